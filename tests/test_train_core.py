"""The one training core (`pipeline.training.TrainState`, `epoch_minibatches`, `run_epochs`) and the
data-parallel planning of `pipeline.ray_train`, without Ray: chunks of an in-memory stream stand in
for a Ray Data training stream (same columns, same epoch tags)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline import models, ray_train, training
from pipeline.errors import UserError


def _stream(x, y, epochs, start=0, chunk=40, seed=0):  # noqa: D401
    """What `datasets.training_stream` + `iter_torch_batches` deliver: per pass a seeded order,
    cut into chunks with an `epoch` column; chunks may straddle passes."""
    rows = []
    for e in range(start, epochs):
        perm = np.random.default_rng([seed, e]).permutation(len(x))
        rows.append((x[perm], y[perm], np.full(len(x), e)))
    X = np.concatenate([r[0] for r in rows])
    Y = np.concatenate([r[1] for r in rows])
    E = np.concatenate([r[2] for r in rows])
    for s in range(0, len(X), chunk):
        yield {"x": torch.from_numpy(X[s:s + chunk]), "y": torch.from_numpy(Y[s:s + chunk]),
               "epoch": torch.from_numpy(E[s:s + chunk])}


def _data(n=130, d=8, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = (rng.normal(size=(n, d)) + y[:, None]).astype(np.float32)
    return x, y.astype(np.int64)


def test_balanced_shards_are_disjoint_even_and_deterministic():
    entries = [{"path": f"s{i}", "num_samples": n} for i, n in enumerate([1000, 1000, 1000, 1000, 1000, 400])]
    a = ray_train.balanced_shards(entries, 2)
    assert a == ray_train.balanced_shards(entries, 2)
    assert sorted(e["path"] for r in a for e in r) == sorted(e["path"] for e in entries)
    assert sorted(sum(e["num_samples"] for e in r) for r in a) == [2400, 3000]
    assert ray_train.steps_per_epoch(a, 64) == 2400 // 64
    with pytest.raises(UserError, match="shard"):
        ray_train.balanced_shards(entries[:1], 2)
    assert ray_train.balanced_shards(entries[:1], 2, allow_empty=True)[1] == []
    with pytest.raises(UserError, match="batch"):
        ray_train.steps_per_epoch([[{"num_samples": 10}]], 64)


def test_epoch_minibatches_give_exact_steps_per_epoch_and_resume_where_they_stood():
    x, y = _data()
    x[:, 0] = np.arange(len(x))  # row ids, to follow the rows
    full = list(training.epoch_minibatches(_stream(x, y, 3), 16, 7, 0, seed=1, window=48))
    assert [e for e, _ in full] == [0] * 7 + [1] * 7 + [2] * 7
    assert all(len(b["x"]) == 16 for _, b in full)
    ids = [b["x"][:, 0].long() for e, b in full if e == 1]
    flat = torch.cat(ids)
    assert len(set(flat.tolist())) == len(flat)  # within an epoch no row twice
    assert all(torch.equal(b["y"], torch.from_numpy(y)[b["x"][:, 0].long()]) for _, b in full)  # rows aligned
    again = list(training.epoch_minibatches(_stream(x, y, 3, chunk=33), 16, 7, 0, seed=1, window=48))
    assert all(torch.equal(p[1]["x"], q[1]["x"]) for p, q in zip(full, again))
    # a resume at epoch 1 step 3 from a stream restarted at epoch 1 gives the rest of the same batches
    resumed = list(training.epoch_minibatches(_stream(x, y, 3, start=1), 16, 7, 1, skip_steps=3, seed=1, window=48))
    assert len(resumed) == len(full) - 10
    assert all(torch.equal(p[1]["x"], q[1]["x"]) for p, q in zip(full[10:], resumed))
    # a worker group restarted inside one fit reads the stream from its start: earlier epochs skipped
    skipped = list(training.epoch_minibatches(_stream(x, y, 3), 16, 7, 2, seed=1, window=48))
    assert all(torch.equal(p[1]["x"], q[1]["x"]) for p, q in zip(full[14:], skipped))


def _train(folder, x, y, stop_at=None, resume=False, epochs=3, steps=7, bs=16):
    torch.manual_seed(0)
    model = models.build_model({"arch": "mlp", "hidden": [16], "dropout": 0.2}, [x.shape[1]], 3)
    tcfg = {"epochs": epochs, "batch_size": bs, "lr": 0.01, "optimizer": "adam", "schedule": "cosine",
            "checkpoint_every_steps": 4, "patience": None}
    state = training.TrainState(model, tcfg, steps, epochs)
    if resume:
        state.load(folder)
        assert state.optimizer_devices_ok()
        assert all(p.device == state.device for p in state.model.parameters())
    batches = training.epoch_minibatches(_stream(x, y, epochs, start=state.next_epoch), bs, steps,
                                         state.next_epoch, int(state.meta.get("step") or 0), seed=0)
    seen = {"n": 0}

    def checkpoint(st, metrics):
        st.save(folder, {"arch": "mlp", "hidden": [16], "dropout": 0.2}, [x.shape[1]], 3)
        seen["n"] += 1
        if stop_at is not None and (st.meta["epoch"] + 1, st.meta["step"]) == stop_at:
            raise KeyboardInterrupt  # the process dies right after this checkpoint

    def evaluate(model):
        with torch.no_grad():
            return float((model(torch.from_numpy(x)).argmax(1).numpy() != y).sum()), float(len(y))

    try:
        training.run_epochs(state, batches, lambda out, b: torch.nn.functional.cross_entropy(out, b["y"]),
                            evaluate=evaluate, checkpoint=checkpoint, seed=0)
    except KeyboardInterrupt:
        return None
    return state


def test_a_run_resumed_from_a_mid_epoch_step_checkpoint_equals_an_uninterrupted_one(tmp_path):
    x, y = _data()
    whole = _train(str(tmp_path / "a"), x, y)
    assert _train(str(tmp_path / "b"), x, y, stop_at=(1, 4)) is None  # killed in epoch 2, step 4
    with open(os.path.join(tmp_path / "b", training.META_FILE)) as f:
        assert '"step": 4' in f.read()
    resumed = _train(str(tmp_path / "b"), x, y, resume=True)
    assert resumed.meta["starts"][-1] == [1, 4]
    for (k, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert [h["train_loss"] for h in whole.meta["history"]] == [h["train_loss"] for h in resumed.meta["history"]]
    assert resumed.meta["best_epoch"] == whole.meta["best_epoch"]


def test_optimizer_state_lands_on_the_parameters_device_after_load(tmp_path):
    x, y = _data()
    state = _train(str(tmp_path / "c"), x, y, epochs=1)
    assert state.optimizer.state  # Adam moments exist
    fresh = training.TrainState(models.build_model({"arch": "mlp", "hidden": [16], "dropout": 0.2}, [8], 3),
                                state.tcfg, 7, 1)
    fresh.load(str(tmp_path / "c"))
    assert fresh.optimizer_devices_ok()
    # a state dict whose tensors live elsewhere than the params is caught by the check
    p = next(iter(fresh.optimizer.state))
    fresh.optimizer.state[p]["exp_avg"] = fresh.optimizer.state[p]["exp_avg"].to("meta")
    assert not fresh.optimizer_devices_ok()


def test_epoch_minibatches_prepare_each_chunk_once_and_cut_the_same_rows():
    """A row-wise `prepare` (the cached KD loss's prepare_chunk) runs once per chunk used and the
    minibatches carry its columns for exactly the rows they would have had without it."""
    x, y = _data()
    x[:, 0] = np.arange(len(x))
    calls = []

    def prepare(chunk):
        calls.append(len(chunk["epoch"]))
        return dict(chunk, twice=chunk["x"][:, 0] * 2)

    plain = list(training.epoch_minibatches(_stream(x, y, 3), 16, 7, 0, seed=1, window=48))
    prepared = list(training.epoch_minibatches(_stream(x, y, 3), 16, 7, 0, seed=1, window=48, prepare=prepare))
    assert len(calls) == len(list(_stream(x, y, 3)))
    assert [e for e, _ in plain] == [e for e, _ in prepared]
    for (_, a), (_, b) in zip(plain, prepared):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
        assert torch.equal(b["twice"], b["x"][:, 0] * 2)
    calls.clear()  # chunks of epochs before start_epoch are skipped unprepared
    list(training.epoch_minibatches(_stream(x, y, 3), 16, 7, 2, seed=1, window=48, prepare=prepare))
    assert sum(calls) <= len(x) + 40
