"""Atomic file writes: a crash never leaves a half-written file behind.

Every writer goes through :func:`atomic_write`: write to a temporary file in the same directory,
flush and fsync it, then ``os.replace`` it over the target (atomic on POSIX and Windows). A write that
fails for lack of space removes its temporary file and stops the command with
:class:`~kdcli.errors.DiskFull` (exit code 3), naming the directory; the previous file is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

from kdcli.errors import DiskFull

if TYPE_CHECKING:  # pandas loads on first use, so the command line starts fast
    import pandas as pd


def cache_root() -> Path:
    """``$KDCLI_CACHE`` or ``~/.cache/kdcli``: where kdcli keeps what it can recompute (teacher outputs, listings)."""
    return Path(os.environ.get("KDCLI_CACHE", "~/.cache/kdcli")).expanduser()


@contextlib.contextmanager
def _replacing(path: str | Path) -> Iterator[str]:
    """A temporary sibling of ``path``: fsynced and renamed over ``path`` if the block succeeds, else removed.

    The rename is atomic, so readers (and a run killed halfway) see the old file or the new one, never a part.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared like any new file
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        full = _out_of_space(error, path.parent)  # judged before the partial file gives its space back
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if full:
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing half-written was kept"
            raise DiskFull(f"no space left on the device (or quota exceeded) while writing into {path.parent}: "
                           f"{kept}") from error
        raise


def _out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether a write failed for lack of space. Libraries report it differently (an OSError with ENOSPC,
    safetensors' "No space left on device", torch's "unexpected pos"), so a failure on a file system with
    under 1 MiB free counts too."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, Exception):  # Ctrl-C, SystemExit: never a disk problem
        return False
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporary files that a process killed in the middle of an atomic write left under ``directory``."""
    for path in Path(directory).rglob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)  # the only way to read it is to set it
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success it atomically replaces ``path``."""
    with _replacing(path) as tmp, open(tmp, mode) as handle:
        yield handle


def atomic_save(path: str | Path, save: Callable[[str], None]) -> None:
    """Atomically write a file produced by a library function that takes a filename (safetensors, ONNX...)."""
    with _replacing(path) as tmp:
        save(tmp)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_write(path) as handle:
        frame.to_csv(handle, index=False)


def append_csv_row(path: str | Path, row: dict[str, Any]) -> pd.DataFrame:
    """Append one row to a CSV table (rewritten atomically; columns are the union of old and new)."""
    import pandas as pd

    path = Path(path)
    old = pd.read_csv(path) if path.exists() else pd.DataFrame()
    frame = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
    write_csv(path, frame)
    return frame
