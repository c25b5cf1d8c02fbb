"""One output policy for every command that writes (train-teacher, distill, evaluate, export,
measure-violations, bench, cache-teacher):

* without ``--out`` a command writes into a fresh ``runs/<name>-<command>-<time>``, never into ``.``;
* an ``--out`` that is missing or empty is written in place;
* a non-empty ``--out`` is refused, unless the command continues it (``--resume``; ``cache-teacher`` finishes
  its own cache) or ``--overwrite`` is given. With ``--overwrite`` the new result is written into a sibling
  ``<out>.new-<time>`` and swapped in when the command succeeds, so a failure leaves the old result whole.
  Only a directory that the same kdcli command wrote (its ``run.json`` says so) is ever replaced, never a
  folder of the user's.

A refused command changes nothing on disk: the checks run before anything is created.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from kdcli.engine.runs import read_record
from kdcli.errors import UserError

RUNS_DIR = Path("runs")


def default_out_dir(name: str, command: str, smoke: bool = False) -> Path:
    """Where a command writes without --out: ``runs/<name>-<command>[-smoke]-<time>``."""
    return RUNS_DIR / f"{name}-{command}{'-smoke' if smoke else ''}-{_stamp()}"


def _stamp() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}"


@dataclass
class Output:
    """Where a command writes (:attr:`dir`) and where its result ends up (:attr:`final`)."""

    final: Path
    staging: Path | None = None  # set when the result replaces a previous one (--overwrite)
    created: bool = False  # whether final did not exist before this command

    @property
    def dir(self) -> Path:
        return self.staging or self.final

    def commit(self) -> None:
        """Put a staged result in place of the old one; the old one is deleted only once the new one is there."""
        if self.staging is None:
            return
        retired = self.final.with_name(f"{self.final.name}.replaced-{_stamp()}")
        os.replace(self.final, retired)
        os.replace(self.staging, self.final)
        shutil.rmtree(retired, ignore_errors=True)
        self.staging = None

    def discard(self) -> None:
        """Undo what a failed command started: a staged result, or an output directory it created and left empty."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        elif self.created and self.final.is_dir() and not any(self.final.iterdir()):
            self.final.rmdir()


def claim(out: Path | None, command: str, name: str, *, overwrite: bool, resume: bool = False,
          smoke: bool = False) -> Output:
    """Check ``--out`` for ``command`` (``name``: the recipe or checkpoint it is about) before anything is written."""
    if out is None:
        return Output(default_out_dir(name, command, smoke), created=True)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; choose a directory path for --out")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if resume or not out.is_dir() or not any(out.iterdir()):
        return Output(out, created=not out.exists())
    if not overwrite:
        again = "pass --resume to continue it, " if command in ("train-teacher", "distill") else ""
        raise UserError(f"output directory {out} is not empty; {again}pass --overwrite to replace it, or choose "
                        "another --out")
    record = read_record(out)
    if record is None or record.command != command:
        what = f"a `kdcli {record.command}` run" if record is not None else "not written by kdcli"
        raise UserError(f"--overwrite: {out} is {what}, and --overwrite only replaces the output of an earlier "
                        f"`kdcli {command}`; choose another --out")
    return Output(out, staging=out.with_name(f"{out.name}.new-{_stamp()}"))


@contextlib.contextmanager
def writing(output: Output) -> Iterator[Path]:
    """The directory to write into; the result is committed if the block succeeds, else discarded."""
    try:
        yield output.dir
    except BaseException:
        output.discard()
        raise
    output.commit()
