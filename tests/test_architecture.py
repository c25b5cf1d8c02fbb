"""The architecture's promises: layers point one way (no import cycles), and a new method is one file."""

from __future__ import annotations

import ast
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd

import kdcli

PACKAGE = Path(kdcli.__file__).resolve().parent

# Each top-level module or package of kdcli and its layer: a unit may import only units of lower layers.
LAYERS = {
    "errors": 0, "devices": 0, "losses": 0, "isotonic": 0,
    "recipes": 1, "augment": 1,
    "data": 2,
    "models": 3,
    "methods": 4,
    "engine": 5,
    "bench": 6, "catalog": 6, "figures": 6,
    "violations": 7, "report": 7, "curves": 7,
    "cli": 8, "__main__": 9,
}


def unit_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_units(path: Path) -> set[str]:
    """The kdcli units that a file imports anywhere, deferred imports inside functions included."""
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "kdcli" and len(parts) > 1:
                units.add(parts[1])
            elif isinstance(node, ast.ImportFrom) and name == "kdcli":  # from kdcli import losses
                units.update(a.name for a in node.names)
    return units


def test_layers_point_one_way_so_there_is_no_import_cycle() -> None:
    files = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"]  # the root is the public facade
    assert {unit_of(p) for p in files} == set(LAYERS), "a new top-level unit needs a layer in LAYERS"
    upward = sorted(f"{p.relative_to(PACKAGE)} imports kdcli.{u}" for p in files for u in imported_units(p)
                    if u != unit_of(p) and LAYERS[u] >= LAYERS[unit_of(p)])
    assert upward == []


def test_the_import_check_sees_deferred_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from kdcli.engine.pipeline import distill\n    from kdcli import losses\n")
    assert imported_units(probe) == {"engine", "losses"}


# A feature method that exists nowhere in kdcli: a FitNet-style hint on the stage-1 maps through a 1x1 regressor.
THROWAWAY = '''
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from kdcli.methods import register
from kdcli.methods.base import Method, MethodParams
from kdcli.models import Taps


@register
class StageHint(Method):
    name = "{name}"
    summary = "throwaway test method: CE + MSE(regressor(student stage 1), teacher stage 1)"
    default_weights = {{"ce": 1.0, "hint": 10.0}}
    taps = Taps(logits=True, stages=(1,))
    teacher_taps = Taps(logits=False, stages=(1,))

    def __init__(self, networks, params, weights, ctx):
        super().__init__(networks, params, weights, ctx)
        (student_channels, *_), = ctx.shapes["student"].stages
        (teacher_channels, *_), = ctx.shapes["teacher"].stages
        self.regressor = nn.Conv2d(student_channels, teacher_channels, 1)

    def loss_terms(self, batch, outputs, teacher, info):
        student = outputs["student"]
        return {{"ce": F.cross_entropy(student.logits, batch.labels),
                "hint": F.mse_loss(self.regressor(student.stages[0]), teacher.stages[0])}}
'''


def test_a_new_method_is_one_file_and_a_recipe(tmp_path: Path) -> None:
    name = f"throwaway{uuid.uuid4().hex[:8]}"
    module = PACKAGE / "methods" / f"{name}.py"
    recipe = tmp_path / "hint.yaml"
    recipe.write_text(f"base: quickstart\nmethod: {{name: {name}}}\n")
    module.write_text(THROWAWAY.format(name=name))
    try:
        run = subprocess.run([sys.executable, "-m", "kdcli", "distill", "--recipe", str(recipe), "--smoke",
                              "--out", str(tmp_path / "run"), "--device", "cpu"], capture_output=True, text=True,
                             timeout=300)
        listed = subprocess.run([sys.executable, "-m", "kdcli", "list", "methods"], capture_output=True, text=True,
                                timeout=120)
    finally:
        module.unlink()
    assert run.returncode == 0, run.stderr[-2000:]
    assert name in listed.stdout
    assert list(pd.read_csv(tmp_path / "run" / "results.csv")["stage"]) == ["teacher", "baseline", name]
    history = pd.read_csv(tmp_path / "run" / name / "history.csv")
    assert history["hint"].iloc[0] > 0 and history["loss"].iloc[0] > history["ce"].iloc[0]
