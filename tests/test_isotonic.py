"""Tests of kdcli.isotonic: the exact IDA projection, the KD-p penalty and the violation statistics.

The projection is checked against two independent solutions of the same quadratic program:
an exhaustive enumeration of the active sets of the tree constraints (small C), and a KKT certificate
(any C), plus the per-sample reference loop.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kdcli import isotonic
from kdcli.augment import label_roles
from kdcli.bench import bench_isotonic, teacher_like_batch
from kdcli.isotonic import ViolationStats, order_penalty, project, project_loop, violation_stats

# --------------------------------------------------------------------------------------------------
# Instances and independent references
# --------------------------------------------------------------------------------------------------

def make_instances(count: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 rows of five kinds (probabilities, raw logits, teacher-like, exact ties, near ties) with roles
    from random label pairs (some of the same class) and lam drawn from {0, 0.5, 1, U(0, 1)}."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(count, classes, generator=gen, dtype=torch.float64)
    labels_a = torch.randint(0, classes, (count,), generator=gen)
    labels_b = torch.where(torch.rand(count, generator=gen) < 0.15, labels_a,
                           torch.randint(0, classes, (count,), generator=gen))
    lam_choices = torch.tensor([0.0, 0.5, 1.0, -1.0], dtype=torch.float64)
    lam = lam_choices[torch.randint(0, 4, (count,), generator=gen)]
    lam = torch.where(lam < 0, torch.rand(count, generator=gen, dtype=torch.float64), lam)
    teacher = logits.clone()
    teacher.scatter_add_(1, labels_a[:, None], 6.0 * lam[:, None])
    teacher.scatter_add_(1, labels_b[:, None], 6.0 * (1 - lam[:, None]))
    kinds = [
        torch.softmax(logits / 4.5, dim=1),
        logits,
        torch.softmax(teacher / 4.5, dim=1),
        torch.randint(0, 4, (count, classes), generator=gen).double() / 4,  # heavy exact ties
        torch.randint(0, 4, (count, classes), generator=gen).double() / 4  # near ties
        + 1e-6 * torch.randn(count, classes, generator=gen, dtype=torch.float64),
    ]
    kind = torch.arange(count) % len(kinds)
    values = torch.stack(kinds)[kind, torch.arange(count)]
    primary, secondary = label_roles(labels_a, labels_b, lam)
    return values, primary, secondary


def brute_force_ir(values: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Exact IR by enumerating every active set of the tree constraints (float64, small C).

    Each row is relabelled so that ``a`` is label 0 (and ``b`` label 1), which gives all rows of one
    kind (chain or star) the same constraint tree. Every subset of its edges, held with equality,
    merges labels into blocks at their means; the optimum is the feasible candidate with the smallest
    objective (it is the equality-constrained minimiser of its own active set).
    """
    out = torch.empty_like(values)
    for chain in (False, True):
        rows = (secondary >= 0) == chain
        key = torch.arange(values.shape[1]).repeat(int(rows.sum()), 1) + values.shape[1]
        key.scatter_(1, primary[rows, None], -2)
        if chain:
            key.scatter_(1, secondary[rows, None], -1)
        relabel = key.argsort(dim=1)  # [a, (b,) the others in increasing order]
        solved = _enumerate_active_sets(values[rows].gather(1, relabel), chain)
        out[rows] = torch.empty_like(solved).scatter_(1, relabel, solved)
    return out


def _enumerate_active_sets(p: torch.Tensor, chain: bool) -> torch.Tensor:
    classes = p.shape[1]
    top = 1 if chain else 0  # parent of the other labels
    edges = [(0, 1)] * chain + [(top, k) for k in range(top + 1, classes)]
    active = torch.tensor(list(itertools.product([0.0, 1.0], repeat=len(edges))), dtype=torch.float64)
    # Blocks = connected components of the active edges: transitive closure by repeated squaring.
    parents, children = torch.tensor(edges).T
    reach = torch.eye(classes, dtype=torch.float64).repeat(len(active), 1, 1)
    reach[:, parents, children] = active
    reach[:, children, parents] = active
    for _ in range(classes.bit_length()):
        reach = (reach @ reach).clamp(max=1.0)
    block_mean = reach / reach.sum(-1, keepdim=True)  # (subsets, C, C)
    candidates = torch.einsum("skc,nc->nsk", block_mean, p)  # (rows, subsets, C)
    feasible = (candidates[..., parents] >= candidates[..., children] - 1e-12).all(-1)
    objective = ((candidates - p[:, None]) ** 2).sum(-1).masked_fill(~feasible, float("inf"))
    return candidates[torch.arange(len(p)), objective.argmin(1)]


