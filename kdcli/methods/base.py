"""The method contract: a method turns network outputs into named loss terms; the engine does the rest.

A method is an ``nn.Module`` that owns

* ``networks``: the networks being trained (``{"student": ...}``; online methods such as AFD train
  several: ``{"net1": ..., "net2": ...}``). The first one is the method's main output;
* its extra trainable modules (projectors, discriminators) and buffers (KDAV's queue) as ordinary
  submodules, so ``state_dict()`` captures everything needed to resume exactly and the engine's DDP
  wrapper averages their gradients too.

It declares what it reads (``taps`` of its networks, ``teacher_taps`` of the frozen teacher, ``None`` for
no teacher), and receives its typed ``params``, the weights of its terms and a small
:class:`MethodContext` (class count, image size, device, world size, the shapes of the tapped outputs),
never the recipe. The engine runs the teacher, the networks (through DDP) and the optimisers, and hands a
:class:`Step` to :meth:`Method.train_step`. Most methods only implement :meth:`Method.loss_terms`; the
total is ``sum_i weight_i(epoch) * term_i``. Methods with their own update order (AFD: several passes and
optimisers) override :meth:`Method.train_step` and :meth:`Method.param_groups`, using the same seams.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn

from kdcli.augment import MixedBatch
from kdcli.errors import UserError
from kdcli.models import Features, FeatureShapes, Taps, merge_taps, select_stages
from kdcli.recipes import OptimConfig, ScheduleConfig, build_dataclass

Outputs = dict[str, Features]  # network name -> what its pass produced


@dataclass
class Batch:
    """One training batch; ``mix`` is set by a method's :meth:`Method.view` when it mixes the images.

    ``views`` are the loader's augmentation view ids (:class:`kdcli.data.ViewGrid`) of the images, which
    let the engine replay cached teacher outputs; a view that changes the images must drop them.
    """

    images: Tensor
    labels: Tensor
    indices: Tensor
    mix: MixedBatch | None = None
    views: Tensor | None = None


@dataclass
class StepInfo:
    """Where training stands, handed to every step."""

    epoch: int  # 0-based
    epochs: int
    step: int  # global optimiser step, 0-based
    generator: torch.Generator  # CPU generator for the method's own randomness, seeded per epoch


@dataclass
class StepOutput:
    logits: Tensor  # logits of the main network, for the running train accuracy
    logs: dict[str, Tensor]  # detached scalars: every loss term and "loss", the weighted total


@dataclass
class MethodParams:
    """Base class of each method's typed hyper-parameters (``method.params`` in a recipe)."""


@dataclass(frozen=True)
class MethodContext:
    """What a method may know of its run besides its params (it never sees the recipe)."""

    num_classes: int
    image_size: int
    device: torch.device
    world_size: int
    shapes: dict[str, FeatureShapes]  # per network name, and "teacher": shapes of the tapped outputs
    train_labels: Tensor | None = None  # the label of every training sample, by position (CRD's negatives)


@dataclass
class ParamGroup:
    """Parameters stepped by one optimiser; ``None`` settings mean the recipe's ``optim`` / ``schedule``."""

    name: str
    params: list[nn.Parameter]
    optim: OptimConfig | None = None
    schedule: ScheduleConfig | None = None


class Step(Protocol):
    """The engine's seams for one training step (implemented by :class:`kdcli.engine.step.Engine`)."""

    def teacher(self, batch: Batch) -> Features:
        """The frozen teacher's ``teacher_taps`` outputs on ``batch.images`` (inference mode, run precision)."""

    def forward(self, taps: Taps, fn: Callable[..., Any], batch: Batch, *args: Any) -> Any:
        """One differentiable pass through the DDP-wrapped method: every network's ``taps`` outputs on
        ``batch.images``, then ``fn(batch, outputs, *args)``, whose result is returned."""

    def update(self, loss: Tensor, *groups: str) -> None:
        """Zero the gradients of the optimisers ``groups``, back-propagate ``loss``, step them."""


