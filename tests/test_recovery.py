"""Step-exact recovery: kills at any step (in real processes), SIGTERM/SIGINT, pruning, and a soak run.

The reference in every identity test is the same command run without interruption: on the CPU, a resumed
run must end with bitwise the same weights and the same history.csv apart from its timing columns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from kdcli.engine import pipeline
from kdcli.engine.pipeline import resolve_recipe
from kdcli.engine.recovery import recovery_points
from kdcli.engine.step import Engine
from kdcli.engine.trainer import RunContext, Trainer
from kdcli.errors import RunInterrupted

WORKER = Path(__file__).with_name("kill_worker.py")
TIMING = ("seconds", "images_per_s")


def _ctx(out: Path, resume: bool = False, max_steps: int | None = None) -> RunContext:
    return RunContext(out, torch.device("cpu"), seed=5, console=Console(quiet=True), resume=resume, max_steps=max_steps)


def assert_same_run(a: Path, b: Path) -> None:
    """Every checkpoint bitwise equal, every history.csv equal apart from timing columns."""
    weights = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert weights and weights == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for name in weights:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    histories = sorted(p.relative_to(a) for p in a.rglob("history.csv"))
    assert histories == sorted(p.relative_to(b) for p in b.rglob("history.csv"))
    for name in histories:
        x, y = pd.read_csv(a / name), pd.read_csv(b / name)
        pd.testing.assert_frame_equal(x.drop(columns=list(TIMING)), y.drop(columns=list(TIMING)))


def _signal_at(monkeypatch, number: int, signum: int) -> None:
    """Send ``signum`` to this process as the ``number``-th training step begins."""
    real, taken = Engine.train_step, []

    def train_step(self, batch, info):
        taken.append(info.step)
        if len(taken) == number:
            os.kill(os.getpid(), signum)
        return real(self, batch, info)

    monkeypatch.setattr(Engine, "train_step", train_step)


def test_sigterm_mid_epoch_saves_a_recovery_point_and_the_resumed_run_is_bit_exact(tiny_recipe, tmp_path,
                                                                                   monkeypatch) -> None:
    """kd-aug draws its mixing from the method's generator, so this also checks that stream is restored."""
    recipe = resolve_recipe(str(tiny_recipe(method="kd-aug", epochs=2)))
    teacher = tmp_path / "teacher.safetensors"
    pipeline.train_teacher(resolve_recipe(str(tiny_recipe(method="ce", epochs=1))), _ctx(tmp_path / "t"), smoke=False)
    (tmp_path / "t/teacher/checkpoints/teacher-best.safetensors").rename(teacher)
    (tmp_path / "t/teacher/checkpoints/teacher-best.json").rename(teacher.with_suffix(".json"))
    recipe.teacher.checkpoint = str(teacher)
    pipeline.distill(recipe, _ctx(tmp_path / "a"), smoke=False)

    _signal_at(monkeypatch, 10, signal.SIGTERM)  # 7 steps per epoch: the 10th is the 3rd of epoch 2
    with pytest.raises(RunInterrupted) as stopped:
        pipeline.distill(recipe, _ctx(tmp_path / "b"), smoke=False)
    assert stopped.value.exit_code == 143 and "epoch 2, step 10" in str(stopped.value)
    checkpoints = tmp_path / "b/kd-aug/checkpoints"
    assert list(recovery_points(checkpoints)) == [10]
    monkeypatch.undo()
    pipeline.distill(recipe, _ctx(tmp_path / "b", resume=True), smoke=False)
    assert recovery_points(checkpoints) == {}  # superseded by the end of the epoch
    assert_same_run(tmp_path / "a/kd-aug", tmp_path / "b/kd-aug")


def test_a_recovery_point_is_written_every_n_steps_and_only_the_newest_is_kept(tiny_recipe, tmp_path,
                                                                               monkeypatch) -> None:
    recipe = resolve_recipe(str(tiny_recipe(method="ce", epochs=1)), ["train.save_every_steps=2"])
    seen: list[list[int]] = []
    real = Trainer._step_boundary

    def spy(self, progress, begin, watch):
        real(self, progress, begin, watch)
        seen.append(sorted(recovery_points(self.ckpt_dir)))

    monkeypatch.setattr(Trainer, "_step_boundary", spy)
    pipeline.train_teacher(recipe, _ctx(tmp_path), smoke=False)
    # Checked after steps 1..6 of the 7 (the 7th ends the epoch, which saves the full state instead).
    assert seen == [[], [2], [2], [4], [4], [6]]
    assert recovery_points(tmp_path / "teacher/checkpoints") == {}
    assert sorted(p.name for p in (tmp_path / "teacher/checkpoints").iterdir()) == [
        "teacher-best.json", "teacher-best.safetensors", "teacher-last.json", "teacher-last.safetensors",
        "train_state.pt"]


