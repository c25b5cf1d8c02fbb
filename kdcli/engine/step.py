"""The seams of a training step: the teacher, the DDP-wrapped pass and the optimisers.

:class:`Engine` implements :class:`kdcli.methods.base.Step` for one method:

* ``teacher(batch)``: the frozen teacher, once per call, in ``torch.inference_mode`` and its own
  precision (``teacher.precision``), BatchNorm folded and channels-last when the run is, on exactly the
  images of the batch the method's ``view`` returned, giving the outputs of the method's
  ``teacher_taps``. It is the one place a teacher runs during training (and the place an output cache
  plugs in);
* ``forward(taps, fn, batch, ...)``: one differentiable pass through the method wrapped in
  DistributedDataParallel, so DDP sees every pass and averages every trainable parameter's gradient —
  networks, projectors, discriminators alike — with its bucketed, overlapped all-reduce;
* ``update(loss, *groups)``: zero, back-propagate, step the optimisers built from the method's
  :meth:`~kdcli.methods.base.Method.param_groups` (with a gradient scaler under fp16).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from kdcli.devices import autocast, resolve_precision
from kdcli.engine.cache import CachedTeacher, serves
from kdcli.engine.distributed import DistEnv, wrap
from kdcli.engine.optim import build_optimizers
from kdcli.errors import UserError
from kdcli.methods import get_method
from kdcli.methods.base import (
    FEATURE_TERMS,
    Batch,
    Method,
    MethodContext,
    MethodParams,
    StepInfo,
    StepOutput,
    parse_params,
    parse_term_params,
)
from kdcli.models import Features, FeatureShapes, Taps, compile_taps, feature_shapes, forward_taps
from kdcli.models.fold import fold_batchnorm
from kdcli.recipes import MethodConfig, Recipe, TeacherConfig


def build_method(cfg: MethodConfig, networks: dict[str, nn.Module], teacher: nn.Module | None, num_classes: int,
                 image_size: int, device: torch.device, world_size: int = 1,
                 train_labels: torch.Tensor | None = None) -> Method:
    """The method of ``cfg`` over ``networks``, given the shapes of what it taps from them and the teacher, with
    the feature terms its weights name attached (see :class:`~kdcli.methods.base.FeatureTerm`)."""
    cls = get_method(cfg.name)
    if cls.teacher_taps is not None and teacher is None:
        raise UserError(f"method '{cfg.name}' needs a teacher; add teacher.arch (and teacher.checkpoint) to the recipe")
    shapes = {name: _shapes(net, image_size, cls.taps, num_classes) for name, net in networks.items()}
    if teacher is not None and cls.teacher_taps is not None:
        shapes["teacher"] = _shapes(teacher, image_size, cls.teacher_taps, num_classes)
    ctx = MethodContext(num_classes, image_size, device, world_size, shapes, train_labels)
    method = cls(networks, parse_params(cls, cfg.params), cfg.weights, ctx)
    for name, weight in method.weights.items():
        if name in FEATURE_TERMS and weight != 0:
            _attach(method, name, parse_term_params(name, cfg.params), teacher, image_size, num_classes)
    return method.to(device)


def _attach(method: Method, name: str, params: MethodParams, teacher: nn.Module, image_size: int,
            num_classes: int) -> None:
    """Build feature term ``name`` for the method's main network and the teacher, sized by a probing pass."""
    term_cls = FEATURE_TERMS[name]
    student = next(iter(method.networks.values()))
    stages = term_cls.stages(params, len(student.feature_info), len(teacher.feature_info))
    student_taps, teacher_taps = term_cls.taps(params, *stages)
    term = term_cls(params, method.ctx, _shapes(student, image_size, student_taps, num_classes),
                    _shapes(teacher, image_size, teacher_taps, num_classes))
    method.attach_term(term.to(next(student.parameters()).device), *stages)


def _shapes(network: nn.Module, image_size: int, taps: Taps, num_classes: int) -> FeatureShapes:
    """Shapes of the tapped outputs; logits alone need no probing forward."""
    if taps.splits_forward:
        return feature_shapes(network, image_size, taps)
    return FeatureShapes(logits=(num_classes,) if taps.logits else ())


