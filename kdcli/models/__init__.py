"""Networks: the CIFAR KD zoo (registered in timm on import) and any timm model, behind one interface.

* ``ZOO``: the 22 benchmark names (RepDistiller / mdistiller / TTM), in the benchmark's order.
* ``create_model(name, num_classes)``: a zoo model or any timm model, randomly initialised.
* ``model_features(model, x)``: logits, penultimate feature and last feature map from one backbone pass.
* ``feature_dims(model)``: (penultimate dim, feature-map channels).
* ``describe_models()``: the rows of ``kdcli list models``.
"""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

import timm
import torch
from torch import Tensor, nn

from kdcli.errors import UserError
from kdcli.models.base import ZooNet
from kdcli.models.cifar_zoo import ZOO_SPECS, build_zoo_model

ZOO: tuple[str, ...] = tuple(ZOO_SPECS)


class Features(NamedTuple):
    """What a distillation loss may read from a network for one batch.

    logits: (B, num_classes).
    pre_logits: (B, D), the pooled penultimate feature (RepDistiller's ``feat[-1]``).
    feature_map: the output of ``forward_features``: (B, C, H, W) for the zoo and timm CNNs; timm models
        keep their own layout, e.g. ViT-like models return tokens (B, N, D) and a few (Swin, MambaOut, ...)
        return (B, H, W, C), flagged by their ``output_fmt == 'NHWC'`` attribute.
    """

    logits: Tensor
    pre_logits: Tensor
    feature_map: Tensor


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A randomly initialised zoo model or timm model ``name`` with ``num_classes`` outputs.

    ``kwargs`` go to timm's ``create_model`` (zoo models accept none). Unknown names raise ``UserError``
    with the closest known names.
    """
    if not timm.is_model(name):
        raise UserError(_unknown_model_message(name))
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _unknown_model_message(name: str) -> str:
    known = timm.list_models()
    by_lower = {n.lower(): n for n in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(by_lower[c] for c in close)}? " if close else ""
    return f"unknown model '{name}'; {hint}see `kdcli list models` for the CIFAR zoo (any timm model name also works)"


def model_features(model: nn.Module, x: Tensor) -> Features:
    """Logits, pre-logits and feature map with one pass of the backbone (timm's forward split).

    feature_map = forward_features(x); pre_logits = forward_head(feature_map, pre_logits=True);
    logits = forward_head(feature_map). Only the head (pooling + classifier) runs twice, which for a timm
    model with head dropout in training mode means two independent dropout masks.
    """
    feature_map = model.forward_features(x)
    pre_logits = model.forward_head(feature_map, pre_logits=True)
    logits = model.forward_head(feature_map)
    return Features(logits=logits, pre_logits=pre_logits, feature_map=feature_map)


def feature_dims(model: nn.Module, image_size: int = 32) -> tuple[int, int]:
    """(pre-logits dim D, feature-map channels C) of ``model``.

    Zoo models report their attributes; other models run one dummy (1, 3, image_size, image_size)
    forward in eval mode without gradients (the training flag is restored). The channel axis of a
    feature map is dim 1 for NCHW maps and the last dim for tokens (B, N, D) and NHWC maps.
    """
    if isinstance(model, ZooNet):
        return model.num_features, model.feature_channels
    like = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dummy = torch.zeros(1, 3, image_size, image_size, device=like.device, dtype=like.dtype)
            feats = model_features(model, dummy)
    finally:
        model.train(was_training)
    channels_last_axis = feats.feature_map.ndim != 4 or getattr(model, "output_fmt", "NCHW") == "NHWC"
    return feats.pre_logits.shape[-1], feats.feature_map.shape[-1 if channels_last_axis else 1]


def describe_models() -> list[dict[str, Any]]:
    """One row per zoo model: name, params (for 100 classes), feature_dim (penultimate) and family.

    Models are built on the meta device, so no memory is allocated and no weights are initialised.
    """
    rows = []
    for name, spec in ZOO_SPECS.items():
        with torch.device("meta"):
            model = build_zoo_model(name, num_classes=100)
        params = sum(p.numel() for p in model.parameters())
        rows.append({"name": name, "params": params, "feature_dim": model.num_features, "family": spec.family})
    return rows


__all__ = ["ZOO", "Features", "create_model", "describe_models", "feature_dims", "model_features"]
