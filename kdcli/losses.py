"""Distillation losses as pure functions, in the style of ``torch.nn.functional``.

The logit losses take student logits ``(B, K)`` and teacher logits ``(B, K)``; the feature losses
(:func:`attention_transfer`, :func:`similarity_preserving`, :func:`pkt`, :func:`rkd`,
:func:`contrastive_nce`, :func:`itrd_correlation`, :func:`itrd_mutual_information`,
:func:`hierarchical_context`) take feature maps
``(B, C, H, W)`` or pooled features ``(B, D)``. Every one returns a scalar tensor. Conventions shared by all:

* Gradients flow into the student logits only: teacher logits are detached inside, so targets and
  weights built from the teacher are constants.
* Probabilities are handled in log space (``log_softmax`` / ``logsumexp``), so nothing takes log(0)
  and logits of magnitude 1e4 stay finite in float32.
* Half-precision inputs (bfloat16/float16, e.g. logits produced under ``torch.autocast``) are
  upcast to float32 before any softmax, and the loss is returned in float32. float64 inputs stay
  float64 (used by the gradient checks).

Notation in the docstrings: σ is the softmax over classes, s and t are student and teacher logits of
one sample, KL(p ‖ q) = Σ_k p_k · (log p_k − log q_k), and mean_b averages over the batch.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["kl_div", "kd", "soft_target_kd", "ttm", "wttm", "dkd", "dkd_parts", "dist", "attention_transfer",
           "similarity_preserving", "pkt", "rkd", "contrastive_nce", "itrd_correlation", "itrd_mutual_information",
           "hierarchical_context"]

DIST_EPS = 1e-8
"""Added to the product of norms in DIST's Pearson correlation (the DIST code's convention)."""


def _working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Common floating dtype of the inputs, at least float32 (softmax in bf16 loses ~3 digits)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
        return torch.float32
    return dtype


def _prepare(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes, detach the teacher and cast both to the working dtype."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both have shape (batch, classes); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = _working_dtype(student_logits, teacher_logits)
    return student_logits.to(dtype), teacher_logits.detach().to(dtype)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def kl_div(log_pred: torch.Tensor, target: torch.Tensor, log_target: bool = True) -> torch.Tensor:
    """Per-sample KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) over the last dim; shape (B,). The one KL of kdcli.

    Args:
        log_pred: log q, log-probabilities of the prediction (receives the gradient).
        target: log p when ``log_target`` (entries whose p_k = exp(log p_k) underflows to 0 contribute
            exactly 0, because both log terms are finite), else the probabilities p themselves, which may
            hold exact zeros (0 · log 0 = 0 through ``torch.xlogy``).
        log_target: which form ``target`` has, as in ``torch.nn.functional.kl_div``.
    """
    if log_target:
        return (target.exp() * (target - log_pred)).sum(dim=-1)
    return (torch.xlogy(target, target) - target * log_pred).sum(dim=-1)


def kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Hinton KD loss with temperature applied to both sides (RepDistiller's ``DistillKL``).

    L = T² · mean_b KL(σ(t/T) ‖ σ(s/T))

    Args:
        student_logits: (B, K) student logits s; receives the gradient.
        teacher_logits: (B, K) teacher logits t; detached.
        temperature: T > 0.

    Returns:
        Scalar: the per-sample KL summed over classes, averaged over the batch, times T².
    """
    _check_positive("temperature", temperature)
    student, teacher = _prepare(student_logits, teacher_logits)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    log_student = F.log_softmax(student / temperature, dim=-1)
    return temperature**2 * kl_div(log_student, log_teacher).mean()


