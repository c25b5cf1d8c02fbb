"""`kdcli report` over run directories with known numbers, its files and curves, and the experiment trackers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.report import build_report, find_runs

RESULT_COLUMNS = ["recipe", "config_hash", "stage", "network", "arch", "best_epoch", "best_top1", "last_top1",
                  "test_top1_at_best", "test_top1_last", "checkpoint", "eval_split", "epochs", "seed", "stage_seconds",
                  "images_per_s", "kdcli", "torch", "finished"]


def _row(stage: str, network: str, arch: str, seed: int, best: float, last: float, split: str, config: str,
         at_best: float | None = None, at_last: float | None = None, seconds: float = 10.0) -> dict:
    return {"recipe": "r1", "config_hash": config, "stage": stage, "network": network, "arch": arch, "best_epoch": 3,
            "best_top1": best, "last_top1": last, "test_top1_at_best": at_best, "test_top1_last": at_last,
            "checkpoint": "", "eval_split": split, "epochs": 3, "seed": seed, "stage_seconds": seconds,
            "images_per_s": 100.0 * (seed + 1), "kdcli": "0.1.0", "torch": "2.14", "finished": "2026-12-01T10:00"}


def _write_run(folder: Path, rows: list[dict], method: str, seeds: list[int], paper: float | None = None,
               finished: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"command": "distill", "seeds": seeds, "smoke": False}))
    recipe = {"name": "r1", "method": {"name": method}, "train": {"epochs": 3}, "paper_top1": paper}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for row in rows:
        stage_dir = folder / (f"seed-{row['seed']}" if len(seeds) > 1 and row["stage"] != "teacher" else "") / row["stage"]
        stage_dir.mkdir(parents=True, exist_ok=True)
        epochs = [1, 2, 3] if finished else [1, 2]
        pd.DataFrame({"epoch": epochs, "lr": [0.1, 0.1, 0.01][:len(epochs)], "ce": [2.0, 1.5, 1.0][:len(epochs)],
                      "loss": [2.0, 1.5, 1.0][:len(epochs)], "train_top1": [30.0, 50.0, 60.0][:len(epochs)],
                      "test_top1": [row["best_top1"] - 10, row["best_top1"], row["last_top1"]][:len(epochs)]}
                     ).to_csv(stage_dir / "history.csv", index=False)
    if finished:
        frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
        mean = frame.iloc[[0]].assign(seed="mean")  # a --seeds mean row: recomputed by the report, never read
        pd.concat([frame, mean]).to_csv(folder / "results.csv", index=False)
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Run A: kd, 3 seeds, selection on val, one shared teacher, a baseline per seed, paper 70.0.
    Run B: the same recipe name with another config (ttm), 2 seeds, selection on test.
    Run C: interrupted (no results.csv) after 2 of 3 epochs."""
    root = tmp_path / "runs"
    rows_a = [_row("teacher", "teacher", "resnet20", 0, 75.0, 74.0, "val", "aaa", 74.5, 74.2)]
    for seed, (kd, kd_last, base) in enumerate([(71.0, 70.0, 66.0), (72.5, 71.0, 67.0), (70.1, 69.5, 65.5)]):
        rows_a.append(_row("baseline", "student", "resnet8", seed, 60.0, 59.0, "val", "aaa", base, base - 1))
        rows_a.append(_row("kd", "student", "resnet8", seed, 80.0, 79.0, "val", "aaa", kd, kd_last, seconds=10 + seed))
    _write_run(root / "r1-distill-a", rows_a, "kd", [0, 1, 2], paper=70.0)
    rows_b = [_row("ttm", "student", "resnet8", seed, top, top - 0.5, "test", "bbb")
              for seed, top in enumerate([73.0, 74.0])]
    _write_run(root / "r1-distill-b", rows_b, "ttm", [0, 1], paper=None)
    _write_run(root / "nested" / "r1-distill-c", [_row("teacher", "teacher", "resnet20", 0, 50, 50, "val", "ccc")],
               "kd", [0], finished=False)
    return root


