"""Feature losses against the published implementations, plus the properties that define them.

Golden values: the reference functions of mdistiller (commit a08d46f) and RepDistiller (commit b84f547) --
``AT.at_loss``/``single_stage_at_loss``, ``SP.similarity_loss``, ``PKT.cosine_similarity_loss``, ``RKDLoss``,
``crd/criterion.py::ContrastLoss`` (both repositories agree bit for bit) -- and of the TTM authors' code
(zkxufo/TTM commit fe457b3, ``distiller_zoo/itrd.py::ITLoss``), run unchanged in float64 on the inputs of
:func:`inputs` (drawn in this order from one generator seeded 0). ReviewKD's ``hcl_loss`` and ``ABF`` from
mdistiller (``mdistiller/distillers/ReviewKD.py``), the same in dvlab-research/ReviewKD (commit cede6ea).
"""

from __future__ import annotations

import pytest
import torch

from kdcli import losses

F64 = torch.float64


def inputs():
    g = torch.Generator().manual_seed(0)
    s_maps = [torch.randn(4, 8, 8, 8, generator=g, dtype=F64), torch.randn(4, 16, 4, 4, generator=g, dtype=F64)]
    t_maps = [torch.randn(4, 12, 16, 16, generator=g, dtype=F64), torch.randn(4, 24, 4, 4, generator=g, dtype=F64)]
    s_feat = torch.randn(6, 10, generator=g, dtype=F64)
    t_feat = torch.randn(6, 14, generator=g, dtype=F64)
    return s_maps, t_maps, s_feat, t_feat


def test_attention_transfer_matches_mdistiller_and_repdistiller() -> None:
    s_maps, t_maps, _, _ = inputs()
    # pair 1: the 16x16 teacher map is pooled to 8x8 (mdistiller); pair 2: equal sizes (both repositories)
    assert losses.attention_transfer(s_maps[:1], t_maps[:1]).item() == pytest.approx(0.006541950270789478, rel=1e-12)
    assert losses.attention_transfer(s_maps[1:], t_maps[1:]).item() == pytest.approx(0.011230907807427259, rel=1e-12)
    assert losses.attention_transfer(s_maps, t_maps).item() == pytest.approx(0.017772858078216738, rel=1e-12)


def test_similarity_preserving_matches_the_reference() -> None:
    s_maps, t_maps, _, _ = inputs()
    assert losses.similarity_preserving(s_maps[0], t_maps[0]).item() == pytest.approx(0.0014673688262895187, rel=1e-12)


def test_pkt_matches_the_reference() -> None:
    _, _, s_feat, t_feat = inputs()
    assert losses.pkt(s_feat, t_feat).item() == pytest.approx(0.011193047012505919, rel=1e-12)


def test_rkd_matches_the_reference() -> None:
    _, _, s_feat, t_feat = inputs()
    # unweighted parts: distance 0.028245084973149585, angle 0.027715645366974379
    assert losses.rkd(s_feat, t_feat, 1.0, 0.0).item() == pytest.approx(0.028245084973149585, rel=1e-12)
    assert losses.rkd(s_feat, t_feat, 0.0, 1.0).item() == pytest.approx(0.027715645366974379, rel=1e-12)
    assert losses.rkd(s_feat, t_feat).item() == pytest.approx(2.0919093926774583, rel=1e-12)