def kkt_certificate(p: torch.Tensor, y: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor,
                    tol: float) -> torch.Tensor:
    """Per-row optimality certificate of ``y`` for IR(p) on the IDA tree (float64).

    Stationarity fixes the multiplier of each edge (parent -> child) to the residual mass of the
    child's subtree, ``mu_child = sum_{k in subtree(child)} (p_k - y_k)``; ``y`` is optimal iff it is
    feasible, every mu >= 0, mu * slack = 0 on every edge, and the root residual ``sum(p - y)`` is 0.
    """
    residual = p - y
    rows = torch.arange(len(p))
    has_b = secondary >= 0
    top = torch.where(has_b, secondary, primary)  # parent of the other labels
    is_other = torch.ones_like(p, dtype=torch.bool)
    is_other[rows, primary] = False
    is_other[rows[has_b], secondary[has_b]] = False
    leaf_slack = y[rows, top][:, None] - y
    leaf_ok = ~is_other | ((leaf_slack >= -tol) & (residual >= -tol) & ((residual * leaf_slack).abs() <= tol))
    mu_b = residual[rows, top] + (residual * is_other).sum(1)
    ab_slack = y[rows, primary] - y[rows, top]
    ab_ok = ~has_b | ((ab_slack >= -tol) & (mu_b >= -tol) & ((mu_b * ab_slack).abs() <= tol))
    return leaf_ok.all(1) & ab_ok & (residual.sum(1).abs() <= tol)


# --------------------------------------------------------------------------------------------------
# project: exactness
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [3, 10])
def test_project_equals_brute_force_active_set_enumeration(classes: int) -> None:
    values, primary, secondary = make_instances(300, classes, seed=classes)
    assert (secondary == -1).any() and (secondary >= 0).any()
    expected = brute_force_ir(values, primary, secondary)
    torch.testing.assert_close(project(values, primary, secondary), expected, rtol=0, atol=1e-12)
    # float32: the projection is 1-Lipschitz, so rounding the input moves the optimum by at most as much
    scale = values.abs().amax(1, keepdim=True).clamp(min=1.0)
    error = (project(values.float(), primary, secondary).double() - expected).abs() / scale
    assert error.max() < 1e-6


def test_project_equals_loop_and_has_kkt_certificate_at_100_classes() -> None:
    values, primary, secondary = make_instances(300, 100, seed=7)
    projected = project(values, primary, secondary)
    torch.testing.assert_close(projected, project_loop(values, primary, secondary), rtol=0, atol=1e-12)
    assert kkt_certificate(values, projected, primary, secondary, tol=1e-10).all()
    changed = (projected != values).any(1)
    assert changed.float().mean() > 0.5  # the instances do exercise the pooling
    scale = values.abs().amax(1, keepdim=True).clamp(min=1.0)
    for solver in (project, project_loop):
        out32 = solver(values.float(), primary, secondary)
        assert out32.dtype == torch.float32
        assert ((out32.double() - projected).abs() / scale).max() < 1e-6


def test_kkt_certificate_rejects_non_optimal_points() -> None:
    values, primary, secondary = make_instances(200, 10, seed=3)
    projected = project(values, primary, secondary)
    violating = (projected != values).any(1)
    assert not kkt_certificate(values, values, primary, secondary, tol=1e-10)[violating].any()
    # move a little mass between two labels: still sums to the same, no longer optimal
    nudged = projected.clone()
    nudged[:, 0] += 1e-3
    nudged[:, 1] -= 1e-3
    assert not kkt_certificate(values, nudged, primary, secondary, tol=1e-10).any()