def test_report_means_stds_baseline_teacher_paper_and_hash_split(runs: Path) -> None:
    report = build_report(find_runs([runs])).set_index(["stage", "config_hash"], drop=False)
    kd = report.loc[("kd", "aaa")]
    # selection on val: the test top-1 at the chosen epoch (test_top1_at_best), mean and sample std over 3 seeds
    assert kd.seeds == 3 and kd.selection == "val"
    assert kd.top1 == pytest.approx(statistics.mean([71.0, 72.5, 70.1]))
    assert kd.top1_std == pytest.approx(statistics.stdev([71.0, 72.5, 70.1]))
    assert kd.last_top1 == pytest.approx(statistics.mean([70.0, 71.0, 69.5]))
    assert kd.last_top1_std == pytest.approx(statistics.stdev([70.0, 71.0, 69.5]))
    assert kd.teacher_top1 == pytest.approx(74.5) and kd.baseline_top1 == pytest.approx(statistics.mean([66, 67, 65.5]))
    assert kd.gain == pytest.approx(kd.top1 - kd.baseline_top1)
    assert kd.paper_top1 == 70.0 and kd.paper_delta == pytest.approx(kd.top1 - 70.0)
    assert kd.seconds == pytest.approx(11.0) and kd.images_per_s == pytest.approx(200.0)
    ttm = report.loc[("ttm", "bbb")]  # selection on test: the best test epoch, labelled as such
    assert ttm.selection == "best-on-test" and ttm.top1 == pytest.approx(73.5)
    assert ttm.top1_std == pytest.approx(statistics.stdev([73.0, 74.0]))
    assert pd.isna(ttm.paper_top1) and pd.isna(ttm.baseline_top1) and pd.isna(ttm.teacher_top1)
    assert "2 configs of this recipe, not averaged" in kd.note and "2 configs" in ttm.note
    teacher = report.loc[("teacher", "aaa")]
    assert teacher.seeds == 1 and teacher.top1 == 74.5 and pd.isna(teacher.top1_std)
    incomplete = report[report.status.str.startswith("incomplete")]
    assert len(incomplete) == 1 and "teacher 2/3 epochs" in incomplete.status.iloc[0]
    assert incomplete.seeds.iloc[0] == 0 and pd.isna(incomplete.top1.iloc[0])  # listed, never averaged


def test_report_command_writes_md_csv_html_and_curves(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(runs), "--out", str(out), "--plot"])
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    line = next(row for row in markdown.splitlines() if "| kd |" in row)
    assert f"{statistics.mean([71.0, 72.5, 70.1]):.2f} ± {statistics.stdev([71.0, 72.5, 70.1]):.2f}" in line
    assert "+1.20" in line  # vs paper: 71.20 - 70.00
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")  # self-contained
    table = pd.read_csv(out / "report.csv")
    assert set(table.stage.dropna()) >= {"teacher", "baseline", "kd", "ttm"}
    curve = out / "curves" / "r1-distill-a-kd.png"
    with Image.open(curve) as image:
        assert image.format == "PNG" and image.size == (1650, 510)  # 11 x 3.4 inches at 150 dpi
    assert sorted(p.name for p in (out / "curves").iterdir()) == [
        "r1-distill-a-baseline.png", "r1-distill-a-kd.png", "r1-distill-a-teacher.png", "r1-distill-b-ttm.png",
        "r1-distill-c-teacher.png"]


def test_report_of_nothing_or_a_bad_option_is_one_line(tmp_path: Path, runs: Path) -> None:
    nothing = CliRunner().invoke(app, ["report", str(tmp_path)] + ["--format", "xlsx"])
    assert nothing.exit_code == 2 and "--format 'xlsx'" in nothing.output
    (tmp_path / "empty").mkdir()
    none = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert none.exit_code == 2 and "no kdcli training run" in none.output
    grouped = CliRunner().invoke(app, ["report", str(runs), "--group-by", "method", "--out", str(tmp_path / "r")])
    assert grouped.exit_code == 2 and "--group-by 'method'" in grouped.output


def test_evaluations_and_violations_inside_a_run_join_the_report(runs: Path, tmp_path: Path) -> None:
    run = runs / "r1-distill-a"
    (run / "eval").mkdir()
    pd.DataFrame([{"checkpoint": "kd/checkpoints/student-best.safetensors", "recipe": "r1", "split": "test",
                   "samples": 100, "top1": 71.0, "teacher": "t.safetensors", "agreement": 88.5}]
                 ).to_csv(run / "eval" / "evaluation.csv", index=False)
    (run / "eval" / "run.json").write_text(json.dumps({"command": "evaluate", "seeds": [0], "smoke": False}))
    out = tmp_path / "report"
    assert CliRunner().invoke(app, ["report", str(runs), "--out", str(out), "--no-plot"]).exit_code == 0
    markdown = (out / "report.md").read_text()
    assert "### evaluations" in markdown and "| 88.5 |" in markdown and str(run) in markdown
    assert "<h2>evaluations</h2>" in (out / "report.html").read_text()
    assert not (out / "curves").exists()


def test_a_report_of_only_unfinished_runs_lists_them(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(runs / "nested"), "--out", str(out), "--no-plot"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "report.csv")
    assert len(table) == 1 and table.status[0] == "incomplete (teacher 2/3 epochs)" and pd.isna(table.top1[0])
