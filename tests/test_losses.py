"""KD losses against an independent float64 numpy reference, and the paper's gradient properties.

`kd_loss` is tested directly and through `pipeline.losses.make_loss`, the loss_fn the student
and every tuning trial train with."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cache import topk_to_dense
from pipeline.losses import _log_softmax, cross_entropy_loss, kd_loss


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _reference(zs, zt, labels, T, alpha):
    """Hinton et al.'s loss with explicit sums in float64: alpha T^2 KL(p_T||q_T) + (1-alpha) CE."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    p, q = _softmax(zt / T), _softmax(zs / T)
    kl = 0.0
    for b in range(zs.shape[0]):
        for c in range(zs.shape[1]):
            if p[b, c] > 0:
                kl += p[b, c] * (math.log(p[b, c]) - math.log(q[b, c]))
    kl /= zs.shape[0]
    if labels is None:
        return T * T * kl
    q1 = _softmax(zs)
    ce = -np.mean([math.log(q1[b, labels[b]]) for b in range(zs.shape[0])])
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(6, 5, generator=g) * 3
    zt = torch.randn(6, 5, generator=g) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    return zs, zt, y


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.5, 0.9), (20.0, 0.3), (4.0, 1.0), (0.5, 0.7)])
def test_matches_float64_reference(logits, T, alpha):
    zs, zt, y = logits
    got = kd_loss(zs, zt, y, T, alpha)
    want = _reference(zs.numpy(), zt.numpy(), y.numpy(), T, alpha)
    assert got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy(logits):
    zs, zt, y = logits
    assert kd_loss(zs, zt, y, T=7.0, alpha=0.0).item() == pytest.approx(F.cross_entropy(zs, y).item(), rel=1e-6)


def test_unlabelled_transfer_set_uses_soft_term_only(logits):
    zs, zt, _ = logits
    got = kd_loss(zs, zt, None, T=3.0, alpha=0.2)
    assert got.item() == pytest.approx(_reference(zs.numpy(), zt.numpy(), None, 3.0, 0.2), rel=1e-5)


def test_logprob_teacher_equals_logit_teacher(logits):
    """softmax(log_softmax(z)/T) == softmax(z/T): the cache may hold either."""
    zs, zt, y = logits
    a = kd_loss(zs, zt, y, 4.0, 0.7)
    b = kd_loss(zs, F.log_softmax(zt, -1), y, 4.0, 0.7, teacher_is_log_probs=True)
    c = kd_loss(zs, F.log_softmax(zt, -1).half(), y, 4.0, 0.7, teacher_is_log_probs=True)  # float16 cache
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    assert c.item() == pytest.approx(a.item(), rel=1e-2)


