"""The paper's §5 core (specialists/): clustering, dustbin relabelling/sampling/correction, combination.

Plain numpy/torch, no Ray: every test here runs in well under a second or two.
"""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from _clustering_helpers import simplex_like_correlation, simplex_like_cov
from specialists.clustering import (
    CovarianceAccumulator, adjusted_rand, class_points, cluster_classes, subsets_to_labels,
)
from specialists.combine import (
    SubsetIndex, active_mask, combine, combine_fixed_point, combine_gradient_descent, objective,
)
from specialists.dustbin import (
    DustbinMapper, HalfSubsetSampler, apply_correction, dustbin_correction, half_subset_batches,
    subset_fraction,
)


# -------------------------------------------------------------------------------------------------
# Synthetic generalist predictions with planted confusable groups
# -------------------------------------------------------------------------------------------------

def planted_predictions(n, groups, seed=0, spread=3.0, noise=0.7):
    """(n, C) softmax predictions: an input of class y puts mass on y's whole group.

    groups: (C,) group id per class. Returns (probs, true labels).
    """
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    C = groups.size
    y = rng.integers(0, C, size=n)
    logits = rng.normal(0.0, noise, size=(n, C))
    logits += spread * (groups[None, :] == groups[y][:, None])
    logits[np.arange(n), y] += 1.0
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), y


GROUPS_12 = np.repeat(np.arange(4), 3)  # 12 classes in 4 groups of 3


