"""One distribution per sample from the generalist and its active specialists (Hinton et al. 2015, §5.4).

For a sample, the active specialists A are those whose class subset S^m meets the generalist's top-n
classes. The combined distribution q over all C classes minimises

    F(q) = KL(p^g || q) + sum_{m in A} KL(p^m || q^m),

where q^m is q collapsed onto specialist m's outputs (its classes kept, all others summed into its
dustbin). Two solvers, both batched over samples:

* `combine_fixed_point` (default): the MM iteration of docs/method.md ("Specialists", step 4),
      q_c <- (p^g_c + sum_m r^m_c) / (1 + |A|),
      r^m_c = p^m_c (c in S^m),   r^m_c = p^m_dustbin q_c / Q^m_dustbin (c not in S^m),
  where Q^m_dustbin is the mass of q outside S^m. It keeps q normalised, never increases F, and
  converges to the unique minimiser (F is strictly convex in q when p^g > 0 everywhere).
  Cost (docs/performance.md): classes outside the union U_b of a sample's active subsets all evolve
  by the same factor, q_c = s_b p^g_c, so only U_b (in float64 by default) and one scalar s_b per
  sample are iterated; everything over all C classes stays in the input dtype and is done in three
  passes with no (B, C) temporary beside the output: the top-n classes (max), one chunked pass for
  each row's mass outside U_b (lse = log(outside + inside)), and the write of
  log q = z - lse_b + log s_b. A sample with one active specialist has a closed form (the
  iteration's first step), computed in the input dtype. The classes of
  a multi-specialist union fall into a few cells by which subsets hold them, and the iterates are
  q_c = A(cell) * (p^g_c + sum_{m: c in S^m} p^m_c) + B(cell) * p^g_c, so an iteration updates a few
  numbers per cell, not per class. Convergence is checked on the device every `check_every`
  iterations: one host sync per check.
* `combine_gradient_descent`: the paper's reference, q = softmax(z) with z optimised by autograd
  (Adam or L-BFGS) on the summed per-sample objectives (the samples are independent, so the sum
  separates).

Longer than 600 lines: the fast solver's index tables (`SubsetIndex`), its kernels, the objective
and the gradient-descent reference are kept in one module on purpose, because the reference and the
objective are what the tests hold the fast solver to, and splitting them would put the contract
and the code it constrains in different files.

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

import numpy as np
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
        pos_rep: (M, Smax) int64 position in the subset, padded with 0 (its first class again).
        padded_rep: (M, Smax) int64 class indices, padded with the subset's first class.
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
        self.pos_rep = torch.arange(smax, device=device).expand(len(tensors), smax) * self.mask
        self.padded_rep = self.padded.gather(1, self.pos_rep)

    @property
    def position(self) -> torch.Tensor:
        """(M, C) int32: position[m, c] is c's index in S^m, -1 where c is not in S^m (built once, on
        first use: only rows with several active specialists need it)."""
        if getattr(self, "_position", None) is None:
            M, C = self.member.shape
            pos = torch.full((M * C,), -1, dtype=torch.int32, device=self.member.device)
            rows = torch.arange(M, device=self.member.device)[:, None] * C
            pos.index_copy_(0, (rows + self.padded)[self.mask], self.pos_rep[self.mask].to(torch.int32))
            self._position = pos.view(M, C)
        return self._position

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
    top = _top1(p_g)[1] if n == 1 else p_g.topk(n, dim=1).indices  # (B, n)
    return _active_from_top(idx, top)


def _top1(z: torch.Tensor, width: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) row maxima and (B, 1) index of each row's first maximum: `z.max(dim=1, keepdim=True)`.

    On CPU `max` with indices runs scalar code, ~4x the vectorised `amax`, and `topk(1)` or `argmax`
    cost more still; over wide rows this takes `amax` over blocks of `width` classes, then `max`
    with indices over the first block holding the row maximum (the same index, ties included).
    """
    B, C = z.shape
    if z.device.type != "cpu" or C < 8 * width or not z.is_contiguous() or not z.is_floating_point():
        v, i = z.max(dim=1, keepdim=True)
        return v.squeeze(1), i
    nb = C // width
    blocks = z[:, :nb * width].view(B, nb, width).amax(dim=2)                # (B, nb)
    if nb * width < C:
        blocks = torch.cat([blocks, z[:, nb * width:].amax(dim=1, keepdim=True)], dim=1)
    zmax, blk = blocks.max(dim=1, keepdim=True)                              # first block with it
    cols = (blk * width + torch.arange(width, device=z.device)).clamp_max_(C - 1)   # (B, width)
    flat = cols + torch.arange(B, device=z.device)[:, None] * C
    j = z.reshape(-1).index_select(0, flat.reshape(-1)).view(B, width).max(dim=1, keepdim=True).indices
    return zmax.squeeze(1), cols.gather(1, j)


