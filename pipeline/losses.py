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


_CONSTS: dict = {}
# Up to this many classes the fused loss's gradient is one matmul with a (2C, C) mixer; wider rows
# (a 15,000-class cache, online distillation) combine the two softmaxes elementwise.
MIXER_MAX_CLASSES = 256


def _const(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A small constant tensor, made once per key (a fresh one per step would cost a host copy)."""
    t = _CONSTS.get(key)
    if t is None:
        if len(_CONSTS) > 64:
            _CONSTS.clear()
        t = _CONSTS[key] = make()
    return t


def _scales(T: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[1 / T, 1] as a (2, 1, 1) tensor: stacks the logits at T and at 1."""
    return _const(("scales", T, dtype, str(device)),
                  lambda: torch.tensor([1.0 / T, 1.0], dtype=dtype, device=device).view(2, 1, 1))


def _mixer(a: float, b: float, C: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[[a I], [b I]], (2C, C): maps the stacked (B, 2C) softmaxes to a q_T + b q_1 in one matmul."""
    def make():
        eye = torch.eye(C, dtype=dtype, device=device)
        return torch.cat([eye * a, eye * b])
    return _const(("mixer", a, b, C, dtype, str(device)), make)


def _weights(labels: Any, alpha: float) -> tuple[float, float]:
    """(soft, hard) weights: without labels the soft term alone, weight 1."""
    return (alpha, 1.0 - alpha) if labels is not None else (1.0, 0.0)


def kd_targets(teacher: torch.Tensor, labels: Optional[torch.Tensor], T: float, alpha: float) -> torch.Tensor:
    """What the fused loss needs of each row's teacher and label, prepared once per row: (N, 3C + 1)
    in float32 (float64 for a float64 teacher), on the teacher's device, columns

        [soft_w T p_T + hard_w onehot(y) | soft_w T^2 p_T | hard_w onehot(y) | soft_w T^2 sum p_T log p_T]

    (p_T = softmax(teacher / T); soft_w, hard_w = alpha, 1 - alpha, or 1, 0 without labels): the
    target part of the loss's gradient, the weights of the stacked student log-probabilities in the
    loss, and the teacher's side of the KL. Row-wise, so a chunk of rows prepared at once
    (`make_loss`'s `prepare_chunk`) gives every minibatch cut from it what preparing that minibatch
    would.
    """
    T, alpha = float(T), float(alpha)
    soft_w, hard_w = _weights(labels, alpha)
    N, C = teacher.shape
    cd = torch.promote_types(teacher.dtype, torch.float32)
    t = teacher.detach().to(cd)
    # a teacher log-prob of -inf (zero mass) would make 0 * -inf = NaN in p log p, so it is floored
    # at the dtype's minimum (exp of it is exactly 0).
    lp = _log_softmax(t * (1.0 / T) if T != 1.0 else t).clamp_min(torch.finfo(cd).min)
    p = lp.exp()
    out = torch.zeros((N, 3 * C + 1), dtype=cd, device=teacher.device)
    torch.mul(p, soft_w * T, out=out[:, :C])
    torch.mul(p, soft_w * T * T, out=out[:, C:2 * C])
    if hard_w > 0.0:
        idx = labels.long().view(-1, 1)
        out[:, :C].scatter_add_(1, idx, torch.full((N, 1), hard_w, dtype=cd, device=teacher.device))
        out[:, 2 * C:3 * C].scatter_(1, idx, hard_w)
    torch.mul((p * lp).sum(1), soft_w * T * T, out=out[:, 3 * C])
    return out


class _FusedKD(torch.autograd.Function):
    """Loss and its gradient w.r.t. the student logits in one forward; backward scales the gradient.

    forward(z (B, C), targets (B, 3C + 1) from `kd_targets`, T, soft_w, hard_w). Both log-softmaxes
    (at T and at 1) are one kernel over a class-major (2, C, B) stack (vectorised along the batch
    whatever C is), the loss is one weighted sum of the stacked log-probabilities, and the gradient
    of both terms one matmul of their softmaxes with a constant (2C, C) mixer, added to the
    prepared target term: a handful of kernels, about what `F.cross_entropy` costs forward and backward.
    """

    @staticmethod
    def forward(ctx, z, targets, T, soft_w, hard_w):  # noqa: D401
        B, C = z.shape
        cd = torch.promote_types(z.dtype, targets.dtype)
        zd = z if z.dtype == cd else z.to(cd)
        zz = torch.empty((2, C, B), dtype=cd, device=z.device)
        torch.mul(zd.T, _scales(T, cd, z.device), out=zz)  # [z / T; z], class-major
        lq = torch.log_softmax(zz, 1).view(2 * C, B).T       # [log q_T | log q_1], (B, 2C) view
        if targets.dtype != cd:
            targets = targets.to(cd)
        loss = (targets[:, C:3 * C] * lq).sum().sub_(targets[:, 3 * C].sum()).mul_(-1.0 / B)
        q = lq.exp_()
        if C <= MIXER_MAX_CLASSES:
            grad = torch.addmm(targets[:, :C], q, _mixer(soft_w * T / B, hard_w / B, C, cd, z.device), beta=-1.0 / B)
        else:  # the (2C, C) mixer grows as C^2 (1.8 GB and B C^2 work at C = 15,000): elementwise instead
            grad = q[:, :C].mul(soft_w * T / B).add_(q[:, C:], alpha=hard_w / B).sub_(targets[:, :C], alpha=1.0 / B)
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
    return _fused(student_logits, kd_targets(teacher, labels, T, alpha), T, *_weights(labels, alpha))


def _fused(z: torch.Tensor, targets: torch.Tensor, T: float, soft_w: float, hard_w: float) -> torch.Tensor:
    if targets.shape != (z.shape[0], 3 * z.shape[1] + 1):
        raise ValueError(f"prepared KD targets {tuple(targets.shape)} do not match student logits {tuple(z.shape)}")
    return _FusedKD.apply(z, targets, T, soft_w, hard_w)


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


TEACHER_COLUMNS = ("teacher", "teacher_topk_idx", "teacher_topk_val", "teacher_tail")
PREPARED = "kd_targets"
# Rows of at most this many classes get their targets prepared per chunk (`_CachedKD.prepare_chunk`):
# 3C + 1 floats a row, 12.6 MB for a 4096-row chunk at this bound; wider rows are prepared per batch.
PREPARE_MAX_CLASSES = 256


class _CachedKD:
    """loss_fn(logits, batch) of cached distillation: `kd_loss` against the batch's cached targets.

    `prepare_chunk(chunk)` (`pipeline.training.epoch_minibatches(prepare=...)`) turns a streamed
    chunk's teacher columns into the fused loss's per-row targets (`kd_targets`) once, on the chunk's
    device, so a step only runs the student's side; a batch that still carries raw teacher columns
    (no prepare, or more than PREPARE_MAX_CLASSES classes) is prepared when the loss is called. Both
    give the same loss (tested)."""

    def __init__(self, T: float, alpha: float, num_classes: int, labels: "_Labels"):
        _check_t_alpha(T, alpha)
        self.T, self.alpha, self.num_classes, self.labels = T, alpha, num_classes, labels

    def _targets(self, batch: dict) -> tuple[torch.Tensor, float, float]:
        targets = batch.get(PREPARED)
        if targets is not None:  # prepared with the labels decision made on the first chunk
            return targets, *_weights(True if self.labels.labelled else None, self.alpha)
        y = self.labels(batch)
        teacher = dense_teacher(batch, self.num_classes)
        if y is not None and y.shape != teacher.shape[:1]:
            raise ValueError(f"labels {tuple(y.shape)} do not match the batch size {teacher.shape[0]}")
        targets = kd_targets(teacher, y, self.T, self.alpha)
        return targets, *_weights(y, self.alpha)

    def prepare_chunk(self, chunk: dict) -> dict:
        if self.num_classes > PREPARE_MAX_CLASSES or PREPARED in chunk:
            return chunk
        targets, _, _ = self._targets(chunk)
        out = {k: v for k, v in chunk.items() if k not in TEACHER_COLUMNS}
        out[PREPARED] = targets
        return out

    def __call__(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] == 0:
            raise ValueError(f"student logits {tuple(logits.shape)}: the KD loss needs a non-empty (B, C) batch")
        targets, soft_w, hard_w = self._targets(batch)
        return _fused(logits, targets, self.T, soft_w, hard_w)


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
        return _CachedKD(float(T), float(alpha), int(num_classes), labels)
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
