"""Split-wide inference (`pipeline.inference`): per-batch partial results merge to what a pass over
the whole split in memory gives, without Ray (`run_local`) and on Ray workers (slow)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline import inference
from pipeline.errors import UserError

from _targets_helpers import NUM_CLASSES, SUBSETS, make_config, make_inputs, write_dataset, write_teacher


@pytest.fixture()
def run(tmp_path):
    cfg = make_config(str(tmp_path / "run"))
    write_dataset(cfg.stage_uri("data"), [40, 37, 23])
    write_teacher(cfg)
    return cfg


def _batches(x, y, sizes):
    out, start = [], 0
    for n in sizes:
        out.append({"x": x[start:start + n], "y": y[start:start + n]})
        start += n
    assert start == len(x)
    return out


def _job(cfg, stats, **kw):
    from pipeline.teacher_ensemble import resolve_from_config

    if "ensemble" in stats or kw.pop("teacher", False):
        return inference.InferenceJob(stats=stats, teacher=inference.teacher_job_fields(resolve_from_config(cfg)), **kw)
    return inference.InferenceJob(stats=stats, checkpoint=cfg.stage_uri("teacher"), **kw)


def test_moments_merge_to_the_covariance_whatever_the_batches(run):
    from pipeline.models import load_checkpoint
    from specialists.clustering import CovarianceAccumulator

    x, y = make_inputs("val", 150, 3)
    model, _ = load_checkpoint(run.stage_uri("teacher"))
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(x)).double(), 1).numpy()
    acc = CovarianceAccumulator(NUM_CLASSES)
    acc.update(p)
    ref = np.cov(p, rowvar=False, bias=True)
    covs = []
    for sizes, bs in (([150], 1024), ([1, 60, 89], 1024), ([150], 7)):
        total = inference.run_local(_job(run, ("moments",), batch_size=bs), _batches(x, y, sizes))
        assert int(total["mom_n"]) == 150 and total["mom_cross"].dtype == np.float64
        covs.append(inference.covariance_from_moments(total))
    for cov in covs:
        np.testing.assert_allclose(cov, ref, rtol=1e-5, atol=1e-10)  # float32 forwards differ by batch size
        np.testing.assert_allclose(cov, acc.covariance(), rtol=1e-5, atol=1e-10)
    assert np.array_equal(covs[0], covs[0].T)


def test_error_counts_skip_unlabelled_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    got = inference.error_counts(logits, np.array([0, 0, -1, 1]))
    assert (int(got["errors"]), int(got["n"])) == (1, 3)
    with pytest.raises(UserError, match="no labelled"):
        inference.finish_errors({"errors": np.int64(0), "n": np.int64(0)})


def test_evaluate_checkpoint_without_ray_equals_evaluate_on_the_whole_split(run):
    from pipeline.data.shards import load_split
    from pipeline.models import load_checkpoint
    from _reference import plain_error as evaluate

    data = run.stage_uri("data")
    x, y, _ = load_split(data, "train")
    model, _ = load_checkpoint(run.stage_uri("teacher"))
    want = evaluate(model, x, y)
    got = inference.evaluate_checkpoint(run.stage_uri("teacher"), data, "train", batch_size=16, use_ray=False)
    assert got == want
    with pytest.raises(UserError, match="model.json"):
        inference.evaluate_checkpoint(os.path.join(str(data), "nowhere"), data, "train", use_ray=False)


def _reference_ensemble(cfg, x, y):
    """The specialists stage's evaluation as it was: every model over all of x in memory."""
    from pipeline.models import load_checkpoint
    from pipeline.stages.specialists import table4
    from pipeline.teacher_ensemble import resolve_from_config
    from specialists.combine import active_mask, combine

    spec = resolve_from_config(cfg)
    g_model, _ = load_checkpoint(spec.generalist_uri)
    specs = [load_checkpoint(u)[0] for u in spec.specialist_uris]
    with torch.no_grad():
        xt = torch.from_numpy(x)
        g = g_model(xt)
        z = [m(xt) for m in specs]
    act = active_mask(torch.log_softmax(g.double(), 1), SUBSETS, 1)
    log_q = combine(g, z, SUBSETS, dustbin_corrections=spec.corrections, active=act)
    gen_pred, ens_pred = g.argmax(1).numpy(), log_q.argmax(1).numpy()
    gen_ok, ens_ok = gen_pred == y, ens_pred == y
    task_err = []
    for m, s in enumerate(SUBSETS):
        task = np.full(NUM_CLASSES, len(s))
        task[s] = np.arange(len(s))
        zc = z[m].clone()
        zc[:, -1] += spec.corrections[m]
        task_err.append(float((zc.argmax(1).numpy() != task[y]).mean()))
    return {"test_errors": int((~ens_ok).sum()), "generalist_test_errors": int((~gen_ok).sum()),
            "predictions_changed": int((ens_pred != gen_pred).sum()), "fixed": int((ens_ok & ~gen_ok).sum()),
            "broken": int((~ens_ok & gen_ok).sum()), "examples_with_active_specialist": int(act.any(1).sum()),
            "specialist_active": act.sum(0).tolist(), "specialist_task_error": task_err,
            "table4": table4(y, SUBSETS, NUM_CLASSES, gen_ok, ens_ok)}