def shuffled_groups(num_classes, num_groups, seed=0):
    """Group ids for classes in random order, so contiguous indices do not give the answer away."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(num_classes) % num_groups)


# -------------------------------------------------------------------------------------------------
# Covariance accumulator
# -------------------------------------------------------------------------------------------------

def test_accumulator_matches_np_cov_population_definition():
    p, _ = planted_predictions(1000, shuffled_groups(40, 5))
    acc = CovarianceAccumulator(40)
    for i in range(0, 1000, 97):  # uneven batches, last one short
        acc.update(p[i:i + 97])
    assert acc.count == 1000
    np.testing.assert_allclose(acc.covariance(), np.cov(p, rowvar=False, bias=True), atol=1e-15, rtol=1e-10)
    np.testing.assert_allclose(acc.covariance(ddof=1), np.cov(p, rowvar=False), atol=1e-15, rtol=1e-10)
    np.testing.assert_allclose(acc.mean, p.mean(axis=0), rtol=1e-12)
    cov = acc.covariance()
    np.testing.assert_array_equal(cov, cov.T)


def test_accumulator_merge_and_float32_and_torch_input():
    p, _ = planted_predictions(600, shuffled_groups(30, 3), seed=1)
    a, b = CovarianceAccumulator(30), CovarianceAccumulator(30, dtype=np.float32)
    a.update(p[:250])
    b.update(torch.from_numpy(p[250:400])).update(p[400:])
    a.merge(b)
    assert a.count == 600
    np.testing.assert_allclose(a.covariance(), np.cov(p, rowvar=False, bias=True), atol=1e-8)
    assert a.covariance(dtype=np.float32).dtype == np.float32
    assert b.nbytes == 30 * 30 * 4


def test_accumulator_rejects_bad_input():
    acc = CovarianceAccumulator(5)
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        acc.update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((2, 5), np.nan))
    with pytest.raises(ValueError, match="rows"):
        acc.covariance()


# -------------------------------------------------------------------------------------------------
# Clustering
# -------------------------------------------------------------------------------------------------

def _cov_of(groups, n=4000, seed=0):
    p, _ = planted_predictions(n, groups, seed=seed)
    return CovarianceAccumulator(len(groups)).update(p).covariance()


def test_clustering_recovers_planted_groups():
    cov = _cov_of(GROUPS_12)
    subsets = cluster_classes(cov, num_specialists=4, seed=0)
    assert adjusted_rand_score(GROUPS_12, subsets_to_labels(subsets, 12)) >= 0.8
    assert sorted(c for s in subsets for c in s) == list(range(12))  # disjoint and covering
    assert all(s == sorted(s) for s in subsets)


def test_clustering_recovers_shuffled_groups_at_larger_scale():
    groups = shuffled_groups(120, 8, seed=3)
    cov = _cov_of(groups, n=6000, seed=3)
    subsets = cluster_classes(cov, num_specialists=8, seed=1, batch_size=64)
    assert adjusted_rand(subsets, groups, 120) >= 0.8
    # Projecting to a few components keeps the group structure.
    projected = cluster_classes(cov, num_specialists=8, seed=1, batch_size=64, n_components=16)
    assert adjusted_rand(projected, groups, 120) >= 0.8


def test_correlation_normalisation_is_scale_free():
    cov = _cov_of(GROUPS_12)
    d = np.linspace(0.1, 10, 12)  # rescaling classes must not change their points
    np.testing.assert_allclose(class_points(cov), class_points(cov * d[:, None] * d[None, :]), atol=1e-5)
    norms = np.linalg.norm(class_points(cov, "unit"), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_excess_normalisation_sees_confusions_below_the_simplex_correlation():
    # Probabilities sum to 1, so a strong generalist's classes are all negatively correlated (about
    # -1/(C-1)); confusions show only as correlations less negative than the rest.
    cov = simplex_like_cov()
    points = class_points(cov, "excess")
    np.testing.assert_allclose(points, class_points(simplex_like_correlation(), "excess"), atol=1e-5)  # scale-free
    assert (points >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(points[:6], axis=1), 1.0, rtol=1e-5)
    assert not points[6:].any(), "a class confused no more than its median is the zero vector"
    assert points[2] @ points[3] > 0.99 and points[2] @ points[7] == 0
    for seed in range(10):  # every confused pair has its own specialist at every k-means seed
        subsets = cluster_classes(cov, num_specialists=3, seed=seed, normalize="excess", min_size=1)
        where = {c: i for i, s in enumerate(subsets) for c in s}
        assert where[0] == where[1] and where[2] == where[3] and where[4] == where[5]
        assert len({where[0], where[2], where[4]}) == 3
    # Planted groups are found as with "correlation".
    subsets = cluster_classes(_cov_of(GROUPS_12), num_specialists=4, seed=0, normalize="excess")
    assert adjusted_rand_score(GROUPS_12, subsets_to_labels(subsets, 12)) >= 0.8
    with pytest.raises(ValueError, match="excess"):
        class_points(cov, "bogus")


def test_subset_size_gives_fixed_size_overlapping_subsets():
    cov = _cov_of(GROUPS_12)
    subsets = cluster_classes(cov, num_specialists=4, subset_size=5, seed=0)
    assert 1 <= len(subsets) <= 4
    assert all(len(s) == 5 and s == sorted(s) and len(set(s)) == 5 for s in subsets)
    counts = np.bincount([c for s in subsets for c in s], minlength=12)
    assert counts.max() >= 2, "4 subsets of 5 over 12 classes must overlap"
    # Each subset is built around one true group: it contains a whole group.
    for s in subsets:
        assert any(set(np.flatnonzero(GROUPS_12 == g)) <= set(s) for g in range(4))


def test_clustering_is_deterministic_for_a_seed():
    groups = shuffled_groups(60, 6, seed=5)
    cov = _cov_of(groups, n=2000, seed=5)
    a = cluster_classes(cov, num_specialists=6, seed=7, batch_size=32)
    b = cluster_classes(cov, num_specialists=6, seed=7, batch_size=32)
    assert a == b
    c = cluster_classes(cov, num_specialists=6, subset_size=12, seed=7, batch_size=32)
    assert c == cluster_classes(cov, num_specialists=6, subset_size=12, seed=7, batch_size=32)


def test_min_and_max_size_rules():
    cov = _cov_of(GROUPS_12)
    # Groups have 3 classes: with max_size=2 every cluster is capped and overflow moves elsewhere.
    capped = cluster_classes(cov, num_specialists=6, max_size=2, min_size=1, seed=0)
    assert all(len(s) <= 2 for s in capped)
    assert sorted(c for s in capped for c in s) == list(range(12))  # 6 x 2 places: all still covered
    # min_size larger than any cluster: nothing is kept.
    assert cluster_classes(cov, num_specialists=4, min_size=4, seed=0) == []
    with pytest.raises(ValueError, match="num_specialists"):
        cluster_classes(cov, num_specialists=13)
    with pytest.raises(ValueError, match="exceeds max_size"):
        cluster_classes(cov, num_specialists=2, subset_size=5, max_size=4)


def test_subsets_to_labels_keeps_uncovered_classes_apart():
    labels = subsets_to_labels([[0, 1], [1, 2]], 5)
    assert labels[0] == labels[1] == 0 and labels[2] == 1
    assert len({labels[3], labels[4], 0, 1}) == 4


# -------------------------------------------------------------------------------------------------
# Dustbin mapping, correction, half/half batches
# -------------------------------------------------------------------------------------------------

def test_dustbin_mapper_numpy_and_torch():
    mapper = DustbinMapper([7, 2, 5], num_classes=10)
    y = np.array([2, 3, 5, 7, 0, 9])
    np.testing.assert_array_equal(mapper(y), [1, 3, 2, 0, 3, 3])
    t = mapper(torch.tensor(y))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64
    assert t.tolist() == [1, 3, 2, 0, 3, 3]
    assert mapper(7) == 0 and mapper.dustbin == 3 and mapper.num_outputs == 4
    np.testing.assert_array_equal(mapper.in_subset(y), [True, False, True, True, False, False])
    with pytest.raises(ValueError, match="outside"):
        mapper(np.array([10]))
    with pytest.raises(ValueError, match="repeated"):
        DustbinMapper([1, 1], 4)


def test_subset_fraction_and_correction_value():
    labels = np.array([0, 1, 2, 3, 0, 0, 5, 6])
    assert subset_fraction(labels, [0, 6]) == pytest.approx(4 / 8)
    assert dustbin_correction(0.5) == 0.0
    assert dustbin_correction(0.1) == pytest.approx(math.log(9.0))
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="strictly between"):
            dustbin_correction(bad)
    logits = torch.zeros(2, 4)
    out = apply_correction(logits, 1.5)
    assert out[:, -1].tolist() == [1.5, 1.5] and out[:, :-1].abs().sum() == 0 and logits.abs().sum() == 0


def test_correction_recovers_natural_posterior_exactly():
    """A Bayes-optimal specialist trained on half/half data, corrected, equals the natural posterior."""
    rng = np.random.default_rng(0)
    C, subset = 8, [1, 4, 6]
    prior = rng.dirichlet(np.ones(C))
    lik = rng.random(C)  # p(x | y) for one fixed input x
    f = prior[subset].sum()
    mapper = DustbinMapper(subset, C)
    # Natural posterior collapsed onto the specialist's outputs.
    post = prior * lik / (prior * lik).sum()
    natural = np.array([post[c] for c in subset] + [np.delete(post, subset).sum()])
    # Training prior: half the mass on S, half on the rest, natural proportions within each.
    inside = np.isin(np.arange(C), subset)
    train_prior = np.where(inside, prior * 0.5 / f, prior * 0.5 / (1 - f))
    tpost = train_prior * lik / (train_prior * lik).sum()
    trained = np.bincount(mapper(np.arange(C)), weights=tpost, minlength=4)
    logits = np.log(trained) + 3.0  # any per-sample shift of the logits is irrelevant
    corrected = apply_correction(logits, dustbin_correction(f))
    probs = np.exp(corrected - corrected.max())
    np.testing.assert_allclose(probs / probs.sum(), natural, rtol=1e-12)
    assert not np.allclose(trained, natural)  # the uncorrected specialist is wrong


def test_half_subset_batches_are_exactly_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, size=1000)
    subset = [3, 7, 11]
    batches = half_subset_batches(labels, subset, batch_size=33, num_batches=40, rng=np.random.default_rng(1))
    assert batches.shape == (40, 33) and batches.dtype == np.int64
    in_s = np.isin(labels[batches], subset)
    assert (in_s.sum(axis=1) == 16).all()  # exactly B // 2 from S in every batch
    # Without replacement until a pool runs out: the first pass over S has no repeats.
    n_s = int(np.isin(labels, subset).sum())
    full_rows = n_s // 16
    s_idx = batches[:full_rows][in_s[:full_rows]]
    assert s_idx.size == full_rows * 16 and len(set(s_idx.tolist())) == s_idx.size
    # The default length is one pass over the subset's examples.
    assert half_subset_batches(labels, subset, 32).shape[0] == math.ceil(n_s / 16)
    with pytest.raises(ValueError, match="no example"):
        half_subset_batches(labels, [99], 8, 2)
    with pytest.raises(ValueError, match="nothing for the dustbin"):
        half_subset_batches(labels, list(range(20)), 8, 2)


def test_half_subset_sampler_with_dataloader_is_seeded_per_epoch():
    labels = torch.arange(200) % 10
    data = torch.utils.data.TensorDataset(torch.arange(200), labels)
    sampler = HalfSubsetSampler(labels, [2, 5], batch_size=10, num_batches=7, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    epoch0 = [y.tolist() for _, y in loader]
    assert len(epoch0) == len(sampler) == 7
    assert all(sum(v in (2, 5) for v in ys) == 5 for ys in epoch0)
    again = [y.tolist() for _, y in loader]
    sampler.set_epoch(1)
    epoch1 = [idx for idx in sampler]
    sampler.set_epoch(0)
    assert epoch0 == again and [idx for idx in sampler] != epoch1
    assert [labels[i].item() for i in list(sampler)[0]] == epoch0[0]


# -------------------------------------------------------------------------------------------------
# Combination
# -------------------------------------------------------------------------------------------------

def _problem(B=12, C=30, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    subsets = [[0, 1, 2, 3, 4], [4, 5, 6], [10, 11, 12, 13], [0, 13, 20, 21], [25, 26, 27, 28, 29, 3]]
    p_g = torch.softmax(2 * torch.randn(B, C, generator=g, dtype=dtype), dim=1)
    spec = [torch.softmax(2 * torch.randn(B, len(s) + 1, generator=g, dtype=dtype), dim=1) for s in subsets]
    active = torch.rand(B, len(subsets), generator=g) < 0.5
    active[0] = False
    active[1] = True  # all five, with overlaps
    return p_g, spec, subsets, active


def test_fixed_point_and_gradient_descent_agree():
    p_g, spec, subsets, active = _problem()
    q_fp, log_fp = combine_fixed_point(p_g, spec, subsets, active, iters=500, tol=1e-14)
    q_gd, log_gd = combine_gradient_descent(p_g, spec, subsets, active, iters=500)
    torch.testing.assert_close(q_fp, q_gd, atol=1e-6, rtol=0)
    f_fp, f_gd = objective(q_fp, p_g, spec, subsets, active), objective(q_gd, p_g, spec, subsets, active)
    assert (f_fp <= f_gd + 1e-10).all()
    # Both are real minima: nudging q towards any specialist's view or p_g does not lower F.
    q_alt = 0.9 * q_fp + 0.1 * p_g
    assert (objective(q_alt, p_g, spec, subsets, active)[active.any(1)] > f_fp[active.any(1)]).all()
    torch.testing.assert_close(log_fp, q_fp.log())


def test_fixed_point_objective_never_increases_and_q_stays_normalised():
    p_g, spec, subsets, active = _problem(seed=1)
    values, sums, mins = [], [], []

    def record(t, q):
        values.append(objective(q, p_g, spec, subsets, active))
        sums.append(q.sum(dim=1))
        mins.append(q.min())

    combine_fixed_point(p_g, spec, subsets, active, iters=25, tol=0.0, callback=record)
    f = torch.stack(values)
    assert len(values) == 26
    assert (f[1:] - f[:-1] <= 1e-12).all()
    assert (f[-1] < f[0] - 1e-3)[active.any(1)].all()  # and it actually moves
    torch.testing.assert_close(torch.stack(sums), torch.ones(26, 12, dtype=torch.float64), atol=1e-12, rtol=0)
    assert min(float(m) for m in mins) > 0


def test_no_active_specialist_returns_generalist_exactly():
    p_g, spec, subsets, _ = _problem()
    none = torch.zeros(12, len(subsets), dtype=torch.bool)
    for fn in (combine_fixed_point, combine_gradient_descent):
        q, log_q = fn(p_g, spec, subsets, none)
        assert torch.equal(q, p_g)
    _, _, _, active = _problem()
    q, _ = combine_fixed_point(p_g, spec, subsets, active)
    assert torch.equal(q[0], p_g[0])  # row 0 has no active specialist


def test_confident_specialist_pulls_q_towards_its_class():
    C = 10
    p_g = torch.softmax(torch.tensor([[2.0, 1.9, 0.5] + [0.0] * 7], dtype=torch.float64), dim=1)
    subsets = [[0, 1, 2]]
    spec = [torch.tensor([[0.02, 0.95, 0.02, 0.01]], dtype=torch.float64)]  # sure it is class 1
    q, _ = combine_fixed_point(p_g, spec, subsets, torch.ones(1, 1, dtype=torch.bool))
    assert q[0].argmax() == 1 and p_g[0].argmax() == 0
    assert q[0, 1] > p_g[0, 1] and q[0, 0] < p_g[0, 0]
    # Classes outside the subset keep their relative odds (the dustbin only scales them).
    ratio = q[0, 3:] / p_g[0, 3:]
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))
    assert abs(float(q.sum()) - 1) < 1e-12


def test_active_mask_uses_top_n():
    p_g = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]])
    subsets = [[0], [1, 2], [3]]
    assert active_mask(p_g, subsets, 1).tolist() == [[True, False, False], [False, False, True]]
    assert active_mask(p_g, subsets, 2).tolist() == [[True, True, False], [False, True, True]]
    assert active_mask(torch.log(p_g), SubsetIndex(subsets, 4), 2).tolist() == [[True, True, False], [False, True, True]]



def test_active_mask_from_logits_equals_from_float64_log_softmax():
    # The ensemble ranks classes on the raw float32 logits (no (B, C) float64 log-softmax):
    # the same active set, ties and wide rows (the blockwise top-1) included.
    g = torch.randn(64, 5000, generator=torch.Generator().manual_seed(3)) * 4
    g[:8, 10] = g[:8, 4000] = g[:8].amax(dim=1) + 1.0  # ties between two top classes
    g[8:16] = torch.round(g[8:16])                      # many ties everywhere
    rng = np.random.default_rng(0)
    sidx = SubsetIndex([rng.choice(5000, 300, replace=False) for _ in range(20)] + [[10], [4000]], 5000)
    for n in (1, 2, 5):
        want = active_mask(torch.log_softmax(g.double(), dim=1), sidx, n)
        assert torch.equal(active_mask(g, sidx, n), want)
    assert active_mask(g, sidx, 1)[:8, -2].all() and not active_mask(g, sidx, 1)[:8, -1].any()

def test_combine_from_logits_float32_and_input_checks():
    p_g, spec, subsets, active = _problem(seed=2)
    logits_g = torch.log(p_g).float() + 5.0  # any shift: logits, not log-probs
    corr = [0.3, -0.2, 0.0, 1.0, 0.5]
    spec_logits = [torch.log(s).float() for s in spec]
    log_q = combine(logits_g, spec_logits, subsets, top_n=2, iters=200, dustbin_corrections=corr)
    assert log_q.dtype == torch.float32 and log_q.shape == (12, 30)
    torch.testing.assert_close(log_q.exp().sum(1), torch.ones(12), atol=1e-5, rtol=0)
    # Same as correcting by hand and calling the core.
    spec_c = []
    for s, c in zip(spec_logits, corr):
        s = s.double().clone()
        s[:, -1] += c
        spec_c.append(torch.softmax(s, 1))
    pg64 = torch.softmax(logits_g.double(), 1)
    q_ref, _ = combine_fixed_point(pg64, spec_c, subsets, active_mask(pg64, subsets, 2), iters=200)
    torch.testing.assert_close(log_q.double().exp(), q_ref, atol=1e-6, rtol=1e-5)
    log_q_gd = combine(logits_g, spec_logits, subsets, top_n=2, method="gradient", iters=500,
                       dustbin_corrections=corr)
    torch.testing.assert_close(log_q_gd.exp(), log_q.exp(), atol=1e-5, rtol=0)
    with torch.no_grad():  # inference code calls it under no_grad; the gradient method still works
        log_q_ng = combine(logits_g, spec_logits, subsets, top_n=2, method="gradient", iters=500,
                           dustbin_corrections=corr)
    torch.testing.assert_close(log_q_ng, log_q_gd)
    with pytest.raises(ValueError, match="expected"):
        combine(logits_g, spec_logits[:-1] + [torch.zeros(12, 3)], subsets)
    with pytest.raises(ValueError, match="method"):
        combine(logits_g, spec_logits, subsets, method="newton")


def test_log_q_is_exact_for_underflowing_tail():
    """Classes far in the generalist's tail keep finite, exact log-probabilities."""
    logits = torch.zeros(1, 6, dtype=torch.float32)
    logits[0, 5] = -2000.0  # exp underflows even in float64
    spec = [torch.tensor([[1.0, 0.0, -1.0]])]
    log_q = combine(logits, spec, [[0, 1]], top_n=1)
    assert torch.isfinite(log_q).all()
    # The tail class is outside the active subset: log q = log p_g + (row scale), same shift as class 4.
    log_pg = torch.log_softmax(logits.double(), 1)
    assert abs(float((log_q[0, 5] - log_pg[0, 5]) - (log_q[0, 4] - log_pg[0, 4]))) < 1e-3


