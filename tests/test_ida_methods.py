"""kd-aug, ida (KD-i) and ida-p (KD-p): hand-computed targets and terms, switches, weights, recipes, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

from kdcli import losses
from kdcli.augment import mix
from kdcli.cli import app
from kdcli.engine.pipeline import resolve_recipe
from kdcli.engine.step import Engine, method_engine
from kdcli.errors import UserError
from kdcli.isotonic import order_penalty, project, violation_stats
from kdcli.methods import get_method
from kdcli.methods.base import Batch, StepInfo
from kdcli.methods.ida import isotonic_target
from kdcli.recipes import MethodConfig

CLASSES = 6


class FixedLogits(nn.Module):
    """A 'network' returning fixed logits for every batch (trainable for a student)."""

    def __init__(self, logits: list[list[float]], trainable: bool = False) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits), requires_grad=trainable)

    def forward(self, images: Tensor) -> Tensor:
        return self.logits[: images.shape[0]]


class Linear(nn.Module):
    """A tiny image classifier: global average pool then a linear layer (fast, and mixing-sensitive)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3, CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(images.mean(dim=(2, 3)) * 4.0)


def make(name: str, student: nn.Module, teacher: nn.Module, weights: dict | None = None,
         params: dict | None = None, num_classes: int = CLASSES) -> Engine:
    """The method and its engine (``.method``; ``step_terms`` computes a step's terms without an update)."""
    cfg = MethodConfig(name=name, weights=weights or {}, params=params or {})
    return method_engine(cfg, {"student": student}, teacher.eval().requires_grad_(False), num_classes, image_size=8)


def step_info(seed: int = 0) -> StepInfo:
    return StepInfo(epoch=0, epochs=1, step=0, generator=torch.Generator().manual_seed(seed))


def image_batch(size: int = 16, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (size,), generator=g),
                 torch.arange(size))


# -- the corrected target and the KL against it, by hand --------------------------------------------
def test_isotonic_target_by_hand_in_both_spaces() -> None:
    """p = (.5, .1, .3, .1), a = 0, b = 1, tau = 1. Probability space: b's block absorbs .3 (mean .2 <= p_a),
    so p~ = (.5, .2, .2, .1). Logit space: b's block absorbs log .3, level log sqrt(.03), then softmax."""
    p = torch.tensor([[0.5, 0.1, 0.3, 0.1]], dtype=torch.float64)
    a, b = torch.tensor([0]), torch.tensor([1])
    prob = isotonic_target(p.log(), a, b, tau=1.0, ir_space="prob_tau")
    torch.testing.assert_close(prob.double(), torch.tensor([[0.5, 0.2, 0.2, 0.1]], dtype=torch.float64))
    level = math.sqrt(0.03)
    expected = torch.tensor([[0.5, level, level, 0.1]], dtype=torch.float64)
    logit = isotonic_target(p.log(), a, b, tau=1.0, ir_space="logit")
    torch.testing.assert_close(logit.double(), expected / expected.sum(), atol=1e-6, rtol=0)


def test_isotonic_target_removes_every_violation_at_any_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 100, generator=g)
    primary = torch.randint(0, 100, (64,), generator=g)
    other = (primary + 1 + torch.randint(0, 99, (64,), generator=g)) % 100
    secondary = torch.where(torch.rand(64, generator=g) < 0.2, -1, other)
    for space in ("prob_tau", "logit"):
        target = isotonic_target(logits, primary, secondary, tau=4.5, ir_space=space)
        torch.testing.assert_close(target.sum(1), torch.ones(64))
        assert violation_stats(target, primary, secondary).discordant_pairs.sum() == 0
    before = violation_stats(logits, primary, secondary)
    assert before.has_violation.float().mean() > 0.9  # the inputs did violate


def test_soft_target_kd_equals_hinton_kd_for_the_teacher_target_and_handles_zeros() -> None:
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(5, 7, generator=g), 2 * torch.randn(5, 7, generator=g)
    target = F.softmax(teacher / 4.5, dim=1)
    torch.testing.assert_close(losses.soft_target_kd(student, target, 4.5), losses.kd(student, teacher, 4.5))
    # A target with exact zeros: 0 * log 0 = 0, computed by hand for one row, tau = 2.
    row = torch.tensor([[0.75, 0.25, 0.0]])
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    log_q = F.log_softmax(logits / 2, dim=1)[0]
    hand = 4 * (0.75 * (math.log(0.75) - log_q[0]) + 0.25 * (math.log(0.25) - log_q[1]))
    assert losses.soft_target_kd(logits, row, 2.0).item() == pytest.approx(hand.item(), rel=1e-6)
    logits.requires_grad_(True)
    losses.soft_target_kd(logits, row, 2.0).backward()
    assert torch.isfinite(logits.grad).all()