def method_engine(cfg: MethodConfig, networks: dict[str, nn.Module], teacher: nn.Module | None, num_classes: int,
                  image_size: int = 32, recipe: Recipe | None = None, epochs: int = 1,
                  device: torch.device | None = None, cache: CachedTeacher | None = None,
                  train_labels: torch.Tensor | None = None) -> Engine:
    """A method over ``networks`` and its engine in one process, e.g. for tests, benchmarks and notebooks.

    ``recipe`` supplies the optimiser, schedule and precision (defaults: a default :class:`Recipe`).
    """
    device = device or next(next(iter(networks.values())).parameters()).device
    method = build_method(cfg, networks, teacher, num_classes, image_size, device, train_labels=train_labels)
    return Engine(method, teacher, dataclasses.replace(recipe or Recipe(), method=cfg), epochs, cache=cache)


class TeacherSeam:
    """Runs the frozen teacher on a batch: inference mode, its own precision, the declared taps.

    The network is prepared once for inference: channels-last weights when the run's images are
    channels-last, BatchNorm folded into the convolutions (``teacher.fold_bn``; see
    :func:`kdcli.models.fold.fold_batchnorm`) and optionally compiled.
    """

    def __init__(self, teacher: nn.Module, taps: Taps, precision: str, cfg: TeacherConfig | None = None,
                 channels_last: bool = False, image_size: int = 32, cache: CachedTeacher | None = None,
                 renormalise: tuple[Tensor, Tensor] | None = None) -> None:
        cfg = cfg or TeacherConfig(fold_bn=False)
        self.network, self.folded = prepare_teacher(teacher, cfg, channels_last, image_size)
        self.taps, self.precision = taps, precision
        self.channels_last, self.compiled = channels_last, cfg.compile
        if cache is not None and not serves(list(cache.outputs), taps):
            raise ValueError(f"a cache of {', '.join(cache.outputs)} cannot serve the teacher taps {taps}")
        self.cache = cache
        self.renormalise = renormalise  # (scale, shift): the data's normalisation -> the teacher's own
        self.notes: list[str] = []  # lines for the log, taken by the trainer
        self._bypass_said = False

    def __call__(self, batch: Batch) -> Features:
        if self.cache is not None:
            if batch.views is not None:
                return self.cache(batch.indices, batch.views)
            if not self._bypass_said:
                self._bypass_said = True
                self.notes.append("the teacher sees images that are no cached view (mixed by the method, or not "
                                  "from the in-memory loader): it runs live for them, the cache is bypassed")
        images = batch.images
        if self.renormalise is not None:
            scale, shift = self.renormalise
            images = images * scale.to(images.device) + shift.to(images.device)
        with torch.inference_mode(), autocast(batch.images.device, self.precision):
            out = forward_taps(self.network, images, self.taps)
        # Outside inference mode a clone is an ordinary tensor, which autograd may save for backward
        # (a loss such as an MSE to a teacher map saves its target).
        return Features(*(_clone(value) for value in out))

    def describe(self) -> str:
        """One line for the log: how the teacher runs."""
        parts = [self.precision, "channels-last" if self.channels_last else "contiguous",
                 f"{self.folded} BatchNorms folded", *(["compiled"] if self.compiled else []),
                 *(["input re-normalised to its own mean/std"] if self.renormalise is not None else [])]
        cached = f"; outputs replayed from the cache {self.cache.folder or 'in memory'}" if self.cache is not None else ""
        return ", ".join(parts) + cached


def teacher_normalisation(teacher: nn.Module, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor] | None:
    """(scale, shift) taking images normalised with the data's ``mean``/``std`` to the normalisation the teacher's
    weights were trained with (``kdcli_meta``: a checkpoint's sidecar, a pretrained name's), ``x·s_d/s_t +
    (m_d − m_t)/s_t``, as timm's distillation task does; None when they agree or the teacher does not say."""
    meta = getattr(teacher, "kdcli_meta", None) or {}
    if "mean" not in meta or "std" not in meta:
        return None
    data_mean, data_std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    own_mean, own_std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
    if torch.allclose(data_mean, own_mean) and torch.allclose(data_std, own_std):
        return None
    return data_std / own_std, (data_mean - own_mean) / own_std


