"""Figures: matplotlib on demand (the ``plot`` extra), and files in the format their name says (PNG, PDF, SVG)."""

from __future__ import annotations

from pathlib import Path

from kdcli.errors import UserError

FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def pyplot():
    """``matplotlib.pyplot`` drawing to files only; one line saying how to install it when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib, which is not installed; install the plot extra: "
                        "pip install 'kdcli[plot]'") from None
    return plt


def check_path(path: Path) -> None:
    """Refuse, before any work, a figure name whose format cannot be written."""
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"{path}: a figure is written as PNG, PDF or SVG; end the file name in .png, .pdf or .svg")


def save(figure, path: Path, dpi: int = 150) -> Path:
    """Write ``figure`` atomically in the format of ``path``'s suffix, and close it."""
    from kdcli.engine.io import atomic_save

    check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda tmp: figure.savefig(tmp, format=FORMATS[path.suffix.lower()], dpi=dpi))
    pyplot().close(figure)
    return path
