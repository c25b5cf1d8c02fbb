"""Tests for kdcli.losses: spec reference values, float64 numpy references, identities, gradients,
stability and reduction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcli import losses

# Reference inputs and values from specs/ttm.md §1.4 (numpy, float64).
SPEC_STUDENT = [[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 2.0, 1.0]]
SPEC_TEACHER = [[2.0, 1.0, 4.0, -1.0], [3.0, 0.0, 1.0, 0.5]]
SPEC_TABLE = {
    # gamma: (U per sample, KL per sample, TTM, WTTM)
    1.0: ([1.0, 1.0], [0.169823, 1.131311], 0.650567, 0.650567),
    0.5: ([1.532526, 1.667859], [0.103243, 0.608338], 0.355791, 0.586422),
    0.25: ([2.263855, 2.463883], [0.225758, 0.475377], 0.350568, 0.841178),
}
SPEC_KD_T4 = 0.770062


# ---------------------------------------------------------------- independent numpy references


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * np.log(p / q)).sum(axis=-1)


def np_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    return temp**2 * np_kl(np_softmax(t / temp), np_softmax(s / temp)).mean()


def np_ttm_parts(s: np.ndarray, t: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample KL and U, literally as in the authors' code: softmax, power, normalise."""
    powered = np_softmax(t) ** gamma
    u = powered.sum(axis=-1)
    return np_kl(powered / u[:, None], np_softmax(s)), u


def np_dkd_parts(s: np.ndarray, t: np.ndarray, y: np.ndarray, temp: float) -> tuple[float, float]:
    """TCKD and NCKD from plain probabilities (DKD paper, eqs. 1-4), T²-scaled, batch mean."""
    tckd, nckd = [], []
    for s_row, t_row, label in zip(s, t, y):
        p, q = np_softmax(t_row / temp), np_softmax(s_row / temp)
        b_p = np.array([p[label], 1.0 - p[label]])
        b_q = np.array([q[label], 1.0 - q[label]])
        rest = np.arange(len(p)) != label
        tckd.append(np_kl(b_p, b_q))
        nckd.append(np_kl(p[rest] / p[rest].sum(), q[rest] / q[rest].sum()))
    return temp**2 * float(np.mean(tckd)), temp**2 * float(np.mean(nckd))


def np_pearson(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    return float(xc @ yc / (np.linalg.norm(xc) * np.linalg.norm(yc) + eps))


def np_dist(s: np.ndarray, t: np.ndarray, beta: float, gamma: float, tau: float) -> float:
    ys, yt = np_softmax(s / tau), np_softmax(t / tau)
    inter = 1 - np.mean([np_pearson(ys[b], yt[b]) for b in range(ys.shape[0])])
    intra = 1 - np.mean([np_pearson(ys[:, k], yt[:, k]) for k in range(ys.shape[1])])
    return tau**2 * (beta * inter + gamma * intra)


def np_renyi(p: np.ndarray, order: float) -> np.ndarray:
    return np.log((p**order).sum(axis=-1)) / (1 - order)


def np_entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p)).sum(axis=-1)


# ---------------------------------------------------------------- fixtures and helpers


