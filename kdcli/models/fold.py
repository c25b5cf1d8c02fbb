"""Fold BatchNorm into the convolution before it, for a frozen network in eval mode.

In eval mode ``bn(conv(x)) = gamma * (W x + b - mu) / sqrt(var + eps) + beta`` is itself a convolution
with weight ``W * s`` and bias ``(b - mu) * s + beta``, where ``s = gamma / sqrt(var + eps)`` per output
channel. Folding removes one kernel (and one pass over the activation) per BatchNorm; the module tree is
kept (each folded BatchNorm becomes ``nn.Identity``), so ``forward_intermediates`` and feature taps work
as before.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def fold_batchnorm(model: nn.Module, example: Tensor, rtol: float = 1e-4) -> tuple[nn.Module, int]:
    """A copy of the eval-mode ``model`` with every ``Conv2d -> BatchNorm2d`` pair folded, and the pair count.

    The pairs are found by running ``example`` through the network: a BatchNorm (tracking running
    statistics) whose input is exactly the output of a convolution, each module called once. A hidden
    second reader of the convolution's output (which would now see normalised values) cannot be seen
    that way, so the folded copy is checked against the original on ``example``; if an output differs
    by more than ``rtol`` of its range, ``(model, 0)`` is returned unchanged. Never train a folded
    network: its BatchNorm statistics no longer exist.
    """
    if not any(isinstance(module, nn.BatchNorm2d) for module in model.modules()):
        return model, 0
    pairs = _conv_bn_pairs(model, example)
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    for conv, norm in pairs:
        _fold_into(folded.get_submodule(conv), folded.get_submodule(norm))
        _replace(folded, norm, nn.Identity())
    # TF32 convolutions (cuDNN's default on Ampere and later) differ by ~1e-3: check in full fp32.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        before, after = model(example), folded(example)
    if (after - before).abs().max() > rtol * before.abs().max().clamp_min(1e-6):
        return model, 0
    return folded, len(pairs)


def _conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BatchNorm's input is the convolution's output, each called once."""
    produced: dict[int, str] = {}
    alive: list[Tensor] = []  # every conv output stays referenced, so no later tensor reuses its id()
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(module, nn.Conv2d):
                produced[id(output)] = name
                alive.append(output)
            elif module.track_running_stats and id(inputs[0]) in produced:
                pairs.append((produced[id(inputs[0])], name))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
               if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [(conv, norm) for conv, norm in pairs if calls[conv] == 1 and calls[norm] == 1]


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.affine:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale + (norm.bias.double() if norm.affine else 0.0)
    bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
    conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.empty_like(norm.running_mean), requires_grad=conv.weight.requires_grad)
    conv.bias.copy_(bias)


def _replace(model: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
