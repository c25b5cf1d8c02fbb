"""Checkpoints: weights as safetensors plus a JSON sidecar; the training state separately.

Layout for a network saved under stem ``student-best``::

    student-best.safetensors   the state_dict (tensors only: nothing is ever unpickled to read it)
    student-best.json          sidecar: arch, num_classes, normalisation, image size, recipe, metrics

The training state (method state incl. extra modules and queues, optimisers, schedulers, RNG states,
epoch, best metric, history) goes to ``train_state.pt`` and is read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdcli.engine.io import atomic_save, write_json
from kdcli.errors import UserError

FORMAT = "kdcli-checkpoint"
STATE_FILE = "train_state.pt"


def save_weights(model: nn.Module, path_stem: Path, meta: dict[str, Any]) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; returns the safetensors path."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    weights = path_stem.with_suffix(".safetensors")
    atomic_save(weights, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    write_json(path_stem.with_suffix(".json"), {"format": FORMAT, "version": 1, **meta})
    return weights


def read_sidecar(weights: Path) -> dict[str, Any]:
    sidecar = weights.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        return json.loads(sidecar.read_text())
    except ValueError as err:
        raise UserError(f"the sidecar {sidecar} of {weights.name} is not valid JSON ({err}); restore it, or delete it "
                        "and pass --arch") from None


def save_train_state(directory: Path, state: dict[str, Any]) -> None:
    atomic_save(directory / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_train_state(directory: Path) -> dict[str, Any] | None:
    """The epoch-end training state in ``directory`` (None if no epoch has finished)."""
    path = directory / STATE_FILE
    return read_train_state(path) if path.is_file() else None


def read_train_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file (or one that carries code) becomes one line
        raise UserError(f"training state {path} is unreadable ({_first_line(err)}); delete it to resume from the "
                        "previous state, or start the run again") from None


def _unpickler_reason(err: Exception) -> str:
    """What torch's weights_only refusal refused (e.g. ``unsupported GLOBAL os.system``), without its boilerplate."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line.rstrip(".") for line in lines if not line.startswith(boilerplate)), _first_line(err))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read weights from a kdcli ``.safetensors`` file or a RepDistiller/mdistiller ``.pth`` file.

    ``.pth`` files hold either ``{'model': state_dict, ...}`` or a bare state_dict; they are read with
    ``torch.load(weights_only=True)`` so no arbitrary code can run.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(p.name for p in path.rglob("*.safetensors"))[:5]
        example = ", ".join(found) or "student-best.safetensors"
        raise UserError(f"{path} is a directory; pass a checkpoint file, e.g. {example}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), read_sidecar(path)
        except (SafetensorError, OSError, ValueError) as err:  # truncated, damaged header, unreadable sidecar
            raise UserError(f"checkpoint {path} is damaged or truncated ({_first_line(err)}); use another copy, or the "
                            "run's -last.safetensors") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: one line is enough
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corruption becomes one line
        raise UserError(f"cannot read checkpoint {path} safely (weights_only=True refused it: {_unpickler_reason(err)}); "
                        "it is not a plain PyTorch checkpoint, or it holds objects or code besides tensors: re-save "
                        "it as a plain state_dict or safetensors") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no state_dict (expected {{'model': state_dict}} or a bare state_dict)")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def infer_num_classes(state: dict[str, torch.Tensor]) -> int:
    """The classifier's output size: the last 2-D weight in the state_dict."""
    for key in reversed(list(state)):
        if key.endswith("weight") and state[key].ndim == 2:
            return int(state[key].shape[0])
    raise UserError("cannot infer num_classes from the checkpoint; pass --num-classes")


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None) -> nn.Module:
    """Build a network from a checkpoint and return it in eval mode.

    Accepts kdcli checkpoints (``.safetensors`` + sidecar: arch and classes are read from the sidecar)
    and RepDistiller/mdistiller ``.pth`` files (pass ``arch``). Keys and shapes must match exactly.
    """
    from kdcli.models import create_model

    state, meta = read_state_dict(path)
    arch = arch or meta.get("arch")
    if not arch:
        raise UserError(f"checkpoint {path} does not say its architecture; pass --arch (e.g. --arch resnet32x4)")
    found = meta.get("num_classes")
    if num_classes is not None and found is not None and found != num_classes:
        raise UserError(f"checkpoint {path} predicts {found} classes but the data has {num_classes}; use a checkpoint "
                        "trained on this dataset (or the recipe of the checkpoint's dataset)")
    num_classes = num_classes or found or infer_num_classes(state)
    model = create_model(arch, num_classes=num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"checkpoint {path} does not match architecture '{arch}' with {num_classes} classes: "
                        f"{detail}") from None
    model.kdcli_meta = meta  # normalisation and provenance, when the checkpoint carries them
    return model.eval()