def test_half_subset_stream_gives_exact_halves_from_a_stream():
    from specialists.dustbin import half_subset_steps, half_subset_stream

    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 3000)
    x = np.arange(3000, dtype=np.float32)[:, None]
    subset = [2, 5]
    n_in = int(np.isin(y, subset).sum())
    steps = half_subset_steps(n_in, 20)

    def chunks():
        for s in range(0, 3000, 256):
            yield {"x": torch.from_numpy(x[s:s + 256]), "y": torch.from_numpy(y[s:s + 256]),
                   "epoch": torch.zeros(len(y[s:s + 256]), dtype=torch.int64)}

    def run(seed):
        return list(half_subset_stream(chunks(), subset, 20, steps, n_in, 3000 - n_in, torch.Generator().manual_seed(seed), 6))

    batches = run(1)
    assert len(batches) == steps and all(len(b["y"]) == 20 for b in batches)
    assert all(int((b["y"] < 2).sum()) == 10 and int((b["y"] == 2).sum()) == 10 for b in batches)  # 2 = dustbin
    ids = torch.cat([b["x"][:, 0] for b in batches]).long().numpy()
    inside = ids[np.isin(y[ids], subset)]
    assert len(set(inside.tolist())) == len(inside) == steps * 10  # one pass over S, no repeats
    mapped = np.where(y[ids] == 2, 0, np.where(y[ids] == 5, 1, 2))
    assert (torch.cat([b["y"] for b in batches]).numpy() == mapped).all()  # labels follow their rows
    rest = y[ids][~np.isin(y[ids], subset)]
    assert set(np.unique(rest)) == {0, 1, 3, 4}  # the rest half samples every other class
    again = run(1)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(batches, again))
    # a subset holding most of the data: the rest half is topped up from what the stream held
    big = [0, 1, 2, 3, 4]
    n_big = int(np.isin(y, big).sum())
    s_big = half_subset_steps(n_big, 20)
    out = list(half_subset_stream(chunks(), big, 20, s_big, n_big, 3000 - n_big, torch.Generator().manual_seed(0), 6))
    assert len(out) == s_big and all(int((b["y"] == 5).sum()) == 10 for b in out)


