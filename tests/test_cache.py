"""Soft-target cache format, planning, verification and readers (pipeline/cache/), without Ray.

The Ray Data path of the targets stage is exercised in test_targets_stage.py; here the same
`regenerate` runs its writer in-process (`use_ray=False`) so the format and bookkeeping are tested fast.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import cache, datasets, storage
from pipeline.cache import parquet as cache_parquet
from pipeline.cache import webdataset as cache_webdataset
from pipeline.data import shards, tario
from pipeline.errors import UserError
from pipeline.stages import targets

from _targets_helpers import NUM_CLASSES, SUBSETS, make_config, replace_shard, write_dataset, write_teacher


def _outputs(n=40, c=NUM_CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.normal(scale=3, size=(n, c)).astype(np.float32)
    z = rng.normal(scale=3, size=(n, c))
    e = (z - np.log(np.exp(z).sum(1, keepdims=True))).astype(np.float32)
    return g, e


@pytest.fixture
def run(tmp_path):
    """A run directory with a 3-shard dataset and a generalist + 2 specialists."""
    cfg = make_config(str(tmp_path / "run"))
    write_dataset(cfg.stage_uri("data"), [30, 30, 17])
    write_teacher(cfg)
    return cfg


def _cfg(cfg, **targets_over):
    return cfg.model_copy(update={"targets": cfg.targets.model_copy(update=targets_over)})


def _joined(cache_uri, which="ensemble", fmt=None, shard_indices=None, verify=True):
    """The cache joined with its inputs, read without Ray by the per-shard reader the production
    Ray Data read tasks run (`datasets.cache_items` items, checksums checked, keys compared)."""
    items = datasets.cache_items(cache_uri, which, fmt=fmt, verify=verify)
    if shard_indices is not None:
        items = [items[i] for i in shard_indices]
    parts = [datasets._read_one(it) for it in items]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ------------------------------------------------------------------------------------------------
# Values


def test_dense_encode_keeps_values_and_refuses_non_finite():
    g, e = _outputs()
    e[0, 0] = -np.inf  # a class with probability exactly 0
    f32 = cache.Layout(NUM_CLASSES, "float32").encode(g, e)
    assert np.array_equal(f32["generalist_logits"], g)
    assert f32["ensemble_logprobs"][0, 0] == cache.LOGP_FLOOR  # finite, and exp(floor / T) == 0
    f16 = cache.Layout(NUM_CLASSES, "float16").encode(g, e)
    assert f16["generalist_logits"].dtype == np.float16
    np.testing.assert_allclose(f16["generalist_logits"], g, rtol=1e-3, atol=1e-3)

    bad = g.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        cache.Layout(NUM_CLASSES, "float32").encode(bad, e)
    huge = g.copy()
    huge[1, 1] = 1e6  # fits float32, overflows float16
    with pytest.raises(ValueError, match="float32"):
        cache.Layout(NUM_CLASSES, "float16").encode(huge, e)


def test_topk_holds_the_largest_classes_and_the_exact_tail():
    g, e = _outputs(c=20)
    layout = cache.Layout(20, "float32", top_k=5)
    f = layout.encode(g, e)
    for t, logp in (("generalist", g - np.log(np.exp(g).sum(1, keepdims=True))), ("ensemble", e)):
        idx, val, tail = f[f"{t}_topk_idx"], f[f"{t}_topk_val"], f[f"{t}_tail"]
        assert idx.shape == (40, 5) and idx.dtype == np.int16  # C <= 32767: 2 bytes per index
        want = np.argsort(-logp, axis=1)[:, :5]
        assert np.array_equal(idx, want)
        np.testing.assert_allclose(val, np.take_along_axis(logp, want, 1), atol=1e-5)
        rest = np.exp(logp).sum(1) - np.exp(np.take_along_axis(logp, want, 1)).sum(1)
        np.testing.assert_allclose(np.exp(tail), rest, rtol=1e-4)
        dense = cache.topk_to_dense(idx, val, tail, 20)
        np.testing.assert_allclose(np.exp(dense).sum(1), 1.0, atol=1e-5)
        # torch gives the same
        dt = cache.topk_to_dense(torch.from_numpy(idx), torch.from_numpy(val), torch.from_numpy(tail), 20)
        np.testing.assert_allclose(dt.numpy(), dense, atol=1e-6)
    with pytest.raises(UserError, match="top_k"):
        cache.Layout(20, "float16", top_k=20)


# ------------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("labelled", [True, False])
def test_parquet_and_webdataset_hold_identical_targets(tmp_path, top_k, labelled):
    layout = cache.Layout(NUM_CLASSES, "float16", top_k)
    g, e = _outputs(25)
    fields = layout.encode(g, e)
    keys = [f"train_{i:08d}" for i in range(25)]
    y = np.arange(25) % NUM_CLASSES if labelled else None
    x = np.random.default_rng(1).integers(0, 255, size=(25, 1, 4, 4), dtype=np.uint8)
    files = cache.write_cache_shard(str(tmp_path), "train-000000", ["parquet", "webdataset"], layout, keys, y,
                                    fields, inputs=x)
    assert set(files) == {"parquet", "webdataset"}
    for info in files.values():
        assert storage.sha256_file(str(tmp_path / info["path"])) == info["sha256"]
    p = cache.load_cache_shard(str(tmp_path / "train-000000.parquet"))
    w = cache.load_cache_shard(str(tmp_path / "train-000000.tar"))
    assert list(p["keys"]) == keys == list(w["keys"])
    want_y = y if labelled else np.full(25, -1)
    assert np.array_equal(p["labels"], want_y) and np.array_equal(w["labels"], want_y)
    for name in layout.fields():
        assert p[name].dtype == w[name].dtype == fields[name].dtype
        assert np.array_equal(p[name], fields[name]) and np.array_equal(w[name], fields[name])
    assert np.array_equal(w["inputs"], x)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("labels", ["all", "none", "partial"])
def test_array_built_tar_equals_tarfile_and_reads_back(tmp_path, monkeypatch, top_k, labels):
    """The vectorised tar writer/reader are byte-for-byte the member-by-member tarfile ones."""
    n = 37
    layout = cache.Layout(NUM_CLASSES, "float16", top_k)
    g, e = _outputs(n)
    fields = layout.encode(g, e)
    keys = [f"train_{i:08d}" for i in range(n)]
    y = {"all": np.arange(n) * 7 % 100, "none": None,
         "partial": np.where(np.arange(n) % 3 == 0, -1, np.arange(n) % NUM_CLASSES)}[labels]
    x = np.random.default_rng(2).normal(size=(n, 3, 2)).astype(np.float32)
    cache.write_webdataset(str(tmp_path / "fast.tar"), keys, y, x, fields, layout)
    monkeypatch.setattr(cache_webdataset, "_tar_fast", lambda *a: None)
    cache.write_webdataset(str(tmp_path / "slow.tar"), keys, y, x, fields, layout)
    monkeypatch.undo()
    fast_bytes = (tmp_path / "fast.tar").read_bytes()
    assert fast_bytes == (tmp_path / "slow.tar").read_bytes()
    assert (tario.index_regular_tar(fast_bytes) is not None) == (labels != "partial")
    got = cache.read_webdataset(fast_bytes)
    monkeypatch.setattr(tario, "index_regular_tar", lambda data: None)
    ref = cache.read_webdataset(fast_bytes)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k
    # A damaged header is refused by the array reader (its checksum no longer matches).
    import tarfile

    member = tarfile.open(fileobj=io.BytesIO(fast_bytes)).getmembers()[n]  # a header mid-archive
    bad = bytearray(fast_bytes)
    bad[member.offset + 120] ^= 0x01  # the gid field: only the checksum can tell
    monkeypatch.undo()
    assert tario.index_regular_tar(bytes(bad)) is None


def test_the_format_registry_is_the_one_format_list(tmp_path):
    """Every format is a `CacheFormat` in `cache.REGISTRY`; config validation, file names and the
    readers take the list from there, and each format gives back what was written through it."""
    import typing

    from pipeline.config import TargetsConfig

    assert cache.FORMATS == tuple(cache.REGISTRY) == ("parquet", "webdataset")
    assert typing.get_args(TargetsConfig.model_fields["format"].annotation) == cache.FORMAT_SETTINGS == (
        *cache.FORMATS, "both")
    assert cache.formats_from_setting("both") == list(cache.FORMATS)
    assert cache.formats_from_setting(["webdataset"]) == ["webdataset"]
    with pytest.raises(UserError, match="parquet, webdataset, both"):
        cache.formats_from_setting("csv")
    with pytest.raises(ValueError, match="unknown cache format"):
        cache.get_format("csv")
    layout = cache.Layout(NUM_CLASSES, "float16", 3)
    g, e = _outputs(6)
    fields = layout.encode(g, e)
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    keys = [f"train_{i:08d}" for i in range(6)]
    for name, fmt in cache.REGISTRY.items():
        assert fmt.name == name and cache.shard_file_name("train-000000", name) == "train-000000" + fmt.extension
        assert cache.format_of(str(tmp_path / ("train-000000" + fmt.extension))) == name
        path = str(tmp_path / ("one" + fmt.extension))
        fmt.write(path, keys, np.arange(6) % NUM_CLASSES, fields, layout, inputs=x)
        got = cache.read_shard(open(path, "rb").read(), name)
        assert list(got["keys"]) == keys and all(np.array_equal(got[k], v) for k, v in fields.items())
        assert ("inputs" in got) == fmt.carries_inputs  # a format without inputs is joined when read
        if fmt.carries_inputs:
            assert np.array_equal(got["inputs"], x)
    with pytest.raises(UserError, match="not a cache shard"):
        cache.format_of("train-000000.csv")


def test_importing_the_cache_loads_no_torch_ray_or_pyarrow():
    """The CLI's `targets verify` / `regen` checks start fast: the package imports only numpy and
    fsspec; pyarrow loads when a Parquet file is touched, torch only with torch inputs."""
    import subprocess
    import sys

    code = ("import sys; from pipeline import cache; import numpy as np; "
            "cache.topk_to_dense(np.zeros((1, 1), np.int16), np.zeros((1, 1), np.float32), np.zeros(1), 3); "
            "heavy = [m for m in ('torch', 'ray', 'pyarrow') if m in sys.modules]; assert not heavy, heavy")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_parquet_schema_is_fixed_width(tmp_path):
    layout = cache.Layout(NUM_CLASSES, "float16")
    g, e = _outputs(10)
    cache.write_cache_shard(str(tmp_path), "train-000003", ["parquet"], layout, [f"k{i}" for i in range(10)],
                            None, layout.encode(g, e))
    schema = pq.read_schema(str(tmp_path / "train-000003.parquet"))
    assert schema.field("key").type == pa.string()
    assert schema.field("label").type == pa.int32()
    assert schema.field("generalist_logits").type == pa.list_(pa.float16(), NUM_CLASSES)
    assert schema.field("ensemble_logprobs").type == pa.list_(pa.float16(), NUM_CLASSES)
    table = pq.read_table(str(tmp_path / "train-000003.parquet"))
    assert table.column("label").null_count == 10
    assert schema.metadata[b"distill.num_classes"] == str(NUM_CLASSES).encode()


def test_webdataset_cache_is_readable_by_the_webdataset_library(tmp_path):
    wds = pytest.importorskip("webdataset")
    layout = cache.Layout(NUM_CLASSES, "float32")
    g, e = _outputs(8)
    x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    y = np.arange(8) % NUM_CLASSES
    cache.write_cache_shard(str(tmp_path), "train-000000", ["webdataset"], layout, [f"train_{i:08d}" for i in range(8)],
                            y, layout.encode(g, e), inputs=x)
    samples = list(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False).decode())
    assert len(samples) == 8
    for i, s in enumerate(samples):
        assert s["__key__"] == f"train_{i:08d}"
        assert int(s["cls"]) == y[i]
        assert np.array_equal(s["input.npy"], x[i])
        assert np.array_equal(s["targets.npy"]["generalist_logits"], g[i])
        assert np.array_equal(s["targets.npy"]["ensemble_logprobs"], e[i])


@pytest.mark.parametrize("top_k", [None, 4])
def test_webdataset_holds_one_member_per_sample_for_all_targets(tmp_path, top_k):
    """Targets cost one tar member per sample (a 512-byte header + data in 512-byte blocks), not one
    per field: with labels and inputs that is 3 members per sample, and the record's dtype is the
    layout's fields in order."""
    n = 11
    layout = cache.Layout(NUM_CLASSES, "float16", top_k)
    g, e = _outputs(n)
    fields = layout.encode(g, e)
    x = np.random.default_rng(0).normal(size=(n, 5)).astype(np.float32)
    cache.write_cache_shard(str(tmp_path), "train-000000", ["webdataset"], layout,
                            [f"train_{i:08d}" for i in range(n)], np.arange(n) % NUM_CLASSES, fields, inputs=x)
    with tarfile.open(str(tmp_path / "train-000000.tar")) as tar:
        names = tar.getnames()
        rec = np.load(io.BytesIO(tar.extractfile(names[2]).read()), allow_pickle=False)
    assert len(names) == 3 * n
    assert [nm.split(".", 1)[1] for nm in names[:3]] == ["cls", "input.npy", "targets.npy"]
    assert rec.shape == () and rec.dtype == layout.record_dtype() and list(rec.dtype.names) == list(layout.fields())
    for name in layout.fields():
        assert np.array_equal(rec[name], fields[name][0])
    size = os.path.getsize(tmp_path / "train-000000.tar")
    one = 512 + -(-(128 + layout.record_dtype().itemsize) // 512) * 512
    assert size <= n * (1024 + 512 + -(-(128 + 20) // 512) * 512 + one) + 10240  # cls + input + targets


def test_topk_indices_are_int32_only_when_int16_cannot_hold_them():
    assert cache.Layout(32767, "float16", 8).fields()["ensemble_topk_idx"][0] == np.int16
    big = cache.Layout(40000, "float16", 3)
    assert big.fields()["ensemble_topk_idx"][0] == np.int32
    g = np.zeros((2, 40000), np.float32)
    g[:, 39999] = 5.0
    f = big.encode(g, _log_softmax_np(g))
    assert f["generalist_topk_idx"].dtype == np.int32 and (f["generalist_topk_idx"][:, 0] == 39999).all()
    assert f["generalist_topk_val"].dtype == np.float16


def _log_softmax_np(z):
    m = z.max(1, keepdims=True)
    return (z - m - np.log(np.exp(z - m).sum(1, keepdims=True))).astype(np.float32)


def test_format_1_shards_still_read_and_format_1_caches_ask_for_regen(tmp_path):
    """Version 1 wrote one member per field; its shards still decode to the same keys, and a cache
    whose manifest says version 1 is refused with the command that rebuilds it."""
    n = 4
    g, e = _outputs(n)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            for sfx, arr in (("generalist_logits.npy", g[i].astype(np.float16)),
                             ("ensemble_logprobs.npy", e[i].astype(np.float16))):
                b = io.BytesIO()
                np.save(b, arr)
                info = tarfile.TarInfo(f"train_{i:08d}.{sfx}")
                info.size = len(b.getvalue())
                tar.addfile(info, io.BytesIO(b.getvalue()))
    got = cache.read_webdataset(buf.getvalue())
    assert list(got["keys"]) == [f"train_{i:08d}" for i in range(n)]
    assert np.array_equal(got["generalist_logits"], g.astype(np.float16))
    assert np.array_equal(got["ensemble_logprobs"], e.astype(np.float16))
    storage.write_json_atomic(str(tmp_path / "manifest.json"), {"kind": cache.KIND, "format_version": 1})
    with pytest.raises(UserError, match=r"format version 1.*regen"):
        cache.read_manifest(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# The teacher ensemble


def test_teacher_ensemble_matches_the_reference_combination(run):
    from pipeline.models import load_checkpoint
    from pipeline.teacher_ensemble import TeacherEnsemble, resolve_from_config
    from specialists.combine import combine

    from _targets_helpers import make_inputs

    x, _ = make_inputs("train", 200, 5)
    ens = TeacherEnsemble(resolve_from_config(run))
    g, logq = ens(x)
    # Reference: every specialist on every row, as the specialists stage evaluates the ensemble.
    gen, _ = load_checkpoint(run.stage_uri("teacher"))
    specs = [load_checkpoint(u) for u in ens.spec.specialist_uris]
    with torch.no_grad():
        xt = torch.from_numpy(x)
        g_ref = gen(xt)
        s_ref = [m(xt) for m, _ in specs]
    ref = combine(g_ref, s_ref, SUBSETS, top_n=1, dustbin_corrections=[m["extra"]["dustbin_correction"] for _, m in specs])
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(logq, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(logq.exp().sum(1), torch.ones(200), atol=1e-5)
    # Samples whose top class no specialist covers keep the generalist's distribution.
    uncovered = ~torch.isin(g.argmax(1), torch.tensor([c for s in SUBSETS for c in s]))
    assert uncovered.any()
    torch.testing.assert_close(logq[uncovered], torch.log_softmax(g[uncovered], 1), atol=1e-5, rtol=1e-5)
    # ... and the others differ from it: the specialists changed something.
    assert not torch.allclose(logq[~uncovered], torch.log_softmax(g[~uncovered], 1), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Regeneration, in-process


def _regen(cfg, **kw):
    return targets.regenerate(cfg, progress=False, use_ray=False, **kw)


def _flip_byte(path, offset=None):
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_regen_cases_in_process(run):
    cache_uri = run.stage_uri("targets")
    r = _regen(run)
    assert (r["checked"], r["rewritten"], r["kept"], r["missing"]) == (3, 3, 0, 3)
    m = cache.read_manifest(cache_uri)
    assert m["num_samples"] == 77 and [s["name"] for s in m["shards"]] == ["train-000000", "train-000001", "train-000002"]
    assert set(m["fingerprints"]) == {"teacher", "specialists", "combination", "teacher_fingerprint"}
    metrics = storage.read_json(os.path.join(cache_uri, "metrics.json"))
    assert (metrics["num_samples"], metrics["rewritten"], metrics["samples_written"]) == (77, 3, 77)
    marker = storage.read_json(os.path.join(cache_uri, "_stage.json"))
    assert marker["fingerprint"] == targets.fingerprint(run)  # `distill run` will skip the stage
    untouched = {n: os.stat(os.path.join(cache_uri, n)).st_mtime_ns for n in os.listdir(cache_uri)
                 if os.path.isfile(os.path.join(cache_uri, n))}

    r = _regen(run)
    assert (r["rewritten"], r["kept"]) == (0, 3)
    assert {n: os.stat(os.path.join(cache_uri, n)).st_mtime_ns for n in untouched} == untouched  # nothing written

    replace_shard(run.stage_uri("data"), "train", 1, seed=99)
    r = _regen(run)
    assert (r["rewritten"], r["stale"], r["kept"], r["rewritten_shards"]) == (1, 1, 2, ["train-000001"])

    write_teacher(run, seed=7)  # a new generalist and specialists
    r = _regen(run)
    assert (r["rewritten"], r["stale"]) == (3, 3)

    run2 = run.model_copy(update={"specialists": run.specialists.model_copy(update={"top_n": 2})})
    assert _regen(run2)["rewritten"] == 3  # combination parameters are part of the fingerprint
    assert cache.verify_cache(cache_uri)["damaged"] == 0


def test_an_up_to_date_cache_is_checked_without_loading_torch(run, tmp_path):
    """`distill targets regen` on a fresh cache only hashes files: no weights, no torch, no Ray."""
    import subprocess
    import sys

    import yaml

    _regen(run)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(run.model_dump(mode="json")))
    code = ("import json, sys; from pipeline.cli import main; rc = main(['targets', 'regen', sys.argv[1], '--json']); "
            "assert rc == 0; assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'heavy import'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, str(cfg_path)], capture_output=True, text=True, cwd=root,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert (report["rewritten"], report["kept"]) == (0, 3)


def test_flipped_byte_is_named_by_verify_and_rewritten_alone(run):
    cache_uri = run.stage_uri("targets")
    _regen(run)
    assert cache.verify_cache(cache_uri)["damaged"] == 0
    _flip_byte(os.path.join(cache_uri, "train-000002.parquet"))
    rep = cache.verify_cache(cache_uri)
    assert rep["damaged"] == 1 and rep["damaged_shards"] == ["train-000002"]
    assert "sha256" in rep["problems"]["train-000002"]
    r = _regen(run)
    assert (r["rewritten"], r["damaged"], r["kept"], r["damaged_shards"]) == (1, 1, 2, ["train-000002"])
    assert cache.verify_cache(cache_uri)["damaged"] == 0


def test_verify_checks_keys_values_and_rows_not_only_checksums(run, tmp_path):
    """A file rewritten with a matching checksum in the manifest but wrong content is still caught."""
    cache_uri = run.stage_uri("targets")
    _regen(run)
    manifest = cache.read_manifest(cache_uri)
    layout = cache.layout_of(manifest)

    def rewrite(name, mutate):
        path = os.path.join(cache_uri, f"{name}.parquet")
        arrays = cache.read_parquet(path)
        keys, labels = list(arrays["keys"]), arrays["labels"]
        fields = {k: arrays[k] for k in layout.fields()}
        keys, labels, fields = mutate(keys, labels, fields)
        cache.write_parquet(path, keys, labels, fields, layout)
        for e in manifest["shards"]:
            if e["name"] == name:
                e["files"]["parquet"]["sha256"] = storage.sha256_file(path)

    def swap(keys, labels, fields):
        order = np.r_[1, 0, 2:len(keys)]
        return [keys[i] for i in order], labels[order], {k: v[order] for k, v in fields.items()}

    def nan(keys, labels, fields):
        fields["generalist_logits"] = fields["generalist_logits"].copy()
        fields["generalist_logits"][4, 1] = np.nan
        return keys, labels, fields

    def drop(keys, labels, fields):
        return keys[:-1], labels[:-1], {k: v[:-1] for k, v in fields.items()}

    rewrite("train-000000", swap)
    rewrite("train-000001", nan)
    rewrite("train-000002", drop)
    storage.write_json_atomic(cache.manifest_uri(cache_uri), manifest)
    rep = cache.verify_cache(cache_uri)
    assert rep["damaged_shards"] == ["train-000000", "train-000001", "train-000002"]
    assert "keys differ" in rep["problems"]["train-000000"]
    assert "non-finite" in rep["problems"]["train-000001"]
    assert "rows" in rep["problems"]["train-000002"]


def test_readers_refuse_a_damaged_shard(run):
    _regen(run)
    _flip_byte(os.path.join(run.stage_uri("targets"), "train-000001.parquet"))
    with pytest.raises(UserError, match="train-000001.parquet.*damaged"):
        _joined(run.stage_uri("targets"))
    assert len(_joined(run.stage_uri("targets"), shard_indices=[0, 2])["x"]) == 47


def test_verify_reports_missing_files_and_missing_manifest(run):
    cache_uri = run.stage_uri("targets")
    _regen(run)
    os.remove(os.path.join(cache_uri, "train-000001.parquet"))
    rep = cache.verify_cache(cache_uri)
    assert rep["damaged_shards"] == ["train-000001"] and "missing" in rep["problems"]["train-000001"]
    os.remove(os.path.join(cache_uri, "manifest.json"))
    with pytest.raises(UserError, match="regen"):
        cache.verify_cache(cache_uri)
    with pytest.raises(UserError, match="manifest"):
        _joined(cache_uri)
    r = _regen(run)
    assert (r["rewritten"], r["missing"], r["kept"]) == (1, 1, 2)


def test_a_crash_mid_write_leaves_no_partial_shard_and_a_rerun_finishes(run, monkeypatch):
    cache_uri = run.stage_uri("targets")
    _regen(run)  # a complete cache, then a new teacher: every shard must be rewritten
    write_teacher(run, seed=3)
    real = cache_parquet.write_parquet
    calls = {"n": 0}

    def dying(path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # half a file on disk, then the process "dies"
            with open(path, "wb") as f:
                f.write(b"PAR1 partial")
            raise KeyboardInterrupt("killed")
        return real(path, *a, **k)

    monkeypatch.setattr(cache_parquet, "write_parquet", dying)
    with pytest.raises(KeyboardInterrupt):
        _regen(run)
    monkeypatch.setattr(cache_parquet, "write_parquet", real)
    names = sorted(os.listdir(cache_uri))
    assert "manifest.json" not in names  # the cache reads as incomplete
    assert not [n for n in names if n.startswith(".tmp")]
    for n in names:
        if n.endswith(".parquet"):  # every visible shard is a complete Parquet file
            pq.read_table(os.path.join(cache_uri, n))
    with pytest.raises(UserError, match="interrupted"):
        cache.read_manifest(cache_uri)
    r = _regen(run)
    assert r["kept"] == 1 and r["rewritten"] == 2  # the shard finished before the crash is kept
    assert cache.verify_cache(cache_uri)["damaged"] == 0


def test_format_changes_write_only_what_is_missing(run):
    cache_uri = run.stage_uri("targets")
    _regen(run)
    sha = {e["name"]: e["files"]["parquet"]["sha256"] for e in cache.read_manifest(cache_uri)["shards"]}
    both = _cfg(run, format="both")
    r = _regen(both)
    assert (r["rewritten"], r["missing"]) == (3, 3)
    m = cache.read_manifest(cache_uri)
    assert m["formats"] == ["parquet", "webdataset"]
    assert {e["name"]: e["files"]["parquet"]["sha256"] for e in m["shards"]} == sha  # parquet untouched
    assert cache.verify_cache(cache_uri)["damaged"] == 0
    r = _regen(run)  # back to parquet only: nothing recomputed, the tars are deleted
    assert (r["rewritten"], r["kept"], r["removed"]) == (0, 3, 3)
    assert not [n for n in os.listdir(cache_uri) if n.endswith(".tar")]
    assert _regen(_cfg(run, dtype="float32"))["rewritten"] == 3


def test_shards_of_vanished_inputs_are_removed(run):
    cache_uri = run.stage_uri("targets")
    _regen(run)
    shutil.rmtree(run.stage_uri("data"))
    write_dataset(run.stage_uri("data"), [30, 30])  # same first two shards, third gone
    r = _regen(run)
    assert (r["checked"], r["rewritten"], r["kept"], r["removed"]) == (2, 0, 2, 2)  # parquet + its _parts entry
    assert sorted(n for n in os.listdir(cache_uri) if n.endswith(".parquet")) == ["train-000000.parquet", "train-000001.parquet"]
    assert cache.read_manifest(cache_uri)["num_samples"] == 60


def test_unlabelled_transfer_set(tmp_path):
    cfg = make_config(str(tmp_path / "run"), format="both")
    write_dataset(cfg.stage_uri("data"), [20, 15], labelled=False)
    write_teacher(cfg)
    assert _regen(cfg)["rewritten"] == 2
    assert cache.verify_cache(cfg.stage_uri("targets"))["damaged"] == 0
    table = pq.read_table(os.path.join(cfg.stage_uri("targets"), "train-000000.parquet"))
    assert table.column("label").null_count == 20
    for fmt in ("parquet", "webdataset"):
        j = _joined(cfg.stage_uri("targets"), fmt=fmt)
        assert (j["y"] == -1).all() and j["x"].shape == (35, 8) and j["teacher"].shape == (35, NUM_CLASSES)


def test_regen_refuses_to_write_into_the_dataset_or_a_foreign_folder(run, tmp_path):
    with pytest.raises(UserError, match="dataset's folder"):
        _regen(_cfg(run, uri=run.stage_uri("data")))
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"splits": {}}))
    with pytest.raises(UserError, match="not a soft-target cache"):
        _regen(_cfg(run, uri=str(other)))
    assert (other / "manifest.json").exists()


def test_fingerprint_ignores_execution_settings(run):
    fp = targets.fingerprint(run)
    assert targets.fingerprint(_cfg(run, num_actors=4, batch_size=7, cpus_per_actor=2)) == fp
    assert targets.fingerprint(_cfg(run, dtype="float32")) != fp
    write_teacher(run, seed=11)  # same config, new weights
    assert targets.fingerprint(run) != fp


# ------------------------------------------------------------------------------------------------
# Readers


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_joined_reader_aligns_inputs_labels_and_targets(run, fmt):
    cfg = _cfg(run, format="both")
    _regen(cfg)
    cache_uri = cfg.stage_uri("targets")
    x, y, keys = shards.load_split(cfg.stage_uri("data"), "train")
    j = _joined(cache_uri, which="ensemble", fmt=fmt)
    assert np.array_equal(j["x"], x) and np.array_equal(j["y"], y) and list(j["key"]) == list(keys)
    assert j["teacher"].shape == (77, NUM_CLASSES)
    np.testing.assert_allclose(np.exp(j["teacher"].astype(np.float32)).sum(1), 1.0, atol=2e-2)  # log-probs
    g = _joined(cache_uri, which="generalist", fmt=fmt, shard_indices=[1])
    assert np.array_equal(g["x"], x[30:60]) and list(g["key"]) == list(keys[30:60])
    stored = cache.load_cache_shard(storage.join(cache_uri, cache.shard_file_name("train-000001", fmt)))
    assert np.array_equal(g["teacher"], stored["generalist_logits"])  # the generalist's raw logits


def test_joined_reader_refuses_a_cache_from_other_inputs(run):
    _regen(run)
    # The dataset is rebuilt with the same sizes but other keys: the join must fail loudly.
    entry = shards.read_manifest(run.stage_uri("data"))["splits"]["train"]["shards"][0]
    x, y, keys = shards.load_shard(storage.join(run.stage_uri("data"), entry["path"]))
    storage.write_bytes_atomic(storage.join(run.stage_uri("data"), entry["path"]),
                               shards.encode_shard(x, y, [k.replace("train", "other") for k in keys]))
    with pytest.raises(UserError, match="sha256 differs"):  # the input shard is not the one the cache was made from
        _joined(run.stage_uri("targets"))
    with pytest.raises(UserError, match="keys do not match"):  # and without checksums, the keys tell
        _joined(run.stage_uri("targets"), verify=False)


def test_topk_cache_end_to_end(run):
    cfg = _cfg(run, top_k=2, format="both")
    r = _regen(cfg)
    assert r["rewritten"] == 3
    cache_uri = cfg.stage_uri("targets")
    assert cache.verify_cache(cache_uri)["damaged"] == 0
    j = _joined(cache_uri, fmt="webdataset")
    assert j["teacher_topk_idx"].shape == (77, 2) and j["teacher_tail"].shape == (77,) and "teacher" not in j
    p = _joined(cache_uri, fmt="parquet")
    for k in ("teacher_topk_idx", "teacher_topk_val", "teacher_tail", "x", "y"):
        assert np.array_equal(p[k], j[k]), k
    dense = cache.topk_to_dense(*(torch.from_numpy(j[k][:16]) for k in ("teacher_topk_idx", "teacher_topk_val",
                                                                       "teacher_tail")), NUM_CLASSES)
    assert dense.shape == (16, NUM_CLASSES)
    torch.testing.assert_close(dense.exp().sum(1), torch.ones(16), atol=2e-3, rtol=0)