def prepare_teacher(teacher: nn.Module, cfg: TeacherConfig, channels_last: bool,
                    image_size: int) -> tuple[nn.Module, int]:
    """The frozen teacher ready for inference as ``cfg`` asks, and how many BatchNorms were folded."""
    network = teacher.eval().requires_grad_(False)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(memory_format=memory)
    folded = 0
    if cfg.fold_bn:
        device = next(network.parameters(), torch.empty(0)).device
        # Its own generator: preparing the teacher must not move the run's global random stream.
        example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        network, folded = fold_batchnorm(network, example.to(device).contiguous(memory_format=memory))
    if cfg.compile:
        compile_taps(network)
    return network, folded


def _clone(value: Tensor | tuple[Tensor, ...] | None) -> Any:
    if isinstance(value, tuple):
        return tuple(t.clone() for t in value)
    return value.clone() if value is not None else None


class _Passes(nn.Module):
    """What DDP wraps: the whole method, so one wrapper covers every trainable parameter it owns."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, taps: Taps, fn: Callable[..., Any], batch: Batch, *args: Any) -> Any:
        outputs = {name: forward_taps(net, batch.images, taps) for name, net in self.method.networks.items()}
        return fn(batch, outputs, *args)


class Engine:
    """The step seams of one method in one run (see the module docstring); owns optimisers and schedulers."""

    def __init__(self, method: Method, teacher: nn.Module | None, recipe: Recipe, epochs: int,
                 dist: DistEnv | None = None, cache: CachedTeacher | None = None,
                 input_norm: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
        device = method.ctx.device
        self.method = method
        self.precision = resolve_precision(recipe.train.precision, device)
        if device.type == "cuda":
            # Fixed input shapes: pick the fastest kernels once. (Process-wide; CUDA results are not promised
            # bit-reproducible anyway: only CPU runs are.)
            torch.backends.cudnn.benchmark = True
        self.teacher_seam = None
        if teacher is not None and method.teacher_taps is not None:
            teacher_cfg = recipe.teacher or TeacherConfig()
            self.teacher_seam = TeacherSeam(teacher, method.teacher_taps,
                                            resolve_precision(teacher_cfg.precision, device), teacher_cfg,
                                            recipe.train.channels_last, method.ctx.image_size, cache,
                                            teacher_normalisation(teacher, *input_norm) if input_norm else None)
        if recipe.train.compile:
            for network in method.networks.values():
                compile_taps(network)
        self.passes = wrap(_Passes(method), dist or DistEnv(),
                           find_unused_parameters=not method.every_pass_uses_all_parameters)
        self.optimizers, self.schedulers = build_optimizers(method.param_groups(), recipe.optim, recipe.schedule,
                                                            epochs, (dist or DistEnv()).world)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    # -- the Step seams ---------------------------------------------------------------------------
    def teacher(self, batch: Batch) -> Features:
        if self.teacher_seam is None:
            raise RuntimeError(f"method '{self.method.name}' declares no teacher_taps but asked for the teacher")
        return self.teacher_seam(batch)

    def forward(self, taps: Taps, fn: Callable[..., Any], batch: Batch, *args: Any) -> Any:
        with autocast(batch.images.device, self.precision):
            return self.passes(taps, fn, batch, *args)

    def update(self, loss: Tensor, *groups: str) -> None:
        optimizers = [self.optimizers[g] for g in groups]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    # -- driving the method -----------------------------------------------------------------------
    def train_step(self, batch: Batch, info: StepInfo) -> StepOutput:
        return self.method.train_step(batch, self, info)

    def step_terms(self, batch: Batch, info: StepInfo) -> tuple[Tensor, dict[str, Tensor]]:
        """The logits and loss terms one step would minimise, without an update (tests, benchmarks)."""
        return self.method.step_terms(batch, self, info)

    def end_epoch(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()