def _fixed_point_residual(q, p_g, spec, subsets, active):
    """max |q - (p^g + sum_m r^m) / (1 + |A|)|: zero exactly at the MM iteration's fixed point (the
    minimiser), computed densely and independently of the solver's bookkeeping."""
    B, C = p_g.shape
    worst = 0.0
    for b in range(B):
        acts = [m for m in range(len(subsets)) if active[b, m]]
        if not acts:
            continue
        total = p_g[b].clone()
        for m in acts:
            inside = torch.zeros(C, dtype=torch.bool)
            inside[subsets[m]] = True
            r = q[b] * spec[m][b, -1] / q[b][~inside].sum()
            r[inside] = spec[m][b, :-1]
            total += r
        worst = max(worst, float((q[b] - total / (1 + len(acts))).abs().max()))
    return worst


def test_wide_rows_across_chunks_reach_the_fixed_point_in_float32_and_float64():
    """C = 5,000 and 130 rows span several of the row chunks; rows have 1 to 4 overlapping active
    specialists (the closed form and the cell iteration), float32 logits stay float32 outside the
    unions and agree with the float64 answer."""
    g = torch.Generator().manual_seed(7)
    B, C = 130, 5000
    subsets = [sorted(torch.randperm(C, generator=g)[:200].tolist()) for _ in range(6)]
    subsets[1] = sorted(set(subsets[0][:120]) | set(subsets[1][:80]))  # overlaps
    subsets[2] = sorted(set(subsets[1][:50]) | set(subsets[0][100:150]) | set(subsets[2][:100]))
    logits = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    spec_logits = [torch.randn(B, len(s) + 1, generator=g, dtype=torch.float64) * 2 for s in subsets]
    active = torch.rand(B, len(subsets), generator=g) < torch.linspace(0.0, 0.7, B)[:, None]
    log64 = combine(logits, spec_logits, subsets, active=active, iters=200, tol=1e-13)
    log32 = combine(logits.float(), [s.float() for s in spec_logits], subsets, active=active, iters=200)
    assert log32.dtype == torch.float32 and torch.isfinite(log32).all()
    q = log64.exp()
    torch.testing.assert_close(q.sum(1), torch.ones(B, dtype=torch.float64), atol=1e-12, rtol=0)
    p_g = torch.softmax(logits, 1)
    spec = [torch.softmax(s, 1) for s in spec_logits]
    assert (active.sum(1) >= 3).any() and (active.sum(1) == 1).any() and (active.sum(1) == 0).any()
    assert _fixed_point_residual(q, p_g, spec, subsets, active) < 1e-12
    torch.testing.assert_close(log32.double().exp(), q, atol=2e-6, rtol=1e-4)
    none = ~active.any(1)
    torch.testing.assert_close(log64[none], torch.log_softmax(logits[none], 1))