class Method(nn.Module, abc.ABC):
    """Base class: one pass, one optimiser over all trainable parameters, total = weighted sum of named terms."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    default_weights: ClassVar[dict[str, float]] = {}
    optional_terms: ClassVar[tuple[str, ...]] = ()  # further terms a recipe may switch on with a weight
    taps: ClassVar[Taps] = Taps()  # what the method reads from each of its networks
    teacher_taps: ClassVar[Taps | None] = Taps()  # what it reads from the teacher; None: it needs none
    # False when some pass leaves parameters without a gradient (AFD's logit and feature passes): DDP then
    # has to look for them after each forward.
    every_pass_uses_all_parameters: ClassVar[bool] = True

    def __init__(self, networks: dict[str, nn.Module], params: MethodParams, weights: dict[str, float],
                 ctx: MethodContext) -> None:
        super().__init__()
        self.networks = nn.ModuleDict(networks)
        self.params = params
        self.ctx = ctx
        self.weights = {**self.default_weights, **weights}
        self.feature_terms = nn.ModuleDict()  # see attach_term
        self._term_stages: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    @classmethod
    def networks_for(cls, params: MethodParams, student_arch: str | None) -> dict[str, str]:
        """The networks this method trains, name -> arch (one student by default)."""
        if student_arch is None:
            raise UserError(f"method '{cls.name}' trains a student; add student.arch to the recipe")
        return {"student": student_arch}

    def param_groups(self) -> list[ParamGroup]:
        """The optimisers to build: by default one (``main``) over every trainable parameter."""
        return [ParamGroup("main", [p for p in self.parameters() if p.requires_grad])]

    # -- training ---------------------------------------------------------------------------------
    def view(self, batch: Batch, info: StepInfo) -> Batch:
        """The input that networks and teacher see this step (mixing methods return the mixed batch)."""
        return batch

    def shows_loader_views(self) -> bool:
        """Whether the teacher sees the loader's images as they are (then cached outputs of their views apply)."""
        return True

    def uses_teacher(self, info: StepInfo) -> bool:
        """Whether this step needs the teacher (logit methods skip it when only CE has a weight)."""
        return self.teacher_taps is not None

    @abc.abstractmethod
    def loss_terms(self, batch: Batch, outputs: Outputs, teacher: Features | None, info: StepInfo) -> dict[str, Tensor]:
        """The unweighted loss terms by name, from the networks' ``outputs`` and the ``teacher``'s."""

    def term_weight(self, name: str, info: StepInfo) -> float:
        """Weight of a term at this step; override for schedules such as DKD's warm-up."""
        weight = self.weights.get(name, 0.0)
        return weight * self.feature_terms[name].ramp(info) if name in self.feature_terms else weight

    def attach_term(self, term: FeatureTerm, student_stages: tuple[int, ...], teacher_stages: tuple[int, ...]) -> None:
        """Add a feature term (its weight is ``self.weights[term.name]``); the method's taps grow by the term's, so
        the same passes give it the student's and the teacher's outputs it reads."""
        if type(self).taps.stages or (type(self).teacher_taps or Taps()).stages:
            raise UserError(f"method '{self.name}' reads stage maps itself; feature terms cannot be added to it yet")
        self.feature_terms[term.name] = term
        self._term_stages[term.name] = (student_stages, teacher_stages)
        student_taps, teacher_taps = term.taps(term.params, student_stages, teacher_stages)
        self.taps = merge_taps(self.taps, student_taps)
        self.teacher_taps = merge_taps(self.teacher_taps, teacher_taps)

    def feature_loss_terms(self, student: Features, teacher: Features | None, batch: Batch,
                           info: StepInfo) -> dict[str, Tensor]:
        """The attached feature terms with a non-zero weight at this step, unweighted."""
        terms = {}
        for name, term in self.feature_terms.items():
            if self.term_weight(name, info) != 0.0:
                student_stages, teacher_stages = self._term_stages[name]
                # Terms run in float32 outside autocast: their heads are small, and their losses (batch
                # relations, NCE scores) lose too much in half precision.
                with torch.autocast(batch.images.device.type, enabled=False):
                    terms[name] = term(_as_float(select_stages(student, self.taps, student_stages)),
                                       _as_float(select_stages(teacher, self.teacher_taps, teacher_stages)), batch, info)
        return terms

    def weighted_total(self, terms: dict[str, Tensor], info: StepInfo) -> Tensor:
        total = sum(self.term_weight(name, info) * value for name, value in terms.items())
        return total if isinstance(total, Tensor) else torch.zeros((), device=self.ctx.device)

    def train_step(self, batch: Batch, step: Step, info: StepInfo) -> StepOutput:
        """View, teacher, one pass, one update of ``main`` on the weighted total."""
        logits, terms = self.step_terms(batch, step, info)
        total = self.weighted_total(terms, info)
        step.update(total, "main")
        return step_output(logits, terms, total)

    def step_terms(self, batch: Batch, step: Step, info: StepInfo) -> tuple[Tensor, dict[str, Tensor]]:
        """The main network's logits and the loss terms of one step, without an update."""
        batch = self.view(batch, info)
        teacher = step.teacher(batch) if self.uses_teacher(info) else None
        return step.forward(self.taps, self._pass, batch, teacher, info)

    def _pass(self, batch: Batch, outputs: Outputs, teacher: Features | None,
              info: StepInfo) -> tuple[Tensor, dict[str, Tensor]]:
        student = main_output(outputs)
        terms = self.loss_terms(batch, outputs, teacher, info)
        return student.logits, {**terms, **self.feature_loss_terms(student, teacher, batch, info)}


