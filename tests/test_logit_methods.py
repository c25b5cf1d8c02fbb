"""The logit-method family (ce, kd, ttm, wttm, dkd, dist): terms, weights, warm-up, composition, CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typer.testing import CliRunner

from kdcli import losses
from kdcli.cli import app
from kdcli.engine.pipeline import resolve_recipe
from kdcli.engine.step import Engine, method_engine
from kdcli.errors import UserError
from kdcli.methods import describe_methods, get_method
from kdcli.methods.base import Batch, StepInfo
from kdcli.methods.logit import TERMS
from kdcli.models import create_model
from kdcli.recipes import MethodConfig, Recipe, TeacherConfig

FIVE = ("kd", "ttm", "wttm", "dkd", "dist")
CLASSES = 10

# ttm.md §1.4: student/teacher logits and the TTM / WTTM losses per γ (numpy, float64).
SPEC_STUDENT = [[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 2.0, 1.0]]
SPEC_TEACHER = [[2.0, 1.0, 4.0, -1.0], [3.0, 0.0, 1.0, 0.5]]
SPEC_VALUES = {1.0: (0.650567, 0.650567), 0.5: (0.355791, 0.586422), 0.25: (0.350568, 0.841178)}
SPEC_KD_T4 = 0.770062


class FixedLogits(nn.Module):
    """A 'network' whose output for a batch is a fixed logit matrix (a learnable one for the student)."""

    def __init__(self, logits: list[list[float]], trainable: bool) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float64), requires_grad=trainable)

    def forward(self, images: Tensor) -> Tensor:
        return self.logits[: images.shape[0]]


def make_method(name: str, student: nn.Module, teacher: nn.Module | None, weights: dict | None = None,
                params: dict | None = None, num_classes: int = CLASSES) -> Engine:
    """The method and its engine (``.method``; ``step_terms`` computes a step's terms without an update).

    The teacher runs unfolded, so its logits equal ``teacher(x)`` bit for bit (folding: test_engine.py)."""
    cfg = MethodConfig(name=name, weights=weights or {}, params=params or {})
    recipe = Recipe(teacher=TeacherConfig(fold_bn=False))
    return method_engine(cfg, {"student": student}, teacher, num_classes, recipe=recipe, epochs=240)


def info(epoch: int = 0, epochs: int = 240) -> StepInfo:
    return StepInfo(epoch=epoch, epochs=epochs, step=0, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = create_model("resnet8", CLASSES)
    teacher = create_model("resnet8", CLASSES).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


@pytest.fixture(scope="module")
def batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.randint(0, CLASSES, (8,), generator=g)
    return Batch(images, labels, torch.arange(8))


def spec_batch() -> Batch:
    return Batch(torch.zeros(2, 3, 4, 4), torch.tensor([2, 0]), torch.arange(2))


# -- the spec's reference values through the method ------------------------------------------------
@pytest.mark.parametrize("gamma", sorted(SPEC_VALUES))
@pytest.mark.parametrize("name", ["ttm", "wttm"])
def test_ttm_and_wttm_methods_reproduce_the_spec_values(name: str, gamma: float) -> None:
    method = make_method(name, FixedLogits(SPEC_STUDENT, True), FixedLogits(SPEC_TEACHER, False),
                         params={"gamma": gamma}, num_classes=4)
    _, terms = method.step_terms(spec_batch(), info())
    expected = SPEC_VALUES[gamma][0 if name == "ttm" else 1]
    assert terms[name].item() == pytest.approx(expected, abs=1e-6)
    # CE is the plain label cross-entropy of the same logits (labels 2 and 0)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(torch.tensor(SPEC_STUDENT), torch.tensor([2, 0])).item(),
                                               abs=1e-6)


def test_kd_added_to_wttm_uses_the_params_temperature_and_matches_the_spec() -> None:
    method = make_method("wttm", FixedLogits(SPEC_STUDENT, True), FixedLogits(SPEC_TEACHER, False),
                         weights={"kd": 0.5}, params={"gamma": 0.5, "temperature": 4.0}, num_classes=4)
    _, terms = method.step_terms(spec_batch(), info())
    assert list(terms) == ["ce", "wttm", "kd"]
    assert terms["kd"].item() == pytest.approx(SPEC_KD_T4, abs=1e-6)
    assert terms["wttm"].item() == pytest.approx(SPEC_VALUES[0.5][1], abs=1e-6)


# -- every method's terms equal the loss functions on the same logits -------------------------------
def expected_terms(name: str, student: Tensor, teacher: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The terms each method should produce with its default params, from kdcli.losses directly."""
    ce = F.cross_entropy(student, labels)
    return {
        "kd": {"ce": ce, "kd": losses.kd(student, teacher, 4.0)},
        "ttm": {"ce": ce, "ttm": losses.ttm(student, teacher, 0.2)},
        "wttm": {"ce": ce, "wttm": losses.wttm(student, teacher, 0.2)},
        "dkd": {"ce": ce, "dkd": losses.dkd(student, teacher, labels, 1.0, 8.0, 4.0)},
        "dist": {"ce": ce, "dist": losses.dist(student, teacher, 1.0, 1.0, 4.0)},
    }[name]


@pytest.mark.parametrize("name", FIVE)
def test_terms_equal_the_loss_functions_on_real_networks(name: str, nets, batch: Batch) -> None:
    student, teacher = nets
    method = make_method(name, student, teacher)
    logits, terms = method.step_terms(batch, info(epoch=30))
    with torch.no_grad():
        teacher_logits = teacher(batch.images)
    torch.testing.assert_close(logits, student(batch.images))
    expected = expected_terms(name, logits, teacher_logits, batch.labels)
    assert list(terms) == list(expected)
    for term, value in expected.items():
        torch.testing.assert_close(terms[term], value, rtol=1e-6, atol=1e-7)
    assert all(terms[t].requires_grad for t in terms)  # every term reaches the student


@pytest.mark.parametrize("name", FIVE)
def test_logged_total_is_the_weighted_sum_of_the_logged_terms(name: str, batch: Batch) -> None:
    torch.manual_seed(2)
    student, teacher = create_model("resnet8", CLASSES), create_model("resnet8", CLASSES).eval()
    weights = {"ce": 0.7, name: 1.3} if name != "kd" else {"ce": 0.2, "kd": 0.8}
    method = make_method(name, student, teacher, weights=weights)
    before = [p.detach().clone() for p in student.parameters()]
    out = method.train_step(batch, info(epoch=30))
    manual = sum(weights[t] * out.logs[t] for t in weights)
    assert out.logs["loss"].item() == pytest.approx(manual.item(), rel=1e-6)
    assert set(out.logs) == set(weights) | {"loss"}
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # a real step


def test_default_weights_follow_the_papers() -> None:
    defaults = {name: get_method(name).default_weights for name in ("ce",) + FIVE}
    assert defaults == {"ce": {"ce": 1.0}, "kd": {"ce": 0.1, "kd": 0.9}, "ttm": {"ce": 1.0, "ttm": 8.0},
                        "wttm": {"ce": 1.0, "wttm": 2.0}, "dkd": {"ce": 1.0, "dkd": 1.0},
                        "dist": {"ce": 1.0, "dist": 2.0}}  # DIST authors' CIFAR config: loss weight 2
    assert {row["method"] for row in describe_methods()} >= {"ce", *FIVE}


def test_every_term_a_method_allows_finds_its_hyper_parameters() -> None:
    for name in ("ce",) + FIVE:
        cls = get_method(name)
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        for term in [*cls.default_weights, *cls.optional_terms]:
            assert set(TERMS[term].params) <= fields, (name, term)


# -- only non-zero terms are computed ----------------------------------------------------------------
def test_zero_weight_terms_and_an_unneeded_teacher_are_never_run(monkeypatch, nets, batch: Batch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("computed a zero-weight term")

    monkeypatch.setattr(losses, "kd", forbidden)
    monkeypatch.setattr(losses, "wttm", forbidden)
    student, _ = nets

    class NoTeacher(nn.Module):
        def forward(self, images: Tensor) -> Tensor:
            raise AssertionError("ran the teacher for a CE-only step")

    method = make_method("wttm", student, NoTeacher(), weights={"wttm": 0.0, "kd": 0.0})
    _, terms = method.step_terms(batch, info())
    assert list(terms) == ["ce"]


def test_zero_ce_weight_drops_the_ce_term(nets, batch: Batch) -> None:
    student, teacher = nets
    method = make_method("wttm", student, teacher, weights={"ce": 0.0})  # the paper's "WTTM w/o CE"
    _, terms = method.step_terms(batch, info())
    assert list(terms) == ["wttm"]


def test_all_zero_weights_are_rejected_when_the_recipe_loads() -> None:
    from kdcli.engine.pipeline import resolve_recipe

    with pytest.raises(UserError, match="every term in 'method.weights' is 0"):
        resolve_recipe("quickstart-ttm", ["method.weights.ce=0", "method.weights.ttm=0"])


# -- DKD warm-up ---------------------------------------------------------------------------------
def test_dkd_weight_warms_up_linearly_over_twenty_epochs(nets) -> None:
    student, teacher = nets
    method = make_method("dkd", student, teacher, weights={"dkd": 2.0})
    ramp = [method.method.term_weight("dkd", info(epoch)) for epoch in (0, 9, 19, 30)]
    assert ramp == pytest.approx([2.0 / 20, 2.0 * 10 / 20, 2.0, 2.0])  # mdistiller: min(epoch/20, 1), epoch 1-based
    assert method.method.term_weight("ce", info(0)) == 1.0  # CE is not warmed up


def test_dkd_warm_up_enters_the_total(nets, batch: Batch) -> None:
    student, teacher = nets
    method = make_method("dkd", student, teacher, params={"warmup_epochs": 4})
    out = method.train_step(batch, info(epoch=0))
    assert out.logs["loss"].item() == pytest.approx(out.logs["ce"].item() + 0.25 * out.logs["dkd"].item(), rel=1e-6)
    no_warmup = make_method("dkd", student, teacher, params={"warmup_epochs": 0})
    assert no_warmup.method.term_weight("dkd", info(0)) == 1.0


# -- recipe-level validation -----------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("method.params.gamma=0", "'method.params.gamma' must be > 0"),
    ("method.params.temperature=-1", "'method.params.temperature' must be > 0"),
    ("method.weights.dkd=1", "'method.weights.dkd' is not a loss term of method 'wttm'"),
    ("method.params.tau=4", "unknown key 'method.params.tau'"),
])
def test_bad_method_settings_are_rejected_at_load(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        resolve_recipe("quickstart-wttm", [override])


@pytest.mark.parametrize("name", ["ttm", "wttm", "dkd", "dist"])
def test_quickstart_variants_differ_from_the_quickstart_only_in_the_method(name: str) -> None:
    base, variant = resolve_recipe("quickstart"), resolve_recipe(f"quickstart-{name}")
    assert variant.method.name == name
    assert set(variant.method.weights) == {"ce", name}
    assert dataclasses.replace(variant, name=base.name, description=base.description, method=base.method) == base


def test_dkd_negative_warmup_is_rejected() -> None:
    with pytest.raises(UserError, match="warmup_epochs' must be >= 0"):
        resolve_recipe("quickstart-dkd", ["method.params.warmup_epochs=-1"])


# -- through the CLI -------------------------------------------------------------------------------
runner = CliRunner()


def smoke(out: Path, recipe: str, *sets: str) -> Path:
    args = ["distill", "--recipe", recipe, "--smoke", "--device", "cpu", "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def quickstart_kd(tmp_path_factory) -> Path:
    """The quickstart as shipped (teacher, baseline, KD), smoke-sized; its teacher serves the tests below."""
    return smoke(tmp_path_factory.mktemp("quick") / "kd", "quickstart")


def test_quickstart_smoke_trains_teacher_baseline_and_kd(quickstart_kd: Path) -> None:
    frame = pd.read_csv(quickstart_kd / "results.csv")
    assert list(frame["stage"]) == ["teacher", "baseline", "kd"]
    assert {"ce", "kd", "loss"} <= set(pd.read_csv(quickstart_kd / "kd" / "history.csv").columns)


@pytest.mark.parametrize("name", ["ttm", "wttm", "dkd", "dist"])
def test_quickstart_smoke_runs_with_each_method(name: str, quickstart_kd: Path, tmp_path: Path) -> None:
    teacher = quickstart_kd / "teacher" / "checkpoints" / "teacher-best.safetensors"
    out = smoke(tmp_path / "run", "quickstart", f"method.name={name}", f"teacher.checkpoint={teacher}",
                "train.baseline=false")
    frame = pd.read_csv(out / "results.csv")
    assert list(frame["stage"]) == [name]
    history = pd.read_csv(out / name / "history.csv")
    assert {"ce", name, "loss"} <= set(history.columns)
    assert history[[name, "loss"]].notna().all().all() and (history[name] >= 0).all()


def test_wttm_plus_kd_logs_both_terms_in_history(quickstart_kd: Path, tmp_path: Path) -> None:
    teacher = quickstart_kd / "teacher" / "checkpoints" / "teacher-best.safetensors"
    out = smoke(tmp_path / "run", "quickstart-wttm", "method.weights.kd=0.5", f"teacher.checkpoint={teacher}",
                "train.baseline=false")
    history = pd.read_csv(out / "wttm" / "history.csv")
    assert {"ce", "wttm", "kd", "loss"} <= set(history.columns)
    row = history.iloc[-1]
    # epoch means of the per-step values: the total is still the weighted sum (linear in the steps)
    assert row["loss"] == pytest.approx(row["ce"] + 2.0 * row["wttm"] + 0.5 * row["kd"], rel=1e-5)
