"""A specialist's view of the labels: its subset plus one dustbin class (Hinton et al. 2015, §5.2).

A specialist for class subset S predicts |S| + 1 classes: the classes of S (in the order of S) and a
*dustbin* standing for every other class. It is trained on batches where half the examples come from
S and half from the rest, so its training prior over {S, dustbin} is 1:1 instead of the natural
f : (1 - f). This module holds the label mapping, the oversampling batches, and the logit correction
that undoes the oversampling after training.

Derivation of the correction. Let P(y) be the natural prior over the specialist's outputs, with
P(S) = f and P(dustbin) = 1 - f, and let the half/half batches keep the natural proportions *within*
S and *within* the rest. Then the training prior is P_tr(y) = w(y) P(y) with w = 1/(2f) on S's classes
and w = 1/(2(1-f)) on the dustbin. The class-conditional densities p(x | y) are the same in both, so
by Bayes P(y | x) is proportional to P_tr(y | x) / w(y): in logits, z_y <- z_y - log w(y). Only the
differences between logits matter, so shifting every logit by +log(1/(2f)) leaves just the dustbin
changed by log(w(S)/w(dustbin)) = log((1 - f) / f). With f < 1/2 this is positive: the dustbin was
under-represented during training and gets its mass back. (Reading the paper's "log of the factor by
which the specialist class was oversampled" as log(1/(2f)) differs from this by log(2(1 - f)), about
log 2 for small f: the dustbin's *under*-sampling by 2(1 - f) must be undone too.)
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "DustbinMapper", "subset_fraction", "dustbin_correction", "apply_correction",
    "half_subset_batches", "HalfSubsetSampler",
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[int]]


def _as_subset(subset: ArrayLike, num_classes: int) -> np.ndarray:
    s = np.asarray(subset.cpu() if isinstance(subset, torch.Tensor) else subset, dtype=np.int64).ravel()
    if s.size == 0:
        raise ValueError("subset is empty; a specialist needs at least one class")
    if s.min() < 0 or s.max() >= num_classes:
        raise ValueError(f"subset has class indices outside [0, {num_classes})")
    if np.unique(s).size != s.size:
        raise ValueError("subset has repeated class indices")
    return s


class DustbinMapper:
    """Maps global class labels to a specialist's labels.

    Class ``subset[i]`` becomes label ``i``; every class outside the subset becomes the dustbin
    label ``len(subset)``.

    Args:
        subset: the specialist's classes (any order; the order fixes the specialist's outputs).
        num_classes: C, the number of global classes.
    Attributes:
        subset: (|S|,) int64 array of the classes.
        dustbin: the dustbin label, |S|.
        num_outputs: |S| + 1.
        table: (C,) int64 lookup from global to specialist label.
    """

    def __init__(self, subset: ArrayLike, num_classes: int):
        self.num_classes = int(num_classes)
        self.subset = _as_subset(subset, self.num_classes)
        self.dustbin = int(self.subset.size)
        self.num_outputs = self.dustbin + 1
        self.table = np.full(self.num_classes, self.dustbin, dtype=np.int64)
        self.table[self.subset] = np.arange(self.dustbin)
        self._torch_table = torch.from_numpy(self.table)

    def __call__(self, labels: Union[np.ndarray, torch.Tensor, int]):
        """Specialist labels for global labels: same shape and library as the input (int64)."""
        if isinstance(labels, torch.Tensor):
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"labels outside [0, {self.num_classes})")
            return self._torch_table.to(labels.device)[labels.long()]
        arr = np.asarray(labels)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_classes):
            raise ValueError(f"labels outside [0, {self.num_classes})")
        out = self.table[arr.astype(np.int64)]
        return int(out) if np.ndim(labels) == 0 else out

    def in_subset(self, labels: Union[np.ndarray, torch.Tensor]):
        """Boolean mask of the labels that belong to the subset."""
        mapped = self(labels)
        return mapped != self.dustbin


def subset_fraction(labels: ArrayLike, subset: ArrayLike) -> float:
    """f: fraction of the (natural, un-resampled) examples whose label is in the subset.

    Args:
        labels: (N,) global labels of the training data.
        subset: the specialist's classes.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    if y.size == 0:
        raise ValueError("labels is empty; cannot compute the subset's share of the data")
    s = np.asarray(subset.cpu() if isinstance(subset, torch.Tensor) else subset).ravel()
    return float(np.isin(y, s).mean())