def test_ensemble_counts_merge_to_the_in_memory_evaluation(run):
    x, y = make_inputs("test", 300, 11)
    ref = _reference_ensemble(run, x, y)
    assert ref["predictions_changed"] > 0  # the specialists change something, so the test means something
    total = inference.run_local(_job(run, ("ensemble",), batch_size=32), _batches(x, y, [100, 1, 199]))
    got = inference.finish_ensemble(total, SUBSETS)
    for k, v in ref.items():
        if k == "specialist_task_error":
            np.testing.assert_allclose(got[k], v)
        else:
            assert got[k] == v, k
    assert got["num_test_examples"] == 300 and got["test_error"] == ref["test_errors"] / 300


def test_teacher_ensemble_scores_and_targets_agree(run):
    """The evaluation and the cache call one ensemble: its log q, whether specialists run on every
    row (evaluation) or only where active (targets), are the same."""
    from pipeline.teacher_ensemble import TeacherEnsemble, resolve_from_config

    x, _ = make_inputs("train", 120, 4)
    ens = TeacherEnsemble(resolve_from_config(run))
    a, b = ens.outputs(x), ens.outputs(x, all_specialists=True)
    torch.testing.assert_close(a.log_q, b.log_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.generalist, b.generalist)
    # uint8 inputs are scaled on the device exactly as prepare_inputs scales them on the CPU.
    from pipeline.models import prepare_inputs
    from pipeline.teacher_ensemble import model_inputs

    u8 = np.arange(24, dtype=np.uint8).reshape(3, 8)
    assert torch.equal(model_inputs(u8, "cpu"), prepare_inputs(u8))


def test_a_damaged_shard_is_named_without_ray(run):
    data = run.stage_uri("data")
    path = os.path.join(data, "train-000001.tar")
    blob = bytearray(open(path, "rb").read())
    blob[600] ^= 0x01
    open(path, "wb").write(bytes(blob))
    with pytest.raises(UserError, match="train-000001.tar"):
        inference.evaluate_checkpoint(run.stage_uri("teacher"), data, "train", use_ray=False)


# ------------------------------------------------------------------------------------------------
# On Ray workers


@pytest.mark.slow
def test_on_ray_workers_the_merged_results_equal_the_local_ones(run, ray_local):
    data = run.stage_uri("data")
    kw = {"batch_size": 16, "actors": 2, "cpus_per_actor": 0.5}
    assert (inference.evaluate_checkpoint(run.stage_uri("teacher"), data, "train", **kw)
            == inference.evaluate_checkpoint(run.stage_uri("teacher"), data, "train", use_ray=False, **kw))
    a = inference.generalist_statistics(run.stage_uri("teacher"), data, "train", **kw)
    b = inference.generalist_statistics(run.stage_uri("teacher"), data, "train", use_ray=False, **kw)
    assert (a["rows"], a["n"], a["errors"]) == (b["rows"], b["n"], b["errors"]) == (100, 100, b["errors"])
    np.testing.assert_allclose(a["covariance"], b["covariance"], atol=1e-12)

    from pipeline.teacher_ensemble import resolve_from_config

    spec = resolve_from_config(run)
    assert inference.evaluate_ensemble(spec, data, "train", **kw) == \
        inference.evaluate_ensemble(spec, data, "train", use_ray=False, **kw)

    # A damaged shard stops the job with a UserError naming it (checked in the read tasks).
    path = os.path.join(data, "train-000002.tar")
    blob = bytearray(open(path, "rb").read())
    blob[600] ^= 0x01
    open(path, "wb").write(bytes(blob))
    with pytest.raises(UserError, match="train-000002.tar"):
        inference.evaluate_checkpoint(run.stage_uri("teacher"), data, "train", **kw)


@pytest.mark.slow
def test_a_local_ray_never_gets_more_replicas_than_it_holds(ray_local):
    assert inference.fit_actors(8, 0.5, 0, "x") == 4
    assert inference.fit_actors(1, 0.5, 0, "x") == 1
    with pytest.raises(UserError, match="GPU"):
        inference.fit_actors(1, 0.5, 1, "inference")


# ------------------------------------------------------------------------------------------------
# The targets stage's device-side encoding equals the cache's reference encoding


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_encode_on_device_equals_layout_encode(top_k, dtype):
    from pipeline import cache
    from pipeline.stages.targets import encode_on_device

    rng = np.random.default_rng(0)
    g = rng.normal(scale=4, size=(50, 7)).astype(np.float32)
    e = torch.log_softmax(torch.from_numpy(rng.normal(scale=3, size=(50, 7)).astype(np.float32)), 1)
    e[0, 2] = -float("inf")  # an exact zero probability is floored, not stored as -inf
    layout = cache.Layout(7, dtype, top_k)
    want = layout.encode(g, e.numpy())
    got = encode_on_device(layout, torch.from_numpy(g), e)
    assert list(got) == list(layout.fields())
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_allclose(got[k].astype(np.float64), want[k].astype(np.float64), rtol=1e-3, atol=1e-3)
    bad = torch.from_numpy(g.copy())
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        encode_on_device(layout, bad, e)
    if dtype == "float16" and top_k is None:
        with pytest.raises(ValueError, match="targets.dtype=float32"):
            encode_on_device(layout, torch.from_numpy(g * 1e5), e)
