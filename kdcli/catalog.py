"""What ``kdcli list models`` and ``kdcli list methods`` print, remembered between calls.

Describing the zoo and the methods means importing torch and timm (seconds); the listing only changes
when kdcli's source or the installed torch/timm change. So the rows are kept in
``<cache root>/listings.json`` under a key made of those versions and the size and modification time
of every kdcli source file: an edit, a new method file or an upgrade makes the key differ, and the
listing is rebuilt from the code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from kdcli.engine.io import cache_root, write_json

Rows = list[dict[str, object]]
PACKAGE = Path(__file__).resolve().parent


def listing(kind: str, build: Callable[[], Rows]) -> Rows:
    """The rows of listing ``kind``: remembered ones when the key matches, else ``build()`` (then remembered)."""
    path = cache_root() / "listings.json"
    key = _source_key()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if stored.get("key") == key and kind in stored.get("rows", {}):
        return stored["rows"][kind]
    rows = build()
    kept = stored.get("rows", {}) if stored.get("key") == key else {}
    try:
        write_json(path, {"key": key, "rows": {**kept, kind: rows}})
    except OSError:  # a read-only home: list without remembering
        pass
    return rows


def _source_key() -> str:
    sha = hashlib.sha256()
    for package in ("kdcli", "torch", "timm"):
        try:
            sha.update(f"{package}={version(package)};".encode())
        except PackageNotFoundError:
            sha.update(f"{package}=?;".encode())
    for source in sorted(PACKAGE.rglob("*.py")):
        stat = source.stat()
        sha.update(f"{source.relative_to(PACKAGE)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return sha.hexdigest()
