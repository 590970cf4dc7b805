"""Covariances for clustering tests (numpy only, no Ray)."""
from __future__ import annotations

import numpy as np

# Every pair of the 10 classes mildly negative, as for a strong generalist's probabilities (which sum
# to 1), except three confused pairs: one positively correlated, two only less negative than the rest.
CONFUSED_PAIRS = {(0, 1): 0.3, (2, 3): -0.05, (4, 5): -0.07}


def simplex_like_correlation(C: int = 10, common: float = -0.11) -> np.ndarray:
    r = np.full((C, C), common)
    np.fill_diagonal(r, 1.0)
    for (a, b), v in CONFUSED_PAIRS.items():
        r[a, b] = r[b, a] = v
    return r


def simplex_like_cov(C: int = 10) -> np.ndarray:
    """`simplex_like_correlation` with per-class scales from 0.05 to 0.3."""
    d = np.linspace(0.05, 0.3, C)
    return simplex_like_correlation(C) * d[:, None] * d[None, :]
