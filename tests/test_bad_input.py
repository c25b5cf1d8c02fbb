"""Every class of user mistake gets exit code 2 and one line naming the problem and the fix, and changes no file.

Each case runs in a folder that already holds a finished run, a recipe and checkpoints; afterwards every file
there must be byte-for-byte what it was, and nothing may have been added (no runs/, no half-written output).
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdcli.cli import app

runner = CliRunner()


class _Payload:
    """A pickle that runs code when unpickled (it would create ``marker``); weights_only must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def world(tmp_path_factory, write_tiny_recipe) -> Path:
    """A working folder: tiny.yaml, a finished teacher run in run/, and checkpoints good and bad."""
    base = tmp_path_factory.mktemp("world")
    write_tiny_recipe(base / "tiny.yaml", method="kd", epochs=1)
    result = runner.invoke(app, ["train-teacher", "--recipe", str(base / "tiny.yaml"), "--out", str(base / "run"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    good = base / "run/teacher/checkpoints/teacher-best.safetensors"
    data = good.read_bytes()
    (base / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (base / "corrupt.safetensors").write_bytes(bytes(range(256)) * 64)
    header = bytearray(data)
    header[8:40] = b"{" + b"\x00" * 31  # the JSON header is garbage
    (base / "header.safetensors").write_bytes(bytes(header))
    with open(base / "code.pth", "wb") as handle:
        pickle.dump({"model": _Payload(base / "pwned")}, handle, protocol=2)  # torch.save's protocol
    (base / "broken.yaml").write_text("train: {epochs: 2\nmethod: kd\n")
    (base / "empty-folder/train/cat").mkdir(parents=True)
    (base / "empty-folder/val/cat").mkdir(parents=True)
    (base / "empty-folder/train/cat/readme.txt").write_text("no images here")
    return base


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


TEACHER = "run/teacher/checkpoints/teacher-best.safetensors"
CASES = {
    "malformed YAML": (["train-teacher", "--recipe", "broken.yaml"], "not valid YAML"),
    "unknown key": (["distill", "--recipe", "tiny.yaml", "--set", "train.epochz=3"], "unknown key 'train.epochz'"),
    "wrong type": (["distill", "--recipe", "tiny.yaml", "--set", "train.epochs=two"], "'train.epochs' must be int"),
    "lr <= 0": (["distill", "--recipe", "tiny.yaml", "--set", "optim.lr=-0.1"], "'optim.lr' must be > 0"),
    "temperature <= 0": (["distill", "--recipe", "tiny.yaml", "--set", "method.params.temperature=0"],
                         "'method.params.temperature' must be > 0"),
    "batch 0": (["distill", "--recipe", "tiny.yaml", "--set", "train.batch_size=0"], "'train.batch_size' must be >= 1"),
    "epochs < 1": (["distill", "--recipe", "tiny.yaml", "--set", "train.epochs=0"], "'train.epochs' must be >= 1"),
    "probability above 1": (["distill", "--recipe", "tiny.yaml", "--set", "method=ida", "--set",
                             "method.params.ratio=1.5"], "'method.params.ratio' must be in [0, 1]"),
    "fraction outside [0, 1)": (["distill", "--recipe", "tiny.yaml", "--set", "data.val_fraction=1.2"],
                                "'data.val_fraction' must be in [0, 1)"),
    "negative weight": (["distill", "--recipe", "tiny.yaml", "--set", "method.weights.kd=-1"],
                        "'method.weights.kd' must be >= 0"),
    "--set without =": (["distill", "--recipe", "tiny.yaml", "--set", "train.epochs"], "expected key.path=value"),
    "unknown recipe": (["distill", "--recipe", "quickstrat"], "unknown recipe 'quickstrat' (did you mean quickstart"),
    "unknown model": (["distill", "--recipe", "tiny.yaml", "--set", "student.arch=resnet9000"], "resnet9000"),
    "unknown method": (["distill", "--recipe", "tiny.yaml", "--set", "method=kdd"], "unknown method 'kdd'"),
    "unknown dataset": (["distill", "--recipe", "tiny.yaml", "--set", "data.dataset=imagenet5"], "'data.dataset' must be"),
    "missing dataset files": (["train-teacher", "--recipe", "tiny.yaml", "--set", "data.dataset=cifar100", "--set",
                               "data.root=no-such-folder"], "data.download=true"),
    "empty ImageFolder": (["train-teacher", "--recipe", "tiny.yaml", "--set", "data.dataset=imagefolder", "--set",
                           "data.root=empty-folder"], "one folder per class holding images"),
    "teacher of another class count": (["distill", "--recipe", "tiny.yaml", "--set", f"teacher.checkpoint={TEACHER}",
                                        "--set", "data.num_classes=10"], "predicts 20 classes but the data has 10"),
    "missing checkpoint": (["evaluate", "missing.safetensors"], "does not exist"),
    "truncated checkpoint": (["evaluate", "truncated.safetensors", "--recipe", "tiny.yaml"], "damaged or truncated"),
    "corrupt checkpoint": (["evaluate", "corrupt.safetensors", "--recipe", "tiny.yaml"], "damaged or truncated"),
    "damaged safetensors header": (["evaluate", "header.safetensors", "--recipe", "tiny.yaml"], "damaged or truncated"),
    "checkpoint of another architecture": (["evaluate", TEACHER, "--arch", "resnet20"],
                                           "does not match architecture 'resnet20'"),
    "pickle that carries code": (["evaluate", "code.pth", "--recipe", "tiny.yaml", "--arch", "resnet8"],
                                 "refused it: Trying to load unsupported GLOBAL os.makedirs"),
    "unknown evaluation split": (["evaluate", TEACHER, "--split", "dev"], "--split 'dev' is not a split"),
    "--out naming a file": (["distill", "--recipe", "tiny.yaml", "--out", "tiny.yaml"], "is a file, not a directory"),
    "non-empty --out": (["distill", "--recipe", "tiny.yaml", "--out", "run"], "is not empty"),
    "resume with another recipe": (["train-teacher", "--recipe", "tiny.yaml", "--out", "run", "--resume", "--set",
                                    "optim.lr=0.1"], "differs from the one"),
}
if not torch.cuda.is_available():
    CASES["--device cuda without CUDA"] = (["distill", "--recipe", "tiny.yaml", "--device", "cuda"],
                                          "CUDA is not available")


@pytest.mark.parametrize("case", list(CASES))
def test_each_mistake_is_one_line_exit_2_and_changes_no_file(world: Path, case: str, monkeypatch) -> None:
    args, needle = CASES[case]
    monkeypatch.chdir(world)
    before = snapshot(world)
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(world) == before  # nothing changed, nothing added (no runs/, no output folder)
    assert not (world / "pwned").exists()  # the pickle's code never ran


def test_evaluate_without_recipe_reads_the_runs_recipe(world: Path, monkeypatch) -> None:
    monkeypatch.chdir(world)
    shutil.rmtree(world / "runs", ignore_errors=True)
    result = runner.invoke(app, ["evaluate", TEACHER, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "evaluate tiny (test)" in result.output  # the tiny recipe of run/, not a default one
    shutil.rmtree(world / "runs")


def test_no_space_left_names_the_folder_keeps_the_last_checkpoint_and_exits_3(tmp_path: Path, write_tiny_recipe,
                                                                             monkeypatch) -> None:
    """A real full disk: a 16 MiB tmpfs (needs root; skipped otherwise) filled up after the first epoch."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=16m tmpfs {disk} 2>/dev/null") != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        from kdcli.engine.trainer import Trainer

        monkeypatch.setattr("sys.argv", ["kdcli", "train-teacher", "--recipe", "tiny.yaml", "--out", str(disk / "run")])
        recipe = write_tiny_recipe(tmp_path / "tiny.yaml", method="ce", epochs=2)
        real, filled = Trainer._report, []

        def fill_after_first_epoch(self, row):
            real(self, row)
            if not filled:
                filled.append(disk / "filler")
                with open(filled[0], "wb") as handle:  # take every free byte
                    while True:
                        try:
                            handle.write(b"\0" * 65536)
                            handle.flush()
                        except OSError:
                            break

        monkeypatch.setattr(Trainer, "_report", fill_after_first_epoch)
        out = disk / "run"
        result = runner.invoke(app, ["train-teacher", "--recipe", str(recipe), "--out", str(out), "--device", "cpu"])
        lines = [line for line in result.output.splitlines() if line.strip() and line.startswith("error")]
        assert result.exit_code == 3 and len(lines) == 1, result.output
        assert "no space left on the device" in lines[0] and str(out / "teacher") in lines[0]
        assert "continue with: kdcli train-teacher" in lines[0] and f"--resume --out {out}" in lines[0]
        assert not list(out.rglob("*.tmp"))  # the partial file was removed
        kept = torch.load(out / "teacher/checkpoints/train_state.pt", weights_only=True)
        assert kept["epoch"] == 1  # the first epoch's state, intact and readable
        filled[0].unlink()
        monkeypatch.undo()
        resumed = runner.invoke(app, ["train-teacher", "--recipe", str(recipe), "--out", str(out), "--resume",
                                      "--device", "cpu"])
        assert resumed.exit_code == 0, resumed.output
    finally:
        os.system(f"umount {disk}")
