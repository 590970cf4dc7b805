"""Knowledge-distillation losses (Hinton, Vinyals & Dean 2015, section 2) for the student and tuning.

    L = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1)

p_T = softmax(teacher / T), q_T = softmax(student / T). The soft term is multiplied by T^2 because its
gradient w.r.t. the student logits scales as 1/T^2; with the factor the soft/hard balance set by alpha
does not drift when T is tuned. At high T with zero-mean logits the soft gradient tends to
(z_i - v_i) / (C * B), i.e. logit matching (Ba & Caruana) is the high-temperature limit (tested).

Teacher targets come from the soft-target cache either as raw logits (the generalist) or as
log-probabilities at T = 1 (the generalist + specialist ensemble, section 5.4). Both work unchanged:
log p = z - logsumexp(z) differs from z by a per-row constant, and softmax((z - c) / T) ==
softmax(z / T). Caching logits/log-probs (never probabilities at one T) keeps T a training-time choice.

`kd_loss` is the one KD loss; `make_loss` (below) builds from it the per-batch loss_fn(logits, batch)
that the training core calls for every student, Tune trial and bench. `kd_loss` is fused: one autograd node whose forward computes the loss
*and* its gradient with respect to the student logits in a handful of whole-batch kernels, so the
backward pass is one multiply:

    dL/dz = alpha * T * (q_T - p_T) / B + (1 - alpha) * (q_1 - onehot(y)) / B.

The teacher's softmax at T is computed per batch on the batch's device (the cache is read as raw
float16/float32 targets; no N x C copy of the dataset at some T is ever made). At T = 1 the soft and
hard terms share one log-softmax. On CPU, rows of 3 to 15 classes are normalised along the batch
axis instead (`_log_softmax`): aten's row kernel falls back to scalar code below one vector width and
costs ~5x more there, which at the quickstart's 12 classes would cost more than the student itself.
Measured by `bench/bench_kd_loss.py` as step-time ratios against a hard-label step.

Top-k caches are densified by `pipeline.cache.topk_to_dense` (the single densifier: the stored tail
mass spread uniformly over the other classes) and then go through the same `kd_loss`.

Plain torch; no Ray. The math runs in float32 (float64 for float64 students) whatever the cache dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "cross_entropy_loss"]


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over dim 1 of a (B, C) tensor; for 2 < C < 16 on CPU along the batch-major layout
    (same values, several times faster: see the module docstring). The result may be a transposed
    view; only elementwise ops and reductions consume it."""
    if x.device.type == "cpu" and 2 < x.shape[1] < 16:
        return F.log_softmax(x.T, dim=0).T
    return F.log_softmax(x, dim=1)


def _check_t_alpha(T: float, alpha: float) -> None:
    if not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


class _FusedKD(torch.autograd.Function):
    """Loss and its gradient w.r.t. the student logits in one forward; backward scales the gradient.

    forward(z (B, C), teacher (B, C), labels (B,) | None, T, alpha).
    """

    @staticmethod
    def forward(ctx, z, teacher, labels, T, alpha):  # noqa: D401
        B = z.shape[0]
        cd = torch.promote_types(z.dtype, torch.float32)
        zc = z.detach().to(cd)
        inv = 1.0 / T
        soft_w = alpha if labels is not None else 1.0  # no labels: the soft term alone, weight 1
        hard_w = 1.0 - alpha if labels is not None else 0.0
        loss = None
        grad = None
        lq1 = None
        if soft_w > 0.0:
            t = teacher.detach().to(cd)
            # kl terms are p * (log p - log q); a teacher log-prob of -inf (zero mass) would make
            # 0 * -inf = NaN, so it is floored at the dtype's minimum (exp of it is exactly 0).
            lp = _log_softmax(t * inv if T != 1.0 else t).clamp_min(torch.finfo(cd).min)
            p = lp.exp()
            lq = _log_softmax(zc * inv) if T != 1.0 else _log_softmax(zc)
            if T == 1.0:
                lq1 = lq
            c = soft_w * T * T / B
            loss = (p * (lp - lq)).sum() * c
            grad = lq.exp().sub_(p).mul_(c * inv)          # soft_w T (q_T - p_T) / B
        if hard_w > 0.0:
            if lq1 is None:
                lq1 = _log_softmax(zc)
            c = hard_w / B
            hard = F.nll_loss(lq1, labels, reduction="sum")
            loss = hard * c if loss is None else loss.add_(hard, alpha=c)
            g1 = lq1.exp()
            grad = g1.mul_(c) if grad is None else grad.add_(g1, alpha=c)
            grad.scatter_(1, labels.view(-1, 1), -c, reduce="add")  # - onehot(y) * c
        ctx.save_for_backward(grad)
        ctx.z_dtype = z.dtype
        return loss.to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.z_dtype), None, None, None, None


