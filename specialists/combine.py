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
  Cost (docs/performance.md): classes outside the union U_b of a sample's active subsets all evolve
  by the same factor, q_c = s_b p^g_c, so only U_b (in float64 by default) and one scalar s_b per
  sample are iterated; everything over all C classes stays in the input dtype and is done in three
  passes with no (B, C) temporary beside the output: the top-n classes (max), one chunked pass for
  each row's logsumexp and its mass outside U_b, and the write of log q = z - lse_b + log s_b. A
  sample with one active specialist has a closed form (the iteration's first step). The classes of
  a multi-specialist union fall into a few cells by which subsets hold them, and the iterates are
  q_c = A(cell) * (p^g_c + sum_{m: c in S^m} p^m_c) + B(cell) * p^g_c, so an iteration updates a few
  numbers per cell, not per class. Convergence is checked on the device every `check_every`
  iterations: one host sync per check.
* `combine_gradient_descent`: the paper's reference, q = softmax(z) with z optimised by autograd
  (Adam or L-BFGS) on the summed per-sample objectives (the samples are independent, so the sum
  separates).

Conventions. `p_g` is (B, C) generalist probabilities; `spec_probs[m]` is (B, |S^m| + 1)
probabilities of specialist m, dustbin last, *already dustbin-corrected* (`specialists.dustbin`);
rows of specialists that are inactive for a sample are never read, so they may hold anything.
`active` is a (B, M) bool mask. Everything runs on CPU or any torch device in the input's float
dtype; the union's iteration runs in float64 by default (`compute_dtype`) because
Q^m_dustbin = (mass outside S^m) is tiny when a specialist's classes hold almost all of q; the mass
of p_g outside the union is summed directly for the same reason, never as 1 - (mass inside).
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
        self.sizes_list = [int(t.numel()) for t in tensors]
        self.sizes = torch.tensor(self.sizes_list, dtype=torch.long, device=device)
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


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x.view(-1)[idx] by `index_select` (several times faster than advanced indexing on CPU)."""
    return x.reshape(-1).index_select(0, idx)


@dataclass
class _Entries:
    """The active (sample, specialist) pairs, N of them, and their (pair, class) entries, nnz of them.

    Rows are batch rows (not compacted); pairs are ordered by row, then specialist, so entries are
    ordered by row too.
    """

    b: torch.Tensor        # (N,) row of each pair
    m: torch.Tensor        # (N,) specialist of each pair
    p_d: torch.Tensor      # (N,) specialist dustbin probability (compute dtype)
    n_active: torch.Tensor  # (B,) |A_b|
    e_pair: torch.Tensor   # (nnz,) pair of each entry
    e_b: torch.Tensor      # (nnz,) row of each entry
    e_c: torch.Tensor      # (nnz,) class of each entry
    e_flat: torch.Tensor   # (nnz,) e_b * C + e_c: the entry's cell in a flat (B, C) tensor
    e_p: torch.Tensor      # (nnz,) specialist probability of the entry's class (compute dtype)
    num_classes: int


def _gather_pairs(outputs: Sequence[torch.Tensor], sidx: SubsetIndex, active: torch.Tensor, dtype: torch.dtype,
                  fill: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the specialists' outputs for the active pairs: one gather per active specialist.

    Returns (b, m, rows): rows is (N, Smax + 1) in `dtype`, pair n's |S^m| + 1 outputs (dustbin
    last) left-aligned, the rest `fill`.
    """
    b, m = active.nonzero(as_tuple=True)  # ordered by row, then specialist
    N = b.numel()
    width = max(sidx.sizes_list) + 1
    if N == 0:
        return b, m, torch.full((0, width), fill, dtype=dtype, device=active.device)
    order = torch.argsort(m, stable=True)
    rows_sorted = b.index_select(0, order)
    counts = torch.bincount(m, minlength=sidx.num_specialists).tolist()  # one host sync for the loop
    parts, start = [], 0
    for k, cnt in enumerate(counts):
        if cnt:
            part = outputs[k].index_select(0, rows_sorted[start:start + cnt])
            if part.shape[1] < width:
                part = torch.nn.functional.pad(part, (0, width - part.shape[1]), value=fill)
            parts.append(part)
            start += cnt
    rows = torch.empty((N, width), dtype=dtype, device=active.device)
    rows.index_copy_(0, order, torch.cat(parts).to(dtype))
    return b, m, rows


def _entries(b: torch.Tensor, m: torch.Tensor, probs: torch.Tensor, sidx: SubsetIndex,
             active: torch.Tensor) -> _Entries:
    """Split (N, Smax + 1) specialist probabilities into per-entry values and dustbin masses."""
    dev = b.device
    N, width = probs.shape
    sizes = sidx.sizes.index_select(0, m)
    pair_ids = torch.arange(N, device=dev)
    p_d = _take(probs, pair_ids * width + sizes)
    if min(sidx.sizes_list) == width - 1:  # every subset of one size: no padding to skip
        S = width - 1
        e_pair = pair_ids[:, None].expand(N, S).reshape(-1)
        e_c = sidx.padded.index_select(0, m).reshape(-1)
        e_p = probs[:, :S].reshape(-1)
    else:
        e_pair = pair_ids.repeat_interleave(sizes)
        j = torch.arange(e_pair.numel(), device=dev) - (torch.cumsum(sizes, 0) - sizes).index_select(0, e_pair)
        e_c = _take(sidx.padded, m.index_select(0, e_pair) * sidx.padded.shape[1] + j)
        e_p = _take(probs, e_pair * width + j)
    e_b = b.index_select(0, e_pair)
    return _Entries(b, m, p_d, active.sum(dim=1), e_pair, e_b, e_c, e_b * sidx.num_classes + e_c, e_p,
                    sidx.num_classes)


def _compact(keys: torch.Tensor, space: int) -> torch.Tensor:
    """Dense ids 0..K-1 of the distinct values of `keys` (in increasing key order), keys in [0, space).

    For a key space up to a few times the number of keys a presence table and a cumulative sum
    replace the sort of `torch.unique`.
    """
    if space <= 8 * keys.numel() + 1024:
        present = torch.zeros(space, dtype=torch.int32, device=keys.device)
        present.index_fill_(0, keys, 1)
        return (torch.cumsum(present, 0, dtype=torch.int32) - 1).index_select(0, keys).long()
    return torch.unique(keys, return_inverse=True)[1]


def _dedup(keys: torch.Tensor, space: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique slots of entry keys: (slot of each entry, one entry of each slot).

    Overlapping subsets of one row put a class in several entries, which must share one q value.
    """
    nnz = keys.numel()
    inv = _compact(keys, space)
    first = torch.empty(int(inv.max()) + 1 if nnz else 0, dtype=torch.long, device=keys.device)
    first.index_copy_(0, inv, torch.arange(nnz, device=keys.device))  # any entry of the slot will do
    return inv, first


def _normalisers(z: torch.Tensor, zmax: torch.Tensor, ent: _Entries, cd: torch.dtype,
                 chunk_elems: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over z: (lse, outside) per row and z on the entries, in `cd`.

    lse = logsumexp(z_b); outside = p_g's mass outside the union of row b's active subsets, summed
    directly (not as 1 - inside: a union may hold nearly all the mass). By row chunks small enough
    to stay in cache between their few operations; the only temporary is one chunk of exp(z - shift)
    in z's dtype. The shift is the row maximum, or 0 when every row maximum lies in [-40, 75]
    (exp(z) then neither overflows nor loses anything but terms e^-47 below the row's largest).
    """
    B, C = z.shape
    if chunk_elems is None:  # CPU: chunks that stay in L2 between their operations; GPU: large launches
        chunk_elems = 1 << 18 if z.device.type == "cpu" else 1 << 24
    lse = torch.empty(B, dtype=cd, device=z.device)
    outside = torch.empty(B, dtype=cd, device=z.device)
    z_e = torch.empty(ent.e_flat.numel(), dtype=z.dtype, device=z.device)
    step = max(1, chunk_elems // max(1, C))
    starts = list(range(0, B, step))
    # entries are sorted by row: each chunk's entries are one contiguous range
    bounds = torch.searchsorted(ent.e_b, torch.tensor(starts + [B], device=z.device)).tolist()
    shift = bool(((zmax < -40) | (zmax > 75)).any()) if B else False
    buf = torch.empty((min(step, B), C), dtype=z.dtype, device=z.device)  # reused: no page faults per chunk
    for n, i in enumerate(starts):
        zc = z[i:i + step]
        e = buf[:zc.shape[0]]
        lo, hi = bounds[n], bounds[n + 1]
        sel = ent.e_flat[lo:hi] - i * C
        z_e[lo:hi] = zc.reshape(-1).index_select(0, sel)  # the chunk is in cache: a cheap gather
        if shift:
            torch.sub(zc, zmax[i:i + step, None], out=e).exp_()
            base = zmax[i:i + step].to(cd)
        else:
            torch.exp(zc, out=e)
            base = 0.0
        s_all = e.sum(dim=1).to(cd)
        e.put_(sel, torch.zeros(sel.numel(), dtype=e.dtype, device=e.device))
        lse[i:i + step] = torch.log(s_all) + base
        outside[i:i + step] = e.sum(dim=1).to(cd) / s_all
    # Where the outside mass underflows z's dtype (every outside class ~87 nats below the top in
    # float32), sum those rows again in `cd` with a per-row shift, so their tiny mass stays exact.
    small = outside < torch.finfo(z.dtype).tiny * C * (1.0 if shift else 1e6)
    if bool(small.any()):  # rare; one host sync
        for r in small.nonzero().squeeze(1).tolist():
            row = z[r].to(cd)
            row[ent.e_c[ent.e_b == r]] = float("-inf")
            outside[r] = torch.exp(torch.logsumexp(row, dim=0) - lse[r])
    return lse, outside, z_e


class _MultiRows:
    """The MM iteration on the rows with several active specialists, in `cd`.

    The union's classes of a row fall into cells by which of the row's active subsets hold them
    (one cell for a class only in S^1, one for classes in S^1 and S^2, ...). Every class of a cell
    has the same coefficient sum_{m: c not in S^m} a_m, so after t steps
    q_c = A_t(cell) (p^g_c + sum_{m: c in S^m} p^m_c) + B_t(cell) p^g_c exactly, and an iteration
    only updates (A, B) per cell and s per row: a few hundred numbers, however wide the subsets.
    q itself is formed once at the end (`q_slots`).
    """

    def __init__(self, ent: _Entries, em: torch.Tensor, lp_e: torch.Tensor, g_out: torch.Tensor, cd: torch.dtype):
        dev = em.device
        self.cd, self.tiny = cd, torch.finfo(cd).tiny
        multi_pair = ent.n_active.index_select(0, ent.b) > 1
        pairs = multi_pair.nonzero().squeeze(1)                              # multi pairs, sorted by row
        pair_no = torch.full((ent.b.numel(),), -1, dtype=torch.long, device=dev)
        pair_no[pairs] = torch.arange(pairs.numel(), device=dev)
        rows, row_of_pair, per_row = torch.unique_consecutive(ent.b.index_select(0, pairs), return_inverse=True,
                                                              return_counts=True)
        R, P = rows.numel(), pairs.numel()
        m_pair = pair_no.index_select(0, ent.e_pair.index_select(0, em))    # (nnz_m,) compact pair of each entry
        # slots: unique (row, class) of the entries (overlapping subsets share one q value)
        C = ent.num_classes
        e_row = row_of_pair.index_select(0, m_pair)
        inv, first = _dedup(e_row * C + ent.e_c.index_select(0, em), R * C)
        U = first.numel()
        u_first = em.index_select(0, first)
        u_row = row_of_pair.index_select(0, m_pair.index_select(0, first))  # (U,) compact row of each slot
        pg_u = lp_e.index_select(0, u_first).exp()
        base_u = pg_u.clone().index_add_(0, inv, ent.e_p.index_select(0, em))  # p^g_c + sum_{m: c in S^m} p^m_c
        # cells: (row, set of the row's pairs holding the class) as a bit mask of the pairs' ranks
        rank = torch.arange(P, device=dev) - (torch.cumsum(per_row, 0) - per_row).index_select(0, row_of_pair)
        nbits = int(per_row.max())
        if nbits <= 40:
            bits = torch.zeros(U, dtype=torch.long, device=dev).index_add_(
                0, inv, torch.pow(2, rank.index_select(0, m_pair)))
            cell_keys = u_row * (1 << nbits) + bits
        else:  # too many active specialists for a bit mask: every slot its own cell (same iterates)
            cell_keys = torch.arange(U, device=dev)
        cell = _compact(cell_keys, R << nbits if nbits <= 40 else U)       # (U,) cell of each slot
        NC = int(cell.max()) + 1
        self.cell_row = torch.zeros(NC, dtype=torch.long, device=dev).scatter_(0, cell, u_row)
        # (cell, pair) incidences: pair m holds the classes of the cell
        inc_keys = cell.index_select(0, inv) * P + m_pair
        inc = torch.zeros(NC * P, dtype=torch.bool, device=dev).index_fill_(0, inc_keys, True).nonzero().squeeze(1)
        self.inc_cell, self.inc_pair = inc // P, inc % P
        zeros = torch.zeros(NC, dtype=cd, device=dev)
        self.s_base = zeros.clone().index_add_(0, cell, base_u)
        self.s_pg = zeros.clone().index_add_(0, cell, pg_u)
        self.max_base = zeros.clone().scatter_reduce_(0, cell, base_u, reduce="amax")
        self.max_pg = zeros.clone().scatter_reduce_(0, cell, pg_u, reduce="amax")
        self.A, self.B = zeros.clone(), torch.ones(NC, dtype=cd, device=dev)
        self.s = torch.ones(R, dtype=cd, device=dev)
        self.rows, self.row_of_pair, self.P, self.R = rows, row_of_pair, P, R
        self.p_d = ent.p_d.index_select(0, pairs)
        self.g_rows = g_out.index_select(0, rows)
        self.denom = 1.0 + ent.n_active.index_select(0, rows).to(cd)
        self.denom_cell = self.denom.index_select(0, self.cell_row)
        self.cell, self.base_u, self.pg_u = cell, base_u, pg_u
        self.u_flat = ent.e_flat.index_select(0, u_first)

    def step(self, with_change: bool) -> Optional[torch.Tensor]:
        """One MM step; with `with_change`, a device scalar bounding how far any q_c moved."""
        cd, dev = self.cd, self.s.device
        val = self.A * self.s_base + self.B * self.s_pg                       # q's mass per cell
        q_in = torch.zeros(self.P, dtype=cd, device=dev).index_add_(0, self.inc_pair, val.index_select(0, self.inc_cell))
        mass_u = torch.zeros(self.R, dtype=cd, device=dev).index_add_(0, self.cell_row, val)  # q's mass in U_b
        q_dust = ((self.s * self.g_rows + mass_u).index_select(0, self.row_of_pair) - q_in).clamp_min(self.tiny)
        a = self.p_d / q_dust                                                 # (P,)
        a_tot = torch.zeros(self.R, dtype=cd, device=dev).index_add_(0, self.row_of_pair, a)
        a_in = torch.zeros_like(val).index_add_(0, self.inc_cell, a.index_select(0, self.inc_pair))
        coef = (a_tot.index_select(0, self.cell_row) - a_in).clamp_min(0.0)  # sum_{m: c not in S^m} a_m
        A = (1.0 + self.A * coef) / self.denom_cell
        B = self.B * coef / self.denom_cell
        s = (1.0 + self.s * a_tot) / self.denom
        change = None
        if with_change:  # |dq_c| <= |dA| base_c + |dB| p^g_c; outside the union |ds| p^g_c <= |ds| (its mass)
            change = torch.maximum(((A - self.A).abs() * self.max_base + (B - self.B).abs() * self.max_pg).max(),
                                   ((s - self.s).abs() * self.g_rows).max())
        self.A, self.B, self.s = A, B, s
        return change

    def q_slots(self) -> torch.Tensor:
        """(U,) q on the union slots of the multi rows."""
        return self.A.index_select(0, self.cell) * self.base_u + self.B.index_select(0, self.cell) * self.pg_u


def _solve(
    z: torch.Tensor,
    zmax: torch.Tensor,
    out: torch.Tensor,
    ent: _Entries,
    iters: int,
    tol: float,
    cd: torch.dtype,
    check_every: int,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> None:
    """The MM iteration: writes log q into `out` (which may be z itself).

    z: (B, C) contiguous generalist logits or log-probabilities, zmax its row maxima. Only the
    union U_b of each row's active subsets is iterated, in `cd`; every other class gets
    log q = z - lse_b + log s_b with one scale s_b per row, written in z's dtype by one pass. A row
    with one active specialist has a closed form, which the iteration reaches in its first step
    (q_c = (p^g_c + p^m_c) / 2 on S^m, s_b = (1 + p^m_dustbin / p^g(outside S^m)) / 2), so only
    rows with several active specialists iterate.
    """
    B, C = z.shape
    dev = z.device
    tiny = torch.finfo(cd).tiny
    lse, g_out, z_e = _normalisers(z, zmax, ent, cd)
    lp_e = z_e.to(cd) - lse.index_select(0, ent.e_b)        # log p_g on the entries
    log_s = torch.zeros(B, dtype=cd, device=dev)

    multi_pair = ent.n_active.index_select(0, ent.b) > 1    # (N,)
    e_multi = multi_pair.index_select(0, ent.e_pair)
    single = (~multi_pair).nonzero().squeeze(1)
    sb = ent.b.index_select(0, single)
    log_s.index_copy_(0, sb, torch.log((1.0 + ent.p_d.index_select(0, single)
                                        / g_out.index_select(0, sb).clamp_min(tiny)) * 0.5))
    es = (~e_multi).nonzero().squeeze(1)
    es_flat = ent.e_flat.index_select(0, es)
    q_single = (lp_e.index_select(0, es).exp() + ent.e_p.index_select(0, es)) * 0.5

    em = e_multi.nonzero().squeeze(1)
    have_multi = em.numel() > 0
    if have_multi:
        it = _MultiRows(ent, em, lp_e, g_out, cd)
        q_u = it.q_slots()

    def dense(t: int) -> torch.Tensor:  # diagnostics only: a (B, C) iterate in cd
        ls = torch.zeros_like(log_s) if t == 0 else log_s.clone()
        if have_multi and t > 0:
            ls[it.rows] = torch.log(it.s)
        q = (z.to(cd) - (lse - ls)[:, None]).exp()
        flat = q.view(-1)
        if t == 0:
            flat[ent.e_flat] = lp_e.exp()
            return q
        flat[es_flat] = q_single
        if have_multi:
            flat[it.u_flat] = it.q_slots()
        return q

    if callback is not None:
        callback(0, dense(0))
    if have_multi:
        for t in range(1, iters + 1):
            check = callback is not None or t % check_every == 0 or t == iters
            change = it.step(check)  # on the device; the host waits once per check, not per iteration
            if callback is not None:
                callback(t, dense(t))
            if check and float(change) <= tol:
                break
        log_s.index_copy_(0, it.rows, torch.log(it.s))
        q_u = it.q_slots()
    elif callback is not None and iters >= 1:
        callback(1, dense(1))

    torch.sub(z, (lse - log_s).to(z.dtype)[:, None], out=out)  # outside the unions: log p_g + log s_b
    out.put_(es_flat, _safe_log(q_single).to(out.dtype))
    if have_multi:
        out.put_(it.u_flat, _safe_log(q_u).to(out.dtype))


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
    check_every: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined distribution by the MM fixed-point iteration (see module doc).

    Args:
        p_g: (B, C) generalist probabilities, strictly positive (softmax outputs are).
        spec_probs: M tensors (B, |S^m| + 1), dustbin-corrected specialist probabilities.
        subsets: M subsets or a `SubsetIndex`.
        active: (B, M) bool; default `active_mask(p_g, subsets, 1)`.
        iters: maximum iterations.
        tol: stop when no q_c (and no outside-union q_c) moves by more than this; checked on the
            device every `check_every` iterations (and after the last), so a GPU waits for the host
            once per check, not once per iteration.
        log_p_g: optional (B, C) log p_g; gives exact log q for classes outside all active subsets
            even where p_g underflows.
        compute_dtype: dtype of the iteration on the union of the active subsets (float64
            recommended); everything else stays in p_g's dtype.
        callback: called as callback(t, q) with the dense (B, C) iterate after t iterations
            (t = 0 is the initial q = p_g); for diagnostics, costs O(B C) per call and checks
            convergence at every iteration.
        check_every: iterations between convergence checks.
    Returns:
        (q, log_q): both (B, C) in p_g's dtype. Rows with no active specialist are exactly p_g.
    """
    B, C = p_g.shape
    sidx = SubsetIndex.of(subsets, C, p_g.device)
    if active is None:
        active = active_mask(p_g, sidx, 1)
    _check(p_g, spec_probs, sidx, active)
    log_q = (log_p_g.to(p_g.dtype, copy=True) if log_p_g is not None else _safe_log(p_g))
    active = active.to(torch.bool)
    b, m, probs = _gather_pairs(spec_probs, sidx, active, compute_dtype, 0.0)
    if b.numel() == 0 or iters <= 0:
        if callback is not None:
            callback(0, p_g.clone())
        return p_g.clone(), log_q
    log_q = log_q.contiguous()
    _solve(log_q, log_q.amax(dim=1), log_q, _entries(b, m, probs, sidx, active), iters, tol, compute_dtype,
           max(1, int(check_every)), None if callback is None else (lambda t, q: callback(t, q.to(p_g.dtype))))
    rows = active.any(dim=1)
    if bool(rows.all()):
        return log_q.exp(), log_q
    q = p_g.clone()
    q[rows] = log_q[rows].exp()
    return q, log_q


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
    compute_dtype: torch.dtype = torch.float64,
    check_every: int = 8,
) -> torch.Tensor:
    """Log of the combined distribution, from raw logits (log-probabilities work too).

    The fixed point writes its answer into one (B, C) buffer: the generalist's log-softmax in the
    input dtype, then, in place, log q (see `_solve_`); specialists' softmaxes are taken only on
    the rows they are active for.

    Args:
        p_g_logits: (B, C) generalist logits or log-probabilities.
        spec_logits_list: M tensors (B, |S^m| + 1), specialist logits, dustbin last. Already
            dustbin-corrected unless `dustbin_corrections` is given; rows of inactive specialists
            are ignored (may be zeros if the specialist was not run on them).
        subsets: M subsets or a `SubsetIndex`.
        top_n: specialists meeting the generalist's top-n classes are active.
        method: "fixed_point" (MM iteration) or "gradient" (autograd, Adam).
        iters: iterations of the chosen method.
        tol: fixed point: stopping tolerance on q, checked every `check_every` iterations.
        dustbin_corrections: optional M values added to each specialist's dustbin logit.
        active: optional (B, M) bool overriding the top-n rule.
        compute_dtype: fixed point: dtype of the iteration on the union of the active subsets.
    Returns:
        (B, C) log q in p_g_logits' dtype.
    """
    if method not in ("fixed_point", "gradient"):
        raise ValueError(f"method must be 'fixed_point' or 'gradient', got {method!r}")
    B, C = p_g_logits.shape
    sidx = SubsetIndex.of(subsets, C, p_g_logits.device)
    if dustbin_corrections is not None and len(dustbin_corrections) != sidx.num_specialists:
        raise ValueError(f"{len(dustbin_corrections)} dustbin corrections for {sidx.num_specialists} subsets")
    if method == "gradient":
        log_p_g = torch.log_softmax(p_g_logits.to(torch.float64), dim=1)
        spec_probs = []
        for m, logits in enumerate(spec_logits_list):
            logits = logits.to(torch.float64)
            if dustbin_corrections is not None:
                logits = logits.clone()
                logits[:, -1] += float(dustbin_corrections[m])
            spec_probs.append(torch.softmax(logits, dim=1))
        if active is None:
            active = active_mask(log_p_g, sidx, top_n)
        _, log_q = combine_gradient_descent(log_p_g.exp(), spec_probs, sidx, active, iters=iters, log_p_g=log_p_g)
        return log_q.to(p_g_logits.dtype)

    if active is None:
        n = max(1, min(int(top_n), C))
        if n == 1:  # the row maxima come with the top-1 classes
            zmax, top = p_g_logits.max(dim=1, keepdim=True)
            zmax = zmax.squeeze(1)
        else:
            zmax, top = p_g_logits.amax(dim=1), p_g_logits.topk(n, dim=1).indices
        active = sidx.member[:, top].any(dim=2).T.contiguous()
    else:
        zmax = p_g_logits.amax(dim=1)
    _check(p_g_logits, spec_logits_list, sidx, active)
    active = active.to(torch.bool)
    b, m, z = _gather_pairs(spec_logits_list, sidx, active, compute_dtype, float("-inf"))
    if b.numel() == 0 or iters <= 0:
        return torch.log_softmax(p_g_logits, dim=1)
    if dustbin_corrections is not None:
        corr = torch.tensor([float(c) for c in dustbin_corrections], dtype=compute_dtype, device=z.device)
        z[torch.arange(b.numel(), device=z.device), sidx.sizes[m]] += corr[m]
    probs = torch.softmax(z, dim=1)  # -inf padding: probability 0
    log_q = torch.empty_like(p_g_logits)  # the one (B, C) buffer: the answer
    _solve(p_g_logits.contiguous(), zmax, log_q, _entries(b, m, probs, sidx, active), iters, tol, compute_dtype,
           max(1, int(check_every)))
    return log_q
