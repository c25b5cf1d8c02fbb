"""The TTM paper's CIFAR-100 grid: 13 teacher/student pairs x {kd, ttm, wttm} = 39 recipes.

Every recipe is checked for its models, optimiser, method settings and paper accuracy. One recipe per
pair (13, the method rotating over kd/ttm/wttm) runs a --smoke step through the CLI; the other 26
share their pair's networks with a smoked one and compute their loss terms on a batch of 2 instead.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.engine.pipeline import resolve_recipe
from kdcli.engine.step import method_engine
from kdcli.methods.base import Batch, StepInfo
from kdcli.models import create_model
from kdcli.recipes import list_recipes

SAME_ARCH = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
             ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")]
CROSS_ARCH = [("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
              ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1")]
PAIRS = SAME_ARCH + CROSS_ARCH
METHODS = ("kd", "ttm", "wttm")
GRID = [(t, s, m) for t, s in PAIRS for m in METHODS]
LIGHT_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
TEACHER_FILES = {"wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50"}

# Spot checks typed from ttm.md §5.1/5.2 (gamma, beta) and §6.1/6.2 (top-1).
SPOT = {
    ("resnet32x4", "resnet8x4", "wttm"): (0.1, 3.0, 76.06),
    ("resnet32x4", "resnet8x4", "ttm"): (0.1, 100.0, 76.17),
    ("wrn_40_2", "wrn_16_2", "ttm"): (0.1, 101.0, 76.23),
    ("resnet56", "resnet20", "wttm"): (0.3, 1.5, 71.92),
    ("vgg13", "vgg8", "ttm"): (0.1, 45.0, 74.33),
    ("vgg13", "vgg8", "wttm"): (0.1, 2.25, 74.44),
    ("ResNet50", "MobileNetV2", "ttm"): (0.2, 20.0, 69.24),
    ("resnet32x4", "ShuffleV2", "wttm"): (0.4, 16.0, 76.55),
    ("wrn_40_2", "ShuffleV1", "ttm"): (0.3, 8.0, 75.39),
    ("resnet32x4", "ShuffleV1", "wttm"): (0.2, 1.4, 74.37),
}
SPOT_KD = {("wrn_40_2", "wrn_16_2"): 74.92, ("resnet110", "resnet32"): 73.08, ("vgg13", "MobileNetV2"): 67.37,
           ("ResNet50", "vgg8"): 73.81, ("resnet32x4", "resnet8x4"): 73.33}


def recipe_name(teacher: str, student: str, method: str) -> str:
    return f"cifar100-{teacher}-{student}-{method}"


def test_the_grid_is_exactly_the_39_recipes() -> None:
    shipped = {n for n in list_recipes() if re.fullmatch(r"cifar100-[^-]+-[^-]+-(kd|ttm|wttm)", n)}
    assert shipped == {recipe_name(*cell) for cell in GRID}
    assert len(GRID) == 39


@pytest.mark.parametrize("teacher, student, method", GRID)
def test_grid_recipe_resolves_to_the_paper_protocol(teacher: str, student: str, method: str) -> None:
    recipe = resolve_recipe(recipe_name(teacher, student, method))
    assert (recipe.teacher.arch, recipe.student.arch, recipe.method.name) == (teacher, student, method)
    assert recipe.teacher.checkpoint == f"save/models/{teacher}_vanilla/ckpt_epoch_240.pth"
    assert teacher in TEACHER_FILES
    assert recipe.data.dataset == "cifar100"
    assert recipe.optim.lr == (0.01 if student in LIGHT_STUDENTS else 0.05)
    assert (recipe.optim.momentum, recipe.optim.weight_decay) == (0.9, 5e-4)
    assert (recipe.train.epochs, recipe.train.batch_size) == (240, 64)
    assert recipe.schedule.milestones == [150, 180, 210] and recipe.schedule.gamma == 0.1
    assert recipe.paper_top1 is not None and f"{recipe.paper_top1:.2f}" in recipe.paper_source
    if method == "kd":
        assert recipe.method.weights == {"ce": 0.1, "kd": 0.9} and recipe.method.params == {"temperature": 4.0}
    else:
        assert set(recipe.method.weights) == {"ce", method} and recipe.method.weights["ce"] == 1.0
        assert set(recipe.method.params) == {"gamma"} and 0 < recipe.method.params["gamma"] < 1


@pytest.mark.parametrize("cell", list(SPOT), ids="-".join)
def test_spot_checks_against_the_spec_tables(cell: tuple[str, str, str]) -> None:
    recipe = resolve_recipe(recipe_name(*cell))
    gamma, beta, top1 = SPOT[cell]
    assert recipe.method.params["gamma"] == gamma
    assert recipe.method.weights[cell[2]] == beta
    assert recipe.paper_top1 == top1


def test_kd_accuracies_match_the_spec() -> None:
    for pair, top1 in SPOT_KD.items():
        assert resolve_recipe(recipe_name(*pair, "kd")).paper_top1 == top1


@pytest.mark.parametrize("teacher, student", PAIRS)
def test_ttm_and_wttm_share_gamma_and_wttm_needs_a_smaller_beta(teacher: str, student: str) -> None:
    """In both tables TTM and WTTM use the same gamma, and beta_WTTM < beta_TTM because U >= 1."""
    ttm, wttm = (resolve_recipe(recipe_name(teacher, student, m)).method for m in ("ttm", "wttm"))
    assert ttm.params["gamma"] == wttm.params["gamma"]
    assert wttm.weights["wttm"] < ttm.weights["ttm"]


# -- running ---------------------------------------------------------------------------------------
SMOKED = [(t, s, METHODS[i % 3]) for i, (t, s) in enumerate(PAIRS)]
STEPPED = [cell for cell in GRID if cell not in SMOKED]
runner = CliRunner()


@pytest.mark.parametrize("teacher, student, method", SMOKED)
def test_one_recipe_per_pair_runs_a_smoke_step(teacher: str, student: str, method: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--recipe", recipe_name(teacher, student, method), "--smoke",
                                 "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "results.csv")
    assert list(frame["stage"]) == [method] and list(frame["arch"]) == [student]
    history = pd.read_csv(out / method / "history.csv")
    assert {"ce", method, "loss"} <= set(history.columns) and history["loss"].notna().all()


@functools.cache
def network(arch: str) -> torch.nn.Module:
    """One network per architecture, shared by the recipes of the same pair (forward passes only)."""
    torch.manual_seed(0)
    return create_model(arch, 100)


@pytest.mark.parametrize("teacher, student, method", STEPPED)
def test_the_other_recipes_compute_their_terms_on_a_batch_of_two(teacher: str, student: str, method: str) -> None:
    recipe = resolve_recipe(recipe_name(teacher, student, method))
    engine = method_engine(recipe.method, {"student": network(student)}, network(teacher).eval(), 100, recipe=recipe)
    batch = Batch(torch.randn(2, 3, 32, 32), torch.tensor([3, 97]), torch.arange(2))
    info = StepInfo(epoch=0, epochs=240, step=0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, terms = engine.step_terms(batch, info)
    assert logits.shape == (2, 100)
    assert list(terms) == ["ce", method] and all(torch.isfinite(v) and v >= 0 for v in terms.values())