def _worker(moment: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), moment, *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture
def worker_env(tmp_path: Path) -> dict[str, str]:
    # The same thread count in every process: reductions split across threads differently would round differently.
    return {**os.environ, "OMP_NUM_THREADS": "2", "KDCLI_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}


def test_killed_at_any_moment_a_resumed_distill_ends_bitwise_like_an_uninterrupted_one(tiny_recipe, tmp_path,
                                                                                       worker_env) -> None:
    """Real processes, SIGKILLed before a step, halfway through writing a training state, and stopped by SIGTERM
    and SIGINT; each time the same command with --resume continues. The distill trains its teacher first
    (7 steps per epoch, 2 epochs per stage), so the kills land in both stages."""
    recipe = str(tiny_recipe(method="kd", epochs=2))
    command = ["distill", "--recipe", recipe, "--device", "cpu", "--set", "train.save_every_steps=3"]
    straight = _worker("none", *command, "--out", str(tmp_path / "a"), env=worker_env)
    assert straight.returncode == 0, straight.stderr

    out = str(tmp_path / "b")
    moments = ["step:5", "write:2", "term:6", "step:4", "write:1", "int:3", "step:2"]
    for number, moment in enumerate(moments):
        resume = ["--resume"] if number else []
        run = _worker(moment, *command, "--out", out, *resume, env=worker_env)
        expected = {"term": 143, "int": 130}.get(moment.split(":")[0], -signal.SIGKILL)
        assert run.returncode == expected, (moment, run.returncode, run.stderr)
        if moment.startswith(("term", "int")):
            assert "saved a recovery point" in run.stderr and f"--resume --out {out}" in " ".join(run.stderr.split())
    final = _worker("none", *command, "--out", out, "--resume", env=worker_env)
    assert final.returncode == 0, final.stderr
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert not list((tmp_path / "b").rglob("*.tmp"))  # the half-written files were cleaned up on resume
    a, b = (pd.read_csv(tmp_path / d / "results.csv") for d in "ab")
    assert list(a["best_top1"]) == list(b["best_top1"])


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc")
def test_soak_many_short_epochs_with_frequent_recovery_points_keep_memory_and_disk_flat(tiny_recipe, tmp_path,
                                                                                        monkeypatch) -> None:
    recipe = resolve_recipe(str(tiny_recipe(method="ce", epochs=80)), ["train.save_every_steps=1"])
    samples: list[tuple[float, int]] = []
    real = Trainer._report

    def measure(self, row):
        real(self, row)
        files = sum(1 for p in self.ctx.out_dir.rglob("*") if p.is_file())
        samples.append((_rss_mib(), files))

    monkeypatch.setattr(Trainer, "_report", measure)
    pipeline.train_teacher(recipe, _ctx(tmp_path, max_steps=3), smoke=False)  # 80 epochs, 160 recovery points
    assert len(samples) == 80
    warm = samples[15][0]
    assert max(rss for rss, _ in samples[15:]) < 1.05 * warm, [round(rss) for rss, _ in samples]
    assert len({files for _, files in samples}) == 1  # the same files every epoch: nothing accumulates


def test_a_signal_in_a_stages_last_step_stops_the_run_before_the_next_stage(tiny_recipe, tmp_path, monkeypatch) -> None:
    """The teacher's last step gets SIGTERM: the teacher finishes and is saved, the student never starts, and the
    message gives a resume command without --overwrite (an interrupted overwrite continues in its staging folder)."""
    from typer.testing import CliRunner

    from kdcli import cli

    _signal_at(monkeypatch, 7, signal.SIGTERM)  # 7 steps per epoch, 1 epoch: the teacher's last step
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["kdcli", "distill", "--recipe", "r.yaml", "--overwrite", "--out", "run"])
    result = CliRunner().invoke(cli.app, ["distill", "--recipe", str(tiny_recipe(method="kd", epochs=1)), "--out",
                                          str(out), "--device", "cpu"])
    assert result.exit_code == 143, result.output
    assert "SIGTERM received: stopped before kd began" in result.output
    assert f"Continue with: kdcli distill --recipe r.yaml --resume --out {out}" in " ".join(result.output.split())
    assert (out / "teacher/checkpoints/teacher-best.safetensors").is_file() and not (out / "kd").exists()
    monkeypatch.undo()
    resumed = CliRunner().invoke(cli.app, ["distill", "--recipe", str(tmp_path / "tiny.yaml"), "--out", str(out),
                                           "--resume", "--device", "cpu", "--set", "train.save_every_steps=2"])
    assert resumed.exit_code == 0, resumed.output  # the recovery cadence may change on resume
    assert (out / "kd/checkpoints/student-best.safetensors").is_file()