class FeatureTerm(nn.Module, abc.ABC):
    """A distillation loss on features (FitNet's hint, AT, CRD, ...), which any method with a teacher adds by
    weight: ``method.weights.<name>``, with its settings in ``method.params.<name>``.

    The term owns what it trains and keeps (regressors, embedding heads, memory banks) as submodules and
    buffers: they are saved with the method, averaged by DDP, stepped by the method's optimiser, and never
    part of the exported student. It reads the outputs it declares through :meth:`taps` from the same passes
    the method runs, and receives them with its stage maps in the order of its own stage indices.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    default_weight: ClassVar[float] = 1.0  # the published weight (the standalone method's)
    # What it reads of both networks by default: their stage maps (see stages), their pooled features
    # (pre_logits) or the map they pool (feature_map).
    reads: ClassVar[Literal["stages", "pre_logits", "feature_map"]] = "stages"

    def __init__(self, params: MethodParams, ctx: MethodContext, student: FeatureShapes,
                 teacher: FeatureShapes) -> None:
        super().__init__()
        self.params, self.ctx = params, ctx

    @classmethod
    def stages(cls, params: MethodParams, student_stages: int, teacher_stages: int) -> tuple[tuple[int, ...],
                                                                                            tuple[int, ...]]:
        """The (non-negative) stage indices it reads of the student and of the teacher, given how many stages each
        network has; none by default."""
        return (), ()

    @classmethod
    def taps(cls, params: MethodParams, student_stages: tuple[int, ...],
             teacher_stages: tuple[int, ...]) -> tuple[Taps, Taps]:
        """What it reads of the student and of the teacher: by default what :attr:`reads` names."""
        if cls.reads == "stages":
            return Taps(logits=False, stages=student_stages), Taps(logits=False, stages=teacher_stages)
        both = Taps(logits=False, **{cls.reads: True})
        return both, both

    def ramp(self, info: StepInfo) -> float:
        """The factor of its weight at this step (1; ReviewKD's warm-up overrides it)."""
        return 1.0

    @abc.abstractmethod
    def forward(self, student: Features, teacher: Features, batch: Batch, info: StepInfo) -> Tensor:
        """The unweighted loss from the student's and the teacher's outputs."""


FEATURE_TERMS: dict[str, type[FeatureTerm]] = {}


def register_term(cls: type[FeatureTerm]) -> type[FeatureTerm]:
    """Make a feature term available to every method with a teacher, by its name."""
    FEATURE_TERMS[cls.name] = cls
    return cls


def parse_term_params(name: str, raw: dict[str, Any], source: str = "recipe") -> MethodParams:
    """The settings of feature term ``name``: ``method.params.<name>`` validated against its Params."""
    return build_dataclass(FEATURE_TERMS[name].Params, raw.get(name) or {}, f"method.params.{name}.", source)


def gather_from_ranks(tensor: Tensor) -> Tensor:
    """Concatenate the tensor of every DDP rank (equal shapes), so every rank updates a shared memory alike."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _as_float(features: Features) -> Features:
    def cast(value):
        if isinstance(value, tuple):
            return tuple(t.float() for t in value)
        return value.float() if value is not None else None

    return Features(*(cast(value) for value in features))


def last_stages(count: int, student_stages: int, teacher_stages: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The indices of the last ``count`` stages of each network (at most as many as the shorter one has)."""
    count = min(count, student_stages, teacher_stages)
    return tuple(range(student_stages - count, student_stages)), tuple(range(teacher_stages - count, teacher_stages))


def linear_ramp(info: StepInfo, warmup_epochs: int) -> float:
    """min(1, e / warmup_epochs) with e the 1-based epoch (1/warmup of the weight in the first epoch); 1 without."""
    return min(1.0, (info.epoch + 1) / warmup_epochs) if warmup_epochs > 0 else 1.0


def main_output(outputs: Outputs) -> Features:
    """The outputs of the first network (the student; ``teacher`` when a teacher is trained with ``ce``)."""
    return next(iter(outputs.values()))


def step_output(logits: Tensor, terms: dict[str, Tensor], total: Tensor) -> StepOutput:
    """Detached float logs of every term plus ``loss``, the total."""
    logs = {name: value.detach().float() for name, value in terms.items()}
    logs["loss"] = total.detach().float()
    return StepOutput(logits.detach(), logs)


def parse_params(cls: type[Method], raw: dict[str, Any], source: str = "recipe") -> MethodParams:
    """Validate ``method.params`` against the method's typed Params dataclass (the sections named after feature
    terms are the terms' own: :func:`parse_term_params`)."""
    own = {key: value for key, value in raw.items() if key not in FEATURE_TERMS}
    return build_dataclass(cls.Params, own, "method.params.", source)


def check_weights(cls: type[Method], weights: dict[str, float], source: str) -> None:
    allowed = set(cls.default_weights) | set(cls.optional_terms)
    unknown = sorted(set(weights) - allowed - set(FEATURE_TERMS))
    if unknown:
        features = f"; any method with a teacher also takes the feature terms {', '.join(sorted(FEATURE_TERMS))}"
        raise UserError(f"recipe {source}: 'method.weights.{unknown[0]}' is not a loss term of method "
                        f"'{cls.name}'; its terms: {', '.join(sorted(allowed))}{features}")
    borrowed = sorted(name for name in weights if name in FEATURE_TERMS and name not in allowed and weights[name])
    if borrowed and cls.teacher_taps is None:
        raise UserError(f"recipe {source}: 'method.weights.{borrowed[0]}' is a feature term, which needs a teacher, and "
                        f"method '{cls.name}' has none; use a distillation method (e.g. kd)")
    negative = sorted(name for name, value in weights.items() if value < 0)
    if negative:
        raise UserError(f"recipe {source}: 'method.weights.{negative[0]}' must be >= 0 (a negative weight would "
                        f"maximise that loss), got {weights[negative[0]]}")
    merged = {**cls.default_weights, **weights}
    if merged and not any(merged.values()):
        raise UserError(f"recipe {source}: every term in 'method.weights' is 0; give at least one of "
                        f"{', '.join(merged)} a non-zero weight")


def params_table(cls: type[Method]) -> str:
    """`name=default` list of a method's hyper-parameters (and its feature terms' `term.name=default`), for `kdcli
    list methods`."""
    pairs = [(f.name, f.default) for f in dataclasses.fields(cls.Params) if f.default is not dataclasses.MISSING]
    for term in (FEATURE_TERMS[name] for name in cls.default_weights if name in FEATURE_TERMS):
        pairs += [(f"{term.name}.{f.name}", f.default) for f in dataclasses.fields(term.Params)
                  if f.default is not dataclasses.MISSING]
    return ", ".join(f"{name}={default}" for name, default in pairs)
