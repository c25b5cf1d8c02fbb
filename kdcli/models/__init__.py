"""Networks: the CIFAR KD zoo (registered in timm on import) and any timm model, behind one interface.

* ``ZOO``: the 22 benchmark names (RepDistiller / mdistiller / TTM), in the benchmark's order.
* ``create_model(name, num_classes)``: a zoo model or any timm model, randomly initialised.
* ``Taps`` / ``forward_taps(model, x, taps)``: logits, penultimate feature, last map and stage maps from one
  pass; ``feature_shapes(model, image_size, taps)``: their shapes (see :mod:`kdcli.models.taps`).
* ``describe_models()``: the rows of ``kdcli list models``.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from torch import nn

from kdcli.errors import UserError
from kdcli.models.cifar_zoo import ZOO_SPECS, build_zoo_model
from kdcli.models.taps import (
    Features,
    FeatureShapes,
    Taps,
    compile_taps,
    feature_shapes,
    forward_taps,
    merge_taps,
    select_stages,
)

ZOO: tuple[str, ...] = tuple(ZOO_SPECS)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A randomly initialised zoo model or timm model ``name`` with ``num_classes`` outputs.

    ``kwargs`` go to timm's ``create_model`` (zoo models accept none). Unknown names raise ``UserError``
    with the closest known names.
    """
    check_model_name(name)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def check_model_name(name: str) -> None:
    """:class:`UserError` with the closest known names unless timm (with the zoo registered) knows ``name``."""
    if not timm.is_model(name):
        raise UserError(_unknown_model_message(name))


def _unknown_model_message(name: str) -> str:
    known = timm.list_models()
    by_lower = {n.lower(): n for n in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(by_lower[c] for c in close)}? " if close else ""
    return f"unknown model '{name}'; {hint}see `kdcli list models` for the CIFAR zoo (any timm model name also works)"


def describe_models() -> list[dict[str, Any]]:
    """One row per zoo model: name, params (for 100 classes), feature_dim (penultimate) and family.

    Models are built on the meta device, so no memory is allocated and no weights are initialised.
    """
    rows = []
    for name, zoo in ZOO_SPECS.items():
        with torch.device("meta"):
            model = build_zoo_model(name, num_classes=100)
        params = sum(p.numel() for p in model.parameters())
        rows.append({"name": name, "params": params, "feature_dim": model.num_features, "family": zoo.family})
    return rows


__all__ = ["ZOO", "FeatureShapes", "Features", "Taps", "check_model_name", "compile_taps", "create_model", "describe_models",
           "feature_shapes", "forward_taps", "merge_taps", "select_stages"]