@pytest.mark.parametrize(
    ("p", "a", "b", "expected"),
    [
        ([0.1, 0.5, 0.4], 0, 1, [1 / 3, 1 / 3, 1 / 3]),  # a below b: a joins, then the block takes the other
        ([0.5, 0.1, 0.3, 0.1], 0, 1, [0.5, 0.2, 0.2, 0.1]),  # b absorbs one other, a stays above
        ([0.2, 0.5, 0.3], 0, -1, [0.35, 0.35, 0.3]),  # star: a absorbs the largest other only
        ([0.3, 0.3, 0.3, 0.1], 0, 1, [0.3, 0.3, 0.3, 0.1]),  # exact ties: already feasible
        ([0.2, 0.4, 0.4, 0.0], 0, 1, [1 / 3, 1 / 3, 1 / 3, 0.0]),  # tie between b and an other
    ],
)
def test_project_hand_computed_examples(p: list[float], a: int, b: int, expected: list[float]) -> None:
    values = torch.tensor([p], dtype=torch.float64)
    out = project(values, torch.tensor([a]), torch.tensor([b]))
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-15)


def test_roles_from_lam_ties_same_class_and_one_hot() -> None:
    p = torch.tensor([[0.30, 0.40, 0.20, 0.10]] * 4, dtype=torch.float64)
    labels_a = torch.tensor([0, 0, 0, 2])
    labels_b = torch.tensor([1, 1, 1, 2])
    lam = torch.tensor([0.5, 0.0, 1.0, 0.7])
    primary, secondary = label_roles(labels_a, labels_b, lam)
    assert primary.tolist() == [0, 1, 0, 2] and secondary.tolist() == [1, -1, -1, -1]
    out = project(p, primary, secondary)
    # lam = 0.5: chain with y_i = 0 on top, so 0 and 1 pool at 0.35
    torch.testing.assert_close(out[0], torch.tensor([0.35, 0.35, 0.2, 0.1], dtype=torch.float64))
    torch.testing.assert_close(out[1], p[1])  # star at label 1, already its maximum
    torch.testing.assert_close(out[2], torch.tensor([0.35, 0.35, 0.2, 0.1], dtype=torch.float64))
    torch.testing.assert_close(out[3], torch.tensor([0.3, 0.3, 0.3, 0.1], dtype=torch.float64))  # star at 2
    # a secondary equal to the primary means "same class": identical to the star
    torch.testing.assert_close(project(p[:1], torch.tensor([1]), torch.tensor([1])),
                               project(p[:1], torch.tensor([1]), torch.tensor([-1])), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# project: properties
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_properties(dtype: torch.dtype) -> None:
    values64, primary, secondary = make_instances(400, 30, seed=11)
    values = values64.to(dtype)
    out = project(values, primary, secondary)
    assert out.dtype == dtype and out.shape == values.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = values64.abs().sum(1).clamp(min=1.0)
    assert ((out.double().sum(1) - values.double().sum(1)).abs() / scale).max() < tol  # sum preserved
    assert (out >= values.amin(1, keepdim=True)).all() and (out <= values.amax(1, keepdim=True)).all()
    assert violation_stats(out, primary, secondary).discordant_pairs.eq(0).all()  # exactly feasible
    assert torch.equal(project(out, primary, secondary), out)  # idempotent, bitwise
    probs = torch.softmax(values64[:100], dim=1).to(dtype)  # probability vectors stay distributions
    projected_probs = project(probs, primary[:100], secondary[:100])
    assert (projected_probs >= 0).all() and (projected_probs.double().sum(1) - 1).abs().max() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_without_violation_are_returned_bitwise(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    values = torch.rand(200, 50, generator=gen, dtype=torch.float64).to(dtype)
    sorted_desc = values.argsort(dim=1, descending=True)
    primary, secondary = sorted_desc[:, 0], sorted_desc[:, 1].clone()
    secondary[::3] = -1  # star rows are feasible too
    assert torch.equal(project(values, primary, secondary), values)
    tied = torch.full((4, 6), 0.25, dtype=dtype)  # all equal: feasible, nothing to pool
    assert torch.equal(project(tied, torch.tensor([0, 1, 2, 3]), torch.tensor([1, -1, 5, 0])), tied)


def test_cpu_candidate_cut_equals_the_full_sort_of_accelerators(monkeypatch) -> None:
    """The CPU sorts only the candidates (topk); CUDA sorts full rows. Both must give the same bits."""
    values, primary, secondary = make_instances(300, 100, seed=21)
    values[:, :7] = values[:, 7:8]  # ties among the others
    cut = project(values, primary, secondary)
    monkeypatch.setattr(isotonic, "_sorted_candidates", lambda others: others.sort(dim=1, descending=True))
    assert torch.equal(project(values, primary, secondary), cut)


def test_project_low_precision_is_solved_in_float32_and_cast_back() -> None:
    values, primary, secondary = make_instances(50, 20, seed=2)
    out = project(values.bfloat16(), primary, secondary)
    assert out.dtype == torch.bfloat16
    expected = project(values.bfloat16().float(), primary, secondary).bfloat16()
    assert torch.equal(out, expected)


def test_project_validates_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        project(torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="primary and secondary"):
        project(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# order_penalty (KD-p)
# --------------------------------------------------------------------------------------------------

def test_order_penalty_hand_made() -> None:
    q = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.3, 0.6, 0.1]], requires_grad=True)
    primary, secondary = torch.tensor([0, 0, 0]), torch.tensor([1, 1, -1])
    per_sample = order_penalty(q, primary, secondary, reduction="none")
    # row 1: relu(0.5 - 0.2) + relu(0.3 - 0.2); row 2 (star): relu(0.6 - 0.3)
    torch.testing.assert_close(per_sample, torch.tensor([0.0, 0.4, 0.3]))
    mean = order_penalty(q, primary, secondary)
    torch.testing.assert_close(mean, torch.tensor(0.7 / 3))
    mean.backward()
    # subgradient: largest other up-weighted, smallest original down-weighted, b-vs-a term on row 1
    expected_grad = torch.tensor([[0.0, 0.0, 0.0], [-2.0, 1.0, 1.0], [-1.0, 1.0, 0.0]]) / 3
    torch.testing.assert_close(q.grad, expected_grad)


