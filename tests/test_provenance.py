"""What every run writes says what was used: resolved hyper-parameters in recipe.yaml and --dry-run, exact
percentages, top-5, the loaded teacher's accuracy, averaged --seeds rows, figures in the format asked for."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.engine.metrics import topk_accuracy
from kdcli.engine.pipeline import resolve_recipe, with_seed_summary
from kdcli.engine.runs import check_resume


def _dry(*args: str) -> dict:
    result = CliRunner().invoke(app, ["distill", "--dry-run", *args])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


def test_dry_run_spells_out_the_methods_hyper_parameters_and_only_the_datasets_keys() -> None:
    shown = _dry("--recipe", "cifar100-resnet", "--set", "method=dkd")
    # DKD's defaults (kdcli/methods/logit.py, mdistiller's CIFAR-100 setting) appear instead of `{}`
    assert shown["method"] == {"name": "dkd", "weights": {"ce": 1.0, "dkd": 1.0},
                               "params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20}}
    assert not {"num_classes", "train_size", "test_size", "num_workers", "crop_fraction"} & set(shown["data"])
    synthetic = _dry("--recipe", "quickstart")["data"]
    assert synthetic["num_classes"] == 20 and "num_workers" not in synthetic
    folder = _dry("--recipe", "imagenet-resnet34-resnet18-kd")["data"]
    assert folder["num_workers"] == "auto" and folder["crop_fraction"] == 0.875 and "num_classes" not in folder


def test_a_run_recorded_before_the_resolved_recipe_yaml_still_resumes(tmp_path: Path) -> None:
    recipe = resolve_recipe("quickstart", ["method=dkd"])
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())  # the old form: `weights: {}`, `params: {}`
    plan = check_resume(tmp_path, recipe, "distill", None)
    assert not plan.finished and not plan.grows


def test_percentages_are_exact_and_the_seed_mean_row_averages_time() -> None:
    logits = torch.zeros(300, 10)
    labels = torch.zeros(300, dtype=torch.long)
    logits[:223, 0] = 1.0  # 223 of 300 right
    logits[223:, 1] = 1.0
    assert topk_accuracy(logits, labels) == 74.3333  # not 74.33333396911621 (float32 mean)
    rows = [{"stage": "kd", "network": "student", "seed": seed, "best_top1": top, "last_top1": top,
             "best_top5": 90.0, "last_top5": 90.0, "test_top1_at_best": None, "test_top1_last": None,
             "stage_seconds": seconds, "images_per_s": rate, "wall_seconds": seconds + 1, "teacher_top1": 75.0,
             "finished": finished} for seed, top, seconds, rate, finished in
            [(0, 70.0, 10.0, 100.0, "2026-12-01T10:00:00"), (1, 72.0, 14.0, 300.0, "2026-12-01T11:00:00")]]
    mean = with_seed_summary(pd.DataFrame(rows)).iloc[-1]
    assert mean.seed == "mean" and mean.best_top1 == 71.0 and mean.best_top1_std == pytest.approx(2 ** 0.5)
    assert (mean.stage_seconds, mean.images_per_s, mean.wall_seconds) == (12.0, 200.0, 13.0)
    assert mean.finished == "2026-12-01T11:00:00"


def test_distill_prints_and_records_the_loaded_teachers_accuracy_and_top5(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["distill", "--recipe", "quickstart", "--smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "results.csv").set_index("stage")
    teacher = frame.loc["teacher", "best_top1"]  # the trained teacher's test top-1 (one epoch: best = last)
    assert f"teacher resnet20: top-1 {teacher:.2f}% on the test split" in result.output
    assert frame.loc["kd", "teacher_top1"] == teacher and pd.isna(frame.loc["teacher", "teacher_top1"])
    assert (frame.best_top5 >= frame.best_top1).all()
    history = pd.read_csv(out / "kd" / "history.csv")
    assert (history.test_top5 >= history.test_top1).all()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["method"]["params"] == {"temperature": 4.0}


@pytest.mark.parametrize(("suffix", "magic"), [(".pdf", b"%PDF"), (".svg", b"<?xml"), (".png", b"\x89PNG")])
def test_the_violations_plot_is_written_in_the_format_its_name_says(tmp_path: Path, suffix: str, magic: bytes):
    plot = tmp_path / f"tau{suffix}"
    result = CliRunner().invoke(app, ["measure-violations", "--recipe", "quickstart", "--smoke", "--samples", "32",
                                      "--plot", str(plot), "--out", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(magic)


def test_a_figure_name_without_a_known_format_is_refused_first(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["measure-violations", "--recipe", "quickstart", "--smoke", "--plot",
                                      str(tmp_path / "tau.jpg"), "--out", str(tmp_path / "v")])
    assert result.exit_code == 2 and "PNG, PDF or SVG" in result.output and not (tmp_path / "v").exists()
