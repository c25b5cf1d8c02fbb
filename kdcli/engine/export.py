"""`kdcli export`: safetensors + JSON, TorchScript and ONNX; each export is loaded back and compared."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from kdcli.engine.checkpoint import load_model, save_weights
from kdcli.engine.io import atomic_save, write_csv
from kdcli.errors import UserError

FORMATS = ("safetensors", "torchscript", "onnx")


def onnx_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))


def export_checkpoint(checkpoint: Path, out: Path, formats: list[str], *, arch: str | None = None,
                      image_size: int | None = None, seed: int = 0) -> tuple[pd.DataFrame, Path]:
    """Export to each format, reload it, and record the max abs difference of the outputs (``export.csv``; paths
    relative to ``out``)."""
    if formats == ["auto"]:
        formats = list(FORMATS if onnx_available() else FORMATS[:2])
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown export format '{unknown[0]}'; choose from {', '.join(FORMATS)}")
    if "onnx" in formats and not onnx_available():
        raise UserError("ONNX export needs the onnx extra: pip install -e '.[onnx]' (or drop onnx from --formats)")
    model = load_model(checkpoint, arch=arch)
    meta = dict(getattr(model, "kdcli_meta", {}))
    meta.setdefault("arch", arch)
    meta.setdefault("num_classes", model.num_classes if hasattr(model, "num_classes") else None)
    size = image_size or meta.get("image_size") or 32
    example = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = model(example)
    stem = out / Path(checkpoint).stem.replace(".", "_")
    exporters: dict[str, Callable[[nn.Module, torch.Tensor, Path, dict], tuple[Path, torch.Tensor]]] = {
        "safetensors": _safetensors, "torchscript": _torchscript, "onnx": _onnx}
    rows = []
    for fmt in formats:
        path, output = exporters[fmt](model, example, stem, meta)
        rows.append({"format": fmt, "path": path.name, "max_abs_diff": (output - reference).abs().max().item()})
    frame = pd.DataFrame(rows)
    table = out / "export.csv"
    write_csv(table, frame)
    return frame, table


def _safetensors(model: nn.Module, example: torch.Tensor, stem: Path, meta: dict) -> tuple[Path, torch.Tensor]:
    path = save_weights(model, stem, meta)
    with torch.no_grad():
        return path, load_model(path)(example)


def _torchscript(model: nn.Module, example: torch.Tensor, stem: Path, meta: dict) -> tuple[Path, torch.Tensor]:
    path = stem.with_suffix(".torchscript.pt")
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    atomic_save(path, lambda tmp: torch.jit.save(traced, tmp))
    with torch.no_grad():
        return path, torch.jit.load(str(path))(example)


def _onnx(model: nn.Module, example: torch.Tensor, stem: Path, meta: dict) -> tuple[Path, torch.Tensor]:
    import onnxruntime

    path = stem.with_suffix(".onnx")
    batch = torch.export.Dim("batch")
    # external_data=False: one self-contained file (weights inside, as a CIFAR or ImageNet classifier fits
    # ONNX's 2 GB limit). With external data the weights would land beside the temporary file, under its name.
    atomic_save(path, lambda tmp: torch.onnx.export(
        model, (example,), tmp, input_names=["images"], output_names=["logits"],
        dynamic_shapes=({0: batch},), dynamo=True, verbose=False, external_data=False))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"images": example.numpy()})
    return path, torch.from_numpy(output)