def test_order_penalty_is_zero_exactly_on_feasible_rows() -> None:
    values, primary, secondary = make_instances(300, 10, seed=4)
    penalty = order_penalty(values, primary, secondary, reduction="none")
    has_violation = violation_stats(values, primary, secondary).has_violation
    assert torch.equal(penalty > 0, has_violation)
    assert order_penalty(project(values, primary, secondary), primary, secondary) == 0
    with pytest.raises(ValueError, match="reduction"):
        order_penalty(values, primary, secondary, reduction="sum")


# --------------------------------------------------------------------------------------------------
# violation_stats
# --------------------------------------------------------------------------------------------------

def test_violation_stats_hand_made() -> None:
    soft = torch.tensor([
        [0.5, 0.3, 0.1, 0.1],  # chain a=0, b=1: 5 known pairs, all concordant
        [0.1, 0.3, 0.5, 0.1],  # chain: (a,b) disc, (a,2) disc, (a,3) tie, (b,2) disc, (b,3) conc
        [0.1, 0.3, 0.5, 0.1],  # same soft labels at lam = 0.5: the (a,b) pair is unknown
        [0.2, 0.2, 0.6, 0.0],  # star a=1: (1,0) tie, (1,2) disc, (1,3) conc
    ])
    primary, secondary = torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1, 1, -1])
    lam = torch.tensor([0.7, 0.7, 0.5, 1.0])
    stats = violation_stats(soft, primary, secondary, lam)
    assert stats.known_pairs.tolist() == [5, 5, 4, 3]
    assert stats.discordant_pairs.tolist() == [0, 3, 2, 1]
    torch.testing.assert_close(stats.kendall_tau, torch.tensor([1.0, -2 / 5, -1 / 4, 0.0]))
    assert stats.has_violation.tolist() == [False, True, True, True]
    # row 3: the 0.2 tie is broken towards index 0, so label 1 ranks third
    assert stats.top2_hit.tolist() == [True, True, True, False]
    torch.testing.assert_close(stats.penalty, torch.tensor([0.0, 0.6, 0.6, 0.4]))
    summary = stats.summary()
    assert summary["samples"] == 4
    assert summary["kendall_tau"] == pytest.approx((1 - 0.4 - 0.25 + 0) / 4)
    assert summary["discordant_pairs"] == pytest.approx(1.5)
    assert summary["violation_rate"] == pytest.approx(0.75)
    assert summary["top2_ratio"] == pytest.approx(0.75)
    assert summary["penalty"] == pytest.approx(0.4)
    joined = ViolationStats.concat([stats, violation_stats(soft[:1], primary[:1], secondary[:1])])
    assert joined.kendall_tau.shape == (5,) and joined.summary()["violation_rate"] == pytest.approx(0.6)