def test_zero_probability_classes_give_finite_loss_and_grad():
    zs = torch.randn(3, 4, requires_grad=True)
    logp = torch.log(torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]))
    loss = kd_loss(zs, logp, None, T=1.0, alpha=1.0, teacher_is_log_probs=True)
    loss.backward()
    want = _reference(zs.detach().numpy(), np.log(np.clip(logp.double().exp().numpy(), 1e-300, None)), None, 1.0, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    assert loss.item() == pytest.approx(want, rel=1e-5)


def _soft_grad(zs, zt, T, with_t2):
    zs = zs.clone().requires_grad_(True)
    loss = kd_loss(zs, zt, None, T, 1.0) / (1.0 if with_t2 else T * T)  # T^2 KL, or KL alone
    loss.backward()
    return zs.grad


def test_soft_gradient_scales_as_inverse_t_squared_and_t2_restores_it():
    """d/dz [T^2 KL] = T (q - p) / B; at high T with zero-mean logits q - p ~ (z - v)/(C T), so the
    gradient tends to (z - v) / (C B) (logit matching): O(1) in T with the factor, 1/T^2 without."""
    g = torch.Generator().manual_seed(1)
    B, C = 8, 10
    zs = torch.randn(B, C, generator=g)
    zt = torch.randn(B, C, generator=g)
    zs, zt = zs - zs.mean(1, keepdim=True), zt - zt.mean(1, keepdim=True)
    limit = (zs - zt) / (C * B)

    g20, g40 = _soft_grad(zs, zt, 20.0, True), _soft_grad(zs, zt, 40.0, True)
    torch.testing.assert_close(g20, limit, rtol=0.1, atol=0.05 * limit.abs().max().item())
    torch.testing.assert_close(g40, limit, rtol=0.05, atol=0.025 * limit.abs().max().item())
    # The approximation error shrinks as T grows (it is O(1/T)).
    assert (g40 - limit).norm() < (g20 - limit).norm()

    n20, n40 = _soft_grad(zs, zt, 20.0, False).norm(), _soft_grad(zs, zt, 40.0, False).norm()
    assert (n20 / n40).item() == pytest.approx(4.0, rel=0.05)
    assert (g20.norm() / g40.norm()).item() == pytest.approx(1.0, rel=0.05)


def _autograd_reference(zs, zt, labels, T, alpha):
    """The textbook composition (log_softmax, kl_div, cross_entropy) that autograd differentiates."""
    log_p = F.log_softmax(zt.float() / T, -1).clamp_min(torch.finfo(torch.float32).min)
    soft = F.kl_div(F.log_softmax(zs.float() / T, -1), log_p, reduction="batchmean", log_target=True)
    if labels is None:
        return T * T * soft
    return alpha * T * T * soft + (1 - alpha) * F.cross_entropy(zs.float(), labels)


@pytest.mark.parametrize("C", [2, 3, 12, 15, 16, 40])
@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.7), (4.0, 1.0), (0.5, 0.0), (3.0, 0.3)])
def test_fused_loss_and_gradient_match_autograd(C, T, alpha):
    """The fused loss computes its own gradient: it must equal autograd's through the composition,
    for every class count (the CPU row-width special case included), with and without labels."""
    g = torch.Generator().manual_seed(C)
    zs = (torch.randn(17, C, generator=g) * 3).requires_grad_(True)
    zt = (torch.randn(17, C, generator=g) * 3).half()
    zt[0, 1] = float("-inf")  # a class of zero teacher mass
    y = torch.randint(0, C, (17,), generator=g)
    for labels in (y, None):
        want = _autograd_reference(zs, zt, labels, T, alpha)
        (g_want,) = torch.autograd.grad(want, zs)
        got = kd_loss(zs, zt, labels, T, alpha)
        (g_got,) = torch.autograd.grad(got, zs)
        assert torch.isfinite(got) and torch.isfinite(g_got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)


