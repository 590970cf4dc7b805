"""Which classes each specialist covers (Hinton et al. 2015, section 5.3).

The paper forms the covariance matrix of the generalist's predicted probabilities on held-out data
and clusters its *columns* with an on-line k-means; each cluster is one specialist's class subset.
No true labels are needed: classes the generalist tends to predict together (confuses) end up together.

Two pieces live here:

* `CovarianceAccumulator` streams batches of predictions into a C x C covariance without ever
  holding all predictions (pairwise Chan/Welford merge, one symmetric rank-k BLAS update per batch).
* `cluster_classes` runs scikit-learn's `MiniBatchKMeans` (on-line k-means) over the normalised
  covariance columns and turns the clusters into class subsets, disjoint or of a fixed size.

Memory at the paper's scale (C = 15,000): the accumulator holds one C x C matrix (1.8 GB in float64,
0.9 GB in float32); `covariance()` returns another one of the requested dtype; `cluster_classes`
makes one C x C float32 copy of normalised columns (0.9 GB) plus a float64 copy of the k-means++
subsample (3 x batch_size rows). The benchmark (float64 accumulator, float32 covariance, accumulator
dropped before clustering) peaked at 3.0 GB resident.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy.linalg.blas import get_blas_funcs

__all__ = ["CovarianceAccumulator", "cluster_classes", "class_points", "adjusted_rand", "subsets_to_labels"]

# Rows per block when materialising C x C results, so temporaries stay at a few tens of MB.
_ROW_BLOCK = 512


class CovarianceAccumulator:
    """Streaming covariance of predicted class probabilities.

    Definition: the *population* covariance (divide by n, numpy's ``np.cov(P, rowvar=False,
    bias=True)``) unless ``covariance(ddof=1)`` asks for the sample covariance.

    Each batch is centred on its own mean and merged with Chan et al.'s pairwise update
    ``M2 = M2_a + M2_b + (n_a n_b / n) d d^T`` (d = mean_b - mean_a), which avoids the cancellation
    of ``E[p p^T] - mu mu^T``. The batch's centred rows and the scaled ``d`` are stacked and applied
    as one symmetric rank-(B+1) update (BLAS ``syrk``), which costs half a general matrix product
    and only touches the upper triangle; the full symmetric matrix is built in `covariance()`.

    Args:
        num_classes: C.
        dtype: accumulator dtype, ``np.float64`` (default, 8 C^2 bytes: 1.8 GB at C = 15,000) or
            ``np.float32`` (half the memory, about twice as fast, ~1e-6 relative error).

    Attributes:
        count: number of rows seen so far.
        mean: (C,) running mean of the predictions.
    """

    def __init__(self, num_classes: int, dtype: type = np.float64):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.num_classes = int(num_classes)
        self.dtype = dtype
        self.count = 0
        self.mean = np.zeros(self.num_classes, dtype=np.float64)
        # Fortran order so BLAS syrk updates it in place; only the upper triangle is meaningful.
        self._m2 = np.zeros((self.num_classes, self.num_classes), dtype=dtype, order="F")
        self._syrk = get_blas_funcs("syrk", dtype=dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by the C x C accumulator."""
        return self._m2.nbytes

    def _rank_update(self, rows: np.ndarray) -> None:
        """M2 += rows^T rows on the upper triangle; rows: (k, C), Fortran order, accumulator dtype."""
        out = self._syrk(1.0, rows, beta=1.0, c=self._m2, trans=1, lower=0, overwrite_c=1)
        if out is not self._m2:  # f2py copies if it cannot work in place; never silently lose a batch
            self._m2 = np.asfortranarray(out)

    def update(self, probs) -> "CovarianceAccumulator":
        """Add a batch of predictions.

        Args:
            probs: (B, C) predicted probabilities (numpy array or anything `np.asarray` accepts,
                e.g. a CPU torch tensor). Rows need not sum to exactly one.
        Returns:
            self, so updates can be chained.
        """
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != self.num_classes:
            raise ValueError(f"probs must have shape (B, {self.num_classes}), got {p.shape}")
        n_b = p.shape[0]
        if n_b == 0:
            return self
        if not np.isfinite(p).all():
            raise ValueError("probs contains NaN or inf")
        mean_b = p.mean(axis=0)
        n_a, n = self.count, self.count + n_b
        rows = np.empty((n_b + 1, self.num_classes), dtype=self.dtype, order="F")
        np.subtract(p, mean_b, out=rows[:n_b], casting="unsafe")
        delta = mean_b - self.mean
        rows[n_b] = delta * np.sqrt(n_a * n_b / n)
        self._rank_update(rows)
        self.mean += delta * (n_b / n)
        self.count = n
        return self

    def merge(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        """Fold another accumulator in (e.g. one per data-parallel worker). Returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge C={other.num_classes} into C={self.num_classes}")
        if other.count == 0:
            return self
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean - self.mean
        # syrk never writes the strict lower triangle, so it stays zero in both: plain addition
        # merges the upper triangles. Row blocks keep dtype conversions' temporaries small.
        for i in range(0, self.num_classes, _ROW_BLOCK):
            j = min(i + _ROW_BLOCK, self.num_classes)
            self._m2[i:j, :] += other._m2[i:j, :]
        row = np.asfortranarray((delta * np.sqrt(n_a * n_b / n))[None, :].astype(self.dtype))
        self._rank_update(row)
        self.mean += delta * (n_b / n)
        self.count = n
        return self

    def covariance(self, dtype: type = np.float64, ddof: int = 0) -> np.ndarray:
        """The (C, C) covariance of everything seen so far.

        Args:
            dtype: dtype of the returned matrix (``np.float32`` halves its memory).
            ddof: 0 for the population covariance (np.cov(..., bias=True)), 1 for the sample one.
        Returns:
            (C, C) symmetric matrix, C order.
        """
        if self.count - ddof <= 0:
            raise ValueError(f"need more than {ddof} rows for a covariance, have {self.count}")
        C = self.num_classes
        scale = 1.0 / (self.count - ddof)
        out = np.empty((C, C), dtype=dtype)
        col = np.arange(C)
        for i in range(0, C, _ROW_BLOCK):
            j = min(i + _ROW_BLOCK, C)
            upper = self._m2[i:j, :]          # valid where col >= row
            lower = self._m2[:, i:j].T        # valid where col <= row (mirror of the upper triangle)
            keep_upper = col[None, :] >= np.arange(i, j)[:, None]
            out[i:j] = np.where(keep_upper, upper, lower) * scale
        return out


# -------------------------------------------------------------------------------------------------
# Clustering
# -------------------------------------------------------------------------------------------------

# Excess correlations at or below this are rounding (float32 scaling of equal correlations), not confusion.
_EXCESS_TOL = 1e-5


def class_points(cov: np.ndarray, normalize: str = "correlation", self_similarity: str = "max") -> np.ndarray:
    """One point per class for k-means: the (normalised) covariance columns, as rows of a matrix.

    Why normalise: a raw covariance column scales with how often the generalist predicts the class,
    so plain k-means on raw columns groups classes by *frequency* (all rare classes collapse near the
    origin into one cluster) rather than by *which classes they are confused with*.

    * ``"correlation"`` (default): divide by the standard deviations (covariance -> correlation),
      which removes the scale of both the class itself and of every coordinate, then scale each
      column to unit length so squared Euclidean distance is 2 - 2 cos(angle): k-means on these
      points is spherical k-means on patterns of co-prediction.
      Classes the generalist never varies on (zero variance) become the zero vector.
    * ``"excess"``: the correlation minus the class's median correlation with the other classes,
      negatives set to 0, then as ``"correlation"``. Predicted probabilities sum to 1, so every pair
      of classes is negatively correlated (about -1/(C-1) for a strong generalist) and a confusion
      shows only as a correlation *less negative* than the rest; with ``"correlation"`` every
      rarely-confused class is the same near-uniform negative vector, and those classes decide the
      clusters. Measured on three Fashion-MNIST generalists at K = 4, 20 k-means seeds each
      (docs/method.md, scripts/cluster_stability.py): with ``"correlation"`` 11 of 20 seeds left
      some class without a specialist on each generalist, 5-6 of them T-shirt and Shirt (the most
      confused pair); with ``"excess"`` 11 / 6 / 2 seeds did, and never T-shirt or Shirt.
    * ``"unit"``: columns of the covariance scaled to unit length (keeps per-coordinate scale).
    * ``"none"``: raw columns.

    `self_similarity` sets each class's own coordinate (the diagonal) before the unit scaling, for
    ``"correlation"`` and ``"unit"``:

    * ``"max"`` (default): the class's strongest off-diagonal entry. A correlation diagonal is 1
      while confusions are small (a strong generalist's are often 0.1-0.3), so with the diagonal kept
      every point is dominated by its own axis, all points are nearly orthogonal and k-means groups
      classes almost at random. Zeroing it fixes that but makes a confused *pair* {a, b} orthogonal
      on the coordinates they share (a = r*e_b + ..., b = r*e_a + ...). Setting the diagonal to
      the strongest confusion gives a and b the same two large coordinates. Measured on the
      Fashion-MNIST generalist (7.5 % error) at K = 4: ``"keep"`` finds {Shirt}, {Bag}, {Pullover}
      and one cluster of the other 7; ``"max"`` finds {Pullover, Coat}, {T-shirt, Shirt},
      {Sneaker, Ankle boot} and {Trouser, Dress, Sandal, Bag}.
    * ``"zero"``: 0 on the diagonal. ``"keep"``: the covariance's own diagonal.

    Args:
        cov: (C, C) symmetric covariance.
    Returns:
        (C, C) float32 array whose row c is class c's point.
    """
    if normalize not in ("correlation", "excess", "unit", "none"):
        raise ValueError(f"normalize must be 'correlation', 'excess', 'unit' or 'none', got {normalize!r}")
    if self_similarity not in ("max", "zero", "keep"):
        raise ValueError(f"self_similarity must be 'max', 'zero' or 'keep', got {self_similarity!r}")
    cov = np.asarray(cov)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square (C, C) matrix, got shape {cov.shape}")
    C = cov.shape[0]
    out = np.empty((C, C), dtype=np.float32)
    correlation = normalize in ("correlation", "excess")
    if correlation:
        std = np.sqrt(np.clip(np.diag(cov).astype(np.float64), 0.0, None))
        inv = np.zeros_like(std)
        inv[std > 0] = 1.0 / std[std > 0]
    # The covariance is symmetric, so column c equals row c: build rows blockwise, in place in the
    # float32 output (float32 is plenty for directions; float64 temporaries doubled the time).
    if correlation:
        inv32 = inv.astype(np.float32)
    for i in range(0, C, _ROW_BLOCK):
        j = min(i + _ROW_BLOCK, C)
        block = out[i:j]
        block[...] = cov[i:j]
        diag = (np.arange(j - i), np.arange(i, j))  # each row's own class
        if correlation:
            block *= inv32[i:j, None]
            block *= inv32[None, :]
        if normalize == "excess" and C > 2:
            own = block[diag].copy()
            block[diag] = np.nan
            median = np.nanmedian(block, axis=1, keepdims=True)
            block -= median
            block[diag] = own - median[:, 0]  # "keep" keeps this: 1 - the median
            block[~(block > _EXCESS_TOL)] = 0.0  # negatives, and float32 rounding that unit rows would blow up
        if normalize != "none" and self_similarity != "keep" and C > 1:
            if self_similarity == "zero":
                block[diag] = 0.0
            else:
                block[diag] = -np.inf
                block[diag] = block.max(axis=1)
        if normalize != "none":
            norm = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64)).astype(np.float32)
            np.divide(block, norm[:, None], out=block, where=norm[:, None] > 0)
    return out


def _sq_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(N, K) squared Euclidean distances, by one float32 matrix product.

    sklearn's `euclidean_distances` upcasts float32 inputs chunk by chunk to float64, which
    measured ~10x slower at C = 15,000; float32 products are ample to rank unit-length points.
    """
    x2 = np.einsum("ij,ij->i", points, points, dtype=np.float64)
    c = centers.astype(points.dtype)
    c2 = np.einsum("ij,ij->i", c, c, dtype=np.float64)
    d = x2[:, None] + c2[None, :] - 2.0 * (points @ c.T).astype(np.float64)
    return np.maximum(d, 0.0, out=d)


def _kmeans(points: np.ndarray, K: int, seed: int, batch_size: int, max_iter: int, n_init: int) -> np.ndarray:
    """Centroids (K, D) of on-line (mini-batch) k-means over the rows of `points`.

    Same procedure as `MiniBatchKMeans(n_init=n_init)` (k-means++ restarts on a random subsample,
    the one with the lowest inertia on it seeds the mini-batch run), but the k-means++ seeding runs
    on a float64 copy of the subsample: sklearn's seeding upcasts float32 distance blocks one chunk
    at a time and measured ~10x slower on 15,000-dimensional points.
    """
    from sklearn.cluster import MiniBatchKMeans, kmeans_plusplus

    C = points.shape[0]
    rs = np.random.RandomState(seed)
    batch_size = min(batch_size, C)
    init_size = min(C, max(3 * batch_size, 3 * K))
    sub = points[np.sort(rs.choice(C, size=init_size, replace=False))].astype(np.float64)
    best, best_inertia = None, np.inf
    for _ in range(max(1, n_init)):
        centers, _ = kmeans_plusplus(sub, K, random_state=rs)
        inertia = float(_sq_distances(sub, centers).min(axis=1).sum())
        if inertia < best_inertia:
            best, best_inertia = centers, inertia
    del sub
    km = MiniBatchKMeans(
        n_clusters=K, init=best.astype(points.dtype), n_init=1, batch_size=batch_size,
        max_iter=max_iter, random_state=rs.randint(2**31 - 1),
    )
    km.fit(points)
    return km.cluster_centers_


def _capacity_assign(dist: np.ndarray, max_size: int) -> np.ndarray:
    """Nearest-centroid labels with at most `max_size` classes per cluster.

    Greedy in order of distance over all (class, centroid) pairs: the classes closest to a centroid
    claim its places first, and a class whose nearest cluster is full moves to its nearest cluster
    with room. Classes that fit nowhere (K * max_size < C) get label -1 (no specialist).
    """
    C, K = dist.shape
    labels = np.full(C, -1, dtype=np.int64)
    room = np.full(K, max_size, dtype=np.int64)
    order = np.argsort(dist, axis=None, kind="stable")
    remaining = C
    for flat in order:
        c, k = divmod(int(flat), K)
        if labels[c] >= 0 or room[k] == 0:
            continue
        labels[c] = k
        room[k] -= 1
        remaining -= 1
        if remaining == 0 or not room.any():
            break
    return labels


def cluster_classes(
    cov: np.ndarray,
    num_specialists: int,
    subset_size: Optional[int] = None,
    min_size: int = 2,
    max_size: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 1024,
    normalize: str = "correlation",
    self_similarity: str = "max",
    n_components: Optional[int] = None,
    max_iter: int = 100,
    n_init: int = 3,
) -> list[list[int]]:
    """Class subsets for the specialists, from the covariance of the generalist's predictions.

    Runs on-line k-means (scikit-learn `MiniBatchKMeans`) with K = `num_specialists` over the
    classes, each class being the point `class_points(cov, normalize)[c]` in R^C.

    Subsets:
      * ``subset_size=None`` (disjoint): every class goes to its nearest centroid. With `max_size`,
        a cluster keeps its `max_size` closest classes and the overflow moves to the nearest
        centroid with room (see `_capacity_assign`); this keeps K specialists and coverage instead
        of creating extra clusters. Clusters with fewer than `min_size` classes are dropped: their
        classes are not covered by any specialist (the generalist alone handles them, as for about
        half of JFT's test examples in the paper).
      * ``subset_size=s``: each specialist takes the s classes nearest its centroid, so subsets may
        overlap (one way the paper's overlapping JFT subsets can arise). Identical subsets from
        two centroids are kept once.

    Dimensionality: the default clusters exact columns. `n_components=d` first projects the points
    onto their top d principal directions (randomized truncated SVD, `sklearn.utils.extmath.
    randomized_svd`), which preserves the distances that matter when the spectrum decays (group
    structure lives in the top eigenvectors). Measured at C = 15,000, K = 61 on two shared cores
    (bench/bench_specialists.py): ~50 CPU-seconds for exact columns, ~30 projected to 256
    dimensions, both recovering planted groups exactly; wall time was 2.5-4 minutes under heavy
    load from other jobs.

    Args:
        cov: (C, C) covariance of predicted probabilities (`CovarianceAccumulator.covariance()`).
        num_specialists: K, number of k-means clusters (1 <= K <= C).
        subset_size: classes per specialist, or None for disjoint clusters.
        min_size: smallest subset kept (disjoint mode).
        max_size: largest cluster allowed (disjoint mode); with `subset_size` it must be >= it.
        seed: random state of k-means (and of the projection); same seed, same subsets.
        batch_size: k-means mini-batch size.
        normalize, self_similarity: see `class_points`.
        n_components: project to this many dimensions first (None: exact columns).
        max_iter: passes of mini-batch k-means over the classes.
        n_init: k-means restarts; the best inertia wins.
    Returns:
        list of subsets, each a sorted list of class indices; the subsets in lexicographic order.
    """
    cov = np.asarray(cov)
    C = cov.shape[0] if cov.ndim == 2 else -1
    K = int(num_specialists)
    if not 1 <= K <= C:
        raise ValueError(f"num_specialists must be between 1 and the number of classes ({C}), got {K}")
    if subset_size is not None and not 1 <= subset_size <= C:
        raise ValueError(f"subset_size must be between 1 and the number of classes ({C}), got {subset_size}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if subset_size is not None and max_size is not None and subset_size > max_size:
        raise ValueError(f"subset_size {subset_size} exceeds max_size {max_size}")

    points = class_points(cov, normalize, self_similarity)
    if n_components is not None and n_components < C:
        from sklearn.utils.extmath import randomized_svd

        U, S, _ = randomized_svd(points, int(n_components), random_state=seed)
        points = np.ascontiguousarray(U * S, dtype=np.float32)

    centers = _kmeans(points, K, seed, batch_size, max_iter, n_init)
    dist = _sq_distances(points, centers)  # (C, K)
    del points

    if subset_size is not None:
        subsets = [np.sort(np.argsort(dist[:, k], kind="stable")[:subset_size]) for k in range(K)]
        unique = {tuple(s.tolist()) for s in subsets}
        out = [list(s) for s in unique]
    else:
        if max_size is not None and max_size < C:
            labels = _capacity_assign(dist, int(max_size))
        else:
            labels = np.argmin(dist, axis=1)
        out = []
        for k in range(K):
            members = np.flatnonzero(labels == k)
            if len(members) >= min_size:
                out.append(members.tolist())
    return sorted(out)


# -------------------------------------------------------------------------------------------------
# Evaluation helpers
# -------------------------------------------------------------------------------------------------

def subsets_to_labels(subsets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """(C,) cluster label per class: index of the first subset holding it; uncovered classes get
    distinct labels of their own (they are grouped with nothing)."""
    labels = np.full(num_classes, -1, dtype=np.int64)
    for m, s in enumerate(subsets):
        s = np.asarray(s, dtype=np.int64)
        free = s[labels[s] < 0]
        labels[free] = m
    missing = np.flatnonzero(labels < 0)
    labels[missing] = len(subsets) + np.arange(len(missing))
    return labels


def adjusted_rand(subsets: Sequence[Sequence[int]], class_groups, num_classes: int) -> float:
    """Adjusted Rand index between the subsets (as a class partition) and known class groups.

    Args:
        subsets: class subsets (overlaps resolved to the first subset, see `subsets_to_labels`).
        class_groups: (C,) true group id of each class.
    """
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(class_groups), subsets_to_labels(subsets, num_classes)))
