"""The `data` stage: make sure the run has its dataset shards, ingesting them when needed.

With `data.uri` pointing at an already-ingested dataset (shared by several runs), the stage only
checks that its manifest is readable and every shard it lists is present with the recorded size
(`distill data verify` does the full checksum pass) and uses it as it is. Otherwise it ingests
`data.source` in `data.format` into `cfg.stage_uri("data")`; `ingest` itself skips the work when
that folder already holds the same dataset, and resumes an interrupted ingest.
"""
from __future__ import annotations

from pipeline import storage
from pipeline.config import Config, section_fingerprint

NEEDS_RAY = False


def fingerprint(cfg: Config) -> str:
    d = cfg.data
    # transfer_split chooses what later stages read, not what this stage writes.
    return section_fingerprint(
        "data", d.source, d.format, d.uri, d.val_fraction, d.shard_size, d.seed,
        d.synthetic if d.format == "synthetic" else None,
    )


def _counts(manifest: dict) -> dict:
    out = {s: int(info["num_samples"]) for s, info in manifest["splits"].items()}
    out["num_classes"] = int(manifest["num_classes"])
    return out


def run(cfg: Config) -> dict:
    from pipeline.data.ingest import shards_present, ingest
    from pipeline.data.shards import MANIFEST, read_manifest
    from pipeline.errors import UserError
    from pipeline.runner import log

    out = cfg.stage_uri("data")
    manifest = None
    if cfg.data.uri and storage.exists(storage.join(out, MANIFEST)):
        manifest = read_manifest(out)
        if not shards_present(out, manifest):
            raise UserError(
                f"data.uri {out}: the manifest lists shards that are missing or have the wrong size; "
                f"run `distill data verify {out}` to see which, then re-ingest into it"
            )
        log(f"data: using the dataset at {out} as it is ({manifest.get('name')})")
    else:
        source = cfg.data.source
        if cfg.data.format not in ("synthetic", "digits") and not source:
            raise UserError(f"data.source is empty and {out} holds no dataset; set data.source to the "
                            f"raw {cfg.data.format} data")
        manifest = ingest(
            source, out, cfg.data.format, val_fraction=cfg.data.val_fraction,
            shard_size=cfg.data.shard_size, seed=cfg.data.seed,
            synthetic_overrides=cfg.data.synthetic if cfg.data.format == "synthetic" else None,
        )
    split = cfg.data.transfer_split
    if split not in manifest["splits"]:
        raise UserError(f"data.transfer_split: '{split}' is not a split of {out}; "
                        f"it has {', '.join(manifest['splits'])}")
    counts = _counts(manifest)
    storage.write_json_atomic(storage.join(out, "metrics.json"),
                              {"name": manifest.get("name"), **counts,
                               "input_shape": manifest["input_shape"], "dtype": manifest["dtype"]})
    return counts
