"""One distribution per sample from the generalist and its active specialists (Hinton et al. 2015, §5.4).

For a sample, the active specialists A are those whose class subset S^m meets the generalist's top-n
classes. The combined distribution q over all C classes minimises

    F(q) = KL(p^g || q) + sum_{m in A} KL(p^m || q^m),

where q^m is q collapsed onto specialist m's outputs (its classes kept, all others summed into its
dustbin). Two solvers, both batched over samples:

* `combine_fixed_point` (default): the MM iteration of PAPER.md §3,
      q_c <- (p^g_c + sum_m r^m_c) / (1 + |A|),
      r^m_c = p^m_c (c in S^m),   r^m_c = p^m_dustbin q_c / Q^m_dustbin (c not in S^m),
  where Q^m_dustbin is the mass of q outside S^m. It keeps q normalised, never increases F, and
  converges to the unique minimiser (F is strictly convex in q when p^g > 0 everywhere).
  Cost: classes outside the union U_b of a sample's active subsets all evolve by the same factor,
  q_c = s_b p^g_c, so only the |U_b| <= sum |S^m| classes of U_b and one scalar s_b per sample are
  iterated. An iteration costs O(sum over active (sample, specialist) pairs of |S^m|), independent
  of C; only the set-up and the write-out make a few O(B C) passes.
* `combine_gradient_descent`: the paper's reference, q = softmax(z) with z optimised by autograd
  (Adam or L-BFGS) on the summed per-sample objectives (the samples are independent, so the sum
  separates).

Conventions. `p_g` is (B, C) generalist probabilities; `spec_probs[m]` is (B, |S^m| + 1)
probabilities of specialist m, dustbin last, *already dustbin-corrected* (`specialists.dustbin`);
rows of specialists that are inactive for a sample are never read, so they may hold anything.
`active` is a (B, M) bool mask. Everything runs on CPU (or any torch device) in float32 or float64
input; the iterations run in float64 by default because Q^m_dustbin = 1 - (mass in S^m) is a
difference of nearly equal numbers when a specialist's classes hold almost all of q.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = [
    "SubsetIndex", "active_mask", "combine_fixed_point", "combine_gradient_descent", "objective",
    "combine",
]

SubsetsLike = Union["SubsetIndex", Sequence[Union[torch.Tensor, Sequence[int]]]]


class SubsetIndex:
    """Specialists' class subsets packed for batched indexing.

    Args:
        subsets: M subsets of class indices (lists, numpy arrays or LongTensors; each without repeats).
        num_classes: C.
        device: where the index tensors live.
    Attributes:
        sizes: (M,) subset sizes.
        padded: (M, Smax) int64 class indices, padded with 0.
        mask: (M, Smax) bool, True on real entries.
        member: (M, C) bool, member[m, c] iff c in S^m.
    """

    def __init__(self, subsets: Sequence, num_classes: int, device: Union[str, torch.device] = "cpu"):
        self.num_classes = int(num_classes)
        tensors = [torch.as_tensor(s, dtype=torch.long, device=device).reshape(-1) for s in subsets]
        if not tensors:
            raise ValueError("no specialist subsets given")
        for m, t in enumerate(tensors):
            if t.numel() == 0:
                raise ValueError(f"subset {m} is empty")
            if int(t.min()) < 0 or int(t.max()) >= self.num_classes:
                raise ValueError(f"subset {m} has class indices outside [0, {self.num_classes})")
            if torch.unique(t).numel() != t.numel():
                raise ValueError(f"subset {m} has repeated class indices")
        self.subsets = tensors
        self.num_specialists = len(tensors)
        self.sizes = torch.tensor([t.numel() for t in tensors], dtype=torch.long, device=device)
        smax = int(self.sizes.max())
        self.padded = torch.zeros(len(tensors), smax, dtype=torch.long, device=device)
        self.mask = torch.zeros(len(tensors), smax, dtype=torch.bool, device=device)
        self.member = torch.zeros(len(tensors), self.num_classes, dtype=torch.bool, device=device)
        for m, t in enumerate(tensors):
            self.padded[m, : t.numel()] = t
            self.mask[m, : t.numel()] = True
            self.member[m, t] = True

    @classmethod
    def of(cls, subsets: SubsetsLike, num_classes: int, device: Union[str, torch.device] = "cpu") -> "SubsetIndex":
        """`subsets` itself if already packed for C classes, else a new index."""
        if isinstance(subsets, SubsetIndex):
            if subsets.num_classes != num_classes:
                raise ValueError(f"SubsetIndex is for C={subsets.num_classes}, inputs have C={num_classes}")
            return subsets
        return cls(subsets, num_classes, device)


def active_mask(p_g: torch.Tensor, subsets: SubsetsLike, top_n: int = 1) -> torch.Tensor:
    """Which specialists are active for which samples.

    Args:
        p_g: (B, C) generalist probabilities, log-probabilities or logits (only the ranking is used).
        subsets: M subsets or a `SubsetIndex`.
        top_n: specialist m is active for sample b iff S^m contains one of b's top-n classes.
    Returns:
        (B, M) bool.
    """
    idx = SubsetIndex.of(subsets, p_g.shape[1], p_g.device)
    n = max(1, min(int(top_n), p_g.shape[1]))
    # For the paper's n = 1, max() is several times faster than topk(1) or argmax() on wide rows.
    top = p_g.max(dim=1, keepdim=True).indices if n == 1 else p_g.topk(n, dim=1).indices  # (B, n)
    return idx.member[:, top].any(dim=2).T.contiguous()    # (M, B, n) -> (B, M)


@dataclass
class _Pairs:
    """The active (sample, specialist) pairs of the rows being combined, N of them."""

    rows: torch.Tensor   # (R,) batch rows with at least one active specialist
    b: torch.Tensor      # (N,) compact row (0..R-1) of each pair
    m: torch.Tensor      # (N,) specialist of each pair
    idx: torch.Tensor    # (N, Smax) class indices of S^m (padded with 0)
    mask: torch.Tensor   # (N, Smax) compute dtype, 1 on real entries
    p_in: torch.Tensor   # (N, Smax) specialist probabilities of its classes (0 on padding)
    p_d: torch.Tensor    # (N,) specialist dustbin probability
    n_active: torch.Tensor  # (R,) |A_b|


def _check(p_g: torch.Tensor, spec_probs: Sequence[torch.Tensor], sidx: SubsetIndex, active: torch.Tensor) -> None:
    if p_g.ndim != 2:
        raise ValueError(f"p_g must be (B, C), got shape {tuple(p_g.shape)}")
    B = p_g.shape[0]
    if len(spec_probs) != sidx.num_specialists:
        raise ValueError(f"{len(spec_probs)} specialist outputs for {sidx.num_specialists} subsets")
    for m, sp in enumerate(spec_probs):
        want = (B, int(sidx.sizes[m]) + 1)
        if tuple(sp.shape) != want:
            raise ValueError(f"specialist {m} output has shape {tuple(sp.shape)}, expected {want} "
                             "(its subset's classes, then the dustbin)")
    if tuple(active.shape) != (B, sidx.num_specialists):
        raise ValueError(f"active must be (B, M) = {(B, sidx.num_specialists)}, got {tuple(active.shape)}")


def _pack(spec_probs: Sequence[torch.Tensor], sidx: SubsetIndex, active: torch.Tensor, dtype: torch.dtype) -> _Pairs:
    active = active.to(torch.bool)
    rows = active.any(dim=1).nonzero().squeeze(1)
    act = active[rows]
    b, m = act.nonzero(as_tuple=True)  # ordered by row, then specialist
    idx = sidx.padded[m]
    mask = sidx.mask[m].to(dtype)
    p_in = torch.zeros(idx.shape, dtype=dtype, device=idx.device)
    p_d = torch.zeros(b.shape[0], dtype=dtype, device=idx.device)
    for k in torch.unique(m).tolist():  # one gather per specialist, not per sample
        sel = (m == k).nonzero().squeeze(1)
        out = spec_probs[k][rows[b[sel]]].to(dtype)
        size = int(sidx.sizes[k])
        p_in[sel, :size] = out[:, :size]
        p_d[sel] = out[:, size]
    return _Pairs(rows, b, m, idx, mask, p_in, p_d, act.sum(dim=1))


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def combine_fixed_point(
    p_g: torch.Tensor,
    spec_probs: Sequence[torch.Tensor],
    subsets: SubsetsLike,
    active: Optional[torch.Tensor] = None,
    iters: int = 50,
    tol: float = 1e-10,
    log_p_g: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined distribution by the MM fixed-point iteration (see module doc).

    Args:
        p_g: (B, C) generalist probabilities, strictly positive (softmax outputs are).
        spec_probs: M tensors (B, |S^m| + 1), dustbin-corrected specialist probabilities.
        subsets: M subsets or a `SubsetIndex`.
        active: (B, M) bool; default `active_mask(p_g, subsets, 1)`.
        iters: maximum iterations.
        tol: stop when no q_c (and no outside-union scale) moves by more than this.
        log_p_g: optional (B, C) log p_g; gives exact log q for classes outside all active subsets
            even where p_g underflows.
        compute_dtype: dtype of the iteration (float64 recommended).
        callback: called as callback(t, q) with the dense (B, C) iterate after t iterations
            (t = 0 is the initial q = p_g); for diagnostics, costs O(B C) per call.
    Returns:
        (q, log_q): both (B, C) in p_g's dtype. Rows with no active specialist are exactly p_g.
    """
    B, C = p_g.shape
    sidx = SubsetIndex.of(subsets, C, p_g.device)
    if active is None:
        active = active_mask(p_g, sidx, 1)
    _check(p_g, spec_probs, sidx, active)
    cd = compute_dtype
    pr = _pack(spec_probs, sidx, active, cd)
    R = pr.rows.numel()
    if R == 0:
        if callback is not None:
            callback(0, p_g.clone())
        return p_g.clone(), (log_p_g.clone() if log_p_g is not None else _safe_log(p_g)).to(p_g.dtype)

    # The O(B C) passes below dominate the cost at large C, so avoid copies when every row is active.
    all_rows = R == B
    pg = (p_g if all_rows else p_g[pr.rows]).to(cd)  # (R, C); may alias p_g: never modified
    # Unique (row, class) slots of the union U_b of each row's active subsets; `inv` maps every
    # (pair, position) to its slot, so overlapping subsets share one q value.
    valid = pr.mask > 0
    keys = pr.b[:, None] * C + pr.idx                                  # (N, Smax)
    slot_keys, inv = torch.unique(keys[valid], return_inverse=True)    # (U,), (nnz,)
    u_b, u_c = slot_keys // C, slot_keys % C
    nnz_pair = valid.nonzero()[:, 0]                                   # (nnz,) pair of each entry
    U = slot_keys.numel()
    N = pr.b.numel()

    pg_u = pg[u_b, u_c]                                                # (U,)
    base_u = pg_u.clone().index_add_(0, inv, pr.p_in[valid])           # p^g_c + sum_{m: c in S^m} p^m_c
    # p_g outside the union (zero inside). Its mass is summed directly, not as 1 - inside, so tiny
    # values keep their precision; the buffer becomes the output rows at the end.
    rest = pg.clone()
    rest[u_b, u_c] = 0.0
    g_out = rest.sum(dim=1)                                            # (R,)
    out_max = rest.amax(dim=1)                                         # scales s's change like q's
    denom = 1.0 + pr.n_active.to(cd)                                   # (R,)
    denom_u = denom[u_b]

    q_u = pg_u.clone()                 # q on the union slots
    s = torch.ones(R, dtype=cd, device=pg.device)  # q_c = s_b p^g_c outside the union

    def dense(q_u_: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        q = p_g.to(cd, copy=True)
        q[pr.rows] = rest * s_[:, None]
        q[pr.rows[u_b], u_c] = q_u_
        return q.to(p_g.dtype)

    if callback is not None:
        callback(0, dense(q_u, s))
    tiny = torch.finfo(cd).tiny
    for t in range(1, iters + 1):
        q_in = torch.zeros(N, dtype=cd, device=pg.device).index_add_(0, nnz_pair, q_u[inv])  # mass in S^m
        mass_u = torch.zeros(R, dtype=cd, device=pg.device).index_add_(0, u_b, q_u)
        q_dust = (s[pr.b] * g_out[pr.b] + mass_u[pr.b] - q_in).clamp_min(tiny)  # Q^m_dustbin
        a = pr.p_d / q_dust                                             # (N,)
        a_tot = torch.zeros(R, dtype=cd, device=pg.device).index_add_(0, pr.b, a)
        a_in = torch.zeros(U, dtype=cd, device=pg.device).index_add_(0, inv, a[nnz_pair])  # sum_{m: c in S^m} a_m
        coef = (a_tot[u_b] - a_in).clamp_min(0.0)                       # sum_{m: c not in S^m} a_m
        q_u_new = (base_u + q_u * coef) / denom_u
        s_new = (1.0 + s * a_tot) / denom
        change = max(float((q_u_new - q_u).abs().max()), float(((s_new - s).abs() * out_max).max()))
        q_u, s = q_u_new, s_new
        if callback is not None:
            callback(t, dense(q_u, s))
        if change <= tol:
            break

    q_rows = rest.mul_(s[:, None])
    q_rows[u_b, u_c] = q_u
    if log_p_g is not None:
        log_rows = (log_p_g if all_rows else log_p_g[pr.rows]).to(cd) + torch.log(s)[:, None]
    else:
        log_rows = _safe_log(pg) + torch.log(s)[:, None]
    log_rows[u_b, u_c] = _safe_log(q_u)
    if all_rows:
        return q_rows.to(p_g.dtype), log_rows.to(p_g.dtype)
    q_full = p_g.clone()
    q_full[pr.rows] = q_rows.to(p_g.dtype)
    log_q_full = (log_p_g.clone() if log_p_g is not None else _safe_log(p_g)).to(p_g.dtype)
    log_q_full[pr.rows] = log_rows.to(p_g.dtype)
    return q_full, log_q_full


def _p_log_q(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * log q with 0 * log 0 = 0 (where p is zero, q may be too)."""
    return torch.where(p > 0, p * log_q, torch.zeros((), dtype=p.dtype, device=p.device))


def _pair_terms(log_q: torch.Tensor, pr: _Pairs, not_member: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(N,) sum_m KL(p^m || q^m) terms for each active pair, from (R, C) log q."""
    log_q_in = log_q[pr.b[:, None], pr.idx]                            # (N, Smax)
    kl_in = (torch.xlogy(pr.p_in, pr.p_in) - _p_log_q(pr.p_in * pr.mask, log_q_in)).sum(dim=1)
    parts = []
    for i in range(0, pr.b.numel(), chunk):  # bound the (pairs, C) temporary
        lq = log_q[pr.b[i:i + chunk]].masked_fill(~not_member[pr.m[i:i + chunk]], float("-inf"))
        parts.append(torch.logsumexp(lq, dim=1))
    log_q_dust = torch.cat(parts) if parts else log_q.new_zeros(0)
    kl_d = torch.xlogy(pr.p_d, pr.p_d) - _p_log_q(pr.p_d, log_q_dust)
    return kl_in + kl_d


def objective(
    q: torch.Tensor,
    p_g: torch.Tensor,
    spec_probs: Sequence[torch.Tensor],
    subsets: SubsetsLike,
    active: torch.Tensor,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """F(q) = KL(p^g || q) + sum_{m active} KL(p^m || q^m) per sample.

    q^m's dustbin mass is summed over the classes outside S^m directly (no 1 - x cancellation).

    Args:
        q: (B, C) candidate distribution.
        p_g, spec_probs, subsets, active: as in `combine_fixed_point`.
    Returns:
        (B,) objective in compute_dtype.
    """
    B, C = p_g.shape
    sidx = SubsetIndex.of(subsets, C, p_g.device)
    _check(p_g, spec_probs, sidx, active)
    qd, pgd = q.to(compute_dtype), p_g.to(compute_dtype)
    log_q = torch.log(qd)
    out = (torch.xlogy(pgd, pgd) - torch.xlogy(pgd, qd)).sum(dim=1)
    pr = _pack(spec_probs, sidx, active, compute_dtype)
    if pr.rows.numel():
        terms = _pair_terms(log_q[pr.rows], pr, ~sidx.member)
        out.index_add_(0, pr.rows[pr.b], terms)
    return out


def _minimise(z: torch.Tensor, loss_fn: Callable[[], torch.Tensor], optimizer: str, iters: int,
              lr: Optional[float]) -> None:
    """Optimise the leaf tensor z in place by Adam or L-BFGS on loss_fn()."""
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([z], lr=lr or 1.0, max_iter=iters, max_eval=iters * 2, history_size=20,
                                tolerance_grad=1e-12, tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
    else:
        opt = torch.optim.Adam([z], lr=lr or 0.05)
        for _ in range(iters):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()


def combine_gradient_descent(
    p_g: torch.Tensor,
    spec_probs: Sequence[torch.Tensor],
    subsets: SubsetsLike,
    active: Optional[torch.Tensor] = None,
    iters: int = 500,
    optimizer: str = "adam",
    lr: Optional[float] = None,
    log_p_g: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined distribution by optimising q = softmax(z) with autograd (the paper's method).

    z starts at log p_g. Only rows with an active specialist are optimised; the others return p_g.

    Args:
        p_g, spec_probs, subsets, active, log_p_g, compute_dtype: as in `combine_fixed_point`.
        iters: Adam steps, or L-BFGS iterations (one `step` with `max_iter=iters`).
        optimizer: "adam" (default) or "lbfgs". L-BFGS stalls near q-precision 1e-7: its line
            search works on the summed objective, whose changes near the optimum fall below float64
            resolution. Adam uses only gradients and gets closer, but its nearly sign-like steps
            leave the log-probabilities of tiny classes noisy (their gradients vanish with q_c);
            `combine_fixed_point` has neither problem.
        lr: step size (default 0.05 for Adam, 1.0 for L-BFGS with strong-Wolfe line search).
    Returns:
        (q, log_q): both (B, C) in p_g's dtype.
    """
    B, C = p_g.shape
    sidx = SubsetIndex.of(subsets, C, p_g.device)
    if active is None:
        active = active_mask(p_g, sidx, 1)
    _check(p_g, spec_probs, sidx, active)
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    cd = compute_dtype
    q_full = p_g.clone()
    log_q_full = (log_p_g.clone() if log_p_g is not None else _safe_log(p_g)).to(p_g.dtype)
    pr = _pack(spec_probs, sidx, active, cd)
    if pr.rows.numel() == 0:
        return q_full, log_q_full
    pg = p_g[pr.rows].detach().to(cd)
    z0 = log_p_g[pr.rows].detach().to(cd) if log_p_g is not None else _safe_log(pg)
    z = z0.clone().requires_grad_(True)  # a fresh leaf, whatever graph the inputs came from
    not_member = ~sidx.member
    ent_g = torch.xlogy(pg, pg).sum()

    def loss_fn() -> torch.Tensor:
        # z - logsumexp(z) rather than log_softmax: same value, but aten's log_softmax splits even
        # tiny batches across threads, which is ~50x slower on a busy machine (measured).
        log_q = z - torch.logsumexp(z, dim=1, keepdim=True)
        return ent_g - (pg * log_q).sum() + _pair_terms(log_q, pr, not_member).sum()

    with torch.enable_grad():  # callers often run inference under no_grad; this needs autograd
        _minimise(z, loss_fn, optimizer, iters, lr)

    with torch.no_grad():
        log_q = z - torch.logsumexp(z, dim=1, keepdim=True)
        q_full[pr.rows] = log_q.exp().to(p_g.dtype)
        log_q_full[pr.rows] = log_q.to(p_g.dtype)
    return q_full, log_q_full


def combine(
    p_g_logits: torch.Tensor,
    spec_logits_list: Sequence[torch.Tensor],
    subsets: SubsetsLike,
    top_n: int = 1,
    method: str = "fixed_point",
    iters: int = 50,
    tol: float = 1e-10,
    dustbin_corrections: Optional[Sequence[float]] = None,
    active: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Log of the combined distribution, from raw logits (log-probabilities work too).

    Args:
        p_g_logits: (B, C) generalist logits or log-probabilities.
        spec_logits_list: M tensors (B, |S^m| + 1), specialist logits, dustbin last. Already
            dustbin-corrected unless `dustbin_corrections` is given; rows of inactive specialists
            are ignored (may be zeros if the specialist was not run on them).
        subsets: M subsets or a `SubsetIndex`.
        top_n: specialists meeting the generalist's top-n classes are active.
        method: "fixed_point" (MM iteration) or "gradient" (autograd, Adam).
        iters: iterations of the chosen method.
        tol: fixed point: stopping tolerance on q.
        dustbin_corrections: optional M values added to each specialist's dustbin logit.
        active: optional (B, M) bool overriding the top-n rule.
    Returns:
        (B, C) log q in p_g_logits' dtype.
    """
    if method not in ("fixed_point", "gradient"):
        raise ValueError(f"method must be 'fixed_point' or 'gradient', got {method!r}")
    B, C = p_g_logits.shape
    sidx = SubsetIndex.of(subsets, C, p_g_logits.device)
    if dustbin_corrections is not None and len(dustbin_corrections) != sidx.num_specialists:
        raise ValueError(f"{len(dustbin_corrections)} dustbin corrections for {sidx.num_specialists} subsets")
    log_p_g = torch.log_softmax(p_g_logits.to(torch.float64), dim=1)
    p_g = log_p_g.exp()
    spec_probs = []
    for m, logits in enumerate(spec_logits_list):
        logits = logits.to(torch.float64)
        if dustbin_corrections is not None:
            logits = logits.clone()
            logits[:, -1] += float(dustbin_corrections[m])
        spec_probs.append(torch.softmax(logits, dim=1))
    if active is None:
        active = active_mask(log_p_g, sidx, top_n)
    if method == "fixed_point":
        _, log_q = combine_fixed_point(p_g, spec_probs, sidx, active, iters=iters, tol=tol, log_p_g=log_p_g)
    else:
        _, log_q = combine_gradient_descent(p_g, spec_probs, sidx, active, iters=iters, log_p_g=log_p_g)
    return log_q.to(p_g_logits.dtype)
