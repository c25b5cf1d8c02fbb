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
    """Where a command writes without --out: ``runs/<name>-<command>[-smoke]-<time>`` (``-2``, ``-3``... when two
    commands start in the same second)."""
    base = RUNS_DIR / f"{name}-{command}{'-smoke' if smoke else ''}-{_stamp()}"
    path, number = base, 1
    while path.exists():
        number += 1
        path = base.with_name(f"{base.name}-{number}")
    return path


def _stamp() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}"


@dataclass
class Output:
    """Where ``command`` writes (:attr:`dir`) and where its result ends up (:attr:`final`)."""

    final: Path
    command: str
    staging: Path | None = None  # set when the result replaces a previous one (--overwrite)
    created: bool = False  # whether final did not exist before this command

    @property
    def dir(self) -> Path:
        return self.staging or self.final

    def commit(self) -> None:
        """Put a staged result in place of the old one; the old one is deleted only once the new one is there.

        The old one is checked again first (a resumed --overwrite may run much later): it must still be the
        output of the same command, else the staged result stays where it is and the user is told.
        """
        if self.staging is None:
            return
        if self.final.exists():
            record = read_record(self.final) if self.final.is_dir() else None
            if record is None or record.command != self.command:
                raise UserError(f"{self.final} is no longer the output of an earlier `kdcli {self.command}`, so it was "
                                f"not replaced; the new result is in {self.staging}")
            retired = self.final.with_name(f"{self.final.name}.replaced-{_stamp()}")
            os.replace(self.final, retired)
            os.replace(self.staging, self.final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(self.staging, self.final)
        self.staging = None

    def discard(self) -> None:
        """Undo what a failed command started: a staged result, or an output directory it created and left empty."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        elif self.created and self.final.is_dir() and not any(self.final.iterdir()):
            self.final.rmdir()


def claim(out: Path | None, command: str, name: str, *, overwrite: bool, resume: bool = False, smoke: bool = False,
          marker: str | None = None) -> Output:
    """Check ``--out`` for ``command`` (``name``: the recipe or checkpoint it is about) before anything is written.

    ``marker``: a file that also marks a folder as this command's output (a cache's ``manifest.json``).
    """
    if out is None:
        if resume:
            raise UserError("--resume needs --out DIR: the folder of the run to continue")
        return Output(default_out_dir(name, command, smoke), command, created=True)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; choose a directory path for --out")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if resume or not out.is_dir() or not any(out.iterdir()):
        return Output(out, command, created=not out.exists())
    if not overwrite:
        again = "pass --resume to continue it, " if command in ("train-teacher", "distill") else ""
        raise UserError(f"output directory {out} is not empty; {again}pass --overwrite to replace it, or choose "
                        "another --out")
    record = read_record(out)
    owned = (record is not None and record.command == command) or (marker is not None and (out / marker).is_file())
    if not owned:
        what = f"a `kdcli {record.command}` run" if record is not None else "not written by kdcli"
        raise UserError(f"--overwrite: {out} is {what}, and --overwrite only replaces the output of an earlier "
                        f"`kdcli {command}`; choose another --out")
    final = out.resolve()
    if final == final.parent:
        raise UserError(f"--overwrite cannot replace {final}; choose another --out")
    return Output(out, command, staging=final.with_name(f"{final.name}.new-{_stamp()}"))


@contextlib.contextmanager
def writing(output: Output) -> Iterator[Path]:
    """The directory to write into; the result is committed if the block succeeds, else discarded."""
    try:
        yield output.dir
    except BaseException:
        output.discard()
        raise
    output.commit()
