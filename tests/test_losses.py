"""KD losses against an independent float64 numpy reference, and the paper's gradient properties."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    KDLoss,
    cross_entropy_loss,
    kd_loss,
    kd_loss_topk,
    make_kd_batch_loss,
    soft_kl,
    topk_to_dense_logprob,
)


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
    got = KDLoss(T, alpha)(zs, zt, y)
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
    b = kd_loss(zs, F.log_softmax(zt, -1), y, 4.0, 0.7, teacher_is_logprob=True)
    c = kd_loss(zs, F.log_softmax(zt, -1).half(), y, 4.0, 0.7, teacher_is_logprob=True)  # float16 cache
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    assert c.item() == pytest.approx(a.item(), rel=1e-2)


def test_zero_probability_classes_give_finite_loss_and_grad():
    zs = torch.randn(3, 4, requires_grad=True)
    logp = torch.log(torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]))
    loss = kd_loss(zs, logp, None, T=1.0, alpha=1.0, teacher_is_logprob=True)
    loss.backward()
    want = _reference(zs.detach().numpy(), np.log(np.clip(logp.double().exp().numpy(), 1e-300, None)), None, 1.0, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    assert loss.item() == pytest.approx(want, rel=1e-5)


def _soft_grad(zs, zt, T, with_t2):
    zs = zs.clone().requires_grad_(True)
    loss = (T * T if with_t2 else 1.0) * soft_kl(zs, zt, T)
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


def test_topk_with_k_equal_c_is_the_dense_loss(logits):
    zs, zt, y = logits
    logp = F.log_softmax(zt, -1)
    order = torch.argsort(torch.rand(logp.shape, generator=torch.Generator().manual_seed(2)), dim=1)
    top = kd_loss_topk(zs, order, logp.gather(1, order), y, 3.0, 0.8, num_classes=5)
    dense = kd_loss(zs, logp, y, 3.0, 0.8, teacher_is_logprob=True)
    assert top.item() == pytest.approx(dense.item(), rel=1e-6)


def test_topk_spreads_tail_uniformly_hand_example():
    # Teacher: p = [0.5, ?, 0.3, ?] with tail 0.2 over classes 1 and 3 -> dense [0.5, 0.1, 0.3, 0.1].
    idx = torch.tensor([[2, 0]])
    logp = torch.log(torch.tensor([[0.3, 0.5]]))
    dense = topk_to_dense_logprob(idx, logp, 4)
    np.testing.assert_allclose(dense.exp().numpy(), [[0.5, 0.1, 0.3, 0.1]], rtol=1e-6)
    zs = torch.tensor([[1.0, -0.5, 0.25, 2.0]])
    got = kd_loss_topk(zs, idx, logp, torch.tensor([3]), T=2.0, alpha=0.6, num_classes=4)
    want = _reference(zs.numpy(), np.log([[0.5, 0.1, 0.3, 0.1]]), [3], 2.0, 0.6)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_topk_without_tail_mass_is_finite():
    idx = torch.tensor([[0, 1], [3, 2]])
    logp = torch.log(torch.tensor([[0.6, 0.4], [0.9, 0.1]])).half()  # float16 rounding may overshoot 1
    zs = torch.randn(2, 5, requires_grad=True)
    loss = kd_loss_topk(zs, idx, logp, None, T=4.0, alpha=1.0, num_classes=5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


def test_batch_loss_helpers(logits):
    zs, zt, y = logits
    assert cross_entropy_loss(zs, {"y": y}).item() == pytest.approx(F.cross_entropy(zs, y).item())
    fn = make_kd_batch_loss(5.0, 0.4)
    assert fn(zs, {"y": y, "teacher": zt}).item() == pytest.approx(kd_loss(zs, zt, y, 5.0, 0.4).item())
    assert fn(zs, {"teacher": zt}).item() == pytest.approx(kd_loss(zs, zt, None, 5.0, 0.4).item())
    logp = F.log_softmax(zt, -1)
    top = torch.topk(logp, 2, dim=1)
    fk = make_kd_batch_loss(5.0, 0.4, topk_keys=("ti", "tl"), num_classes=5)
    got = fk(zs, {"y": y, "ti": top.indices, "tl": top.values})
    assert got.item() == pytest.approx(kd_loss_topk(zs, top.indices, top.values, y, 5.0, 0.4, 5).item())


def test_bad_arguments_are_rejected(logits):
    zs, zt, y = logits
    with pytest.raises(ValueError, match="T must be"):
        kd_loss(zs, zt, y, 0.0, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(zs, zt, y, 1.0, 1.5)
    with pytest.raises(ValueError, match="do not match"):
        kd_loss(zs, zt[:, :3], y, 1.0, 0.5)


def test_kd_loss_from_precomputed_log_probs_matches_kd_loss_and_its_gradient():
    from pipeline.losses import kd_loss_from_log_probs, teacher_log_probs

    torch.manual_seed(3)
    s = torch.randn(16, 7, requires_grad=True)
    t = torch.randn(16, 7).half()
    t[0, 2] = float("-inf")  # a class with zero teacher probability stays finite, not NaN
    y = torch.randint(0, 7, (16,))
    for T, alpha, labels in ((1.0, 0.5, y), (4.0, 0.9, y), (2.0, 1.0, y), (3.0, 0.3, None)):
        want = kd_loss(s, t, labels, T, alpha)
        (g_want,) = torch.autograd.grad(want, s)
        got = kd_loss_from_log_probs(s, teacher_log_probs(t, T), labels, T, alpha)
        (g_got,) = torch.autograd.grad(got, s)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g_got, g_want)
