"""Launched by test_recovery.py: run the kdcli command line in this process and stop it at a chosen moment.

    python kill_worker.py MOMENT kdcli-arguments...

MOMENT is one of
  ``step:N``   SIGKILL just before this process's N-th training step (counted over every stage it runs);
  ``write:N``  SIGKILL halfway through this process's N-th ``torch.save`` (a training state being written:
               the first half of its bytes is on disk in the temporary file);
  ``term:N`` / ``int:N``  SIGTERM / SIGINT just before the N-th step (pre-emption, Ctrl-C): the run is
               expected to save a recovery point and exit with 143 / 130;
  ``none``     no interruption.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

from kdcli import cli
from kdcli.engine.step import Engine


def _stop_at_step(number: int, signum: int) -> None:
    real = Engine.train_step
    taken = 0

    def train_step(self, batch, info):
        nonlocal taken
        taken += 1
        if taken == number:
            os.kill(os.getpid(), signum)
        return real(self, batch, info)

    Engine.train_step = train_step


def _kill_in_write(number: int) -> None:
    real = torch.save
    calls = 0

    def save(obj, f, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == number:
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    moment, args = sys.argv[1], sys.argv[2:]
    kind, _, number = moment.partition(":")
    signals = {"step": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
    if kind in signals:
        _stop_at_step(int(number), signals[kind])
    elif kind == "write":
        _kill_in_write(int(number))
    sys.argv = ["kdcli", *args]
    cli.main()


if __name__ == "__main__":
    main()
