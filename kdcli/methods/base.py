"""The method contract shared by every distillation method.

A method is an ``nn.Module`` that owns

* ``networks``: the networks being trained (``{"student": ...}``; online methods such as AFD train
  several: ``{"net1": ..., "net2": ...}``). The first one is the method's main output;
* its extra trainable modules (projectors, discriminators) and buffers (KDAV's queue) as ordinary
  submodules, so ``state_dict()`` captures everything needed to resume exactly;
* a frozen ``teacher`` (eval mode, no grad) that is *not* part of its state.

Most methods only implement :meth:`Method.loss_terms`, returning named, unweighted loss terms; the
total is ``sum_i weight_i(epoch) * term_i`` with the weights from the recipe merged over
:attr:`Method.default_weights`. Methods with their own update order (several optimisers, several
forward passes) override :meth:`Method.train_step` and :meth:`Method.build_optimizers`.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from kdcli.engine.distributed import average_gradients
from kdcli.recipes import OptimConfig, Recipe, ScheduleConfig


@dataclass
class Batch:
    images: Tensor
    labels: Tensor
    indices: Tensor


@dataclass
class StepInfo:
    """Where training stands, handed to every step."""

    epoch: int  # 0-based
    epochs: int
    step: int  # global optimiser step, 0-based
    generator: torch.Generator  # CPU generator for the method's own randomness, seeded per epoch
    precision: str = "fp32"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass
class StepOutput:
    logits: Tensor  # logits of the main network, for the running train accuracy
    logs: dict[str, Tensor]  # detached scalars: every loss term and "loss", the weighted total


@dataclass
class MethodParams:
    """Base class of each method's typed hyper-parameters (``method.params`` in a recipe)."""


def build_optimizer(params: Iterator[nn.Parameter] | list, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
            import math

            span = max(epochs - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Method(nn.Module, abc.ABC):
    """Base class: one optimiser over all trainable parameters, total = weighted sum of named terms."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    default_weights: ClassVar[dict[str, float]] = {}
    optional_terms: ClassVar[tuple[str, ...]] = ()  # further terms a recipe may switch on with a weight
    needs_teacher: ClassVar[bool] = True
    # True when loss_terms runs a network outside its DDP wrapper (e.g. ``model_features(unwrap(net), x)``):
    # train_step then averages the gradients over ranks itself.
    bypasses_ddp: ClassVar[bool] = False

    def __init__(self, networks: dict[str, nn.Module], teacher: nn.Module | None, recipe: Recipe,
                 params: MethodParams, num_classes: int) -> None:
        super().__init__()
        self.networks = nn.ModuleDict(networks)
        self._teacher = (teacher,)  # a tuple keeps the frozen teacher out of state_dict() and parameters()
        self.recipe = recipe
        self.params = params
        self.num_classes = num_classes
        self.weights = {**self.default_weights, **recipe.method.weights}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def create(cls, networks: dict[str, nn.Module], teacher: nn.Module | None, recipe: Recipe,
               num_classes: int) -> "Method":
        return cls(networks, teacher, recipe, parse_params(cls, recipe.method.params), num_classes)

    @classmethod
    def networks_for(cls, recipe: Recipe) -> dict[str, str]:
        """The networks this method trains, name -> arch (one student by default)."""
        if recipe.student is None:
            from kdcli.errors import UserError

            raise UserError(f"recipe '{recipe.name}' has no 'student' section; add student.arch")
        return {"student": recipe.student.arch}

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    @property
    def main(self) -> nn.Module:
        return next(iter(self.networks.values()))

    def build_optimizers(self, epochs: int) -> None:
        """Create ``self.optimizers`` / ``self.schedulers`` (one SGD/AdamW over everything trainable)."""
        optimizer = build_optimizer(self.parameters(), self.recipe.optim)
        self.optimizers = {"main": optimizer}
        self.schedulers = {"main": build_scheduler(optimizer, self.recipe.schedule, epochs)}

    # -- training ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss_terms(self, batch: Batch, info: StepInfo) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the main network's logits and the unweighted loss terms by name.

        Every method defines it; :meth:`train_step` minimises their weighted sum with one optimiser, and
        methods with further optimisers (AFD) call it for their first update and add their own.
        """

    def term_weight(self, name: str, info: StepInfo) -> float:
        """Weight of a term at this step; override for schedules such as DKD's warm-up."""
        return self.weights.get(name, 0.0)

    def weighted_total(self, terms: dict[str, Tensor], info: StepInfo) -> Tensor:
        total = sum(self.term_weight(name, info) * value for name, value in terms.items())
        return total if isinstance(total, Tensor) else torch.zeros((), device=self.device)

    def train_step(self, batch: Batch, info: StepInfo) -> StepOutput:
        with info.autocast(batch.images.device):
            logits, terms = self.loss_terms(batch, info)
        total = self.weighted_total(terms, info)
        optimizer = self.optimizers["main"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.bypasses_ddp:
            average_gradients(optimizer)
        optimizer.step()
        logs = {name: value.detach().float() for name, value in terms.items()}
        logs["loss"] = total.detach().float()
        return StepOutput(logits.detach(), logs)

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        assert self.teacher is not None, f"method {self.name} needs a teacher"
        return self.teacher(images)

    @property
    def device(self) -> torch.device:
        return next(self.networks.parameters()).device

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays frozen in eval mode
        return self


def parse_params(cls: type[Method], raw: dict[str, Any], source: str = "recipe") -> MethodParams:
    """Validate ``method.params`` against the method's typed Params dataclass."""
    from kdcli.recipes import _build

    return _build(cls.Params, raw, "method.params.", source)


def check_weights(cls: type[Method], weights: dict[str, float], source: str) -> None:
    from kdcli.errors import UserError

    allowed = set(cls.default_weights) | set(cls.optional_terms)
    unknown = sorted(set(weights) - allowed)
    if unknown:
        raise UserError(f"recipe {source}: 'method.weights.{unknown[0]}' is not a loss term of method "
                        f"'{cls.name}'; its terms: {', '.join(sorted(allowed))}")
    merged = {**cls.default_weights, **weights}
    if merged and not any(merged.values()):
        raise UserError(f"recipe {source}: every term in 'method.weights' is 0; give at least one of "
                        f"{', '.join(merged)} a non-zero weight")


def params_table(cls: type[Method]) -> str:
    """`name=default` list of a method's hyper-parameters, for `kdcli list methods`."""
    fields = dataclasses.fields(cls.Params)
    return ", ".join(f"{f.name}={f.default}" for f in fields if f.default is not dataclasses.MISSING)
