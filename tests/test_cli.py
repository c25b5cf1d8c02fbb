"""Every CLI command end to end on tiny data, plus the README's two set-up commands."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdcli import cli
from kdcli.cli import app
from kdcli.methods import method_names

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, write_tiny_recipe) -> Path:
    """One tiny distill run (teacher trained first, baseline, KD) shared by the tests below."""
    base = tmp_path_factory.mktemp("cli")
    recipe = write_tiny_recipe(base / "tiny.yaml", method="kd", epochs=1, baseline=True)
    out = base / "run"
    result = invoke("distill", "--recipe", recipe, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_distill_trains_teacher_baseline_and_student(distilled: Path) -> None:
    frame = pd.read_csv(distilled / "results.csv")
    assert list(frame["stage"]) == ["teacher", "baseline", "kd"]
    assert list(frame["arch"]) == ["resnet8"] * 3
    assert frame["best_top1"].between(0, 100).all() and frame["test_top1_at_best"].notna().all()
    assert {"config_hash", "torch", "timm", "kdcli", "device", "seed", "wall_seconds"} <= set(frame)
    history = pd.read_csv(distilled / "kd/history.csv")
    assert {"ce", "kd", "loss"} <= set(history)
    assert (distilled / "recipe.yaml").is_file()


def test_results_table_shows_the_test_accuracy_of_the_epoch_chosen_on_val(distilled: Path) -> None:
    frame = pd.read_csv(distilled / "results.csv")
    with cli.console.capture() as captured:
        cli._print_results(frame, "tiny")
    header, rows = captured.get().split("┡")
    assert "best val top1" in header and "test top1 at best" in header
    for row in frame.itertuples():
        assert f"{row.test_top1_at_best:.2f}" in rows


def test_existing_output_is_never_overwritten(distilled: Path, tiny_recipe) -> None:
    before = (distilled / "results.csv").read_bytes()
    result = invoke("distill", "--recipe", tiny_recipe(), "--out", distilled)
    assert result.exit_code == 2 and "not empty" in result.output
    assert (distilled / "results.csv").read_bytes() == before


def test_resume_of_a_finished_run_retrains_nothing(distilled: Path, tiny_recipe) -> None:
    before = pd.read_csv(distilled / "results.csv")
    weights = load_file(distilled / "kd/checkpoints/student-last.safetensors")
    recipe = distilled / "recipe.yaml"
    result = invoke("distill", "--recipe", recipe, "--out", distilled, "--resume", "--device", "cpu")
    assert result.exit_code == 0, result.output
    after = pd.read_csv(distilled / "results.csv")
    assert list(after["best_top1"]) == list(before["best_top1"])
    again = load_file(distilled / "kd/checkpoints/student-last.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_evaluate_with_teacher_and_logits(distilled: Path, tmp_path: Path) -> None:
    student = distilled / "kd/checkpoints/student-best.safetensors"
    teacher = distilled / "teacher/checkpoints/teacher-best.safetensors"
    logits = tmp_path / "logits.safetensors"
    result = invoke("evaluate", student, teacher, "--recipe", distilled / "recipe.yaml", "--teacher", teacher,
                    "--save-logits", logits, "--out", tmp_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "evaluation.csv")
    assert {"top1", "top5", "nll", "ece", "agreement", "kl_teacher_student"} <= set(frame)
    assert frame.loc[1, "agreement"] == 100.0 and abs(frame.loc[1, "kl_teacher_student"]) < 1e-9
    saved = load_file(logits)
    assert saved["logits.0"].shape == (80, 20) and saved["labels"].shape == (80,)
    top1 = (saved["logits.0"].argmax(1) == saved["labels"]).double().mean().item() * 100
    assert top1 == pytest.approx(frame.loc[0, "top1"])


def test_export_round_trips(distilled: Path, tmp_path: Path) -> None:
    student = distilled / "kd/checkpoints/student-best.safetensors"
    result = invoke("export", student, "--out", tmp_path, "--formats", "safetensors,torchscript")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "export.csv")
    assert list(frame["format"]) == ["safetensors", "torchscript"]
    assert frame.loc[0, "max_abs_diff"] == 0.0 and frame.loc[1, "max_abs_diff"] < 1e-4
    assert "max_abs_diff" in result.output or "max abs" in result.output.lower()


def test_export_onnx(distilled: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")  # the dev extra installs it; a bare install gets the test below
    result = invoke("export", distilled / "kd/checkpoints/student-best.safetensors", "--out", tmp_path,
                    "--formats", "onnx")
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "export.csv").loc[0, "max_abs_diff"] < 1e-4
    # One self-contained file: no hidden temporary-named weights file beside it, so copying the .onnx is enough.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.csv", "run.json", "student-best.onnx"]
    import onnxruntime

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "student-best.onnx").rename(moved / "student.onnx")
    session = onnxruntime.InferenceSession(str(moved / "student.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": torch.zeros(2, 3, 32, 32).numpy()})[0].shape == (2, 20)  # tiny recipe: 20 classes


def test_export_onnx_without_the_extra_is_one_line(distilled: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr("kdcli.engine.export.onnx_available", lambda: False)
    result = invoke("export", distilled / "kd/checkpoints/student-best.safetensors", "--out", tmp_path / "x",
                    "--formats", "onnx")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "pip install -e '.[onnx]'" in lines[0]
    assert not (tmp_path / "x").exists()


def test_train_teacher_and_multi_seed(tiny_recipe, tmp_path: Path) -> None:
    recipe = tiny_recipe(method="ce", epochs=1)
    result = invoke("train-teacher", "--recipe", recipe, "--out", tmp_path / "t", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t/teacher/checkpoints/teacher-best.safetensors").is_file()
    result = invoke("distill", "--recipe", recipe, "--seeds", "0,1", "--out", tmp_path / "s", "--device", "cpu")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "s/results.csv")
    assert list(frame["seed"].astype(str)) == ["0", "1", "mean"]
    per_seed = frame["best_top1"][:2].astype(float)
    assert float(frame["best_top1"][2]) == pytest.approx(per_seed.mean())
    assert float(frame["best_top1_std"][2]) == pytest.approx(per_seed.std(ddof=1))


def test_seeds_share_one_teacher_unless_asked_not_to(tiny_recipe, tmp_path: Path) -> None:
    recipe = tiny_recipe(method="kd", epochs=1)
    result = invoke("distill", "--recipe", recipe, "--seeds", "0,1", "--out", tmp_path / "s", "--device", "cpu")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "s/results.csv")
    # One teacher row (seed 0, no mean row of its own), then two KD rows and their mean.
    assert list(zip(frame["stage"], frame["seed"].astype(str))) == [
        ("teacher", "0"), ("kd", "0"), ("kd", "1"), ("kd", "mean")]
    assert (tmp_path / "s/teacher/checkpoints/teacher-best.safetensors").is_file()
    assert not (tmp_path / "s/seed-0/teacher").exists() and not (tmp_path / "s/seed-1/teacher").exists()
    result = invoke("distill", "--recipe", recipe, "--seeds", "0,1", "--teacher-per-seed", "--out", tmp_path / "p",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert all((tmp_path / f"p/seed-{s}/teacher/checkpoints/teacher-best.safetensors").is_file() for s in (0, 1))
    assert list(pd.read_csv(tmp_path / "p/results.csv")["stage"]).count("teacher") == 3  # 2 seeds and their mean


def test_dry_run_prints_the_resolved_recipe(tmp_path: Path) -> None:
    result = invoke("distill", "--recipe", "cifar100-resnet", "--set", "train.epochs=7", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "epochs: 7" in result.output and "resnet8x4" in result.output


def test_smoke_runs_the_real_cifar100_protocol(tmp_path: Path) -> None:
    result = invoke("distill", "--recipe", "cifar100-resnet", "--smoke", "--out", tmp_path / "o", "--device", "cpu")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "o/results.csv")
    assert list(frame["arch"]) == ["resnet8x4"]
    assert load_file(tmp_path / "o/kd/checkpoints/student-last.safetensors")["fc.weight"].shape == (100, 256)


@pytest.mark.parametrize("args, needle", [
    (["distill", "--recipe", "no-such-recipe"], "unknown recipe"),
    (["distill", "--recipe", "quickstart", "--set", "train.epochs=zero"], "'train.epochs' must be int"),
    (["distill", "--recipe", "quickstart", "--device", "tpu"], "--device"),
    (["evaluate", "missing.safetensors", "--recipe", "quickstart"], "does not exist"),
    (["measure-violations", "--recipe", "quickstart", "--checkpoint", "missing.safetensors"], "does not exist"),
    (["distill", "--recipe", "quickstart", "--seeds", "a,b", "--dry-run"], "--seeds"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0]


@pytest.mark.parametrize("what, needle", [("recipes", "cifar100-resnet"), ("models", "resnet32x4"), ("methods", "kd")])
def test_list(what: str, needle: str) -> None:
    result = invoke("list", what)
    assert result.exit_code == 0 and needle in result.output


def test_readme_has_the_two_setup_commands_and_they_run(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install[^\n]*)\n```", readme)
    assert commands == ['pip install -e . && kdcli distill --recipe quickstart', 'pip install -e ".[dev]" && pytest']
    ci = (ROOT / ".ci/run").read_text()
    assert commands[1] in ci
    # The main job itself (already installed here): run its kdcli part as --smoke to stay fast.
    kdcli_args = commands[0].split("&& kdcli ")[1].split()
    result = invoke(*kdcli_args, "--smoke", "--out", tmp_path / "q", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert list(pd.read_csv(tmp_path / "q/results.csv")["stage"]) == ["teacher", "baseline", "kd"]


@pytest.mark.parametrize("method", [name for name in method_names() if name != "ce"])
def test_quickstart_runs_with_every_method_via_set(method: str, tmp_path: Path) -> None:
    """The issues' `kdcli distill --recipe quickstart --set method=NAME`, as a smoke run."""
    result = invoke("distill", "--recipe", "quickstart", "--set", f"method={method}", "--smoke",
                    "--out", tmp_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "results.csv")
    first = "baseline-net1" if method == "afd" else "teacher"  # afd trains its networks online, no teacher
    assert frame["stage"].iloc[0] == first and frame["stage"].iloc[-1] == method