def test_rows_with_more_active_specialists_than_a_bit_mask_holds_reach_the_fixed_point():
    """45 subsets of different sizes share class 0, so a row whose top class is 0 has 45 active
    specialists (past the 40 a cell's bit mask holds: every union slot is its own cell); other rows
    have 2 to 5. Both kinds meet the dense fixed-point equations and q stays normalised."""
    g = torch.Generator().manual_seed(11)
    B, C = 6, 400
    subsets = [sorted({0} | set(torch.randperm(C - 1, generator=g)[:5 + m % 7].add(1).tolist())) for m in range(45)]
    logits = torch.randn(B, C, generator=g, dtype=torch.float64)
    logits[:3, 0] += 6.0  # rows 0-2: class 0 on top, all 45 specialists active
    spec_logits = [torch.randn(B, len(s) + 1, generator=g, dtype=torch.float64) for s in subsets]
    active = torch.zeros(B, 45, dtype=torch.bool)
    active[:3] = True
    for b, n in zip(range(3, 6), (2, 3, 5)):
        active[b, torch.randperm(45, generator=g)[:n]] = True
    log_q = combine(logits, spec_logits, subsets, active=active, iters=2000, tol=1e-14)
    q = log_q.exp()
    torch.testing.assert_close(q.sum(1), torch.ones(B, dtype=torch.float64), atol=1e-12, rtol=0)
    spec = [torch.softmax(s, 1) for s in spec_logits]
    assert _fixed_point_residual(q, torch.softmax(logits, 1), spec, subsets, active) < 1e-10
    # the same rows alone, where no row has more than 5: the same answer by the bit-mask cells
    few = combine(logits[3:], [s[3:] for s in spec_logits], subsets, active=active[3:], iters=2000, tol=1e-14)
    torch.testing.assert_close(few, log_q[3:], atol=1e-12, rtol=0)


