"""Optimisers and per-epoch learning-rate schedules, built from the parameter groups a method declares."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from kdcli.methods.base import ParamGroup
from kdcli.recipes import OptimConfig, ScheduleConfig

Optimizers = dict[str, torch.optim.Optimizer]
Schedulers = dict[str, torch.optim.lr_scheduler.LRScheduler]


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov), Adam (L2 weight decay added to the gradient) or AdamW (decoupled decay).

    On CUDA the fused implementation updates all parameters in a few kernels instead of several per
    tensor; on the CPU the default (for-each) one is kept: it is what the CPU results are pinned to.
    """
    fused = all(p.is_cuda for p in params) or None
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov, fused=fused)
    adam = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-epoch schedule: linear warm-up (optional), then multi-step, cosine or constant."""
    warmup = cfg.warmup_epochs

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / warmup
        if cfg.name == "multistep":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        if cfg.name == "cosine":
            span = max(epochs - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizers(groups: list[ParamGroup], optim: OptimConfig, schedule: ScheduleConfig,
                     epochs: int, world: int = 1) -> tuple[Optimizers, Schedulers]:
    """One optimiser and schedule per non-empty group; a group without settings takes the recipe's.

    With ``optim.scale_lr`` every group's learning rate is multiplied by ``world``: each of the ``world`` ranks
    takes ``train.batch_size`` samples a step, so the global batch is ``world`` times the recipe's (the linear
    scaling rule of Goyal et al. 2017).
    """
    scale = world if optim.scale_lr else 1
    optimizers: Optimizers = {}
    schedulers: Schedulers = {}
    for group in groups:
        params = [p for p in group.params if p.requires_grad]
        if not params:
            continue
        cfg = group.optim or optim
        optimizers[group.name] = build_optimizer(params, dataclasses.replace(cfg, lr=cfg.lr * scale))
        schedulers[group.name] = build_scheduler(optimizers[group.name], group.schedule or schedule, epochs)
    return optimizers, schedulers