def test_listings_are_remembered_until_the_source_changes(monkeypatch) -> None:
    from kdcli import catalog

    calls = []

    def build():
        calls.append(1)
        return [{"name": "x", "params": 3}]

    monkeypatch.setattr(catalog, "_source_key", lambda: "key-1")
    assert catalog.listing("probe", build) == [{"name": "x", "params": 3}]
    assert catalog.listing("probe", build) == [{"name": "x", "params": 3}] and len(calls) == 1  # remembered
    monkeypatch.setattr(catalog, "_source_key", lambda: "key-2")  # an edited or added source file
    catalog.listing("probe", build)
    assert len(calls) == 2


def test_help_and_listings_do_not_import_torch(tmp_path: Path) -> None:
    """`kdcli --help` and `kdcli list recipes` never load torch (seconds of start-up); `list methods` does so
    only the first time after the source changes."""
    import os
    import subprocess

    env = {**os.environ, "KDCLI_CACHE": str(tmp_path)}
    probe = ("import sys, runpy; sys.argv = ['kdcli'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('kdcli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    for args, torch_loaded in ((["--help"], False), (["list", "recipes"], False), (["list", "methods"], True),
                               (["list", "methods"], False)):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip().endswith("NO-TORCH") != torch_loaded, (args, out.stdout[-300:])


