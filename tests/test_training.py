"""The one training core (`pipeline.training.run_epochs`) on in-memory streams: it learns, distils,
honours max-norm, jitter and uint8 inputs, and its schedules, optimizers and early stopping behave."""
import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.losses import cross_entropy_loss, kd_loss
from pipeline.models import build_model
from pipeline.training import EarlyStopping, TrainState, epoch_minibatches, make_optimizer, make_scheduler, run_epochs

from _reference import plain_error


def _blobs(n, d=10, c=4, seed=0):
    """Gaussian clusters around well-separated class means: linearly separable in practice."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(c, d)) * 3
    y = rng.integers(0, c, n)
    x = (means[y] + rng.normal(size=(n, d))).astype(np.float32)
    return x, y.astype(np.int64)


def _chunks(arrays: dict, epochs: int, chunk: int = 100, seed: int = 0):
    """What a Ray Data training stream delivers to a worker: per epoch a seeded order, in chunks
    with an `epoch` column."""
    n = len(next(iter(arrays.values())))
    for e in range(epochs):
        perm = np.random.default_rng([seed, e]).permutation(n)
        for s in range(0, n, chunk):
            idx = perm[s:s + chunk]
            yield {**{k: torch.as_tensor(np.asarray(a)[idx]) for k, a in arrays.items()},
                   "epoch": torch.full((len(idx),), e)}


def _fit(model, arrays, tcfg, epochs, bs, loss_fn, **kw):
    steps = len(next(iter(arrays.values()))) // bs
    state = TrainState(model, tcfg, steps, epochs)
    run_epochs(state, epoch_minibatches(_chunks(arrays, epochs), bs, steps, 0), loss_fn, **kw)
    return state


def test_mlp_learns_a_separable_problem_quickly():
    torch.manual_seed(0)
    x, y = _blobs(2000)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    model = build_model({"arch": "mlp", "hidden": [32]}, (10,), 4)
    before = plain_error(model, x_test, y_test)["test_error"]
    cfg = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "cosine"}
    state = _fit(model, {"x": x_train, "y": y_train}, cfg, 3, 64, cross_entropy_loss)
    hist = state.meta["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2] and state.meta["done"]
    res = plain_error(model, x_test, y_test, batch_size=128)
    assert before > 0.5 and res["test_error"] < 0.05  # chance is 0.75
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine ends at 0 after epochs*steps


def test_kd_student_learns_teacher_function_from_logits():
    """The same loop distils: a student fits a teacher's logits on an unlabelled transfer set, with
    the production KD loss (`losses.kd_loss`, no labels: alpha = 1)."""
    torch.manual_seed(1)
    x, y = _blobs(1200, seed=1)
    teacher = build_model({"arch": "mlp", "hidden": [32]}, (10,), 4)
    _fit(teacher, {"x": x, "y": y}, {"optimizer": "adam", "lr": 1e-2}, 3, 64, cross_entropy_loss)
    teacher.eval()
    with torch.no_grad():
        t_logits = teacher(torch.from_numpy(x))
    student = build_model({"arch": "mlp", "hidden": [16]}, (10,), 4)

    def loss_fn(out, batch):
        return kd_loss(out, batch["teacher"], None, T=4.0, alpha=1.0)

    _fit(student, {"x": x, "teacher": t_logits.numpy()}, {"optimizer": "adam", "lr": 1e-2}, 3, 64, loss_fn)
    student.eval()
    with torch.no_grad():
        agree = (student(torch.from_numpy(x)).argmax(1) == t_logits.argmax(1)).float().mean().item()
    assert agree > 0.95


def test_max_norm_holds_after_every_step():
    torch.manual_seed(0)
    x, y = _blobs(256)
    model = build_model({"arch": "mlp", "hidden": [64, 64]}, (10,), 4)
    huge = {"optimizer": "sgd", "lr": 5.0, "momentum": 0.0, "schedule": "constant"}  # huge steps inflate weights
    seen = []

    def loss_fn(out, batch):
        for m in model.body.modules():
            if isinstance(m, torch.nn.Linear):
                seen.append(m.weight.norm(dim=1).max().item())
        return cross_entropy_loss(out, batch)

    _fit(model, {"x": x, "y": y}, {**huge, "max_norm": 1.5}, 1, 32, loss_fn)
    for m in model.body.modules():
        if isinstance(m, torch.nn.Linear):
            assert m.weight.norm(dim=1).max().item() <= 1.5 + 1e-5
    assert max(seen[2:]) <= 1.5 + 1e-5  # forward passes after the first step saw constrained weights
    unconstrained = build_model({"arch": "mlp", "hidden": [64, 64]}, (10,), 4)
    _fit(unconstrained, {"x": x, "y": y}, huge, 1, 32, cross_entropy_loss)
    assert unconstrained.body[1].weight.norm(dim=1).max().item() > 1.5  # the test can fail without max_norm


def test_jitter_and_uint8_inputs_in_the_loop():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(64, 1, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, 64)
    model = build_model({"arch": "cnn", "channels": [4], "hidden": [8]}, (1, 8, 8), 3)
    seen = []

    def loss_fn(out, batch):
        seen.append((batch["x"], batch["y"]))
        return cross_entropy_loss(out, batch)

    state = _fit(model, {"x": x, "y": y}, {"optimizer": "adam", "jitter": 2}, 1, 64, loss_fn)
    assert np.isfinite(state.meta["history"][0]["train_loss"])
    xb, yb = seen[0]
    assert xb.dtype == torch.float32 and xb.shape == (64, 1, 8, 8)
    assert xb.min() >= -1 and xb.max() <= 1
    # Line the batch's rows up with the source rows (the stream shuffles): match on labels + pixels sum.
    order = np.random.default_rng([0, 0]).permutation(64)
    plain = torch.from_numpy(x).float() / 127.5 - 1
    shuffled = plain[torch.from_numpy(order)]
    assert sorted(yb.tolist()) == sorted(y.tolist())
    assert not torch.allclose(xb, shuffled) and not torch.allclose(xb, plain)  # shifted
    same = [(xb[i] == plain[j]).all().item() for i in range(64) for j in range(64)]
    assert sum(same) < 20  # only the (0, 0) draws (~1/25) are left unchanged


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant", "onecycle"])
def test_schedules_per_step(schedule):
    model = torch.nn.Linear(2, 2)
    cfg = {"optimizer": "sgd", "lr": 0.1, "schedule": schedule}
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=10, epochs=4)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if schedule == "constant":
        assert lrs == [0.1] * 40
    elif schedule == "cosine":
        assert lrs[0] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.05) and lrs[-1] < 0.001
    elif schedule == "step":
        assert lrs[19] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01) and lrs[30] == pytest.approx(0.001)
    else:
        peak = int(np.argmax(lrs))
        assert 8 <= peak <= 16 and max(lrs) == pytest.approx(0.1, rel=0.02) and lrs[0] < 0.01 and lrs[-1] < 1e-4


def test_optimizer_choices_and_weight_decay_groups():
    model = build_model({"arch": "cnn", "channels": [4], "hidden": [8]}, (1, 4, 4), 2)
    opt = make_optimizer(model, {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.05})
    assert isinstance(opt, torch.optim.AdamW)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    sgd = make_optimizer(model, {"optimizer": "sgd", "lr": 0.1, "momentum": 0.8, "nesterov": True})
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.8
    with pytest.raises(UserError, match=r"train\.optimizer.*'lbfgs'"):
        make_optimizer(model, {"optimizer": "lbfgs"})
    with pytest.raises(UserError, match=r"train\.schedule"):
        make_scheduler(sgd, {"schedule": "poly"}, 10, 2)


def test_early_stopping_and_resume():
    es = EarlyStopping(patience=2, min_delta=0.01)
    history = [0.5, 0.4, 0.395, 0.41, 0.3, 0.31, 0.305]
    stops = []
    for v in history:
        stops.append(es.step(v))
        if stops[-1]:
            break
    assert stops == [False, False, False, True]  # 0.395 is not better by > 0.01
    assert es.best == 0.4 and es.best_epoch == 1
    # Resume mid-way from state_dict: same decisions as an uninterrupted run.
    a = EarlyStopping(3)
    for v in [0.5, 0.4, 0.45]:
        a.step(v)
    b = EarlyStopping(3)
    b.load_state_dict(a.state_dict())
    assert [a.step(v) for v in [0.42, 0.41]] == [b.step(v) for v in [0.42, 0.41]] == [False, True]
    assert b.best_epoch == 1 and b.epoch == 4