def soft_target_kd(student_logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """KD towards a given distribution p (e.g. IDA's isotonic soft labels):

    L = T² · mean_b KL(p ‖ σ(s/T))

    ``target`` rows are probabilities and may hold exact zeros; it is a constant (detached). Half-precision
    inputs are computed in float32, float64 stays float64.
    """
    _check_positive("temperature", temperature)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return temperature**2 * kl_div(log_student, target.detach().to(dtype), log_target=False).mean()


def _ttm_parts(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample KL(p̂ ‖ σ(s)) and per-sample log U = log Σ_j p_j^γ, both of shape (B,)."""
    _check_positive("gamma", gamma)
    student, teacher = _prepare(student_logits, teacher_logits)
    # Softmax first, then the power, as in the authors' code; in log space the power is a product,
    # so teacher probabilities that underflow in float32 still get their (larger) power p^γ.
    log_powered = gamma * F.log_softmax(teacher, dim=-1)
    log_u = torch.logsumexp(log_powered, dim=-1)
    log_target = log_powered - log_u.unsqueeze(-1)
    kl = kl_div(F.log_softmax(student, dim=-1), log_target)
    return kl, log_u


def ttm(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Transformed Teacher Matching (Zheng & Yang, ICLR 2024, eq. 2), the distillation term only.

    p = σ(t),  p̂_k = p_k^γ / Σ_j p_j^γ   (equal to σ(γ·t), i.e. temperature T = 1/γ)
    L = mean_b KL(p̂ ‖ σ(s))

    The temperature is applied to the teacher only; the student uses its plain T = 1 softmax and
    there is no T² factor. log p̂ is computed as log_softmax(γ · log_softmax(t)).

    Args:
        student_logits: (B, K) student logits s; receives the gradient.
        teacher_logits: (B, K) teacher logits t; detached.
        gamma: γ > 0 (γ < 1 smooths the teacher, γ = 1 leaves it unchanged).

    Returns:
        Scalar: the per-sample KL summed over classes, averaged over the batch.
    """
    kl, _ = _ttm_parts(student_logits, teacher_logits, gamma)
    return kl.mean()


def wttm(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Weighted TTM (Zheng & Yang, ICLR 2024, eq. 23), the distillation term only.

    p = σ(t),  U = Σ_j p_j^γ,  p̂_k = p_k^γ / U
    L = mean_b U · KL(p̂ ‖ σ(s))

    U is the power sum of the untransformed teacher softmax, computed as
    exp(logsumexp(γ · log σ(t))). As in the authors' code it is not normalised over the batch; it
    lies in [1, K^(1−γ)] for 0 < γ < 1, equals 1 at γ = 1 and carries no gradient.

    Args:
        student_logits: (B, K) student logits s; receives the gradient.
        teacher_logits: (B, K) teacher logits t; detached.
        gamma: γ > 0.

    Returns:
        Scalar: the U-weighted per-sample KL, averaged over the batch.
    """
    kl, log_u = _ttm_parts(student_logits, teacher_logits, gamma)
    return (log_u.exp() * kl).mean()


def _non_target_index(target: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, K−1) column indices of every class except each row's target, in increasing order.

    Built arithmetically (no boolean indexing) so it needs no host-device synchronisation.
    """
    columns = torch.arange(classes - 1, device=target.device).expand(target.shape[0], -1)
    return columns + (columns >= target.unsqueeze(-1)).long()


def _split_target(
    logits: torch.Tensor, target: torch.Tensor, non_target_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log binary distribution log [p_target, 1 − p_target], shape (B, 2), and the non-target
    logits, shape (B, K−1), where p = σ(logits).

    1 − p_target is taken as exp(logsumexp(non-target logits) − logsumexp(all logits)), which stays
    finite when p_target rounds to 1.
    """
    log_normaliser = torch.logsumexp(logits, dim=-1)
    non_target_logits = logits.gather(-1, non_target_index)
    log_p_target = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - log_normaliser
    log_p_rest = torch.logsumexp(non_target_logits, dim=-1) - log_normaliser
    return torch.stack([log_p_target, log_p_rest], dim=-1), non_target_logits


def dkd_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of Decoupled KD (Zhao et al., CVPR 2022), each T²-scaled and batch-averaged.

    With p = σ(t/T), q = σ(s/T) and y the target class:
        b^p = [p_y, 1 − p_y],  b^q = [q_y, 1 − q_y]
        p̃_k = p_k / (1 − p_y),  q̃_k = q_k / (1 − q_y)  for k ≠ y  (σ over the non-target logits)
        TCKD = T² · mean_b KL(b^p ‖ b^q)
        NCKD = T² · mean_b KL(p̃ ‖ q̃)
    so that per sample KL(p ‖ q) = KL(b^p ‖ b^q) + (1 − p_y) · KL(p̃ ‖ q̃).

    The target column is removed by a gather (not masked with a finite constant) before the
    non-target softmax:
    a finite mask such as −1000 stops working once |logits|/T exceeds it, and −inf would give
    0 · (−inf) = NaN inside the KL.

    Args:
        student_logits: (B, K) student logits s, K ≥ 2; receives the gradient.
        teacher_logits: (B, K) teacher logits t; detached.
        target: (B,) integer class labels in [0, K) (not range-checked here, which would force a
            device synchronisation; torch.gather rejects out-of-range labels).
        temperature: T > 0.

    Returns:
        (TCKD, NCKD): two scalars.
    """
    _check_positive("temperature", temperature)
    student, teacher = _prepare(student_logits, teacher_logits)
    if target.shape != student.shape[:1]:
        raise ValueError(
            f"target must have shape ({student.shape[0]},), got {tuple(target.shape)}"
        )
    if student.shape[1] < 2:
        raise ValueError("DKD needs at least 2 classes")
    target = target.long()
    non_target_index = _non_target_index(target, student.shape[1])
    binary_student, rest_student = _split_target(student / temperature, target, non_target_index)
    binary_teacher, rest_teacher = _split_target(teacher / temperature, target, non_target_index)
    tckd = kl_div(binary_student, binary_teacher).mean()
    nckd = kl_div(F.log_softmax(rest_student, dim=-1), F.log_softmax(rest_teacher, dim=-1)).mean()
    return temperature**2 * tckd, temperature**2 * nckd


def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD loss: L = α · TCKD + β · NCKD (see :func:`dkd_parts` for the two terms).

    Args:
        student_logits: (B, K) student logits; receives the gradient.
        teacher_logits: (B, K) teacher logits; detached.
        target: (B,) integer class labels.
        alpha: weight α of the target-class term.
        beta: weight β of the non-target-class term (8 is the usual CIFAR-100 value).
        temperature: T > 0.

    Returns:
        Scalar: α · TCKD + β · NCKD, each T²-scaled and averaged over the batch.
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd


def _mean_pearson_of_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the Pearson correlation between row i of a and row i of b.

    ρ(x, y) = ⟨x − x̄, y − ȳ⟩ / (‖x − x̄‖ · ‖y − ȳ‖ + ε), ε = 1e-8.
    """
    a_centred = a - a.mean(dim=-1, keepdim=True)
    b_centred = b - b.mean(dim=-1, keepdim=True)
    covariance = (a_centred * b_centred).sum(dim=-1)
    norms = a_centred.norm(dim=-1) * b_centred.norm(dim=-1)
    return (covariance / (norms + DIST_EPS)).mean()


def dist(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 4.0,
) -> torch.Tensor:
    """DIST relation loss (Huang et al., NeurIPS 2022), with the DIST code's conventions.

    With Y_s = σ(s/τ) and Y_t = σ(t/τ) as (B, K) matrices and ρ the Pearson correlation
    (cosine of mean-centred vectors, ε = 1e-8 added to the product of norms):
        inter = τ² · (1 − mean_b ρ(Y_s[b, :], Y_t[b, :]))   correlation across classes
        intra = τ² · (1 − mean_k ρ(Y_s[:, k], Y_t[:, k]))   correlation across the batch
        L = β · inter + γ · intra

    Unlike the other losses here, the intra term couples the samples of a batch, so the loss is not
    a mean of independent per-sample terms (and with B = 1 the intra term is the constant τ²).

    Args:
        student_logits: (B, K) student logits s; receives the gradient.
        teacher_logits: (B, K) teacher logits t; detached.
        beta: weight β of the inter-class term.
        gamma: weight γ of the intra-class term.
        tau: temperature τ > 0.

    Returns:
        Scalar: β · inter + γ · intra.
    """
    _check_positive("tau", tau)
    student, teacher = _prepare(student_logits, teacher_logits)
    probs_student = F.softmax(student / tau, dim=-1)
    probs_teacher = F.softmax(teacher / tau, dim=-1)
    inter = 1.0 - _mean_pearson_of_rows(probs_student, probs_teacher)
    intra = 1.0 - _mean_pearson_of_rows(probs_student.T, probs_teacher.T)
    return tau**2 * (beta * inter + gamma * intra)


# -- feature losses ------------------------------------------------------------------------------------
def _outside_autocast(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a feature loss with autocast off: under an enclosing bf16/fp16 autocast its matmuls would otherwise be
    cast back to half precision (PKT's weight of 30000 turns that rounding into the whole loss)."""

    @functools.wraps(loss)
    def wrapper(student, *args, **kwargs):
        device = (student if isinstance(student, torch.Tensor) else student[0]).device
        with torch.autocast(device.type, enabled=False):
            return loss(student, *args, **kwargs)

    return wrapper


def _as_working(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in the working dtype, the teacher detached (a target, never trained through)."""
    dtype = _working_dtype(student, teacher)
    return student.to(dtype), teacher.detach().to(dtype)


def _attention(feature_map: torch.Tensor, p: float) -> torch.Tensor:
    """AT's spatial attention: the channel mean of ``f^p``, flattened and L2-normalised per sample."""
    return F.normalize(feature_map.pow(p).mean(1).flatten(1), dim=1)


@_outside_autocast
def attention_transfer(student_maps, teacher_maps, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), summed over the stage pairs:

        AT = Σ_pairs mean_{b,i} (a(s)_{b,i} − a(t)_{b,i})²,   a(f) = normalize(mean_c f^p)

    over the H·W positions i. Of a pair, the map with the larger spatial size is adaptive-average-pooled to
    the other's (as mdistiller and RepDistiller do).
    """
    total = None
    for student, teacher in zip(student_maps, teacher_maps, strict=True):
        student, teacher = _as_working(student, teacher)
        if student.shape[-2:] != teacher.shape[-2:]:
            if student.shape[-2] > teacher.shape[-2]:
                student = F.adaptive_avg_pool2d(student, teacher.shape[-2:])
            else:
                teacher = F.adaptive_avg_pool2d(teacher, student.shape[-2:])
        pair = (_attention(student, p) - _attention(teacher, p)).pow(2).mean()
        total = pair if total is None else total + pair
    if total is None:
        raise ValueError("attention_transfer needs at least one pair of stage maps")
    return total


def _similarity(feature_map: torch.Tensor) -> torch.Tensor:
    flat = feature_map.flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


@_outside_autocast
def similarity_preserving(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): with G = row-normalize(f fᵀ) the batch's (B, B)
    similarity of the flattened maps,

        SP = Σ_{b,b'} (G(t) − G(s))² / B²
    """
    student, teacher = _as_working(student_map, teacher_map)
    return (_similarity(teacher) - _similarity(student)).pow(2).sum() / student.shape[0] ** 2


def _pkt_distribution(features: torch.Tensor, eps: float) -> torch.Tensor:
    unit = torch.nan_to_num(features / (features.norm(dim=1, keepdim=True) + eps), nan=0.0)
    similarity = (unit @ unit.T + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


@_outside_autocast
def pkt(student_features: torch.Tensor, teacher_features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): each row of the batch's cosine similarity,
    mapped to [0, 1] and normalised, is a distribution P (teacher) or Q (student) over the batch;

        PKT = mean_{b,b'} P_{bb'} · log((P_{bb'} + eps) / (Q_{bb'} + eps))

    (RepDistiller's form: eps added to the norms and inside the log, the mean over all B² entries).
    """
    student, teacher = _as_working(student_features, teacher_features)
    target, model = _pkt_distribution(teacher, eps), _pkt_distribution(student, eps)
    return (target * torch.log((target + eps) / (model + eps))).mean()


def _distances(features: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """Pairwise Euclidean distances (0 on the diagonal), divided by the mean of the positive ones."""
    square = features.pow(2).sum(dim=1)
    distances = (square[:, None] + square[None, :] - 2 * features @ features.T).clamp(min=eps)
    distances = distances if squared else distances.sqrt()
    distances = distances.clone()
    distances[range(len(features)), range(len(features))] = 0
    return distances / distances[distances > 0].mean()


def _angles(features: torch.Tensor) -> torch.Tensor:
    """cos of the angle at every vertex j of every triangle (i, j, k) of the batch, (B³,)."""
    differences = F.normalize(features[None, :, :] - features[:, None, :], p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).flatten()


@_outside_autocast
def rkd(student_features: torch.Tensor, teacher_features: torch.Tensor, distance_weight: float = 25.0,
        angle_weight: float = 50.0, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Relational KD (Park et al., CVPR 2019) on pooled features:

        RKD = w_d · mean huber(ψ_D(s) − ψ_D(t)) + w_a · mean huber(ψ_A(s) − ψ_A(t))

    ψ_D: pairwise distances, each matrix divided by the mean of its positive entries; ψ_A: the cosines of
    the angles of every triangle of the batch; huber is the smooth-L1 loss with β = 1 (RepDistiller's form).
    """
    student, teacher = _as_working(student_features, teacher_features)
    distance = F.smooth_l1_loss(_distances(student, squared, eps), _distances(teacher, squared, eps))
    angle = F.smooth_l1_loss(_angles(student), _angles(teacher))
    return distance_weight * distance + angle_weight * angle


CRD_EPS = 1e-7
"""Added to NCE's denominators (CRD's convention)."""


@_outside_autocast
def contrastive_nce(log_scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """CRD's binary NCE loss (Tian et al., ICLR 2020, eq. 18) from log scores ``(B, 1 + K)``: column 0 is the
    positive pair, the K others negatives, and a score is P = exp(⟨m, e⟩ / T) / Z. With c = K/N + eps:

        NCE = −(1/B) Σ_b [ log(P_b0 / (P_b0 + c)) + Σ_k log((K/N) / (P_bk + c)) ]

    computed in log space (log(P + c) = logaddexp(log P, log c)), so scores far above c stay finite.
    """
    negatives = log_scores.shape[1] - 1
    noise = negatives / n_data
    log_c = torch.log(torch.as_tensor(noise + CRD_EPS, dtype=log_scores.dtype, device=log_scores.device))
    positive = log_scores[:, 0] - torch.logaddexp(log_scores[:, 0], log_c)
    negative = math.log(noise) - torch.logaddexp(log_scores[:, 1:], log_c)
    return -(positive.sum() + negative.sum()) / log_scores.shape[0]


ITRD_MIN_STD = 1e-8
"""Floor of ITRD's per-dimension std: a dimension constant over the batch (a dead ReLU unit) standardises to 0
instead of NaN (the authors' code divides by the std as it is)."""


def _standardise(features: torch.Tensor) -> torch.Tensor:
    return (features - features.mean(0)) / features.std(0).clamp_min(ITRD_MIN_STD)


@_outside_autocast
def itrd_correlation(student_features: torch.Tensor, teacher_features: torch.Tensor,
                     alpha: float = 1.5) -> torch.Tensor:
    """ITRD's correlation term (Miles et al., BMVC 2022), on features of equal width D (the student embedded):
    with s̃, t̃ standardised per dimension over the batch (unbiased std, floored at 1e-8) and c_d = mean_b s̃_bd t̃_bd,

        L_corr = log₂ Σ_d |c_d − 1|^(2α)
    """
    student, teacher = _as_working(student_features, teacher_features)
    correlation = (_standardise(student) * _standardise(teacher)).sum(0) / student.shape[0]
    return torch.log2((correlation - 1).abs().pow(2 * alpha).sum())


@_outside_autocast
def itrd_mutual_information(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """ITRD's mutual-information term: with ŝ, t̂ the L2-normalised rows, G_s = ŝŝᵀ, G_st = G_s ∘ t̂t̂ᵀ, each
    divided by its trace,

        L_mi = Σ_{b,b'} (G_s² − G_st²)
    """
    student, teacher = _as_working(student_features, teacher_features)
    unit_s, unit_t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    gram_s = unit_s @ unit_s.T
    gram_st = gram_s * (unit_t @ unit_t.T)
    gram_s, gram_st = gram_s / torch.trace(gram_s), gram_st / torch.trace(gram_st)
    return (gram_s.pow(2) - gram_st.pow(2)).sum()


HCL_LEVELS = (4, 2, 1)
"""The pooled pyramid levels of ReviewKD's hierarchical context loss (each used when smaller than the map)."""


@_outside_autocast
def hierarchical_context(student_maps, teacher_maps) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (Chen et al., CVPR 2021), summed over the pairs of maps:

        HCL(s, t) = (mse(s, t) + Σ_l w_l · mse(pool_l(s), pool_l(t))) / (1 + Σ_l w_l)

    over the levels l ∈ {4, 2, 1} smaller than the map's height, pool_l an adaptive average pool to l x l
    and w_l = 1/2, 1/4, 1/8 in the order the levels are used.
    """
    total = None
    for student, teacher in zip(student_maps, teacher_maps, strict=True):
        student, teacher = _as_working(student, teacher)
        loss, weight, weights = F.mse_loss(student, teacher), 1.0, 1.0
        for level in HCL_LEVELS:
            if level >= student.shape[2]:
                continue
            weight /= 2.0
            pooled = F.mse_loss(F.adaptive_avg_pool2d(student, level), F.adaptive_avg_pool2d(teacher, level))
            loss, weights = loss + weight * pooled, weights + weight
        total = loss / weights if total is None else total + loss / weights
    if total is None:
        raise ValueError("hierarchical_context needs at least one pair of maps")
    return total