def test_version_names_kdcli_torch_timm_and_the_device() -> None:
    import timm

    import kdcli

    result = invoke("--version")
    assert result.exit_code == 0
    assert f"kdcli {kdcli.__version__}, torch {torch.__version__}, timm {timm.__version__}" in result.output
    assert ("GPU" in result.output) == torch.cuda.is_available()


def test_debug_shows_the_traceback_and_an_internal_error_is_one_line(monkeypatch, tmp_path: Path) -> None:
    plain = invoke("distill", "--recipe", "nope")
    assert plain.exit_code == 2 and "Traceback" not in plain.output
    debug = invoke("--debug", "distill", "--recipe", "nope")
    assert debug.exit_code != 0 and isinstance(debug.exception, cli.UserError)  # raised, not swallowed

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr("kdcli.engine.pipeline.run_seeds", broken)
    result = invoke("distill", "--recipe", "quickstart", "--out", tmp_path / "out", "--device", "cpu")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "internal error (RuntimeError: something inside broke)" in lines[0] and "--debug" in lines[0]


@pytest.mark.parametrize("command", [["distill", "--recipe", "quickstart"],
                                     ["evaluate", "x.safetensors", "--recipe", "quickstart"],
                                     ["export", "x.safetensors"], ["measure-violations", "--recipe", "quickstart"],
                                     ["cache-teacher", "--recipe", "quickstart"]])