# -- the methods' terms ---------------------------------------------------------------------------
def test_ida_and_ida_p_terms_by_hand_on_an_unmixed_star_sample() -> None:
    """mix=none, label 0, tau=1: teacher p = (.2, .5, .3) -> p~ = (.35, .35, .3); student logits (0, 1, 0)."""
    teacher = FixedLogits([[math.log(0.2), math.log(0.5), math.log(0.3)]])
    student = FixedLogits([[0.0, 1.0, 0.0]], trainable=True)
    batch = Batch(torch.zeros(1, 3, 4, 4), torch.tensor([0]), torch.arange(1))
    params = {"mix": "none", "tau": 1.0}
    method = make("ida", student, teacher, params=params, weights={"penalty": 2.0}, num_classes=3)
    _, terms = method.step_terms(batch, step_info())
    q = [1 / (2 + math.e), math.e / (2 + math.e), 1 / (2 + math.e)]
    p_fixed = [0.35, 0.35, 0.3]
    assert terms["ida"].item() == pytest.approx(sum(t * math.log(t / s) for t, s in zip(p_fixed, q)), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(sum(t * math.log(t / s) for t, s in zip([0.2, 0.5, 0.3], q)), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(-math.log(q[0]), rel=1e-6)
    assert terms["penalty"].item() == pytest.approx(q[1] - q[0], rel=1e-5)  # the worst other above label 0


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_terms_match_an_independent_computation_on_mixed_batches(kind: str) -> None:
    student, teacher, batch = Linear(0), Linear(1), image_batch()
    names = {"kd-aug": {"ce", "kd"}, "ida": {"ce", "kd", "ida"}, "ida-p": {"ce", "kd", "penalty"}}
    for name, expected_terms in names.items():
        method = make(name, student, teacher, params={"mix": kind, "per_sample": True})
        logits, terms = method.step_terms(batch, step_info(7))
        assert set(terms) == expected_terms
        mixed = mix(kind, batch.images, batch.labels, 1.0, torch.Generator().manual_seed(7), per_sample=True)
        with torch.no_grad():
            z_s, z_t = student(mixed.images), teacher(mixed.images)
        torch.testing.assert_close(logits.detach(), z_s)
        lam = mixed.lam
        ce = (lam * F.cross_entropy(z_s, mixed.labels_a, reduction="none")
              + (1 - lam) * F.cross_entropy(z_s, mixed.labels_b, reduction="none")).mean()
        torch.testing.assert_close(terms["ce"].detach(), ce)
        torch.testing.assert_close(terms["kd"].detach(), losses.kd(z_s, z_t, 4.5))
        if name == "ida":
            fixed = project(F.softmax(z_t.double() / 4.5, dim=1), mixed.primary, mixed.secondary)
            log_q = F.log_softmax(z_s.double() / 4.5, dim=1)
            kl = (torch.xlogy(fixed, fixed) - fixed * log_q).sum(1).mean() * 4.5**2
            torch.testing.assert_close(terms["ida"].detach().double(), kl, rtol=1e-5, atol=1e-7)
        if name == "ida-p":
            pen = order_penalty(F.softmax(z_s, dim=1), mixed.primary, mixed.secondary)
            torch.testing.assert_close(terms["penalty"].detach(), pen)


def test_default_weights_are_the_papers_and_the_total_is_their_weighted_sum() -> None:
    assert get_method("kd-aug").default_weights == {"ce": 0.05, "kd": 0.95}
    assert get_method("ida").default_weights == {"ce": 0.05, "kd": 0.95, "ida": 3.0}
    assert get_method("ida-p").default_weights == {"ce": 0.05, "kd": 0.95, "penalty": 2.0}
    assert get_method("ida").Params().tau == 4.5 and get_method("ida").Params().ratio == 1.0
    student, teacher, batch = Linear(0), Linear(1), image_batch()
    method = make("ida", student, teacher)
    out = method.train_step(batch, step_info(3))
    total = 0.05 * out.logs["ce"] + 0.95 * out.logs["kd"] + 3.0 * out.logs["ida"]
    torch.testing.assert_close(out.logs["loss"], total)
    assert out.logs["ida"] > 0  # a random teacher on mixed samples violates the order


def test_replace_mode_distils_kd_from_the_corrected_target_and_drops_the_ida_term() -> None:
    student, teacher, batch = Linear(0), Linear(1), image_batch()
    add = make("ida", student, teacher).step_terms(batch, step_info(5))[1]
    replace = make("ida", student, teacher, params={"mode": "replace"}).step_terms(batch, step_info(5))[1]
    assert set(replace) == {"ce", "kd"}
    torch.testing.assert_close(replace["kd"], add["ida"])  # same mixes, same target, same KL
    torch.testing.assert_close(replace["ce"], add["ce"])


def test_released_code_form_feeds_the_students_softmax_to_kd_i_and_is_much_weaker() -> None:
    """The released code's KD-i: KL(p~ || softmax(softmax(z_S) / tau)) (spec ida.md, code quirk 1), computed
    here by hand in float64 on the same mixed batch as the paper's form."""
    student, teacher, batch = Linear(0), Linear(1), image_batch()
    paper = make("ida", student, teacher, params={"ir_space": "logit"})
    released = make("ida", student, teacher, params={"ir_space": "logit", "form": "released_code"})
    mixed = mix("mixup", batch.images, batch.labels, 1.0, torch.Generator().manual_seed(5))
    with torch.no_grad():
        z_s, z_t = student(mixed.images).double(), teacher(mixed.images).double()
    fixed = F.softmax(project(z_t, mixed.primary, mixed.secondary) / 4.5, dim=1)
    log_q = F.log_softmax(F.softmax(z_s, dim=1) / 4.5, dim=1)
    expected = (torch.xlogy(fixed, fixed) - fixed * log_q).sum(1).mean() * 4.5**2
    terms = released.step_terms(batch, step_info(5))[1]
    torch.testing.assert_close(terms["ida"].detach().double(), expected, rtol=1e-5, atol=1e-7)
    grads = []
    for engine in (paper, released):
        student.zero_grad()
        engine.step_terms(batch, step_info(5))[1]["ida"].backward()
        grads.append(student.fc.weight.grad.norm().item())
    assert grads[1] < grads[0] / 10  # tens of times weaker, as the issue reports of the released code


def test_ratio_applies_the_correction_to_a_seeded_fraction_of_batches() -> None:
    student, teacher, batch = Linear(0), Linear(1), image_batch()
    never = make("ida", student, teacher, params={"ratio": 0.0}, weights={"penalty": 1.0})
    terms = never.step_terms(batch, step_info(1))[1]
    assert terms["ida"].item() == 0.0 and terms["penalty"].item() == 0.0
    # ratio 0 and 1 draw nothing extra: the mixes (so ce and kd) are those of kd-aug with the same seed.
    reference = make("kd-aug", student, teacher).step_terms(batch, step_info(1))[1]
    torch.testing.assert_close(terms["kd"], reference["kd"])
    half = make("ida", student, teacher, params={"ratio": 0.5})
    info = step_info(11)
    applied = [half.step_terms(batch, info)[1]["ida"].item() > 0 for _ in range(30)]
    assert 6 <= sum(applied) <= 24
    info = step_info(11)  # the same generator state replays the same decisions
    assert applied == [half.step_terms(batch, info)[1]["ida"].item() > 0 for _ in range(30)]


def test_bf16_autocast_step_is_finite() -> None:
    student, teacher, batch = Linear(0), Linear(1), image_batch()
    method = make("ida", student, teacher, weights={"penalty": 2.0}, params={"mix": "cutmix"})
    info = step_info(2)
    info.precision = "bf16"
    out = method.train_step(batch, info)
    assert all(torch.isfinite(v) for v in out.logs.values())


@pytest.mark.parametrize("params, needle", [
    ({"ratio": 1.5}, "ratio"), ({"tau": 0.0}, "tau"), ({"mix": "cutout"}, "mix"), ({"mix_alpha": -1.0}, "mix_alpha"),
    ({"mode": "both"}, "mode"), ({"ir_space": "logits"}, "ir_space"),
])
def test_bad_params_are_user_errors(params: dict, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        make("ida", Linear(0), Linear(1), params=params)


def test_kd_aug_has_no_isotonic_switches_or_terms() -> None:
    with pytest.raises(UserError, match="ratio"):
        make("kd-aug", Linear(0), Linear(1), params={"ratio": 0.5})
    from kdcli.methods import validate_method_config

    with pytest.raises(UserError, match="not a loss term"):
        validate_method_config(MethodConfig(name="kd-aug", weights={"ida": 1.0}), "test")
    validate_method_config(MethodConfig(name="ida-p", weights={"ida": 1.0}), "test")  # optional there


# -- recipes and the CLI --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kd-aug", "ida", "ida-p"])
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_cifar100_recipes_use_the_paper_settings(method: str, kind: str) -> None:
    recipe = resolve_recipe(f"cifar100-resnet-{method}-{kind}")
    assert (recipe.teacher.arch, recipe.student.arch, recipe.data.dataset) == ("resnet32x4", "resnet8x4", "cifar100")
    assert recipe.method.name == method
    assert recipe.method.weights == get_method(method).default_weights
    assert recipe.method.params == {"tau": 4.5, "mix": kind, "mix_alpha": 1.0}


def test_quickstart_recipes_and_cutmix_override() -> None:
    for method in ("kd-aug", "ida", "ida-p"):
        recipe = resolve_recipe(f"quickstart-{method}")
        assert recipe.method.name == method and recipe.data.dataset == "synthetic"
    recipe = resolve_recipe("quickstart-ida", ["method.params.mix=cutmix"])
    assert recipe.method.params == {"mix": "cutmix"}


def test_ida_smoke_through_the_cli(tiny_recipe, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["distill", "--recipe", str(tiny_recipe(method="ida")), "--smoke", "--set",
                                      "method.params.mix=cutmix", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    history = pd.read_csv(tmp_path / "o/ida/history.csv")
    assert {"ce", "kd", "ida", "loss"} <= set(history)
    assert history["ida"].notna().all() and (history["loss"] > 0).all()