def test_fused_gradient_passes_gradcheck_in_float64():
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    zt = torch.randn(6, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    for T, alpha, labels in ((2.5, 0.6, y), (1.0, 0.6, y), (1.7, 0.2, None), (3.0, 0.0, y)):
        assert torch.autograd.gradcheck(lambda z: 3.0 * kd_loss(z, zt, labels, T, alpha), (zs,))


def test_half_precision_student_gets_half_gradients():
    zs = torch.randn(4, 12).half().requires_grad_(True)
    loss = kd_loss(zs, torch.randn(4, 12), torch.randint(0, 12, (4,)), 2.0, 0.5)
    loss.backward()
    assert loss.dtype == torch.float16 and zs.grad.dtype == torch.float16 and torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("C", [1, 2, 3, 12, 15, 16, 100])
def test_row_log_softmax_equals_torch(C):
    x = torch.randn(33, C) * 4
    torch.testing.assert_close(_log_softmax(x), F.log_softmax(x, 1))


def test_topk_with_k_equal_c_minus_one_and_exact_tail_is_the_dense_loss(logits):
    """The one densifier (`cache.topk_to_dense`) spreads the cache's stored tail mass: with a single
    class outside the top k it recovers the dense teacher exactly."""
    zs, zt, y = logits
    logp = F.log_softmax(zt, -1)
    order = torch.argsort(logp, dim=1, descending=True)
    idx, val = order[:, :4], logp.gather(1, order[:, :4])
    tail = logp.gather(1, order[:, 4:]).squeeze(1)  # log of the mass outside the top 4
    dense = topk_to_dense(idx, val, tail, 5)
    torch.testing.assert_close(dense, logp)
    top = kd_loss(zs, dense, y, 3.0, 0.8, teacher_is_log_probs=True)
    assert top.item() == pytest.approx(kd_loss(zs, logp, y, 3.0, 0.8).item(), rel=1e-6)


def test_topk_spreads_tail_uniformly_hand_example():
    # Teacher: p = [0.5, ?, 0.3, ?] with tail 0.2 over classes 1 and 3 -> dense [0.5, 0.1, 0.3, 0.1].
    idx = torch.tensor([[2, 0]], dtype=torch.int16)  # the cache stores int16 indices for C <= 32767
    logp = torch.log(torch.tensor([[0.3, 0.5]])).half()
    tail = torch.log(torch.tensor([0.2]))
    dense = topk_to_dense(idx, logp, tail, 4)
    np.testing.assert_allclose(dense.exp().numpy(), [[0.5, 0.1, 0.3, 0.1]], rtol=1e-3)
    zs = torch.tensor([[1.0, -0.5, 0.25, 2.0]])
    got = kd_loss(zs, dense, torch.tensor([3]), T=2.0, alpha=0.6, teacher_is_log_probs=True)
    want = _reference(zs.numpy(), np.log([[0.5, 0.1, 0.3, 0.1]]), [3], 2.0, 0.6)
    assert got.item() == pytest.approx(want, rel=1e-3)


def test_topk_without_tail_mass_is_finite():
    idx = torch.tensor([[0, 1], [3, 2]])
    logp = torch.log(torch.tensor([[0.6, 0.4], [0.9, 0.1]])).half()
    tail = torch.full((2,), -1.0e4)  # the cache's floor for "no mass outside the top k"
    zs = torch.randn(2, 5, requires_grad=True)
    loss = kd_loss(zs, topk_to_dense(idx, logp, tail, 5), None, T=4.0, alpha=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


def test_production_batch_losses_are_kd_loss_on_the_batch(logits):
    """`losses.make_loss` (what the student and tuning trials train with) is `kd_loss` on the
    batch's cached targets: dense, top-k densified by `topk_to_dense`, and unlabelled (y = -1)."""
    from pipeline.losses import make_loss

    zs, zt, y = logits
    assert cross_entropy_loss(zs, {"y": y}).item() == pytest.approx(F.cross_entropy(zs, y).item())
    assert make_loss("hard")(zs, {"y": y}).item() == pytest.approx(F.cross_entropy(zs, y).item())
    cached = make_loss("cached", 5.0, 0.4, 5)
    assert cached(zs, {"y": y, "teacher": zt}).item() == pytest.approx(kd_loss(zs, zt, y, 5.0, 0.4).item())
    unlabelled = make_loss("cached", 5.0, 0.4, 5)  # decides on its first batch whether labels exist
    got = unlabelled(zs, {"y": torch.full_like(y, -1), "teacher": zt})
    assert got.item() == pytest.approx(kd_loss(zs, zt, None, 5.0, 0.4).item())
    logp = F.log_softmax(zt, -1)
    top = torch.topk(logp, 2, dim=1)
    tail = torch.logsumexp(logp.scatter(1, top.indices, float("-inf")), 1)
    batch = {"y": y, "teacher_topk_idx": top.indices.short(), "teacher_topk_val": top.values.half(),
             "teacher_tail": tail}
    want = kd_loss(zs, topk_to_dense(top.indices, top.values.half(), tail, 5), y, 5.0, 0.4)
    assert make_loss("cached", 5.0, 0.4, 5)(zs, batch).item() == pytest.approx(want.item())
    assert want.item() != pytest.approx(kd_loss(zs, zt, y, 5.0, 0.4).item(), rel=1e-3)  # top-2 of 5 loses mass shape


def test_topk_to_dense_is_the_same_on_numpy_and_torch_and_keeps_the_stored_tail():
    """One densifier for numpy and torch inputs: the k stored log-probabilities where they belong,
    log(tail / (C - k)) everywhere else, so the dense row's mass is the stored mass."""
    rng = np.random.default_rng(3)
    z = rng.normal(scale=2, size=(9, 7))
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    idx = np.argsort(-logp, axis=1)[:, :3]
    val = np.take_along_axis(logp, idx, 1).astype(np.float32)
    tail = np.log(1.0 - np.exp(val.astype(np.float64)).sum(1)).astype(np.float32)
    dn = topk_to_dense(idx.astype(np.int16), val, tail, 7)
    dt = topk_to_dense(torch.from_numpy(idx.astype(np.int16)), torch.from_numpy(val), torch.from_numpy(tail), 7)
    assert isinstance(dn, np.ndarray) and isinstance(dt, torch.Tensor) and dn.dtype == np.float32
    np.testing.assert_allclose(dt.numpy(), dn, atol=1e-6)
    np.testing.assert_array_equal(np.take_along_axis(dn, idx, 1), val)
    outside = np.ones_like(dn, dtype=bool)
    np.put_along_axis(outside, idx, False, 1)
    np.testing.assert_allclose(dn[outside].reshape(9, 4), np.repeat(tail[:, None] - np.log(4), 4, 1), rtol=1e-6)
    np.testing.assert_allclose(np.exp(dn).sum(1), 1.0, atol=1e-5)


def test_bad_arguments_are_rejected(logits):
    zs, zt, y = logits
    with pytest.raises(ValueError, match="T must be"):
        kd_loss(zs, zt, y, 0.0, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(zs, zt, y, 1.0, 1.5)
    with pytest.raises(ValueError, match="do not match"):
        kd_loss(zs, zt[:, :3], y, 1.0, 0.5)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(zs, zt, y[:3], 1.0, 0.5)
    with pytest.raises(ValueError, match="empty batch"):
        kd_loss(zs[:0], zt[:0], y[:0], 1.0, 0.5)


@pytest.mark.parametrize("labelled", [True, False])
def test_chunk_prepared_targets_give_the_per_batch_loss_and_gradient(labelled):
    """`prepare_chunk` (targets prepared once per streamed chunk, teacher columns dropped) and the
    per-batch path give the same loss and gradient on every minibatch cut from the chunk, equal to
    the textbook composition; top-k chunks too."""
    from pipeline.losses import PREPARED, make_loss

    g = torch.Generator().manual_seed(5)
    N, B, C = 96, 32, 12
    zt = (torch.randn(N, C, generator=g) * 3).half()
    y = torch.randint(0, C, (N,), generator=g) if labelled else torch.full((N,), -1)
    chunk = {"x": torch.randn(N, 4, generator=g), "y": y, "teacher": zt, "epoch": torch.zeros(N, dtype=torch.long)}
    prepared = make_loss("cached", 4.0, 0.9, C).prepare_chunk(chunk)
    assert PREPARED in prepared and "teacher" not in prepared and torch.equal(prepared["x"], chunk["x"])
    assert prepared[PREPARED].shape == (N, 3 * C + 1) and prepared[PREPARED].dtype == torch.float32
    fast, slow = make_loss("cached", 4.0, 0.9, C), make_loss("cached", 4.0, 0.9, C)
    fast.prepare_chunk(chunk)  # decides labelled on the chunk, as in training
    for s in range(0, N, B):
        zs = (torch.randn(B, C, generator=g) * 2).requires_grad_(True)
        got = fast(zs, {k: v[s:s + B] for k, v in prepared.items()})
        (g_got,) = torch.autograd.grad(got, zs)
        per_batch = slow(zs, {k: v[s:s + B] for k, v in chunk.items()})
        (g_pb,) = torch.autograd.grad(per_batch, zs)
        labels = y[s:s + B] if labelled else None
        want = _autograd_reference(zs, zt[s:s + B], labels, 4.0, 0.9)
        (g_want,) = torch.autograd.grad(want, zs)
        torch.testing.assert_close(got, per_batch, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_got, g_pb, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="prepared KD targets"):
        fast(torch.randn(B, C + 1), {k: v[:B] for k, v in prepared.items()})


def test_wide_rows_are_prepared_per_batch_not_per_chunk():
    from pipeline.losses import PREPARE_MAX_CLASSES, make_loss

    C = PREPARE_MAX_CLASSES + 1
    chunk = {"y": torch.zeros(4, dtype=torch.long), "teacher": torch.randn(4, C)}
    loss = make_loss("cached", 2.0, 0.5, C)
    assert loss.prepare_chunk(chunk) is chunk
    zs = torch.randn(4, C)
    assert loss(zs, chunk).item() == pytest.approx(kd_loss(zs, chunk["teacher"], chunk["y"], 2.0, 0.5).item())