def test_out_naming_a_file_is_refused_and_the_file_kept(tmp_path: Path, command: list[str]) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    result = invoke(*command, "--out", target)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "is a file, not a directory" in lines[0], result.output
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_safetensors_checkpoint_is_one_line(distilled: Path, tmp_path: Path, damage: str) -> None:
    good = (distilled / "kd/checkpoints/student-best.safetensors").read_bytes()
    bad = tmp_path / "student-best.safetensors"
    bad.write_bytes(good[: len(good) // 2] if damage == "truncated" else b"\xff" * 8 + good[8:])
    before = bad.read_bytes()
    result = invoke("evaluate", bad, "--arch", "resnet8", "--recipe", "quickstart", "--smoke", "--out", tmp_path / "e")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "is damaged or truncated" in lines[0], result.output
    assert bad.read_bytes() == before


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    import os

    from kdcli.engine.io import write_json

    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "shared.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600


def test_a_non_finite_loss_stops_the_run_keeping_the_last_good_epoch(tiny_recipe, tmp_path: Path, monkeypatch) -> None:
    from kdcli.engine.step import Engine

    real = Engine.train_step

    def poisoned(self, batch, info):
        out = real(self, batch, info)
        if info.step == 9:  # 240 training images / batch 32 = 7 steps per epoch: step 9 is in epoch 2
            out.logs["kd"] = out.logs["kd"] * float("nan")
        return out

    monkeypatch.setattr(Engine, "train_step", poisoned)
    recipe = tiny_recipe(method="kd", epochs=3)
    teacher = tmp_path / "t"
    assert invoke("train-teacher", "--recipe", recipe, "--out", teacher, "--device", "cpu", "--set",
                  "train.epochs=1").exit_code == 0
    result = invoke("distill", "--recipe", recipe, "--out", tmp_path / "d", "--device", "cpu", "--set",
                    f"teacher.checkpoint={teacher}/teacher/checkpoints/teacher-best.safetensors")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 3, result.output
    assert "the loss became non-finite at epoch 2, step 9 (kd)" in lines[-1] and "(epoch 1)" in lines[-1]
    assert len(pd.read_csv(tmp_path / "d/kd/history.csv")) == 1  # epoch 2 was never saved
    assert (tmp_path / "d/kd/checkpoints/student-last.safetensors").is_file()


def test_a_diverging_learning_rate_exits_3_in_one_line_at_that_step(tiny_recipe, tmp_path: Path, monkeypatch) -> None:
    from kdcli.engine.step import Engine

    steps, real = [], Engine.train_step
    monkeypatch.setattr(Engine, "train_step", lambda self, batch, info: steps.append(info.step) or real(self, batch, info))
    result = invoke("train-teacher", "--recipe", tiny_recipe(method="ce", epochs=2), "--set", "optim.lr=1e38",
                    "--out", tmp_path / "nan", "--device", "cpu")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 3 and "non-finite at epoch 1, step 1 (ce, loss)" in lines[-1]
    assert "nothing had been saved yet" in lines[-1] and "lower optim.lr" in lines[-1]
    assert steps == [0, 1]  # stopped right after the first bad step (step 0's loss is finite), not at the epoch's end
    assert not (tmp_path / "nan/teacher/history.csv").exists()


def test_resume_refuses_another_recipe_and_a_finished_run_changes_nothing(tiny_recipe, tmp_path: Path) -> None:
    recipe, out = tiny_recipe(method="ce", epochs=1), tmp_path / "run"
    assert invoke("train-teacher", "--recipe", recipe, "--out", out, "--device", "cpu").exit_code == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = invoke("train-teacher", "--recipe", recipe, "--out", out, "--resume", "--set", "optim.lr=0.1")
    lines = other.output.strip().splitlines()
    assert other.exit_code == 2 and len(lines) == 1, other.output
    assert "differs from the one" in lines[0] and "'optim.lr' (run: 0.05, now: 0.1)" in lines[0]
    done = invoke("train-teacher", "--recipe", recipe, "--out", out, "--resume", "--device", "cpu")
    assert done.exit_code == 0 and "is a finished run" in done.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # not a byte changed
    longer = invoke("train-teacher", "--recipe", recipe, "--out", out, "--resume", "--set", "train.epochs=2",
                    "--device", "cpu")
    assert longer.exit_code == 0 and len(pd.read_csv(out / "teacher/history.csv")) == 2  # epochs may grow


def test_resuming_a_multi_seed_run_keeps_its_seeds(tiny_recipe, tmp_path: Path, interrupted) -> None:
    recipe, out = tiny_recipe(method="ce", epochs=1), tmp_path / "seeds"
    assert invoke("distill", "--recipe", recipe, "--seeds", "3,4", "--out", out, "--device", "cpu").exit_code == 0
    table = (out / "results.csv").read_bytes()
    again = invoke("distill", "--recipe", recipe, "--resume", "--out", out, "--device", "cpu")  # no --seeds
    assert again.exit_code == 0 and "is a finished run" in again.output and (out / "results.csv").read_bytes() == table
    other = invoke("distill", "--recipe", recipe, "--seeds", "0", "--resume", "--out", out)
    assert other.exit_code == 2 and "started with --seeds 3,4" in other.output


def test_a_failed_start_leaves_no_trace(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("distill", "--recipe", "quickstart", "--set", "student.arch=resnet9000", "--out", out,
                    "--device", "cpu")
    assert result.exit_code == 2 and not out.exists()  # so the same command works once the recipe is fixed
    out.mkdir()
    result = invoke("distill", "--recipe", "quickstart", "--set", "student.arch=resnet9000", "--out", out)
    assert result.exit_code == 2 and out.is_dir() and not any(out.iterdir())  # an existing folder stays


def test_ctrl_c_names_the_command_that_continues(tiny_recipe, tmp_path: Path, monkeypatch) -> None:
    from kdcli.engine import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_seeds", interrupted)
    monkeypatch.setattr(sys, "argv", ["kdcli", "distill", "--recipe", "r.yaml", "--out", "old", "--seed", "3"])
    result = invoke("distill", "--recipe", tiny_recipe(), "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 130
    assert f"Continue with: kdcli distill --recipe r.yaml --seed 3 --resume --out {tmp_path / 'run'}" in result.output


def test_smoke_runs_are_marked_and_never_picked_as_the_teacher(tmp_path: Path, monkeypatch) -> None:
    from kdcli.engine import pipeline

    monkeypatch.chdir(tmp_path)
    result = invoke("train-teacher", "--recipe", "quickstart", "--smoke", "--device", "cpu")
    assert result.exit_code == 0, result.output
    [run] = (tmp_path / "runs").iterdir()
    assert run.name.startswith("quickstart-train-teacher-smoke-")
    assert pd.read_csv(run / "results.csv")["smoke"].all()
    assert "SMOKE RUN" in (run / "recipe.yaml").read_text()
    assert (run / pipeline.TEACHER_CHECKPOINT).is_file() and pipeline.newest_trained_teacher("quickstart") is None
    real = tmp_path / "runs/quickstart-distill-20260101-000000" / pipeline.TEACHER_CHECKPOINT
    real.parent.mkdir(parents=True)
    real.write_bytes(b"x")
    assert pipeline.newest_trained_teacher("quickstart") == Path("runs/quickstart-distill-20260101-000000") / \
        pipeline.TEACHER_CHECKPOINT