def _active_from_top(idx: "SubsetIndex", top: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: S^m holds one of the row's classes in `top` (B, n)."""
    B, n = top.shape
    cols = idx.member.index_select(1, top.reshape(-1)).view(-1, B, n)   # (M, B, n)
    return (cols.any(dim=2) if n > 1 else cols.view(-1, B)).T.contiguous()


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
        want = (B, sidx.sizes_list[m] + 1)
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


@dataclass
class _Active:
    """The active (sample, specialist) pairs, N of them, ordered by row then specialist, and their
    classes as (N, Smax) tables (pair n's |S^m| classes left-aligned; shorter subsets padded by
    repeating their first class, so a padded cell names a class of the pair and holds its value)."""

    b: torch.Tensor         # (N,) row of each pair
    m: torch.Tensor         # (N,) specialist of each pair
    cls: torch.Tensor       # (N, Smax) class indices
    flat: torch.Tensor      # (N, Smax) b * C + cls: the cell in a flat (B, C) tensor
    probs: torch.Tensor     # (N, Smax) specialist probability of each class (compute dtype)
    p_d: torch.Tensor       # (N,) specialist dustbin probability (compute dtype)
    mask: Optional[torch.Tensor]  # (N, Smax) bool, True on real entries; None when no padding
    n_active: torch.Tensor  # (B,) |A_b|
    num_classes: int
    index: "SubsetIndex"


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
    if dtype in (torch.float32, torch.float64) and all(_numpy_ok(outputs[k]) for k, c in enumerate(counts) if c):
        rows = torch.full((N, width), fill, dtype=dtype)  # CPU: each part straight into its rows
        rn, on, rs = rows.numpy(), order.numpy(), rows_sorted.numpy()
        start = 0
        for k, cnt in enumerate(counts):
            if cnt:
                src = outputs[k].detach().numpy()
                rn[on[start:start + cnt], :src.shape[1]] = src[rs[start:start + cnt]]
                start += cnt
        return b, m, rows
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


def _active_pairs(b: torch.Tensor, m: torch.Tensor, probs: torch.Tensor, sidx: SubsetIndex,
                  active: torch.Tensor) -> _Active:
    """The pairs' class tables from (N, Smax + 1) specialist probabilities (dustbin after the classes)."""
    S = probs.shape[1] - 1
    sizes = sidx.sizes.index_select(0, m)
    p_d = probs.gather(1, sizes[:, None]).squeeze(1)
    if min(sidx.sizes_list) == S:  # every subset of one size: no padding
        p_in, mask = probs[:, :S], None
    else:
        p_in, mask = probs.gather(1, sidx.pos_rep.index_select(0, m)), sidx.mask.index_select(0, m)
    cls = sidx.padded_rep.index_select(0, m)
    return _Active(b, m, cls, b[:, None] * sidx.num_classes + cls, p_in, p_d, mask, active.sum(dim=1),
                   sidx.num_classes, sidx)


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


@dataclass
class _Rows:
    """The rows of P pairs (ordered by row): each pair's compact row and rank within its row."""

    rows: torch.Tensor        # (R,) batch rows
    row_of_pair: torch.Tensor  # (P,) compact row 0..R-1
    per_row: torch.Tensor     # (R,) pairs per row
    pair_start: torch.Tensor  # (R,) first pair of each row
    rank: torch.Tensor        # (P,) 0..per_row-1

    @classmethod
    def of(cls, b: torch.Tensor) -> "_Rows":
        rows, row_of_pair, per_row = torch.unique_consecutive(b, return_inverse=True, return_counts=True)
        pair_start = torch.cumsum(per_row, 0) - per_row
        rank = torch.arange(b.numel(), device=b.device) - pair_start.index_select(0, row_of_pair)
        return cls(rows, row_of_pair, per_row, pair_start, rank)


def _union_slots(pr: _Active, multi: torch.Tensor, grp: _Rows, nbits: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The union slots (row, class) of the (P, Smax) entries of the pairs `multi`: overlapping
    subsets of one row put a class in several entries, which must share one q value.

    Returns (slot of each entry, first entry of each slot, pair of that entry, the slot's bit mask
    of the row's pairs holding its class, bit k for the pair of rank k; None when nbits > 40),
    slots in order of their first entry. An entry's first is found from the subsets' membership
    table: the row's lowest-ranked pair whose subset holds the class, at the class's position in
    it. That is `nbits` gathers of P * Smax booleans, with no table over the batch's B * C cells.
    """
    P, S = multi.numel(), pr.cls.shape[1]
    C, dev = pr.num_classes, multi.device
    cls = pr.cls.index_select(0, multi)                                  # (P, S)
    m = pr.m.index_select(0, multi)
    member = pr.index.member.view(-1)
    start = grp.pair_start.index_select(0, grp.row_of_pair)              # (P,) the row's first pair
    in_row = grp.per_row.index_select(0, grp.row_of_pair)[:, None]       # (P, 1) pairs in the row
    bits = None
    if nbits <= 40:  # the bit masks; the first holder is the lowest set bit (the entry's own pair is one)
        bits = torch.zeros((P, S), dtype=torch.long, device=dev)
        for k in range(nbits):
            mk = m.index_select(0, (start + k).clamp_max_(P - 1))
            held = member.index_select(0, (mk[:, None] * C + cls).view(-1)).view(P, S)
            if k >= 2:  # every row here has two pairs or more: only later ranks may not exist
                held &= in_row > k
            bits.add_(held, alpha=1 << k)
        k_star = torch.log2((bits & -bits).to(torch.float64)).long()  # exact: powers of two up to 2^39
    else:  # too many pairs for a bit mask: the lowest-ranked holder by comparisons
        k_star = grp.rank[:, None].expand(P, S).clone()
        for k in range(nbits - 1):
            mk = m.index_select(0, (start + k).clamp_max_(P - 1))
            held = member.index_select(0, (mk[:, None] * C + cls).view(-1)).view(P, S)
            k_star = torch.where(held & (k_star > k), k, k_star)        # k < rank: only earlier pairs
    f_pair = start[:, None] + k_star                                     # (P, S) pair of the first entry
    f_pos = pr.index.position.view(-1).index_select(
        0, (m.index_select(0, f_pair.view(-1)) * C + cls.view(-1)))       # its column
    f_entry = f_pair.view(-1) * S + f_pos
    is_first = f_entry == torch.arange(P * S, device=dev)
    first = is_first.nonzero().squeeze(1)
    slot_of = torch.cumsum(is_first, 0) - 1
    return (slot_of.index_select(0, f_entry), first, f_pair.view(-1).index_select(0, first),
            None if bits is None else bits.view(-1).index_select(0, first))


def _outside_pass(z: torch.Tensor, zmax: torch.Tensor, pr: _Active, shift: bool,
                  chunk_elems: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over z: each row's sum of exp(z - shift) outside the union of its active subsets,
    and z on the pairs' classes, both in z's dtype.

    By row chunks small enough to stay in cache between their operations (gather the union's z,
    exp, zero the union's entries, row sum); the only temporary is one chunk of exp(z - shift).
    The shift is the row maximum, or 0 (`shift` False) when every row maximum lies in [-40, 75]
    (exp(z) then neither overflows nor loses anything but terms e^-47 below the row's largest).
    """
    B, C = z.shape
    dev = z.device
    if chunk_elems is None:  # CPU: chunks that stay in L2 between their operations; GPU: large launches
        chunk_elems = 1 << 17 if dev.type == "cpu" else 1 << 24
    raw_out = torch.empty(B, dtype=z.dtype, device=dev)
    N, S = pr.cls.shape
    z_in = torch.empty((N, S), dtype=z.dtype, device=dev)
    step = max(1, chunk_elems // max(1, C))
    starts = list(range(0, B, step))
    # pairs are sorted by row: each chunk's pairs are one contiguous range; local = within the chunk
    bounds = torch.searchsorted(pr.b, torch.arange(0, B + step, step, device=dev).clamp_max_(B)).tolist()
    local = pr.flat - (torch.div(pr.b, step, rounding_mode="floor") * (step * C))[:, None]
    zflat = z.reshape(-1)
    buf = torch.empty((min(step, B), C), dtype=z.dtype, device=dev)  # reused: no page faults per chunk
    bflat = buf.view(-1)
    np_ok = _numpy_ok(z)  # CPU: numpy's take and fancy assignment cost less per call than torch's
    if np_ok:
        zn, bn, ln, zin_n = zflat.detach().numpy(), bflat.numpy(), local.reshape(-1).numpy(), z_in.view(-1).numpy()
    for n, i in enumerate(starts):
        zc = z[i:i + step]
        rows = zc.shape[0]
        e = buf[:rows]
        lo, hi = bounds[n], bounds[n + 1]
        if np_ok:
            sel_n = ln[lo * S:hi * S]
            if hi > lo:  # the chunk is in cache: a cheap gather
                np.take(zn[i * C:(i + rows) * C], sel_n, out=zin_n[lo * S:hi * S])
        else:
            sel = local[lo:hi].reshape(-1)
            if hi > lo:
                torch.index_select(zflat[i * C:(i + rows) * C], 0, sel, out=z_in[lo:hi].view(-1))
        if shift:
            torch.sub(zc, zmax[i:i + step, None], out=e).exp_()
        else:
            torch.exp(zc, out=e)
        if np_ok:
            bn[sel_n] = 0
        else:
            bflat.index_fill_(0, sel, 0.0)
        torch.sum(e, dim=1, out=raw_out[i:i + rows])
    return raw_out, z_in


class _MultiRows:
    """The MM iteration on the rows with several active specialists, in `cd`.

    The classes of a row fall into cells by which of the row's active subsets hold them: one cell
    for the classes outside all of them, one for the classes only in S^1, one for those in S^1 and
    S^2, ... Every class of a cell has the same coefficient coef = sum_{m: c not in S^m} a_m, so after
    t steps q_c = A_t(cell) (p^g_c + sum_{m: c in S^m} p^m_c) + B_t(cell) p^g_c exactly (outside
    the union A + B is the row's scale s), and an iteration only updates (A, B) per cell: a few
    hundred numbers, however wide the subsets. Both sums an iteration needs run over the (cell,
    pair) incidences with the pair's subset *not* holding the cell, so the dustbin mass of q^m is
    summed directly, never as 1 - (mass inside S^m). q itself is formed once at the end (`q_slots`).

    Args: pr; multi (P,) the pairs of rows with several; grp their rows; inv, first, first_pair,
    u_bits: `_union_slots` of their (P, Smax) entries; pg_u (U,) p^g on the slots; g_out (B,) p^g's mass
    outside each row's union; nbits the most pairs in one row.
    """

    def __init__(self, pr: _Active, multi: torch.Tensor, grp: _Rows, inv: torch.Tensor, first: torch.Tensor,
                 first_pair: torch.Tensor, u_bits: Optional[torch.Tensor], pg_u: torch.Tensor, g_out: torch.Tensor,
                 cd: torch.dtype, nbits: int):
        dev = multi.device
        self.cd, self.tiny = cd, torch.finfo(cd).tiny
        C = pr.num_classes
        rows, row_of_pair, per_row, pair_start = grp.rows, grp.row_of_pair, grp.per_row, grp.pair_start
        R, P = rows.numel(), multi.numel()
        U = first.numel()                                                   # union slots (row, class)
        u_row = row_of_pair.index_select(0, first_pair)                     # (U,) compact row
        u_cls = pr.cls.index_select(0, multi).view(-1).index_select(0, first)  # (U,) class
        p_in = pr.probs.index_select(0, multi)
        if pr.mask is not None:  # padding repeats a class of the pair: count it once
            p_in = p_in * pr.mask.index_select(0, multi)
        base_u = pg_u + torch.zeros(U, dtype=cd, device=dev).index_add_(0, inv, p_in.reshape(-1).to(cd))
        row_ids = torch.arange(R, device=dev)
        if u_bits is not None:  # cells: (row, bits); bits 0 is the row's outside cell
            keys = torch.cat([u_row * (1 << nbits) + u_bits, row_ids * (1 << nbits)])
            cell_all = _compact(keys, R << nbits)
        else:  # too many active specialists for a bit mask: every slot its own cell (same iterates)
            keys = torch.cat([u_row * (U + 1) + 1 + torch.arange(U, device=dev), row_ids * (U + 1)])
            cell_all = _compact(keys, R * (U + 1))
        cell, cell_out = cell_all[:U], cell_all[U:]                          # slot -> cell, row -> outside cell
        NC = int(cell_all.max()) + 1
        cell_row = torch.zeros(NC, dtype=torch.long, device=dev).scatter_(0, cell_all, torch.cat([u_row, row_ids]))
        cell_cls = torch.full((NC,), -1, dtype=torch.long, device=dev).scatter_(0, cell, u_cls)  # a class of it
        # (cell, pair) incidences with the pair's subset not holding the cell's classes: every pair
        # of the cell's row (the outside cell: all of them) but those whose subset holds its class
        cnt = per_row.index_select(0, cell_row)
        ci_cell = torch.arange(NC, device=dev).repeat_interleave(cnt)
        j = torch.arange(ci_cell.numel(), device=dev) - (torch.cumsum(cnt, 0) - cnt).index_select(0, ci_cell)
        ci_pair = pair_start.index_select(0, cell_row.index_select(0, ci_cell)) + j
        ci_cls = cell_cls.index_select(0, ci_cell)
        held = pr.index.member.view(-1).index_select(
            0, pr.m.index_select(0, multi.index_select(0, ci_pair)) * C + ci_cls.clamp_min(0)) & (ci_cls >= 0)
        keep = (~held).nonzero().squeeze(1)
        self.ci_cell = ci_cell.index_select(0, keep)
        self.ci_pair = ci_pair.index_select(0, keep)
        # per cell: sums of (base_c, p^g_c) over its classes; outside: p_g's outside mass
        g_rows = g_out.index_select(0, rows)
        vals = torch.stack([base_u, pg_u], dim=1)                           # (U, 2)
        self.S = torch.zeros(NC, 2, dtype=cd, device=dev).index_add_(0, cell, vals)
        self.S.index_copy_(0, cell_out, g_rows[:, None].expand(R, 2))
        denom = 1.0 + pr.n_active.index_select(0, rows).to(cd).index_select(0, cell_row)  # (NC,)
        self.inv_denom = (1.0 / denom)[:, None]
        self.e0 = torch.tensor([1.0, 0.0], dtype=cd, device=dev) * self.inv_denom  # (NC, 2)
        self.AB = torch.zeros(NC, 2, dtype=cd, device=dev)
        self.AB[:, 1] = 1.0                                                  # q = p_g
        self.p_d = pr.p_d.index_select(0, multi).to(cd)
        self.rows, self.R, self.P, self.NC = rows, R, P, NC
        self.cell, self.cell_out, self.vals = cell, cell_out, vals

    def step(self, with_change: bool) -> Optional[torch.Tensor]:
        """One MM step; with `with_change`, a device scalar bounding how far any q_c moved."""
        val = (self.AB * self.S).sum(dim=1)                                  # q's mass per cell
        q_dust = torch.zeros(self.P, dtype=self.cd, device=val.device).index_add_(
            0, self.ci_pair, val.index_select(0, self.ci_cell))             # q's mass outside S^m
        a = self.p_d / q_dust.clamp_min_(self.tiny)                          # (P,)
        coef = torch.zeros(self.NC, dtype=self.cd, device=val.device).index_add_(
            0, self.ci_cell, a.index_select(0, self.ci_pair))               # sum_{m: c not in S^m} a_m
        AB = torch.addcmul(self.e0, self.AB, coef[:, None] * self.inv_denom)  # (e0 + AB coef) / (1 + |A|)
        change = None
        if with_change:  # |dq_c| <= |dA| base_c + |dB| p^g_c <= |dA| S_base(cell) + |dB| S_pg(cell)
            change = ((AB - self.AB).abs_() * self.S).sum(dim=1).amax()
        self.AB = AB
        return change

    def scale(self) -> torch.Tensor:
        """(R,) the rows' scale s outside their unions."""
        return self.AB.index_select(0, self.cell_out).sum(dim=1)

    def q_slots(self) -> torch.Tensor:
        """(U,) q on the union slots of the multi rows."""
        ab = self.AB.index_select(0, self.cell)                              # (U, 2)
        return torch.addcmul(ab[:, 1] * self.vals[:, 1], ab[:, 0], self.vals[:, 0])  # not a sum over dim 1: slow


def _solve(
    z: torch.Tensor,
    zmax: torch.Tensor,
    out: torch.Tensor,
    pr: _Active,
    iters: int,
    tol: float,
    cd: torch.dtype,
    check_every: int,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> None:
    """The MM iteration: writes log q into `out` (which may be z itself).

    z: (B, C) contiguous generalist logits or log-probabilities, zmax its row maxima. Every class
    outside the union U_b of a row's active subsets gets log q = z - lse_b + log s_b with one scale
    s_b per row, written in z's dtype by one pass. A row with one active specialist has a closed
    form, which the iteration reaches in its first step (q_c = (p^g_c + p^m_c) / 2 on S^m, in z's
    dtype; s_b = (1 + p^m_dustbin / p^g(outside S^m)) / 2), so only rows with several active
    specialists iterate, on their unions, in `cd`. Per-row sums (lse, p^g's mass outside the
    union, summed directly, never as 1 - inside: a union may hold nearly all the mass) are in `cd`.
    """
    B, C = z.shape
    dev = z.device
    tiny = torch.finfo(cd).tiny
    N, S = pr.cls.shape
    shift = bool(((zmax < -40) | (zmax > 75)).any()) if B else False
    raw_out, z_in = _outside_pass(z, zmax, pr, shift)
    base = zmax.to(cd) if shift else torch.zeros(B, dtype=cd, device=dev)
    if shift:
        ex = torch.sub(z_in, zmax.index_select(0, pr.b)[:, None]).exp_()  # (N, S) exp(z - shift)
    else:
        ex = z_in.exp()
    ex_sum = (ex if pr.mask is None else ex * pr.mask).sum(dim=1)        # (N,) mass of S^m
    multi_pair = pr.n_active.index_select(0, pr.b) > 1                   # (N,)
    single = (~multi_pair).nonzero().squeeze(1)
    multi = multi_pair.nonzero().squeeze(1)
    have_multi = multi.numel() > 0
    sb = pr.b.index_select(0, single)
    inside = torch.zeros(B, dtype=cd, device=dev).index_copy_(0, sb, ex_sum.index_select(0, single).to(cd))
    if have_multi:  # overlapping subsets of a row share classes: one slot per (row, class)
        grp = _Rows.of(pr.b.index_select(0, multi))
        nbits = int(grp.per_row.max())
        inv, first, first_pair, u_bits = _union_slots(pr, multi, grp, nbits)
        u_flat = pr.flat.index_select(0, multi).reshape(-1).index_select(0, first)
        u_b = grp.rows.index_select(0, grp.row_of_pair.index_select(0, first_pair))
        ex_u = ex.index_select(0, multi).reshape(-1).index_select(0, first).to(cd)
        inside.index_add_(0, u_b, ex_u)
    outside = raw_out.to(cd)
    total = outside + inside
    lse = torch.log(total) + base
    g_out = outside / total
    # Where the outside mass underflows z's dtype (every outside class ~87 nats below the top in
    # float32), sum those rows again in `cd` with a per-row shift, so their tiny mass stays exact.
    # (Below C * tiny * 1e6 the denormals could matter; above it they hold under 1e-6 of the sum.)
    small = raw_out < torch.finfo(z.dtype).tiny * C * 1e6
    if bool(small.any()):  # rare; one host sync
        _exact_outside(z, small, pr, lse, g_out, cd)

    # rows with one active specialist: the closed form, in z's dtype
    half_pg = (torch.exp(base - lse) * 0.5).to(z.dtype)                  # p^g_c / 2 = ex_c * this
    q_single = torch.addcmul((pr.probs.index_select(0, single) * 0.5).to(z.dtype), ex.index_select(0, single),
                             half_pg.index_select(0, sb)[:, None])      # (p^g_c + p^m_c) / 2
    s_flat = pr.flat.index_select(0, single)
    log_s = torch.zeros(B, dtype=cd, device=dev)
    log_s.index_copy_(0, sb, torch.log((1.0 + pr.p_d.index_select(0, single).to(cd)
                                        / g_out.index_select(0, sb).clamp_min(tiny)) * 0.5))
    if have_multi:
        pg_u = ex_u * torch.exp(base - lse).index_select(0, u_b)
        it = _MultiRows(pr, multi, grp, inv, first, first_pair, u_bits, pg_u, g_out, cd, nbits)

    def dense(t: int) -> torch.Tensor:  # diagnostics only: a (B, C) iterate in cd
        ls = torch.zeros_like(log_s) if t == 0 else log_s.clone()
        if have_multi and t > 0:
            ls[it.rows] = torch.log(it.scale())
        q = (z.to(cd) - (lse - ls)[:, None]).exp()
        if t > 0:
            flat = q.view(-1)
            flat[s_flat.reshape(-1)] = q_single.reshape(-1).to(cd)
            if have_multi:
                flat[u_flat] = it.q_slots()
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
        log_s.index_copy_(0, it.rows, torch.log(it.scale()))
    elif callback is not None and iters >= 1:
        callback(1, dense(1))

    torch.sub(z, (lse - log_s).to(z.dtype)[:, None], out=out)  # outside the unions: log p_g + log s_b
    _put(out, s_flat, _safe_log(q_single).to(out.dtype))
    if have_multi:
        _put(out, u_flat, _safe_log(it.q_slots()).to(out.dtype))


def _numpy_ok(t: torch.Tensor) -> bool:
    """A CPU tensor numpy can view: its index calls cost about half of torch's on small index sets
    (docs/performance.md). Both paths are tested (float32/float64 and bfloat16 inputs)."""
    return t.device.type == "cpu" and t.is_contiguous() and t.dtype in (torch.float32, torch.float64, torch.float16)


def _put(out: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> None:
    """out.view(-1)[flat] = values, through numpy where `_numpy_ok`."""
    if _numpy_ok(out):
        out.numpy().reshape(-1)[flat.reshape(-1).numpy()] = values.reshape(-1).numpy()
    else:
        out.put_(flat, values)


def _exact_outside(z: torch.Tensor, small: torch.Tensor, pr: _Active, lse: torch.Tensor, g_out: torch.Tensor,
                   cd: torch.dtype, chunk_rows: int = 16) -> None:
    """g_out on the `small` rows again, summed in `cd` with the row's own shift (in place)."""
    B, C = z.shape
    rs = small.nonzero().squeeze(1)
    for k in range(0, rs.numel(), chunk_rows):  # by chunks: the temporary stays a chunk in `cd`
        r = rs[k:k + chunk_rows]
        pos = torch.full((B,), -1, dtype=torch.long, device=z.device)
        pos[r] = torch.arange(r.numel(), device=z.device)
        p_pos = pos.index_select(0, pr.b)
        sel = (p_pos >= 0).nonzero().squeeze(1)
        rows_z = z.index_select(0, r).to(cd)
        rows_z.view(-1).index_fill_(0, (p_pos.index_select(0, sel)[:, None] * C
                                        + pr.cls.index_select(0, sel)).reshape(-1), float("-inf"))
        g_out[r] = torch.exp(torch.logsumexp(rows_z, dim=1) - lse.index_select(0, r))


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
    q = torch.empty_like(log_q)  # the answer's buffer
    _solve(log_q, log_q.amax(dim=1), log_q, _active_pairs(b, m, probs, sidx, active), iters, tol, compute_dtype,
           max(1, int(check_every)), None if callback is None else (lambda t, q: callback(t, q.to(p_g.dtype))))
    rows = active.any(dim=1)
    if bool(rows.all()):
        return torch.exp(log_q, out=q), log_q
    q.copy_(p_g)
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
            zmax, top = _top1(p_g_logits)
        else:
            zmax, top = p_g_logits.amax(dim=1), p_g_logits.topk(n, dim=1).indices
        active = _active_from_top(sidx, top)
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
    _solve(p_g_logits.contiguous(), zmax, log_q, _active_pairs(b, m, probs, sidx, active), iters, tol, compute_dtype,
           max(1, int(check_every)))
    return log_q