def test_half_and_bfloat16_logits_give_the_float32_answer_to_their_precision():
    """float16 outputs are written through numpy on CPU, bfloat16 through torch (numpy has no
    bfloat16): both paths give the float32 answer to the dtype's precision."""
    g = torch.Generator().manual_seed(5)
    B, C = 20, 600
    subsets = [sorted(torch.randperm(C, generator=g)[:40].tolist()) for _ in range(8)]
    subsets[1] = sorted(set(subsets[0][:20]) | set(subsets[1][:20]))
    logits = torch.randn(B, C, generator=g) * 2
    spec_logits = [torch.randn(B, len(s) + 1, generator=g) for s in subsets]
    active = torch.rand(B, len(subsets), generator=g) < 0.4
    ref = combine(logits, spec_logits, subsets, active=active)
    for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        low = combine(logits.to(dtype), [s.to(dtype) for s in spec_logits], subsets, active=active)
        assert low.dtype == dtype
        torch.testing.assert_close(low.float(), ref, atol=tol, rtol=tol)


def test_rows_whose_outside_mass_underflows_float32_keep_its_exact_size():
    """Every class outside the active subset 200 nats below it: float32 exp underflows there, yet
    log q outside = log p_g + log s with the exact s = (1 + p_dustbin / outside mass) / 2."""
    C = 6000
    logits = torch.full((2, C), -200.0)
    subset = list(range(0, 300))
    logits[:, :300] = torch.linspace(0.0, 1.0, 300)
    spec_logits = [torch.zeros(2, 301)]
    log_q = combine(logits, spec_logits, [subset], top_n=1)
    log_pg = torch.log_softmax(logits.double(), 1)
    outside = torch.logsumexp(log_pg[:, 300:], 1).exp()
    p_d = 1.0 / 301
    want = torch.log((1 + p_d / outside) / 2)
    assert torch.isfinite(log_q).all()
    torch.testing.assert_close((log_q[:, 500].double() - log_pg[:, 500]), want, atol=1e-3, rtol=1e-6)