def random_logits(seed: int, batch: int = 8, classes: int = 10, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    return (
        scale * rng.standard_normal((batch, classes)),
        scale * rng.standard_normal((batch, classes)),
        rng.integers(0, classes, size=batch),
    )


def as_tensor(x, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


GAMMA = 0.3
LOSSES = {
    "kd": lambda s, t, y: losses.kd(s, t, temperature=4.0),
    "ttm": lambda s, t, y: losses.ttm(s, t, gamma=GAMMA),
    "wttm": lambda s, t, y: losses.wttm(s, t, gamma=GAMMA),
    "dkd": lambda s, t, y: losses.dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0),
    "dist": lambda s, t, y: losses.dist(s, t, beta=1.0, gamma=2.0, tau=4.0),
}
NUMPY_REFERENCES = {
    "kd": lambda s, t, y: np_kd(s, t, 4.0),
    "ttm": lambda s, t, y: np_ttm_parts(s, t, GAMMA)[0].mean(),
    "wttm": lambda s, t, y: np.prod(np_ttm_parts(s, t, GAMMA), axis=0).mean(),
    "dkd": lambda s, t, y: np.dot([1.0, 8.0], np_dkd_parts(s, t, y, 4.0)),
    "dist": lambda s, t, y: np_dist(s, t, 1.0, 2.0, 4.0),
}
KL_LOSSES = ["kd", "ttm", "wttm", "dkd"]


# ---------------------------------------------------------------- reference values (spec §1.4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gamma", sorted(SPEC_TABLE))
def test_ttm_wttm_match_spec_reference_table(gamma, dtype):
    u_ref, kl_ref, ttm_ref, wttm_ref = SPEC_TABLE[gamma]
    s, t = as_tensor(SPEC_STUDENT, dtype), as_tensor(SPEC_TEACHER, dtype)
    assert losses.ttm(s, t, gamma).item() == pytest.approx(ttm_ref, abs=1e-6)
    assert losses.wttm(s, t, gamma).item() == pytest.approx(wttm_ref, abs=1e-6)
    for row in range(2):
        kl_row = losses.ttm(s[row : row + 1], t[row : row + 1], gamma).item()
        weighted_row = losses.wttm(s[row : row + 1], t[row : row + 1], gamma).item()
        assert kl_row == pytest.approx(kl_ref[row], abs=1e-6)
        assert weighted_row / kl_row == pytest.approx(u_ref[row], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kd_matches_spec_reference_value(dtype):
    s, t = as_tensor(SPEC_STUDENT, dtype), as_tensor(SPEC_TEACHER, dtype)
    assert losses.kd(s, t, temperature=4.0).item() == pytest.approx(SPEC_KD_T4, abs=1e-6)


# ---------------------------------------------------------------- against float64 numpy


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_independent_numpy_computation(name, seed):
    s, t, y = random_logits(seed)
    value = LOSSES[name](as_tensor(s), as_tensor(t), torch.as_tensor(y)).item()
    assert value == pytest.approx(float(NUMPY_REFERENCES[name](s, t, y)), rel=1e-10, abs=1e-12)


def test_dkd_parts_match_plain_probability_computation():
    s, t, _ = random_logits(2, batch=7, classes=7)
    y = np.array([6, 0, 3, 1, 5, 2, 4])  # every class, including the first and last, is a target
    tckd, nckd = losses.dkd_parts(as_tensor(s), as_tensor(t), torch.as_tensor(y), temperature=2.0)
    tckd_ref, nckd_ref = np_dkd_parts(s, t, y, 2.0)
    assert tckd.item() == pytest.approx(tckd_ref, rel=1e-10)
    assert nckd.item() == pytest.approx(nckd_ref, rel=1e-10)
    combined = losses.dkd(as_tensor(s), as_tensor(t), torch.as_tensor(y), 0.5, 3.0, 2.0)
    assert combined.item() == pytest.approx(0.5 * tckd_ref + 3.0 * nckd_ref, rel=1e-10)


# ---------------------------------------------------------------- properties and identities


@pytest.mark.parametrize("name", KL_LOSSES)
def test_kl_losses_are_non_negative(name):
    for seed in range(20):
        s, t, y = random_logits(seed, scale=float(1 + seed))
        assert LOSSES[name](as_tensor(s), as_tensor(t), torch.as_tensor(y)).item() >= 0.0


def test_kd_and_dkd_are_zero_when_student_equals_teacher():
    s, _, y = random_logits(3)
    logits = as_tensor(s)
    assert losses.kd(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-14)
    tckd, nckd = losses.dkd_parts(logits, logits.clone(), torch.as_tensor(y))
    assert tckd.item() == pytest.approx(0.0, abs=1e-14)
    assert nckd.item() == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 2.0])
def test_ttm_and_wttm_are_zero_at_the_transformed_teacher(gamma):
    _, t, _ = random_logits(4)
    teacher = as_tensor(t)
    # Any shift of γ·log σ(t) has softmax equal to the power-transformed teacher.
    student = gamma * torch.log_softmax(teacher, dim=-1) + 7.0
    assert losses.ttm(student, teacher, gamma).item() == pytest.approx(0.0, abs=1e-13)
    assert losses.wttm(student, teacher, gamma).item() == pytest.approx(0.0, abs=1e-12)
    # The untransformed teacher is not the optimum when γ ≠ 1.
    assert losses.ttm(teacher, teacher, gamma).item() > 1e-3


