"""Step-exact recovery: what a checkpoint written in the middle of an epoch holds, when one is written, and
the signals (pre-emption, Ctrl-C) that ask for one.

A recovery point is ``checkpoints/recovery-step<N>.pt``: the epoch-end training state (method, optimisers,
schedulers, grad scaler, history) plus every random stream (Python, NumPy, torch CPU and CUDA) and the
:class:`EpochProgress` of the unfinished epoch (batches done, the method's generator, the running sums of
the epoch's metrics). The loader's order and augmentation are functions of (seed, epoch), so continuing
at batch ``batches`` of epoch ``epoch`` with these states restored takes exactly the steps the
uninterrupted run took. Only the newest recovery point is kept; the epoch-end state supersedes it.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcli.engine.checkpoint import load_train_state, read_train_state
from kdcli.engine.io import atomic_save
from kdcli.errors import RunInterrupted

_RECOVERY = re.compile(r"recovery-step(\d+)\.pt")


def recovery_path(directory: Path, step: int) -> Path:
    return directory / f"recovery-step{step:09d}.pt"


def recovery_points(directory: Path) -> dict[int, Path]:
    """The recovery checkpoints in ``directory`` by global step."""
    found = (_RECOVERY.fullmatch(path.name) for path in directory.glob("recovery-step*.pt"))
    return {int(match.group(1)): directory / match.group(0) for match in found if match}


def save_recovery(directory: Path, state: dict[str, Any]) -> Path:
    """Write a recovery point atomically, then delete the older ones (a kill in between leaves both: the newer wins)."""
    path = recovery_path(directory, state["step"])
    atomic_save(path, lambda tmp: torch.save(state, tmp))
    prune(directory, below=state["step"])
    return path


def prune(directory: Path, below: int) -> None:
    """Delete the recovery points older than global step ``below``."""
    for step, path in recovery_points(directory).items():
        if step < below:
            path.unlink(missing_ok=True)


def load_latest(directory: Path) -> dict[str, Any] | None:
    """The newest saved training state: the epoch-end ``train_state.pt`` or a later recovery point."""
    end = load_train_state(directory)
    points = recovery_points(directory)
    if points:
        step = max(points)
        if end is None or step > end["step"]:
            return read_train_state(points[step])
    return end


@dataclass
class EpochProgress:
    """An epoch under way: what a recovery point needs to continue it exactly."""

    epoch: int  # 0-based
    lr: float  # at the start of the epoch (history.csv's lr column)
    generator: torch.Generator  # the method's own random stream (StepInfo.generator)
    batches: int = 0  # batches done
    sums: dict[str, Tensor] = field(default_factory=dict)  # of each logged term over the batches done
    correct: Tensor | None = None  # training predictions that were right
    seen: int = 0  # training samples
    seconds: float = 0.0  # training time spent on this epoch before this process took it up

    def add(self, logs: dict[str, Tensor], correct: Tensor, seen: int) -> None:
        for name, value in logs.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.correct = correct if self.correct is None else self.correct + correct
        self.seen += seen

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "lr": self.lr, "generator": self.generator.get_state(), "batches": self.batches,
                "sums": {name: value.cpu() for name, value in self.sums.items()},
                "correct": None if self.correct is None else self.correct.cpu(), "seen": self.seen,
                "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochProgress:
        generator = torch.Generator()
        generator.set_state(state["generator"])
        correct = state["correct"]
        return cls(state["epoch"], state["lr"], generator, state["batches"],
                   {name: value.to(device) for name, value in state["sums"].items()},
                   None if correct is None else correct.to(device), state["seen"], state["seconds"])


def rng_state() -> dict[str, Any]:
    """Every global random stream (Python, NumPy, torch CPU and CUDA) as tensors and plain values, which a
    ``weights_only`` load accepts."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_initialized():  # a CPU run on a GPU machine must not start CUDA on every device
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (a state written before recovery points existed holds
    the torch streams only)."""
    if "python" in state:
        random.setstate(state["python"])
        numpy = state["numpy"]
        np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                             numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RecoveryClock:
    """When a recovery point is due: every ``every_steps`` global steps and/or every ``every_minutes`` (0: never)."""

    def __init__(self, every_steps: int, every_minutes: float) -> None:
        self.every_steps, self.every_seconds = every_steps, 60.0 * every_minutes
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        return by_steps or (self.every_seconds > 0 and time.monotonic() - self.last >= self.every_seconds)

    def saved(self) -> None:
        self.last = time.monotonic()


class StopSignals:
    """While active, SIGINT and SIGTERM only set :attr:`received`; the trainer then writes a recovery point at the
    next step where it checks (every step for one CPU process, every 10th on a GPU or under torchrun; after
    the evaluation at an epoch's end) and stops with :class:`RunInterrupted`. A second SIGINT (Ctrl-C twice)
    stops at once; a repeated SIGTERM (torchrun's agent forwards one to every worker) waits for the save.

    Re-entrant: the command line holds it over a whole run, so a signal that arrives between stages stops the
    run before the next stage begins. Handlers can only be installed from the main thread; elsewhere (a
    notebook's worker thread) the signals keep their default behaviour.
    """

    HANDLED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def __enter__(self) -> StopSignals:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.HANDLED}
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum


def interruption(signum: int, where: str) -> RunInterrupted:
    """The exception that stops a run on signal ``signum``: exit code 128 + signum (130 SIGINT, 143 SIGTERM)."""
    return RunInterrupted(128 + signum, f"{signal.Signals(signum).name} received: {where}")