def _kd(student_logits: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor], T: float,
        alpha: float) -> torch.Tensor:
    T, alpha = float(T), float(alpha)
    _check_t_alpha(T, alpha)
    if student_logits.dim() != 2 or teacher.shape != student_logits.shape:
        raise ValueError(f"teacher targets {tuple(teacher.shape)} do not match student logits "
                         f"{tuple(student_logits.shape)} (both must be (B, C))")
    if student_logits.shape[0] == 0:
        raise ValueError("empty batch: the loss is a mean over the batch")
    if labels is not None:
        if labels.shape != student_logits.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the batch size {student_logits.shape[0]}")
        labels = labels.long()
    return _FusedKD.apply(student_logits, teacher, labels, T, alpha)


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    T: float,
    alpha: float,
    teacher_is_log_probs: bool = False,
) -> torch.Tensor:
    """alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(labels, q_1), a scalar (mean over the batch).

    Args:
        student_logits: (B, C) float (any float dtype; the math runs in float32 or wider).
        teacher: (B, C) the batch's cached targets, raw logits or log-probabilities at T = 1, float16
            or float32, on the student's device. May hold -inf (a class of zero teacher mass, e.g. a
            densified top-k tail without mass): it contributes 0 * log 0 = 0, not NaN. Gets no gradient.
        labels: (B,) int class indices, or None for an unlabelled transfer set. Without labels there
            is no hard term and the soft term gets weight 1 (T^2 * KL): alpha only trades soft against
            hard, and keeping T^2 keeps the gradient scale (and a tuned learning rate) independent of T.
        T: temperature > 0. alpha: weight of the soft term in [0, 1].
        teacher_is_log_probs: what the caller passes; both give the same soft targets (softmax is
            invariant to a per-row shift: see the module docstring), so it does not change the result.
    """
    del teacher_is_log_probs  # same math either way
    return _kd(student_logits, teacher, labels, T, alpha)


# --------------------------------------------------------------------------------------------------
# Batch losses: loss_fn(model_output, batch_dict) -> scalar.


def cross_entropy_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Hard-label training (teacher, specialists, baseline student): CE against batch["y"] (B,)."""
    return F.cross_entropy(logits, batch["y"].long())


# ------------------------------------------------------------------------------------------------
# The loss functions the training core calls: loss_fn(student_logits, batch) -> scalar.


def dense_teacher(batch: dict, num_classes: int):
    """The batch's teacher targets as dense (B, C) logits / log-probabilities (top-k: tail spread)."""
    from pipeline.cache import topk_to_dense

    if "teacher" in batch:
        return batch["teacher"]
    return topk_to_dense(batch["teacher_topk_idx"], batch["teacher_topk_val"], batch["teacher_tail"], num_classes)


class _Labels:
    """Whether the transfer set is labelled, decided on its first batch (one host sync per run):
    unlabelled rows carry y = -1 and then only the soft term is trained."""

    def __init__(self):
        self.labelled: Optional[bool] = None

    def __call__(self, batch: dict):
        y = batch.get("y")
        if y is None:
            return None
        if self.labelled is None:
            self.labelled = bool((y >= 0).all())
        return y.long() if self.labelled else None


def make_loss(kind: str, T: float = 1.0, alpha: float = 0.0, num_classes: int = 0, target: str = "ensemble",
              ensemble: Any = None) -> Callable:
    """loss_fn(student_logits, batch) for the training core (`pipeline.training.run_epochs`).

    kind: "hard" (cross-entropy with batch["y"]), "cached" (the KD loss `pipeline.losses.kd_loss`
    against the batch's cached targets: the teacher's softmax at T is computed per batch on the
    device) or "online" (KD against `ensemble(batch["x"])`, a `TeacherEnsemble`, run on every batch).
    """
    if kind == "hard":
        return lambda logits, batch: F.cross_entropy(logits, batch["y"].long())
    labels = _Labels()
    if kind == "cached":
        def cached(logits, batch):
            return kd_loss(logits, dense_teacher(batch, num_classes), labels(batch), T, alpha)

        return cached
    if kind == "online":
        if ensemble is None:
            raise ValueError("online distillation needs the teacher ensemble")
        which = 1 if target == "ensemble" else 0

        def online(logits, batch):
            with torch.no_grad():
                teacher = ensemble(batch["x"])[which].to(logits.device)
            return kd_loss(logits, teacher, labels(batch), T, alpha)

        return online
    raise ValueError(f"unknown loss kind {kind!r}")