def test_dist_is_zero_when_student_equals_teacher(monkeypatch):
    s, _, _ = random_logits(5)
    logits = as_tensor(s)
    # With ε the correlation of a vector with itself is n²/(n² + ε) < 1, so the loss is slightly
    # positive (its exact value is covered by the numpy comparison); without ε it is exactly 0.
    assert 0.0 < losses.dist(logits, logits.clone()).item() < 1e-3
    monkeypatch.setattr(losses, "DIST_EPS", 0.0)
    assert losses.dist(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_gamma_one_reduces_ttm_and_wttm_to_kd_at_temperature_one():
    s, t, _ = random_logits(6)
    student, teacher = as_tensor(s), as_tensor(t)
    kd_t1 = losses.kd(student, teacher, temperature=1.0).item()
    assert losses.ttm(student, teacher, 1.0).item() == pytest.approx(kd_t1, rel=1e-12)
    assert losses.wttm(student, teacher, 1.0).item() == pytest.approx(kd_t1, rel=1e-12)


@pytest.mark.parametrize("temperature", [2.0, 4.0, 10.0])
def test_power_transform_equals_teacher_temperature(temperature):
    # Spec §1.1: p^γ / Σ p^γ = σ(γ·t), so TTM with γ = 1/T matches σ(t/T) against σ(s).
    s, t, _ = random_logits(7)
    expected = np_kl(np_softmax(t / temperature), np_softmax(s)).mean()
    value = losses.ttm(as_tensor(s), as_tensor(t), 1.0 / temperature).item()
    assert value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_ttm_is_kd_plus_renyi_entropy_term(temperature):
    # Spec §1.5: KL(p_T‖q) = T·KL(p_T‖q_T) − (T−1)·H_{1/T}(q) + (T−1)·H(p_T); kd carries a T².
    s, t, _ = random_logits(8)
    kd_term = losses.kd(as_tensor(s), as_tensor(t), temperature).item() / temperature**2
    renyi_q = np_renyi(np_softmax(s), 1.0 / temperature).mean()
    entropy_target = np_entropy(np_softmax(t / temperature)).mean()
    expected = temperature * kd_term - (temperature - 1) * (renyi_q - entropy_target)
    value = losses.ttm(as_tensor(s), as_tensor(t), 1.0 / temperature).item()
    assert value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_wttm_weight_spans_one_to_k_power(gamma):
    classes = 100
    student = as_tensor(np.random.default_rng(9).standard_normal((1, classes)))
    uniform_teacher = torch.zeros(1, classes, dtype=torch.float64)
    weight = losses.wttm(student, uniform_teacher, gamma) / losses.ttm(
        student, uniform_teacher, gamma
    )
    assert weight.item() == pytest.approx(classes ** (1 - gamma), rel=1e-12)
    peaked_teacher = torch.zeros(1, classes, dtype=torch.float64)
    peaked_teacher[0, 3] = 200.0
    weight = losses.wttm(student, peaked_teacher, gamma) / losses.ttm(
        student, peaked_teacher, gamma
    )
    assert weight.item() == pytest.approx(1.0, abs=1e-6)


def test_kd_decomposes_into_tckd_and_weighted_nckd():
    # DKD paper eq. 4: KL(p‖q) = TCKD + (1 − p_y)·NCKD per sample (the T² factor is shared).
    temperature = 3.0
    s, t, y = random_logits(10, batch=5)
    for row in range(5):
        student, teacher = as_tensor(s[row : row + 1]), as_tensor(t[row : row + 1])
        label = torch.as_tensor(y[row : row + 1])
        tckd, nckd = losses.dkd_parts(student, teacher, label, temperature)
        p_target = np_softmax(t[row] / temperature)[y[row]]
        kd_value = losses.kd(student, teacher, temperature).item()
        assert kd_value == pytest.approx(tckd.item() + (1 - p_target) * nckd.item(), rel=1e-10)


def test_dist_single_sample_has_constant_intra_term():
    s, t, _ = random_logits(11, batch=1)
    tau = 4.0
    inter_ref = 1 - np_pearson(np_softmax(s[0] / tau), np_softmax(t[0] / tau))
    student = as_tensor(s).requires_grad_(True)
    value = losses.dist(student, as_tensor(t), beta=1.0, gamma=1.0, tau=tau)
    assert value.item() == pytest.approx(tau**2 * (inter_ref + 1.0), rel=1e-10)
    # A last batch of one sample must not produce NaN gradients from the all-zero centred columns.
    value.backward()
    assert torch.isfinite(student.grad).all()


# ---------------------------------------------------------------- reduction


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_duplicated_batch_gives_the_same_loss(name):
    s, t, y = random_logits(12)
    single = LOSSES[name](as_tensor(s), as_tensor(t), torch.as_tensor(y)).item()
    doubled = LOSSES[name](
        as_tensor(np.concatenate([s, s])),
        as_tensor(np.concatenate([t, t])),
        torch.as_tensor(np.concatenate([y, y])),
    ).item()
    # DIST's ε sits next to a norm product that doubles with the batch, hence the looser bound.
    assert doubled == pytest.approx(single, rel=1e-12 if name in KL_LOSSES else 1e-7)


def test_batch_mean_is_the_mean_of_single_sample_losses():
    s, t, y = random_logits(13, batch=4)
    for name in KL_LOSSES:
        rows = [
            LOSSES[name](
                as_tensor(s[i : i + 1]), as_tensor(t[i : i + 1]), torch.as_tensor(y[i : i + 1])
            )
            for i in range(4)
        ]
        batch_value = LOSSES[name](as_tensor(s), as_tensor(t), torch.as_tensor(y))
        assert batch_value.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-12)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck_wrt_student_logits(name):
    s, t, y = random_logits(14, batch=4, classes=6)
    student = as_tensor(s).requires_grad_(True)
    teacher, target = as_tensor(t), torch.as_tensor(y)
    assert torch.autograd.gradcheck(lambda x: LOSSES[name](x, teacher, target), (student,))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_teacher_logits_receive_no_gradient(name):
    s, t, y = random_logits(15)
    student = as_tensor(s).requires_grad_(True)
    teacher = as_tensor(t).requires_grad_(True)
    LOSSES[name](student, teacher, torch.as_tensor(y)).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum().item() > 0


