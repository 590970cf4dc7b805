"""What one cache row holds: the per-sample fields, their dtypes, and encoding teacher outputs into them.

Belongs here: the `Layout` (C, stored dtype, top-k), the field names and the float rules (the
log-probability floor, top-k selection and the tail mass), and `topk_to_dense`, the one densifier
every reader of a top-k cache uses. No file format and no I/O: the formats that store these fields
are `parquet.py` and `webdataset.py`, the manifest that records the layout is `manifest.py`.

Per sample (every format holds the same values):

* dense (default): ``generalist_logits`` (C,) the generalist's raw logits and ``ensemble_logprobs``
  (C,) the log-probabilities of the generalist + specialists combination (Hinton et al. 2015,
  section 5), stored as float16 or float32. Caching logits / log-probabilities, never probabilities
  at one T, keeps the temperature a training-time choice. Log-probabilities are floored at
  ``LOGP_FLOOR`` (-1e4) so that a probability of exactly 0 is stored as a finite number:
  exp(-1e4 / T) is 0 for any T <= 1e3.
* top-k (``targets.top_k``, for large C): for each target t in (generalist, ensemble),
  ``{t}_topk_idx`` (k,) class indices sorted by decreasing probability (int16 when C <= 32767,
  else int32), ``{t}_topk_val`` (k,) their log-probabilities at T = 1 in the cache's dtype (the
  generalist's logits minus their logsumexp: the shift does not change softmax(z / T) at any T),
  and ``{t}_tail`` float32, the log of the probability mass outside the top k, computed exactly in
  float32 before rounding. `topk_to_dense` spreads the tail uniformly over the other C - k classes.

  The bias this introduces: the student is taught that every class outside the top k is equally
  likely, so the ranking among them (part of the "dark knowledge") is lost, and at T > 1 the
  softened tail has the wrong shape. Anshumann et al. (2025, "Sparse Logit Sampling") show such
  top-k targets are biased and cost accuracy and calibration; importance-sampled sparse targets are
  unbiased. Keep the default dense cache unless C makes it too large (e.g. JFT's 15,000 classes).

Bytes per sample of each layout: docs/performance.md, "Cache format".
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from pipeline.errors import UserError

FORMAT_VERSION = 2  # of the whole cache (fields, files, manifest); part of every shard's fingerprint
KIND = "distill-soft-targets"  # the manifest's "kind" and the Parquet files' metadata
TARGETS = ("generalist", "ensemble")
DENSE_FIELDS = {"generalist": "generalist_logits", "ensemble": "ensemble_logprobs"}
LOGP_FLOOR = -1.0e4
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Layout:
    """What each cache row holds: C, the stored float dtype and top-k (None: dense)."""

    num_classes: int
    dtype: str = "float16"
    top_k: Optional[int] = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"targets.dtype: {self.dtype!r} is not supported; use float16 or float32")
        if self.top_k is not None and not 1 <= int(self.top_k) < int(self.num_classes):
            raise UserError(
                f"targets.top_k: {self.top_k} must be between 1 and num_classes - 1 = {self.num_classes - 1}; "
                "unset it to store dense targets"
            )

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def index_dtype(self) -> np.dtype:
        """Top-k class indices: int16 while every class index fits, else int32."""
        return np.dtype(np.int16) if self.num_classes <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)

    def record_dtype(self) -> np.dtype:
        """The packed little-endian structured dtype of one sample's targets (WebDataset member)."""
        return np.dtype([(name, dt.newbyteorder("<"), shape) for name, (dt, shape) in self.fields().items()])

    def fields(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """field name -> (numpy dtype, per-sample shape), in storage order."""
        if self.top_k is None:
            return {f: (self.np_dtype, (self.num_classes,)) for f in DENSE_FIELDS.values()}
        k = int(self.top_k)
        out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        for t in TARGETS:
            out[f"{t}_topk_idx"] = (self.index_dtype, (k,))
            out[f"{t}_topk_val"] = (self.np_dtype, (k,))
            out[f"{t}_tail"] = (np.dtype(np.float32), ())
        return out

    def check_fields(self, fields: dict[str, np.ndarray], n: int) -> None:
        """ValueError unless every field is present with n rows of its per-sample shape."""
        for name, (_, shape) in self.fields().items():
            arr = np.asarray(fields[name])
            if arr.shape != (n, *shape):
                raise ValueError(f"field {name} has shape {arr.shape}, expected {(n, *shape)}")

    def encode(self, generalist_logits: np.ndarray, ensemble_logprobs: np.ndarray) -> dict[str, np.ndarray]:
        """Float32 teacher outputs (N, C) -> the stored fields. Raises ValueError on non-finite values.

        Non-finite values would poison every student trained on the cache, so they are refused here
        (the writer names the shard) instead of being discovered by `verify`.
        """
        g = np.asarray(generalist_logits, dtype=np.float32)
        e = np.asarray(ensemble_logprobs, dtype=np.float32)
        if g.ndim != 2 or g.shape[1] != self.num_classes or e.shape != g.shape:
            raise ValueError(f"teacher outputs have shapes {g.shape} and {e.shape}; expected (N, {self.num_classes})")
        if not np.isfinite(g).all():
            raise ValueError("the generalist produced non-finite logits (NaN or inf): the checkpoint is broken")
        e = np.maximum(e, LOGP_FLOOR)  # exact zeros (log 0 = -inf) become a finite, negligible value
        if not np.isfinite(e).all():
            raise ValueError("the ensemble produced NaN log-probabilities: a specialist checkpoint is broken")
        if self.top_k is None:
            with np.errstate(over="ignore"):  # overflow is detected (and explained) just below
                out = {DENSE_FIELDS["generalist"]: g.astype(self.np_dtype),
                       DENSE_FIELDS["ensemble"]: e.astype(self.np_dtype)}
            for name, arr in out.items():
                if not np.isfinite(arr).all():
                    raise ValueError(
                        f"{name} overflows {self.dtype} (|value| > {float(np.finfo(self.np_dtype).max):g}); "
                        "set targets.dtype=float32"
                    )
            return out
        out = {}
        for t, logp in (("generalist", _log_softmax(g)), ("ensemble", e)):
            idx, val, tail = _topk(logp, int(self.top_k))
            out[f"{t}_topk_idx"] = idx.astype(self.index_dtype)
            out[f"{t}_topk_val"] = val.astype(self.np_dtype)
            out[f"{t}_tail"] = tail
        return out


def labels_or_none(labels: Optional[np.ndarray], n: int) -> Optional[np.ndarray]:
    """int64 labels with -1 for "no label", or None when the shard is unlabelled."""
    if labels is None:
        return None
    y = np.asarray(labels)
    if y.size == 0 and n:
        return None
    y = y.astype(np.int64).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} samples")
    return None if (y < 0).all() else y


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return (z - logsumexp(z, 1)[:, None]).astype(np.float32)


