"""The shared training loop: it learns, honours max-norm and schedules, batches reproducibly."""
import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.losses import cross_entropy_loss, make_kd_batch_loss
from pipeline.models import build_model
from pipeline.training import (
    EarlyStopping,
    evaluate,
    iterate_minibatches,
    make_optimizer,
    make_scheduler,
    predict_logits,
    train_one_epoch,
)


def _blobs(n, d=10, c=4, seed=0):
    """Gaussian clusters around well-separated class means: linearly separable in practice."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(c, d)) * 3
    y = rng.integers(0, c, n)
    x = (means[y] + rng.normal(size=(n, d))).astype(np.float32)
    return x, y.astype(np.int64)


def test_mlp_learns_a_separable_problem_quickly():
    torch.manual_seed(0)
    x, y = _blobs(2000)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    model = build_model({"arch": "mlp", "hidden": [32]}, (10,), 4)
    before = evaluate(model, x_test, y_test)["test_error"]
    cfg = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "cosine"}
    opt = make_optimizer(model, cfg)
    epochs, bs = 3, 64
    sched = make_scheduler(opt, cfg, steps_per_epoch=-(-1500 // bs), epochs=epochs)
    losses = []
    for ep in range(epochs):
        stats = train_one_epoch(model, iterate_minibatches(x_train, y_train, bs, True, 0, ep), opt, cross_entropy_loss, sched)
        assert stats["samples"] == 1500 and stats["steps"] == 24
        losses.append(stats["loss"])
    res = evaluate(model, x_test, y_test, batch_size=128)
    assert res["n"] == 500 and res["test_errors"] == round(res["test_error"] * 500)
    assert before > 0.5 and res["test_error"] < 0.05  # chance is 0.75
    assert losses[-1] < losses[0]
    assert stats["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine ends at 0 after exactly epochs*steps


def test_kd_student_learns_teacher_function_from_logits():
    """The same loop distils: a student fits a teacher's logits on an unlabelled transfer set."""
    torch.manual_seed(1)
    x, y = _blobs(1200, seed=1)
    teacher = build_model({"arch": "mlp", "hidden": [32]}, (10,), 4)
    opt = make_optimizer(teacher, {"optimizer": "adam", "lr": 1e-2})
    for ep in range(3):
        train_one_epoch(teacher, iterate_minibatches(x, y, 64, True, 1, ep), opt, cross_entropy_loss)
    t_logits = predict_logits(teacher, x)
    student = build_model({"arch": "mlp", "hidden": [16]}, (10,), 4)
    opt = make_optimizer(student, {"optimizer": "adam", "lr": 1e-2})
    loss_fn = make_kd_batch_loss(T=4.0, alpha=1.0)
    for ep in range(3):
        train_one_epoch(student, iterate_minibatches(x, None, 64, True, 2, ep, extra={"teacher": t_logits}), opt, loss_fn)
    agree = (predict_logits(student, x).argmax(1) == t_logits.argmax(1)).float().mean().item()
    assert agree > 0.95


def test_max_norm_holds_after_every_step():
    torch.manual_seed(0)
    x, y = _blobs(256)
    model = build_model({"arch": "mlp", "hidden": [64, 64]}, (10,), 4)
    opt = make_optimizer(model, {"optimizer": "sgd", "lr": 5.0, "momentum": 0.0})  # huge steps inflate weights
    seen = []

    def loss_fn(out, batch):
        for m in model.body.modules():
            if isinstance(m, torch.nn.Linear):
                seen.append(m.weight.norm(dim=1).max().item())
        return cross_entropy_loss(out, batch)

    train_one_epoch(model, iterate_minibatches(x, y, 32, True, 0, 0), opt, loss_fn, max_norm=1.5)
    for m in model.body.modules():
        if isinstance(m, torch.nn.Linear):
            assert m.weight.norm(dim=1).max().item() <= 1.5 + 1e-5
    assert max(seen[2:]) <= 1.5 + 1e-5  # forward passes after the first step saw constrained weights
    unconstrained = build_model({"arch": "mlp", "hidden": [64, 64]}, (10,), 4)
    opt = make_optimizer(unconstrained, {"optimizer": "sgd", "lr": 5.0, "momentum": 0.0})
    train_one_epoch(unconstrained, iterate_minibatches(x, y, 32, True, 0, 0), opt, cross_entropy_loss)
    assert unconstrained.body[1].weight.norm(dim=1).max().item() > 1.5  # the test can fail without max_norm


def test_jitter_and_uint8_inputs_in_the_loop():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(64, 1, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, 64)
    model = build_model({"arch": "cnn", "channels": [4], "hidden": [8]}, (1, 8, 8), 3)
    opt = make_optimizer(model, {"optimizer": "adam"})
    seen = []

    def loss_fn(out, batch):
        seen.append(batch["x"])
        return cross_entropy_loss(out, batch)

    g = torch.Generator().manual_seed(0)
    stats = train_one_epoch(model, iterate_minibatches(x, y, 64, False), opt, loss_fn, jitter_pixels=2, generator=g)
    assert np.isfinite(stats["loss"])
    xb = seen[0]
    assert xb.dtype == torch.float32 and xb.shape == (64, 1, 8, 8)
    assert xb.min() >= -1 and xb.max() <= 1
    plain = torch.from_numpy(x).float() / 127.5 - 1
    assert not torch.allclose(xb, plain)  # shifted
    assert (xb == plain).flatten(1).all(1).sum() < 20  # only the (0, 0) draws (~1/25) are unchanged


def test_iterate_minibatches_is_seeded_aligned_and_complete():
    x = np.arange(10 * 2).reshape(10, 2)
    y = np.arange(10)
    extra = {"teacher": torch.arange(10).float()[:, None] * 10}
    a = list(iterate_minibatches(x, y, 4, True, seed=3, epoch=1, extra=extra))
    b = list(iterate_minibatches(x, y, 4, True, seed=3, epoch=1, extra=extra))
    c = list(iterate_minibatches(x, y, 4, True, seed=3, epoch=2, extra=extra))
    assert [len(t["y"]) for t in a] == [4, 4, 2]
    assert all(np.array_equal(s["y"], t["y"]) for s, t in zip(a, b))
    assert not all(np.array_equal(s["y"], t["y"]) for s, t in zip(a, c))
    ys = np.concatenate([t["y"] for t in a])
    assert sorted(ys.tolist()) == list(range(10))
    for t in a:
        assert np.array_equal(t["x"][:, 0] // 2, t["y"])
        assert torch.equal(t["teacher"][:, 0], torch.from_numpy(t["y"]).float() * 10)
    plain = list(iterate_minibatches(x, None, 4, shuffle=False, drop_last=True))
    assert len(plain) == 2 and "y" not in plain[0] and np.array_equal(plain[1]["x"], x[4:8])
    with pytest.raises(ValueError, match="rows"):
        next(iterate_minibatches(x, y[:5], 4, True))


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


def test_predict_logits_restores_mode_and_matches_forward():
    model = build_model({"arch": "mlp", "hidden": [8], "dropout": 0.5}, (3,), 2)
    model.train()
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    out = predict_logits(model, x, batch_size=7)
    assert model.training and out.shape == (50, 2) and out.dtype == torch.float32 and not out.requires_grad
    model.eval()
    torch.testing.assert_close(out, model(torch.from_numpy(x)))
    y = out.argmax(1).numpy()
    y[:5] = 1 - y[:5]
    assert evaluate(model, x, y, batch_size=16) == {"test_error": 0.1, "test_errors": 5, "n": 50}


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