def test_contrastive_nce_matches_crds_contrast_loss() -> None:
    # ContrastLoss(n_data=100) on scores x = rand + 0.1 (positive in column 0, four negatives)
    scores = torch.rand(3, 5, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.1
    assert losses.contrastive_nce(scores.log(), 100).item() == pytest.approx(10.368337115673794, rel=1e-12)


def test_contrastive_nce_stays_finite_where_the_probability_form_overflows() -> None:
    log_scores = torch.tensor([[200.0, -5.0, 150.0, 0.0]])  # exp(200) overflows float32
    value = losses.contrastive_nce(log_scores, 50000)
    assert torch.isfinite(value) and value.item() > 0


def test_itrd_terms_match_the_ttm_authors_itloss() -> None:
    _, _, s_feat, t_feat = inputs()
    # ITLoss's embed: a Linear(10, 14) with weight arange(140).reshape(14, 10).sin() * 0.1 and zero bias
    embedded = s_feat @ (torch.arange(140, dtype=F64).reshape(14, 10).sin() * 0.1).T
    assert losses.itrd_correlation(embedded, t_feat, alpha=1.5).item() == pytest.approx(4.106158583888007, rel=1e-12)
    assert losses.itrd_mutual_information(embedded, t_feat).item() == pytest.approx(0.35922904907513431, rel=1e-12)


def test_itrd_correlation_stays_finite_with_a_dead_unit() -> None:
    _, _, s_feat, t_feat = inputs()
    dead = s_feat[:, :10].clone()
    dead[:, 3] = 0.0  # constant over the batch, as a ReLU unit that never fires
    assert torch.isfinite(losses.itrd_correlation(dead, t_feat[:, :10]))


def test_identical_student_and_teacher_cost_nothing_and_relations_ignore_scale() -> None:
    s_maps, _, s_feat, _ = inputs()
    assert losses.attention_transfer(s_maps, s_maps).item() == 0.0
    assert losses.similarity_preserving(s_maps[0], s_maps[0]).item() == 0.0
    assert losses.pkt(s_feat, s_feat).item() == pytest.approx(0.0, abs=1e-15)
    assert losses.rkd(s_feat, s_feat).item() == 0.0
    # RKD's distances are normalised by their mean and its angles are cosines: a scaled batch has the same relations
    assert losses.rkd(3.0 * s_feat, s_feat).item() == pytest.approx(0.0, abs=1e-12)
    # SP's rows are normalised: scaling the student's maps changes nothing
    assert losses.similarity_preserving(5.0 * s_maps[0], s_maps[0]).item() == pytest.approx(0.0, abs=1e-15)


def test_hierarchical_context_matches_reviewkds_hcl_loss() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = ((4, 8, 8), (4, 4, 4), (4, 1, 1))
    student = [torch.randn(2, *size, generator=g, dtype=F64) for size in sizes]
    teacher = [torch.randn(2, *size, generator=g, dtype=F64) for size in sizes]
    # per pair 1.1896511758882198 (8x8: levels 4, 2, 1), 1.3355079814243533 (4x4: 2, 1), 1.6224979473035033 (1x1)
    assert losses.hierarchical_context(student[2:], teacher[2:]).item() == pytest.approx(1.6224979473035033, rel=1e-12)
    assert losses.hierarchical_context(student, teacher).item() == pytest.approx(4.147657104616076, rel=1e-12)


def test_reviewkd_abf_matches_the_reference_module() -> None:
    from kdcli.methods.reviewkd import ABF

    abf = ABF(3, 4, 5, fuse=True).double().eval()
    with torch.no_grad():  # every parameter, in the reference's order, set to a linspace
        for parameter in abf.parameters():
            parameter.copy_(torch.linspace(-0.5, 0.5, parameter.numel(), dtype=F64).reshape(parameter.shape))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    residual = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    output, fused = abf(x, residual, 4)
    assert output.sum().item() == pytest.approx(39.75208675474102, rel=1e-12)
    assert output.pow(2).sum().item() == pytest.approx(143.21883620642123, rel=1e-12)
    assert fused.sum().item() == pytest.approx(12.782211474518524, rel=1e-12)
    assert output[0, 0, 0].tolist() == pytest.approx([-1.4915655561057044, -1.8086526165027081, -1.6710993839430317,
                                                      -1.045267299187466], rel=1e-12)


@pytest.mark.parametrize("loss", ["attention_transfer", "similarity_preserving", "pkt", "rkd", "itrd_correlation",
                                  "itrd_mutual_information"])
def test_gradients_reach_the_student_only_and_half_precision_is_upcast(loss: str) -> None:
    s_maps, t_maps, s_feat, t_feat = inputs()
    maps = loss in ("attention_transfer", "similarity_preserving")
    student = (s_maps[1] if maps else s_feat[:, :10]).float().requires_grad_()
    teacher = (t_maps[1][:, :16] if maps else torch.cat([t_feat, t_feat], 1)[:, :10]).float().requires_grad_()
    fn = getattr(losses, loss)
    value = fn([student], [teacher]) if loss == "attention_transfer" else fn(student, teacher)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    half = fn([student.bfloat16()], [teacher.bfloat16()]) if loss == "attention_transfer" else fn(
        student.bfloat16(), teacher.bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half)


@pytest.mark.parametrize("loss", ["attention_transfer", "similarity_preserving", "pkt", "rkd", "contrastive_nce",
                                  "itrd_correlation", "itrd_mutual_information", "hierarchical_context"])
def test_an_enclosing_half_precision_autocast_does_not_reach_the_losses(loss: str) -> None:
    """Under bf16 autocast the matmuls inside would run in bf16 (PKT's value was 190x off); the losses switch it off."""
    s_maps, t_maps, s_feat, t_feat = inputs()
    if loss in ("attention_transfer", "hierarchical_context"):
        args = ([s_maps[1].float()], [t_maps[1][:, :16].float()])
    elif loss == "similarity_preserving":
        args = (s_maps[0].float(), t_maps[0].float())
    elif loss == "contrastive_nce":
        args = ((s_feat @ t_feat[:, :10].T).float(), 100)
    else:
        args = (s_feat.float(), t_feat[:, :10].float())
    fn = getattr(losses, loss)
    plain = fn(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fn(*args), plain)
