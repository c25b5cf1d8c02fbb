"""The grid table (recipes/_grid.yaml): 13 pairs x the feature and logit baselines and the seed combinations.

Every recipe resolves to the RepDistiller protocol with its method's published settings; every one builds
its method on the pair's networks and computes its loss terms on a batch of two; every method's
resnet32x4 -> resnet8x4 recipe, and one recipe of every other pair, runs a --smoke step through the CLI.
Reference numbers: the tables cited in each recipe's paper_source (spot-checked below against the TTM
spec's copy of the TTM paper's Tables 1-4 and the RepDistiller README).
"""

from __future__ import annotations

import functools
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

PAIRS = ["resnet56-resnet20", "resnet110-resnet20", "resnet110-resnet32", "resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2",
         "wrn_40_2-wrn_40_1", "vgg13-vgg8", "vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8",
         "resnet32x4-ShuffleV1", "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1"]
METHODS = ["dkd", "dist", "fitnet", "at", "sp", "pkt", "rkd", "crd", "crd-kd", "itrd", "reviewkd", "wttm-crd",
           "wttm-itrd"]
LIGHT_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
DKD_BETA = {"resnet56-resnet20": 2.0, "resnet110-resnet32": 2.0, "vgg13-vgg8": 6.0, "vgg13-MobileNetV2": 6.0,
            "wrn_40_2-wrn_16_2": 6.0, "wrn_40_2-wrn_40_1": 6.0}  # mdistiller's configs; 8 elsewhere
SPOT = {  # (pair, method): reported top-1 (TTM Tables 1-4 / RepDistiller README)
    ("resnet32x4-resnet8x4", "wttm-itrd"): 77.36, ("resnet32x4-resnet8x4", "crd"): 75.51,
    ("vgg13-MobileNetV2", "at"): 59.40, ("wrn_40_2-ShuffleV1", "wttm-crd"): 76.86, ("resnet56-resnet20", "dkd"): 71.97,
    ("ResNet50-vgg8", "sp"): 73.34, ("resnet32x4-ShuffleV2", "reviewkd"): 77.78, ("wrn_40_2-wrn_40_1", "pkt"): 73.45,
}


def name(pair: str, method: str) -> str:
    return f"cifar100-{pair}-{method}"


def test_the_table_lists_every_pair_with_every_method() -> None:
    shipped = set(list_recipes())
    assert {name(p, m) for p in PAIRS for m in METHODS} <= shipped
    assert len([n for n in shipped if any(n.endswith(f"-{m}") for m in METHODS) and n.startswith("cifar100-")]) >= 169


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("method", METHODS)
def test_each_recipe_resolves_to_the_protocol_and_the_methods_settings(pair: str, method: str) -> None:
    recipe = resolve_recipe(name(pair, method))
    teacher, student = pair.split("-")
    assert (recipe.teacher.arch, recipe.student.arch, recipe.data.dataset) == (teacher, student, "cifar100")
    assert recipe.optim.lr == (0.01 if student in LIGHT_STUDENTS else 0.05)
    assert (recipe.train.epochs, recipe.train.batch_size, recipe.schedule.milestones) == (240, 64, [150, 180, 210])
    assert recipe.method.name == method.split("-")[0] if method != "crd-kd" else recipe.method.name == "crd"
    if method == "dkd":
        assert recipe.method.params.get("beta", 8.0) == DKD_BETA.get(pair, 8.0)
    if method.startswith("wttm-"):
        term = method.split("-")[1]
        assert recipe.method.weights[term] == {"crd": 0.8, "itrd": 1.0}[term] and recipe.method.weights["ce"] == 1.0
        assert 0 < recipe.method.params["gamma"] < 1 and recipe.method.weights["wttm"] > 0
    if "itrd" in method:
        same = pair.split("-")[1] not in LIGHT_STUDENTS and not pair.startswith("ResNet50")
        assert recipe.method.params["itrd"]["alpha"] == (1.01 if same else 1.5)
    unreported = {("resnet110-resnet20", "dkd"), ("ResNet50-vgg8", "dkd"), ("resnet110-resnet20", "reviewkd"),
                  ("ResNet50-vgg8", "reviewkd")}
    assert (recipe.paper_top1 is None) == ((pair, method) in unreported)
    assert recipe.paper_top1 is None or (55 < recipe.paper_top1 < 80 and recipe.paper_source)


@pytest.mark.parametrize("cell", list(SPOT), ids="-".join)
def test_spot_checks_against_the_published_tables(cell: tuple[str, str]) -> None:
    assert resolve_recipe(name(*cell)).paper_top1 == SPOT[cell]


def test_the_table_itself_is_no_recipe_and_a_broken_table_is_named(tmp_path: Path, monkeypatch) -> None:
    result = CliRunner().invoke(app, ["distill", "--recipe", "_grid", "--dry-run"])
    assert result.exit_code == 2 and "is the table of the grid recipes, not a recipe" in result.output
    from kdcli import recipes

    table = (recipes.recipes_dir() / recipes.GRID_FILE).read_text()
    (tmp_path / recipes.GRID_FILE).write_text(table.replace("  resnet56-resnet20: {params: {beta: 2.0}}",
                                                            "  resnet65-resnet20: {params: {beta: 2.0}}"))
    with pytest.raises(recipes.UserError, match="pair 'resnet65-resnet20' is not in its pairs list"):
        recipes._grid_table(tmp_path)


def test_the_dkd_recipe_of_resnet56_resnet20_shows_beta_2_in_dry_run() -> None:
    result = CliRunner().invoke(app, ["distill", "--recipe", name("resnet56-resnet20", "dkd"), "--dry-run"])
    assert result.exit_code == 0 and "beta: 2.0" in result.output


# -- running ----------------------------------------------------------------------------------------
SMOKED = [("resnet32x4-resnet8x4", m) for m in METHODS] + [
    (pair, METHODS[i % len(METHODS)]) for i, pair in enumerate(p for p in PAIRS if p != "resnet32x4-resnet8x4")]


@pytest.mark.parametrize("pair, method", SMOKED)
def test_smoke_runs_through_the_command_line(pair: str, method: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["distill", "--recipe", name(pair, method), "--smoke", "--device", "cpu",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    stage = resolve_recipe(name(pair, method)).method.name
    history = pd.read_csv(out / stage / "history.csv")
    terms = {"ce", *resolve_recipe(name(pair, method)).method.weights}
    assert terms <= set(history.columns) and history["loss"].notna().all()


@functools.cache
def network(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(arch, 100)


@pytest.mark.parametrize("pair", PAIRS)
def test_every_recipe_of_a_pair_builds_and_computes_its_terms(pair: str) -> None:
    teacher, student = pair.split("-")
    batch = Batch(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 97]),
                  torch.arange(2))
    for method in METHODS:
        recipe = resolve_recipe(name(pair, method))
        engine = method_engine(recipe.method, {"student": network(student)}, network(teacher).eval(), 100,
                               recipe=recipe, train_labels=torch.arange(100))
        info = StepInfo(epoch=0, epochs=240, step=0, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits, terms = engine.step_terms(batch, info)
        assert logits.shape == (2, 100), method
        weights = engine.method.weights  # the method's defaults under the recipe's
        assert set(terms) == {t for t in weights if engine.method.term_weight(t, info) != 0}, method
        assert all(torch.isfinite(v) for v in terms.values()), method