def test_convergence_is_checked_every_k_iterations_only():
    """A host sync per iteration (`float(change)`) is what the GPU path must avoid: with
    check_every=k the solver reads the device's convergence flag only every k iterations."""
    p_g, spec, subsets, active = _problem(seed=3)
    calls = []
    real = torch.Tensor.__float__

    def counting(self):
        calls.append(1)
        return real(self)

    torch.Tensor.__float__ = counting
    try:
        q8, _ = combine_fixed_point(p_g, spec, subsets, active, iters=40, tol=0.0, check_every=8)
        n8 = len(calls)
        calls.clear()
        q1, _ = combine_fixed_point(p_g, spec, subsets, active, iters=40, tol=0.0, check_every=1)
        n1 = len(calls)
    finally:
        torch.Tensor.__float__ = real
    assert n8 == 5 and n1 == 40
    torch.testing.assert_close(q8, q1)


def test_blockwise_top1_matches_max_with_ties_and_a_tail_block():
    """`_top1` (block amax, then max with indices in the winning block) gives max(dim=1)'s values
    and first indices, also when the maximum sits in the short last block or is tied."""
    from specialists.combine import _top1

    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 5000, generator=g)  # 5000 = 19 blocks of 256 + a tail of 136
    z[0, 4999] = 50.0                        # in the tail block
    z[1, 10] = z[1, 4000] = 50.0             # tie: the first index wins
    z[2, 300] = z[2, 301] = 50.0             # tie inside one block
    v, i = _top1(z)
    ref_v, ref_i = z.max(dim=1, keepdim=True)
    assert torch.equal(v, ref_v.squeeze(1)) and torch.equal(i, ref_i)
    assert i[0, 0] == 4999 and i[1, 0] == 10 and i[2, 0] == 300
