"""`kdcli measure-violations` and `kdcli bench isotonic`: the statistics on a hand-made teacher whose soft
labels on mixed images are known exactly, determinism, teacher resolution, and the commands end to end."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from kdcli.bench import bench_ida_step
from kdcli.cli import app
from kdcli.data import TensorSplit
from kdcli.engine.checkpoint import save_weights
from kdcli.engine.pipeline import resolve_recipe
from kdcli.errors import UserError
from kdcli.models import create_model
from kdcli.violations import ViolationReport, measure_violations, parse_augmentations, teacher_source

runner = CliRunner()
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]
MEAN, STD = (0.4, 0.4, 0.4), (0.25, 0.25, 0.25)
# Clean-sample teacher logits per class (row = class). Class 0 and 3 are ordered correctly; class 1 has one
# other label above it (1 discordant of 3 known pairs, tau 1/3); class 2 has all three others above it
# (tau -1, neither label in the top 2). Irrational-looking values keep mixed logits free of exact ties.
LOGITS = [[5.13, 1.37, 0.21, 0.0], [3.07, 2.11, 0.0, 0.33], [4.19, 3.23, 0.0, 1.41], [0.0, 0.17, 0.0, 1.29]]


class ChannelMeanTeacher(nn.Module):
    """logits = A @ mean_pixels(x) + b, solved so that a constant image of colour k gives LOGITS[k].

    Mixup and CutMix of constant images mix the channel means linearly (CutMix with the kept-area
    fraction), so the teacher's logits on a mixed sample are ``w z(primary) + (1 - w) z(secondary)``.
    """

    def __init__(self) -> None:
        super().__init__()
        features = (torch.tensor(COLOURS, dtype=torch.float64) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
        system = torch.cat([features, torch.ones(4, 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.solve(system, torch.tensor(LOGITS, dtype=torch.float64))
        self.register_buffer("weight", solution[:3].float())
        self.register_buffer("bias", solution[3].float())

    def forward(self, images: Tensor) -> Tensor:
        return images.mean(dim=(2, 3)) @ self.weight + self.bias


def colour_split(per_class: int = 12) -> TensorSplit:
    labels = torch.arange(4).repeat(per_class)
    images = torch.tensor(COLOURS, dtype=torch.uint8)[labels][:, :, None, None].expand(-1, 3, 8, 8).contiguous()
    return TensorSplit(images, labels, MEAN, STD, crop_padding=4, hflip=True)


def measure(augmentations=("none", "mixup", "cutmix"), seed: int = 0, samples: int | None = None) -> ViolationReport:
    return measure_violations(ChannelMeanTeacher(), colour_split(), augmentations, batch_size=16,
                              device=torch.device("cpu"), seed=seed, samples=samples, class_names=list("ABCD"))


def brute_force(row: pd.Series) -> tuple[float, int, bool]:
    """Kendall tau-a over known pairs, discordant pairs and top-2 hit of one sample, from its roles alone."""
    logits = np.asarray(LOGITS)
    primary, secondary, weight = int(row.primary), int(row.secondary), float(row.primary_weight)
    hard = np.zeros(4)
    hard[primary] += weight if secondary >= 0 else 1.0
    soft = logits[primary].copy() if secondary < 0 else weight * logits[primary] + (1 - weight) * logits[secondary]
    if secondary >= 0:
        hard[secondary] += 1 - weight
    concordant = discordant = known = 0
    for k, m in itertools.combinations(range(4), 2):
        if hard[k] != hard[m]:
            known += 1
            assert abs(soft[k] - soft[m]) > 1e-4  # no near-ties: float32 and float64 agree on every sign
            same = np.sign(soft[k] - soft[m]) == np.sign(hard[k] - hard[m])
            concordant, discordant = concordant + same, discordant + (not same)
    rank = {c: int((soft > soft[c]).sum() + ((soft == soft[c]) & (np.arange(4) < c)).sum()) for c in range(4)}
    hit = rank[primary] < 2 or (secondary >= 0 and rank[secondary] < 2)
    return (concordant - discordant) / known, discordant, hit


@pytest.fixture(scope="module")
def report() -> ViolationReport:
    return measure()


def test_clean_samples_give_the_hand_computed_numbers(report: ViolationReport) -> None:
    row = report.table.set_index("augmentation").loc["none"]
    assert row.samples == 48
    assert row.kendall_tau == pytest.approx((1 + 1 / 3 - 1 + 1) / 4, abs=1e-6)
    assert row.violation_rate == pytest.approx(0.5)
    assert row.discordant_pairs == pytest.approx((0 + 1 + 3 + 0) / 4)
    assert row.top2_ratio == pytest.approx(0.75)
    per_class = report.per_class[report.per_class.augmentation == "none"].set_index("class_name")
    assert list(per_class["samples"]) == [12] * 4
    np.testing.assert_allclose(per_class["kendall_tau"], [1.0, 1 / 3, -1.0, 1.0], atol=1e-6)
    assert list(per_class["violation_rate"]) == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("kind", ["none", "mixup", "cutmix"])
def test_every_sample_matches_a_brute_force_count(report: ViolationReport, kind: str) -> None:
    frame = report.per_sample[kind]
    expected = pd.DataFrame([brute_force(row) for _, row in frame.iterrows()], columns=["tau", "disc", "hit"])
    np.testing.assert_allclose(frame["kendall_tau"], expected["tau"], atol=1e-6)
    assert list(frame["discordant_pairs"]) == list(expected["disc"])
    assert list(frame["top2_hit"]) == list(expected["hit"])
    if kind != "none":
        assert (frame["secondary"] >= 0).mean() > 0.5  # most samples really are mixes of two classes
        assert frame["has_violation"].any()


def test_summary_rows_are_the_per_sample_means_and_the_projection_fixes_everything(report: ViolationReport) -> None:
    for row in report.table.itertuples():
        frame = report.per_sample[row.augmentation]
        assert row.samples == len(frame) == 48
        assert row.kendall_tau == pytest.approx(frame["kendall_tau"].mean(), abs=1e-6)
        assert row.violation_rate == pytest.approx(frame["has_violation"].mean())
        assert row.l1_change == pytest.approx(frame["l1_change"].mean(), rel=1e-6)
        assert row.discordant_pairs_projected == 0 and row.violation_rate_projected == 0
        assert (frame["l1_change"][frame["has_violation"]] > 0).all()
        assert (frame["l1_change"][~frame["has_violation"]] < 1e-6).all()  # only violating rows change
        assert row.projection_seconds <= row.seconds
    per_class = report.per_class.groupby("augmentation")
    rates = report.per_class["violation_rate"] * report.per_class["samples"]
    weighted = rates.groupby(report.per_class["augmentation"]).sum()
    for kind, group in per_class:
        rate = report.table.set_index("augmentation").loc[kind, "violation_rate"]
        assert weighted[kind] / group["samples"].sum() == pytest.approx(rate)


def test_results_are_a_function_of_the_seed() -> None:
    first, again = measure(seed=4), measure(seed=4)
    timing = ["seconds", "projection_seconds"]
    pd.testing.assert_frame_equal(first.table.drop(columns=timing), again.table.drop(columns=timing))
    alone = measure(("cutmix",), seed=4)
    pd.testing.assert_frame_equal(alone.per_sample["cutmix"], first.per_sample["cutmix"])
    other = measure(("mixup",), seed=5)
    assert not np.array_equal(other.per_sample["mixup"]["primary_weight"], first.per_sample["mixup"]["primary_weight"])
    subset = measure(("none",), seed=4, samples=10)
    assert subset.table.loc[0, "samples"] == 10


def test_bad_arguments_are_user_errors() -> None:
    assert parse_augmentations("cutmix, none,cutmix") == ["cutmix", "none"]
    with pytest.raises(UserError, match="--augment"):
        parse_augmentations("mixup,cutout")
    with pytest.raises(UserError, match="--samples"):
        measure(samples=0)


def test_teacher_source(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/ here
    recipe = resolve_recipe("quickstart")
    with pytest.raises(UserError, match="train-teacher"):
        teacher_source(recipe, None, None, smoke=False)
    with pytest.raises(UserError, match="does not exist"):
        teacher_source(recipe, tmp_path / "nope.safetensors", None, smoke=False)
    assert teacher_source(recipe, None, None, smoke=True) == (None, "resnet20")
    path = save_weights(create_model("resnet8", 20), tmp_path / "t", {"arch": "resnet8", "num_classes": 20})
    assert teacher_source(recipe, path, None, smoke=False) == (path, "resnet8")  # the sidecar beats the recipe
    assert teacher_source(recipe, path, "resnet14", smoke=False) == (path, "resnet14")  # --arch beats both


# -- the commands ---------------------------------------------------------------------------------
def test_measure_violations_command(tiny_recipe, tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = save_weights(create_model("resnet8", 20), tmp_path / "teacher", {"arch": "resnet8", "num_classes": 20})
    args = ["measure-violations", "--recipe", str(tiny_recipe()), "--checkpoint", str(checkpoint), "--samples", "64",
            "--per-class", "--out", str(tmp_path / "o"), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "violating fixed" in result.output and "per class" in result.output
    table = pd.read_csv(tmp_path / "o/violations.csv")
    assert list(table["augmentation"]) == ["none", "mixup", "cutmix"]
    assert (table["samples"] == 64).all() and (table["discordant_pairs_projected"] == 0).all()
    assert (table["teacher"] == str(checkpoint)).all() and (table["split"] == "train").all()
    per_class = pd.read_csv(tmp_path / "o/violations-per-class.csv")
    assert per_class.groupby("augmentation")["samples"].sum().to_dict() == {"none": 64, "mixup": 64, "cutmix": 64}


def _plot_args(recipe: Path, tmp_path: Path) -> list[str]:
    return ["measure-violations", "--recipe", str(recipe), "--smoke", "--augment", "mixup", "--plot",
            str(tmp_path / "tau.png"), "--out", str(tmp_path / "o"), "--device", "cpu"]


def test_plot_without_matplotlib_is_one_line_naming_the_extra(tiny_recipe, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = runner.invoke(app, _plot_args(tiny_recipe(), tmp_path))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "pip install 'kdcli[plot]'" in lines[0]
    assert not (tmp_path / "o").exists()  # failed before measuring anything


def test_plot_writes_a_png(tiny_recipe, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, _plot_args(tiny_recipe(), tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tau.png").read_bytes()[:4] == b"\x89PNG"


def test_measure_violations_without_a_teacher_checkpoint_says_how_to_get_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/ here
    result = runner.invoke(app, ["measure-violations", "--recipe", "quickstart"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "kdcli distill --recipe quickstart" in lines[0]


def test_teacher_source_finds_the_newest_run_of_exactly_this_recipe(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = resolve_recipe("quickstart")
    teachers = {}
    for run in ("quickstart-distill-20260101-000000", "quickstart-train-teacher-20260102-000000",
                "quickstart-ida-distill-20260103-000000"):
        directory = tmp_path / "runs" / run / "teacher" / "checkpoints"
        teachers[run] = save_weights(create_model("resnet8", 20), directory / "teacher-best",
                                     {"arch": "resnet8", "num_classes": 20})
    os.utime(teachers["quickstart-distill-20260101-000000"], (2e9, 2e9))  # the newest file of a quickstart run
    path, arch = teacher_source(recipe, None, None, smoke=False)
    assert path == Path("runs/quickstart-distill-20260101-000000/teacher/checkpoints/teacher-best.safetensors")
    assert arch == "resnet8"
    assert teacher_source(resolve_recipe("quickstart-ida"), None, None, smoke=False)[0].parts[1].startswith("quickstart-ida")


def test_bench_isotonic_command(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "isotonic", "--no-step", "--classes", "20,50", "--batch", "8",
                                 "--repeats", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "speedup" in result.output
    frame = pd.read_csv(tmp_path / "bench-isotonic.csv")
    assert list(frame["C"]) == [20, 50] and (frame["max_abs_diff"] < 1e-6).all()
    np.testing.assert_allclose(frame["speedup"], frame["loop_ms"] / frame["batched_ms"])
    bad = runner.invoke(app, ["bench", "isotonic", "--classes", "many"])
    assert bad.exit_code == 2 and "--classes" in bad.output


def test_step_share_of_the_projection() -> None:
    row = bench_ida_step(torch.device("cpu"), batch=2, repeats=1, recipe_name="quickstart-ida").iloc[0]
    assert (row.teacher, row.student, row.C, row.B) == ("resnet20", "resnet8", 20, 2)
    assert row.projection_share == pytest.approx(row.projection_ms / row.ida_step_ms)
    assert 0 < row.projection_share < 1 and row.ida_over_kd_aug > 0
