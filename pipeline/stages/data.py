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
from pipeline.layout import METRICS_FILE

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


def ingest_source(source: str, out: str, fmt: str, **kw) -> dict:
    """`pipeline.data.ingest.ingest`, with a damaged or truncated archive source (.npz, .tar.gz,
    .gz) reported as a UserError naming it instead of zipfile's/gzip's traceback."""
    import gzip
    import zipfile
    import zlib

    from pipeline.data.ingest import ingest
    from pipeline.errors import UserError

    try:
        return ingest(source, out, fmt, **kw)
    except (zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{source}: truncated or damaged {fmt} file ({type(e).__name__}: {e}); "
                        "download or export it again (a complete copy must open with its own "
                        "tool, e.g. numpy.load for .npz)") from None


def _repair_before_ingest(cfg: Config, out: str) -> None:
    """`--force`: checksum every shard of the dataset already at `out` (as `distill data verify`
    does). A damaged shard of a dataset this stage ingests is removed so that the ingest below
    writes it again (it keeps the intact ones); a damaged shard of a `data.uri` dataset used as it
    is, is a UserError naming it."""
    from pipeline.data.shards import MANIFEST, verify_dataset
    from pipeline.errors import UserError
    from pipeline.log import log

    if not storage.exists(storage.join(out, MANIFEST)):
        return
    report = verify_dataset(out, progress=False)
    damaged = report["damaged_shards"]
    if not damaged:
        log(f"data: --force, all {report['checked']} shards of {out} verified")
        return
    listing = "; ".join(f"{n}: {report['problems'][n]}" for n in damaged)
    if cfg.data.uri:
        raise UserError(f"data.uri {out}: {len(damaged)} damaged shard(s) ({listing}). This run uses the "
                        f"dataset as it is; re-ingest it with `distill data ingest SOURCE {out} --format FMT` "
                        "(it rewrites only damaged or missing shards), or point data.uri at a good copy")
    for name in damaged:  # listed in the manifest this stage wrote: ours to rewrite
        log(f"data: --force, {name} is damaged ({report['problems'][name]}); writing it again")
        storage.remove(storage.join(out, name))


def run(cfg: Config, force: bool = False) -> dict:
    from pipeline.data.ingest import shards_present
    from pipeline.data.shards import MANIFEST, read_manifest
    from pipeline.errors import UserError
    from pipeline.log import log

    out = cfg.stage_uri("data")
    manifest = None
    if force:
        _repair_before_ingest(cfg, out)
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
        manifest = ingest_source(
            source, out, cfg.data.format, val_fraction=cfg.data.val_fraction,
            shard_size=cfg.data.shard_size, seed=cfg.data.seed,
            synthetic_overrides=cfg.data.synthetic if cfg.data.format == "synthetic" else None,
        )
    split = cfg.data.transfer_split
    if split not in manifest["splits"]:
        raise UserError(f"data.transfer_split: '{split}' is not a split of {out}; "
                        f"it has {', '.join(manifest['splits'])}")
    counts = _counts(manifest)
    storage.write_json_atomic(storage.join(out, METRICS_FILE),
                              {"name": manifest.get("name"), **counts,
                               "input_shape": manifest["input_shape"], "dtype": manifest["dtype"]})
    return counts
