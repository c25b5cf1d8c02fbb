"""DDP through torchrun, for real: two CPU ranks with the gloo backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # Own process group, so a hang kills the workers too and not just the launcher.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=HERE.parent, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def replica_gaps(*args: str) -> dict[str, float]:
    result = torchrun(str(HERE / "ddp_worker.py"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: float(gap) for name, gap in (line.split() for line in result.stdout.splitlines() if line.strip())}


def test_replicas_stay_identical_for_every_kind_of_method() -> None:
    # kd, ttm: one logit pass; kdav: pre-logit taps and a projector; afd: several networks, transfer layers
    # and discriminators in three passes with three optimisers; ida: mixing and the projection on every rank;
    # crd: embedding heads and memory banks written with every rank's samples; fitnet: a regressor on stage maps;
    # reviewkd: ABF modules over stage maps and the pooled feature.
    # All of it goes through the engine's one DDP wrapper around the method.
    methods = ("kd", "ttm", "kdav", "afd", "ida", "crd", "fitnet", "reviewkd")
    assert replica_gaps(*methods) == dict.fromkeys(methods, 0.0)


def test_without_the_ddp_wrapper_replicas_drift() -> None:
    gaps = replica_gaps("--no-sync", "kd", "kdav", "afd")
    assert gaps["kd"] > 1e-4 and gaps["kdav"] > 1e-4 and gaps["afd"] > 1e-6


def test_distill_under_torchrun_writes_once_and_matches_the_results_table(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = torchrun("-m", "kdcli", "distill", "--recipe", "quickstart", "--set", "method=kdav", "--smoke",
                      "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_csv(out / "results.csv")
    assert list(frame["stage"]) == ["teacher", "baseline", "kdav"]
    assert result.stdout.count("results: ") == 1  # only rank 0 prints
    assert (out / "kdav/checkpoints/student-last.safetensors").is_file()
