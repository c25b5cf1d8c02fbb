"""The output policy of every command that writes: a non-empty --out is refused unless --resume or --overwrite,
--overwrite swaps the new result in at the end, defaults go under runs/, and a refusal changes no byte."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.engine.trainer import Trainer

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def occupied(tmp_path: Path) -> Path:
    folder = tmp_path / "occupied"
    folder.mkdir()
    (folder / "notes.txt").write_text("a colleague's results")
    return folder


@pytest.mark.parametrize("command", [
    ["train-teacher", "--recipe", "quickstart"], ["distill", "--recipe", "quickstart"],
    ["evaluate", "x.safetensors", "--recipe", "quickstart"], ["export", "x.safetensors"],
    ["measure-violations", "--recipe", "quickstart"], ["cache-teacher", "--recipe", "quickstart"],
    ["bench", "isotonic", "--no-step", "--repeats", "1"]])
def test_every_writing_command_refuses_a_non_empty_out_in_one_line_and_changes_nothing(occupied: Path,
                                                                                       command: list[str]) -> None:
    before = snapshot(occupied)
    result = invoke(*command, "--out", occupied)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"output directory {occupied} is not empty" in lines[0] and "--overwrite" in lines[0]
    assert snapshot(occupied) == before and sorted(occupied.parent.iterdir()) == [occupied]


def test_overwrite_replaces_only_what_the_same_command_wrote(occupied: Path, tiny_recipe, tmp_path: Path) -> None:
    before = snapshot(occupied)
    result = invoke("export", "x.safetensors", "--out", occupied, "--overwrite")
    assert result.exit_code == 2 and "not written by kdcli" in result.output and snapshot(occupied) == before
    run = tmp_path / "run"
    assert invoke("train-teacher", "--recipe", tiny_recipe(method="ce", epochs=1), "--out", run,
                  "--device", "cpu").exit_code == 0
    kept = snapshot(run)
    checkpoint = run / "teacher/checkpoints/teacher-best.safetensors"
    result = invoke("export", checkpoint, "--out", run, "--overwrite", "--formats", "safetensors")
    assert result.exit_code == 2 and "is a `kdcli train-teacher` run" in result.output and snapshot(run) == kept
    result = invoke("train-teacher", "--recipe", tiny_recipe(), "--out", run, "--resume", "--overwrite")
    assert result.exit_code == 2 and "pass one of them" in result.output and snapshot(run) == kept


def test_overwrite_swaps_at_the_end_and_a_failure_leaves_the_old_result_whole(tiny_recipe, tmp_path: Path) -> None:
    recipe = tiny_recipe(method="ce", epochs=1)
    run = tmp_path / "run"
    assert invoke("train-teacher", "--recipe", recipe, "--out", run, "--device", "cpu").exit_code == 0
    old = snapshot(run)
    # A run that fails (its loss diverges) after its stage began: the old result stays, byte for byte.
    failed = invoke("train-teacher", "--recipe", recipe, "--out", run, "--overwrite", "--set", "optim.lr=1e38",
                    "--device", "cpu")
    assert failed.exit_code == 3 and snapshot(run) == old
    # It stopped before its first epoch was saved, so its staging folder is gone too (a later failure keeps it).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.yaml"]
    result = invoke("train-teacher", "--recipe", recipe, "--out", run, "--overwrite", "--seed", "9", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.yaml"]  # swapped: no staging, no old copy
    frame = pd.read_csv(run / "results.csv")
    assert list(frame["seed"]) == [9] and frame.loc[0, "checkpoint"] == "teacher/checkpoints/teacher-best.safetensors"
    assert f"results: {run / 'results.csv'}" in result.output


def test_an_interrupted_overwrite_resumes_in_its_staging_folder_and_swaps_when_done(tiny_recipe, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    recipe = tiny_recipe(method="ce", epochs=2)
    run = tmp_path / "run"
    assert invoke("train-teacher", "--recipe", recipe, "--out", run, "--device", "cpu").exit_code == 0
    old = snapshot(run)
    real = Trainer._train_epoch

    def ctrl_c_in_epoch_2(self, progress):
        if progress.epoch == 1:
            raise KeyboardInterrupt
        return real(self, progress)

    monkeypatch.setattr(Trainer, "_train_epoch", ctrl_c_in_epoch_2)
    result = invoke("train-teacher", "--recipe", recipe, "--out", run, "--overwrite", "--seed", "4", "--device", "cpu")
    monkeypatch.undo()
    (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.new-")]
    assert result.exit_code == 130 and f"--resume --out {staging}" in " ".join(result.output.split())
    assert snapshot(run) == old
    resumed = invoke("train-teacher", "--recipe", recipe, "--out", staging, "--resume", "--seed", "4", "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.yaml"]
    assert list(pd.read_csv(run / "results.csv")["seed"]) == [4]


def test_defaults_go_under_runs_never_into_the_working_directory(tmp_path: Path, monkeypatch, tiny_recipe) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(method="ce", epochs=1)
    assert invoke("train-teacher", "--recipe", recipe, "--device", "cpu").exit_code == 0
    (teacher_run,) = (tmp_path / "runs").glob("tiny-train-teacher-*")
    checkpoint = teacher_run / "teacher/checkpoints/teacher-best.safetensors"
    for command in (["evaluate", checkpoint, "--device", "cpu"], ["export", checkpoint, "--formats", "safetensors"],
                    ["measure-violations", "--recipe", recipe, "--checkpoint", checkpoint, "--samples", "16",
                     "--device", "cpu"]):
        result = invoke(*command)
        assert result.exit_code == 0, result.output
    names = sorted(p.name.split("-2")[0] for p in (tmp_path / "runs").iterdir())
    assert names == ["teacher-best-export", "tiny-evaluate", "tiny-measure-violations", "tiny-train-teacher"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "tiny.yaml"]


def test_results_csv_checkpoint_paths_are_relative_to_the_run(tiny_recipe, tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    result = invoke("distill", "--recipe", tiny_recipe(method="kd", epochs=1), "--seeds", "0,1", "--out", out,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "results.csv", keep_default_na=False)
    for path in frame["checkpoint"]:
        assert path == "" or (out / path).is_file()
    assert "seed-1/kd/checkpoints/student-best.safetensors" in list(frame["checkpoint"])
    assert os.path.isfile(out / "seed-1" / pd.read_csv(out / "seed-1/results.csv")["checkpoint"].iloc[-1])