def dustbin_correction(f: float) -> float:
    """log((1 - f) / f): what to add to the dustbin logit after half/half training (see module doc).

    Args:
        f: natural fraction of examples in the subset, strictly between 0 and 1.
    """
    if not 0.0 < f < 1.0:
        raise ValueError(
            f"subset fraction f={f} must be strictly between 0 and 1: the subset needs examples both "
            "in and outside it for half/half training"
        )
    return math.log((1.0 - f) / f)


def apply_correction(logits, correction: float):
    """Add `correction` to the dustbin (last) logit.

    Args:
        logits: (..., |S| + 1) specialist logits, numpy or torch; not modified in place.
    Returns:
        corrected logits, same type, shape and dtype.
    """
    if isinstance(logits, torch.Tensor):
        out = logits.clone()
    else:
        out = np.array(logits, copy=True)
    out[..., -1] += correction
    return out


# -------------------------------------------------------------------------------------------------
# Half/half batches
# -------------------------------------------------------------------------------------------------

def _draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n items from pool, without repeats until the pool is exhausted, then a fresh pass."""
    out = []
    while n > 0:
        take = min(n, pool.size)
        out.append(rng.choice(pool, size=take, replace=False))
        n -= take
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def half_subset_batches(
    labels: ArrayLike,
    subset: ArrayLike,
    batch_size: int,
    num_batches: Optional[int] = None,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """Index batches with exactly ``batch_size // 2`` examples from the subset, the rest from outside.

    Both halves are drawn uniformly at random without replacement (a new pass starts when a pool
    runs out), so the proportions *within* S and *within* the rest are the natural ones: the
    assumption under which `dustbin_correction` is exact. Positions within a batch are shuffled.

    Args:
        labels: (N,) global labels of the dataset the indices point into.
        subset: the specialist's classes.
        batch_size: B >= 2.
        num_batches: batches to draw; default one pass over the subset's examples,
            ceil(n_S / (B // 2)).
        rng: numpy Generator (default: seeded with 0).
    Returns:
        (num_batches, B) int64 array of dataset indices.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 to hold both halves, got {batch_size}")
    rng = rng if rng is not None else np.random.default_rng(0)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    s = np.asarray(subset.cpu() if isinstance(subset, torch.Tensor) else subset).ravel()
    inside = np.isin(y, s)
    pool_in, pool_out = np.flatnonzero(inside), np.flatnonzero(~inside)
    if pool_in.size == 0:
        raise ValueError("no example has a label in the subset; cannot oversample it")
    if pool_out.size == 0:
        raise ValueError("every example is in the subset; there is nothing for the dustbin")
    half = batch_size // 2
    if num_batches is None:
        num_batches = -(-pool_in.size // half)
    if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")
    a = _draw(pool_in, num_batches * half, rng).reshape(num_batches, half)
    b = _draw(pool_out, num_batches * (batch_size - half), rng).reshape(num_batches, batch_size - half)
    batches = np.concatenate([a, b], axis=1)
    return rng.permuted(batches, axis=1).astype(np.int64, copy=False)


class HalfSubsetSampler(torch.utils.data.Sampler):
    """Batch sampler for `DataLoader(dataset, batch_sampler=HalfSubsetSampler(...))`.

    Yields lists of dataset indices, half from the subset (exactly B // 2) and half from the rest
    (see `half_subset_batches`). Call `set_epoch(e)` before each epoch, as with
    `DistributedSampler`: the batches are a function of (seed, epoch) only, so a resumed run sees
    the same batches.

    Args:
        labels: (N,) global labels of the dataset.
        subset: the specialist's classes.
        batch_size: B >= 2.
        num_batches: batches per epoch (default: one pass over the subset's examples).
        seed: base seed.
    """

    def __init__(self, labels: ArrayLike, subset: ArrayLike, batch_size: int,
                 num_batches: Optional[int] = None, seed: int = 0):
        self.labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
        self.subset = np.asarray(subset.cpu() if isinstance(subset, torch.Tensor) else subset).ravel()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        n_in = int(np.isin(self.labels, self.subset).sum())
        if num_batches is None:
            half = max(self.batch_size // 2, 1)
            num_batches = -(-n_in // half)
        self.num_batches = int(num_batches)
        # Validate eagerly so a bad subset fails at construction, not inside a DataLoader worker.
        half_subset_batches(self.labels, self.subset, self.batch_size, 0, np.random.default_rng(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = half_subset_batches(self.labels, self.subset, self.batch_size, self.num_batches, rng)
        for row in batches:
            yield row.tolist()


# -------------------------------------------------------------------------------------------------
# Half/half batches from a stream (what the specialists stage trains on)
# -------------------------------------------------------------------------------------------------

def half_subset_steps(n_subset: int, batch_size: int) -> int:
    """Steps of one specialist epoch: one pass over the subset's examples, B // 2 of them a step."""
    return max(1, int(n_subset) // max(1, int(batch_size) // 2))


def half_subset_stream(chunks, subset: ArrayLike, batch_size: int, steps: int, n_subset: int, n_rest: int,
                       generator: torch.Generator, num_classes: int, reservoir: int = 4096):
    """`steps` batches of one epoch, each exactly B // 2 rows of the subset and B - B // 2 rows of the
    rest, cut from a stream of chunks (dicts of tensors with "x" and global labels "y", in a
    shuffled order) — the streaming form of `half_subset_batches`: no split is ever held whole.

    Subset rows are used in stream order (one pass over S per epoch when steps = n_S // (B // 2)).
    Rest rows are thinned at random to about what the epoch needs (each kept with probability
    ~1.25 x needed / n_rest), so the rest half is a uniform sample of the rest at its natural class
    proportions, as `dustbin_correction` assumes. When the rest runs short (a subset holding most
    of the data), rows are drawn again from a reservoir of the last `reservoir` kept rest rows.
    Yields batches {"x", "y" (the specialist's labels: subset position or dustbin), **other columns};
    deterministic given the stream and `generator`. Memory: a few chunks plus the reservoir.
    """
    half_in = int(batch_size) // 2
    half_out = int(batch_size) - half_in
    if half_in < 1:
        raise ValueError(f"batch_size must be >= 2 to hold both halves, got {batch_size}")
    if n_rest <= 0:
        raise ValueError("every example is in the subset; there is nothing for the dustbin")
    sub = torch.as_tensor(np.asarray(subset, dtype=np.int64))
    table = torch.full((int(num_classes),), len(sub), dtype=torch.int64)
    table[sub] = torch.arange(len(sub))
    p = min(1.0, 1.25 * steps * half_out / max(1, n_rest))
    s_buf: Optional[dict] = None
    r_buf: Optional[dict] = None
    pool: Optional[dict] = None  # reservoir of rest rows for top-ups
    done = 0

    def cat(a, b):
        return b if a is None else {k: torch.cat([a[k], b[k]]) for k in b}

    def take(buf, n):
        return {k: v[:n] for k, v in buf.items()}, {k: v[n:] for k, v in buf.items()}

    def size(buf):
        return 0 if buf is None else len(buf["y"])

    def emit(a, b):
        batch = cat(a, b)
        perm = torch.randperm(len(batch["y"]), generator=generator).to(batch["y"].device)
        batch = {k: v[perm] for k, v in batch.items()}
        batch["y"] = table.to(batch["y"].device)[batch["y"].long()]
        return batch

    for chunk in chunks:
        if done >= steps:
            break
        chunk = {k: v for k, v in chunk.items() if k != "epoch"}
        y = chunk["y"].long()
        inside = torch.isin(y, sub.to(y.device))
        s_rows = {k: v[inside] for k, v in chunk.items()}
        keep = ~inside
        if p < 1.0:
            keep &= (torch.rand(len(y), generator=generator) < p).to(y.device)
        r_rows = {k: v[keep] for k, v in chunk.items()}
        s_buf, r_buf = cat(s_buf, s_rows), cat(r_buf, r_rows)
        pool = cat(pool, r_rows)
        if size(pool) > reservoir:
            pool = {k: v[-reservoir:] for k, v in pool.items()}
        while done < steps and size(s_buf) >= half_in and size(r_buf) >= half_out:
            a, s_buf = take(s_buf, half_in)
            b, r_buf = take(r_buf, half_out)
            done += 1
            yield emit(a, b)
    while done < steps and size(s_buf) >= half_in:  # the rest ran short: top up from the reservoir
        if size(pool) == 0:
            raise ValueError("the stream held no example outside the subset")
        a, s_buf = take(s_buf, half_in)
        have = size(r_buf)
        b, r_buf = take(r_buf, min(have, half_out)) if have else (None, r_buf)
        if size(b) < half_out:
            idx = torch.randint(0, size(pool), (half_out - size(b),), generator=generator).to(pool["y"].device)
            b = cat(b, {k: v[idx] for k, v in pool.items()})
        done += 1
        yield emit(a, b)
    if done < steps:
        raise ValueError(f"the epoch's stream held {n_subset} subset rows by its counts but ran out after "
                         f"{done} of {steps} half/half steps")