def test_ttm_gradient_is_student_minus_target_over_batch():
    # Spec §1.5 (paper eq. 20): ∂KL(p̂‖q)/∂z = q − p̂; the batch mean divides by B.
    s, t, _ = random_logits(16)
    student = as_tensor(s).requires_grad_(True)
    losses.ttm(student, as_tensor(t), GAMMA).backward()
    expected = (np_softmax(s) - np_softmax(GAMMA * t)) / s.shape[0]
    np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_kd_gradient_is_scaled_tempered_difference():
    # ∂[T²·KL(p_T‖q_T)]/∂z = T·(q_T − p_T) per sample (paper eq. 21 times T²), then / B.
    temperature = 4.0
    s, t, _ = random_logits(17)
    student = as_tensor(s).requires_grad_(True)
    losses.kd(student, as_tensor(t), temperature).backward()
    tempered_difference = np_softmax(s / temperature) - np_softmax(t / temperature)
    expected = temperature * tempered_difference / s.shape[0]
    np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- numerical stability


def huge_logits(classes: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(18)
    s = rng.choice([-1e4, 1e4], size=(6, classes)) + rng.standard_normal((6, classes))
    t = rng.choice([-1e4, 1e4], size=(6, classes)) + rng.standard_normal((6, classes))
    s[0], t[0] = 1e4 * np.eye(classes)[0], 1e4 * np.eye(classes)[1]  # confidently disagreeing
    target = rng.integers(0, classes, size=6)
    target[0] = 1  # the teacher's target probability rounds to 1, so 1 − p_target rounds to 0
    return s, t, target


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_huge_logits_are_finite_and_match_float64(name):
    s, t, y = huge_logits()
    target = torch.as_tensor(y)
    s32 = as_tensor(s, torch.float32).requires_grad_(True)
    value32 = LOSSES[name](s32, as_tensor(t, torch.float32), target)
    value32.backward()
    # The float64 reference is evaluated on the float32-rounded logits, so the only difference is
    # the arithmetic precision inside the loss.
    value64 = LOSSES[name](as_tensor(s32.detach()), as_tensor(t.astype(np.float32)), target)
    assert torch.isfinite(value32) and torch.isfinite(s32.grad).all()
    assert value32.item() == pytest.approx(value64.item(), rel=1e-6, abs=1e-6)


def test_ttm_keeps_power_of_underflowing_teacher_probability():
    # σ(t)_1 = e^-200 underflows to 0 in float32, but at γ = 0.01 its power e^-2 carries 12% of the
    # transformed target. Working in log space keeps it, so float32 gives the exact value 0.328
    # (a literal float32 softmax-then-power would give the target [1, 0] and KL = log 2 = 0.693).
    t = np.array([[0.0, -200.0]])
    s = np.array([[0.5, 0.5]])
    target = np.array([1.0, np.exp(-2.0)]) / (1.0 + np.exp(-2.0))
    expected = float(np_kl(target, np.array([0.5, 0.5])))
    assert np_ttm_parts(s, t, 0.01)[0].item() == pytest.approx(expected, rel=1e-12)
    value32 = losses.ttm(as_tensor(s, torch.float32), as_tensor(t, torch.float32), 0.01).item()
    assert value32 == pytest.approx(expected, rel=1e-6)


def test_dkd_non_target_term_ignores_an_overwhelming_target_logit():
    # The target logit (2000) exceeds any finite mask such as −1000; the non-target distributions
    # must still be σ([0, 0]) for the teacher and σ([0, 1]) for the student, and TCKD ≈ 0 because
    # both put all binary mass on the target.
    teacher = torch.tensor([[2000.0, 0.0, 0.0]])
    student = torch.tensor([[2000.0, 0.0, 1.0]])
    tckd, nckd = losses.dkd_parts(student, teacher, torch.tensor([0]), temperature=1.0)
    expected_nckd = float(np_kl(np.array([0.5, 0.5]), np_softmax(np.array([0.0, 1.0]))))
    assert tckd.item() == pytest.approx(0.0, abs=1e-12)
    assert nckd.item() == pytest.approx(expected_nckd, rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_autocast_computes_in_float32(name):
    torch.manual_seed(0)
    features = torch.randn(16, 32)
    student_head, teacher_head = torch.nn.Linear(32, 10), torch.nn.Linear(32, 10)
    target = torch.randint(0, 10, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_logits = student_head(features)
        with torch.no_grad():
            teacher_logits = teacher_head(features)
        value = LOSSES[name](student_logits, teacher_logits, target)
    assert student_logits.dtype == torch.bfloat16
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(student_head.weight.grad).all()
    # Against float64 on the same bf16 logits: only float32-level error is allowed, i.e. no bf16
    # arithmetic happened inside the loss.
    reference = LOSSES[name](student_logits.detach().double(), teacher_logits.double(), target)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- argument checking


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mismatched_shapes_raise(name):
    with pytest.raises(ValueError, match="shape"):
        LOSSES[name](torch.zeros(4, 10), torch.zeros(4, 11), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(
    "call",
    [
        lambda s, t: losses.kd(s, t, temperature=0.0),
        lambda s, t: losses.ttm(s, t, gamma=0.0),
        lambda s, t: losses.wttm(s, t, gamma=-0.5),
        lambda s, t: losses.dkd(s, t, torch.zeros(2, dtype=torch.long), temperature=-1.0),
        lambda s, t: losses.dist(s, t, tau=0.0),
    ],
)
def test_non_positive_scale_parameters_raise(call):
    with pytest.raises(ValueError, match="must be > 0"):
        call(torch.zeros(2, 5), torch.zeros(2, 5))


def test_dkd_rejects_target_of_wrong_shape():
    with pytest.raises(ValueError, match="target"):
        losses.dkd(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(2, dtype=torch.long))