def _topk(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k (indices sorted by decreasing value, values) and the log tail mass, row by row."""
    part = np.argpartition(-logp, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(logp, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1).astype(np.int32)
    val = np.maximum(np.take_along_axis(vals, order, 1), LOGP_FLOOR).astype(np.float32)
    rest = logp.astype(np.float32, copy=True)
    np.put_along_axis(rest, idx.astype(np.int64), -np.inf, 1)
    tail = np.maximum(logsumexp(rest, 1), LOGP_FLOOR).astype(np.float32)
    return idx, val, tail


def topk_to_dense(idx: Any, val: Any, tail: Any, num_classes: int):
    """Dense (B, C) log-probabilities from top-k fields, the tail mass spread uniformly.

    The one densifier: the student's cached loss (`pipeline.losses.dense_teacher`) and every
    test use it. Works on numpy arrays or torch tensors (returns the same kind, float32). Class c
    outside the top k gets log(tail mass / (C - k)); see the module docstring for the bias this
    introduces.
    """
    torch = sys.modules.get("torch")  # a tensor argument means torch is loaded; never import it here
    if torch is not None and isinstance(val, torch.Tensor):
        k = val.shape[1]
        tail_t = torch.as_tensor(tail, device=val.device).float().reshape(-1, 1)
        dense = (tail_t - float(np.log(num_classes - k))).expand(val.shape[0], num_classes).clone()
        return dense.scatter_(1, torch.as_tensor(idx, device=val.device).long(), val.float())
    val = np.asarray(val, dtype=np.float32)
    k = val.shape[1]
    tail = np.asarray(tail, dtype=np.float32).reshape(-1, 1)
    dense = np.repeat(tail - np.float32(np.log(num_classes - k)), num_classes, axis=1)
    np.put_along_axis(dense, np.asarray(idx, dtype=np.int64), val, 1)
    return dense
