"""Feature taps: what a distillation method reads from a network, produced by one forward pass.

A method declares a :class:`Taps` for its networks and for its teacher; :func:`forward_taps` runs the
network once and returns a :class:`Features` with exactly those outputs, through timm's forward split:

* logits only: ``model(x)``;
* pre-logits / the last map: ``forward_features`` then ``forward_head`` (``pre_logits=True`` for the
  penultimate feature);
* stage maps: ``forward_intermediates(x, indices=stages)``, whose final output is ``forward_features(x)``,
  so the head still runs on the same pass.

:func:`feature_shapes` probes the shapes of the same outputs with a one-image forward, so a method can
size its projectors and discriminators before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Taps:
    """The outputs a method needs from one network's forward pass.

    logits: (B, num_classes). pre_logits: the pooled penultimate feature (B, D). feature_map: the output
    of ``forward_features``, (B, C, H, W) for CNNs. stages: indices into the network's ``feature_info``
    (negative counts from the end), each giving that stage's map.
    """

    logits: bool = True
    pre_logits: bool = False
    feature_map: bool = False
    stages: tuple[int, ...] = ()

    @property
    def splits_forward(self) -> bool:
        """True when the pass needs more than ``model(x)``."""
        return self.pre_logits or self.feature_map or bool(self.stages)


class Features(NamedTuple):
    """What :func:`forward_taps` produced; outputs that were not asked for are ``None`` (stages: empty)."""

    logits: Tensor | None = None
    pre_logits: Tensor | None = None
    feature_map: Tensor | None = None
    stages: tuple[Tensor, ...] = ()


def forward_taps(model: nn.Module, x: Tensor, taps: Taps) -> Features:
    """One forward pass of ``model`` on ``x`` returning the outputs ``taps`` asks for.

    The head (pooling + classifier) runs once per head output asked for, which for a timm model with
    head dropout in training mode means independent dropout masks for logits and pre-logits.
    """
    if not taps.splits_forward:
        return Features(logits=model(x) if taps.logits else None)
    maps: list[Tensor] = []
    if taps.stages:
        final, maps = model.forward_intermediates(x, indices=list(taps.stages))
    else:
        final = model.forward_features(x)
    return Features(
        logits=model.forward_head(final) if taps.logits else None,
        pre_logits=model.forward_head(final, pre_logits=True) if taps.pre_logits else None,
        feature_map=final if taps.feature_map else None,
        stages=tuple(maps),
    )


class FeatureShapes(NamedTuple):
    """Per-sample shapes of a network's tapped outputs (no batch dimension); ``()`` when not asked for."""

    logits: tuple[int, ...] = ()
    pre_logits: tuple[int, ...] = ()
    feature_map: tuple[int, ...] = ()
    stages: tuple[tuple[int, ...], ...] = ()


def feature_shapes(model: nn.Module, image_size: int, taps: Taps) -> FeatureShapes:
    """The shapes :func:`forward_taps` gives for one ``image_size`` x ``image_size`` image.

    Runs one zero image in eval mode without gradients (no BN statistic changes; the training flag is
    restored), on the model's device and dtype.
    """
    like = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dummy = torch.zeros(1, 3, image_size, image_size, device=like.device, dtype=like.dtype)
            out = forward_taps(model, dummy, taps)
    finally:
        model.train(was_training)

    def shape(t: Tensor | None) -> tuple[int, ...]:
        return tuple(t.shape[1:]) if t is not None else ()

    return FeatureShapes(shape(out.logits), shape(out.pre_logits), shape(out.feature_map),
                         tuple(shape(m) for m in out.stages))


def compile_taps(model: nn.Module) -> None:
    """``torch.compile`` every entry point :func:`forward_taps` uses (``model(x)``, ``forward_features``,
    ``forward_head``, ``forward_intermediates``), in place; parameters and state_dict keys stay as they are."""
    model.compile()
    for name in ("forward_features", "forward_head", "forward_intermediates"):
        if hasattr(model, name):
            setattr(model, name, torch.compile(getattr(model, name)))


def merge_taps(*taps: Taps) -> Taps:
    """The taps of one pass that gives every output any of ``taps`` asks for. Stage indices must be
    non-negative; the merged ones are sorted, the order :func:`forward_taps` returns their maps in."""
    if any(index < 0 for t in taps for index in t.stages):
        raise ValueError("merge_taps needs non-negative stage indices")
    return Taps(logits=any(t.logits for t in taps), pre_logits=any(t.pre_logits for t in taps),
                feature_map=any(t.feature_map for t in taps),
                stages=tuple(sorted({index for t in taps for index in t.stages})))


def select_stages(features: Features, merged: Taps, wanted: tuple[int, ...]) -> Features:
    """``features`` of a :func:`merge_taps` pass with only the stage maps ``wanted``, in that order."""
    return features._replace(stages=tuple(features.stages[merged.stages.index(i)] for i in wanted))