def pairwise_reference(p: list[float], a: int, b: int, lam: float) -> tuple[int, int, int, bool]:
    """Kendall counts by enumerating every label pair against the hard label h (Python loops)."""
    h = [0.0] * len(p)
    h[a] = max(lam, 1 - lam) if b >= 0 else 1.0
    if b >= 0:
        h[b] = min(lam, 1 - lam)
    concordant = discordant = known = 0
    for k, m in itertools.combinations(range(len(p)), 2):
        if h[k] == h[m]:
            continue
        known += 1
        sign = (p[k] - p[m]) * (h[k] - h[m])
        concordant += sign > 0
        discordant += sign < 0
    order = sorted(range(len(p)), key=lambda k: -p[k])  # Python's sort is stable: smaller index first
    top2 = a in order[:2] or (b >= 0 and b in order[:2])
    return concordant, discordant, known, top2


def test_violation_stats_match_pairwise_enumeration() -> None:
    values, primary, secondary = make_instances(200, 8, seed=9)
    gen = torch.Generator().manual_seed(1)
    lam = torch.where(torch.rand(200, generator=gen) < 0.3, 0.5, 0.8)
    lam = torch.where(secondary < 0, 1.0, lam)
    stats = violation_stats(values, primary, secondary, lam)
    for row in range(len(values)):
        conc, disc, known, top2 = pairwise_reference(values[row].tolist(), int(primary[row]),
                                                     int(secondary[row]), float(lam[row]))
        assert (stats.discordant_pairs[row].item(), stats.known_pairs[row].item()) == (disc, known)
        assert stats.kendall_tau[row].item() == pytest.approx((conc - disc) / known, abs=1e-6)
        assert stats.top2_hit[row].item() == top2


def test_violation_stats_are_temperature_invariant() -> None:
    logits, primary, secondary = make_instances(100, 20, seed=12)
    cold = violation_stats(torch.softmax(logits, 1), primary, secondary)
    warm = violation_stats(torch.softmax(logits / 4.5, 1), primary, secondary)
    direct = violation_stats(logits, primary, secondary)
    for stats in (warm, direct):
        assert torch.equal(stats.discordant_pairs, cold.discordant_pairs)
        assert torch.equal(stats.top2_hit, cold.top2_hit)


# --------------------------------------------------------------------------------------------------
# Devices and the benchmark
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_results_equal_cpu_results() -> None:
    values, primary, secondary = make_instances(300, 100, seed=13)
    on_gpu = [t.cuda() for t in (values, primary, secondary)]
    torch.testing.assert_close(project(*on_gpu).cpu(), project(values, primary, secondary), rtol=0, atol=1e-12)
    torch.testing.assert_close(project_loop(*on_gpu).cpu(), project(values, primary, secondary), rtol=0, atol=1e-12)
    gpu_stats, cpu_stats = violation_stats(*on_gpu), violation_stats(values, primary, secondary)
    assert torch.equal(gpu_stats.discordant_pairs.cpu(), cpu_stats.discordant_pairs)
    torch.testing.assert_close(order_penalty(*on_gpu).cpu(), order_penalty(values, primary, secondary))


def test_bench_isotonic_reports_both_implementations() -> None:
    table = bench_isotonic(devices=["cpu"], batch=16, classes=(12, 40), repeats=2)
    assert list(table.columns) == ["device", "B", "C", "batched_ms", "loop_ms", "speedup", "max_abs_diff"]
    assert table["C"].tolist() == [12, 40] and (table["B"] == 16).all()
    assert ((table["batched_ms"] > 0) & (table["loop_ms"] > 0)).all()
    assert (table["speedup"] - table["loop_ms"] / table["batched_ms"]).abs().max() < 1e-12
    assert (table["max_abs_diff"] < 1e-6).all()
    probs, primary, secondary = teacher_like_batch(256, 50, torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs.sum(1), torch.ones(256))
    assert violation_stats(probs, primary, secondary).has_violation.float().mean() > 0.5  # realistic: most violate
