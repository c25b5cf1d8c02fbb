"""Isotonic data augmentation for KD (Cui & Yan, IJCAI 2021; ``docs/methods/ida.md``): kd-aug, ida (KD-i), ida-p (KD-p).

Every step mixes the batch in :meth:`MixedKD.view` (mixup or CutMix, drawn from the trainer's per-epoch CPU
generator, so a resumed run replays the same mixes); the engine runs teacher and student on the mixed images
``x~`` only, and the method combines named terms:

    ce      = L_CE^mix = mean_n [lam_n CE(z_S, y_i) + (1 - lam_n) CE(z_S, y_j)]
    kd      = tau^2 * mean_n KL(softmax(z_T / tau) || softmax(z_S / tau))
    ida     = tau^2 * mean_n KL(p~ || softmax(z_S / tau))       p~: the teacher's soft labels projected
                                                                onto the IDA order (exact isotonic regression)
    penalty = mean_n pen(softmax(z_S))                          KD-p's order penalty at temperature 1

    total   = w_ce * ce + w_kd * kd + w_ida * ida + w_penalty * penalty

with the paper's hyper-parameters as the default weights: ``w_ce = 1 - alpha = 0.05``,
``w_kd = alpha = 0.95``, ``w_ida = beta = 3`` (ida) and ``w_penalty = sigma = 2`` (ida-p), and
``tau = 4.5``. The three methods share this implementation and differ only in their default weights,
the terms a recipe may add (``optional_terms``) and their Params.

Switches of ida / ida-p:

* ``ir_space``: ``prob_tau`` (default) projects ``softmax(z_T / tau)``; ``logit`` projects the raw
  teacher logits and then takes ``softmax(. / tau)`` (the authors' code). Both remove every violation.
* ``mode``: ``add`` (default) adds the ``ida`` term; ``replace`` distils the ``kd`` term from ``p~``
  instead of the teacher's soft labels and computes no ``ida`` term (``weights.ida`` is then unused).
* ``form``: ``paper`` (default) or ``released_code``: the released code passes the student's softmax where
  KD-i expects its logits, so its ida term is ``KL(p~ || softmax(softmax(z_S) / tau))``, a double softmax
  (use it with ``ir_space: logit`` to reproduce the released code's KD-i).
* ``ratio``: each batch gets the order correction (``ida``, ``penalty``, the replaced ``kd`` target)
  with probability ``ratio`` and is plain KD-aug otherwise (the paper's Fig. 4). The Bernoulli draw is
  taken from the same generator only when ``0 < ratio < 1``, so at the default ``ratio = 1`` ida, ida-p
  and kd-aug see identical mixes for the same seed. Skipped terms are logged as 0.

The student's logits are those of the mixed images, so ``train_top1`` in ``history.csv`` counts agreement
with the un-permuted sample's label ``y_i``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcli import losses
from kdcli.augment import MixedBatch, mix
from kdcli.errors import UserError
from kdcli.isotonic import order_penalty, project
from kdcli.methods import register
from kdcli.methods.base import Batch, MethodParams, Outputs, StepInfo, main_output
from kdcli.methods.logit import LogitMethod
from kdcli.models import Features


def isotonic_target(teacher_logits: Tensor, primary: Tensor, secondary: Tensor, tau: float,
                    ir_space: Literal["prob_tau", "logit"] = "prob_tau") -> Tensor:
    """KD-i's corrected soft labels ``p~`` (float32, rows on the simplex), with no reversed known-order pair.

    ``prob_tau``: ``p~ = IR(softmax(z_T / tau))``; ``logit``: ``p~ = softmax(IR(z_T) / tau)``, where ``IR``
    is the exact projection :func:`kdcli.isotonic.project` onto ``p_a >= p_b >= p_other``.
    """
    logits = teacher_logits.detach().float()
    if ir_space == "logit":
        return F.softmax(project(logits, primary, secondary) / tau, dim=1)
    return project(F.softmax(logits / tau, dim=1), primary, secondary)


def _check(condition: bool, key: str, requirement: str, value: object) -> None:
    if not condition:
        raise UserError(f"'method.params.{key}' {requirement}, got {value!r}")


@dataclass
class MixParams(MethodParams):
    """tau: KD temperature (teacher and student).
    mix: mixup, cutmix, or none (no mixing: plain KD with these weights).
    mix_alpha: lam ~ Beta(mix_alpha, mix_alpha); 1 (uniform) as in the authors' code.
    per_sample: one lam (and CutMix box) per sample instead of one per batch (the authors' code draws one per
    batch).
    """

    tau: float = 4.5
    mix: Literal["mixup", "cutmix", "none"] = "mixup"
    mix_alpha: float = 1.0
    per_sample: bool = False

    def __post_init__(self) -> None:
        _check(self.tau > 0, "tau", "must be > 0", self.tau)
        _check(self.mix_alpha > 0, "mix_alpha", "must be > 0 (Beta(alpha, alpha))", self.mix_alpha)


@dataclass
class IsotonicParams(MixParams):
    """ratio: probability that a batch gets the order correction (the paper's Fig. 4).
    mode: add (an extra ida term) or replace (the kd term distils from the corrected labels).
    ir_space: prob_tau (project softmax(z_T/tau)) or logit (project z_T, the authors' code).
    form: paper (the ida term is KL(p~ || softmax(z_S/tau))) or released_code (the released code's KD-i: the
    student's softmax enters where its logits belong, KL(p~ || softmax(softmax(z_S)/tau)), a double softmax
    whose gradient is tens of times weaker; with ir_space=logit it reproduces the released code).
    """

    ratio: float = 1.0
    mode: Literal["add", "replace"] = "add"
    ir_space: Literal["prob_tau", "logit"] = "prob_tau"
    form: Literal["paper", "released_code"] = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 <= self.ratio <= 1.0, "ratio", "must be in [0, 1]", self.ratio)


class MixedKD(LogitMethod):
    """Shared step of kd-aug / ida / ida-p: mix in ``view``, then the active terms on the mixed batch."""

    def shows_loader_views(self) -> bool:
        return self.params.mix == "none"

    def view(self, batch: Batch, info: StepInfo) -> Batch:
        """The mixed batch: teacher and student both see ``x~``; ``batch.mix`` keeps the label provenance.
        Mixed images are no cached view (``views=None``): the teacher runs on them."""
        params = self.params
        mixed = mix(params.mix, batch.images, batch.labels, params.mix_alpha, info.generator, params.per_sample)
        views = batch.views if self.shows_loader_views() else None
        return dataclasses.replace(batch, images=mixed.images, mix=mixed, views=views)

    def loss_terms(self, batch: Batch, outputs: Outputs, teacher: Features | None, info: StepInfo) -> dict[str, Tensor]:
        logits, mixed = main_output(outputs).logits, batch.mix
        names = self.active_terms(info)
        corrected, target = self.order_correction(teacher.logits, mixed, names, info)
        return {name: self.term(name, logits, teacher.logits, mixed, corrected, target) for name in names}

    def order_correction(self, teacher: Tensor, mixed: MixedBatch, names: list[str],
                         info: StepInfo) -> tuple[bool, Tensor | None]:
        """Whether this batch gets the order correction, and ``p~`` if an active term needs it (kd-aug: never)."""
        return False, None

    def term(self, name: str, logits: Tensor, teacher: Tensor, mixed: MixedBatch, corrected: bool,
             target: Tensor | None) -> Tensor:
        if name == "ce":
            return mixed.mixed_ce(logits)
        return losses.kd(logits, teacher, self.params.tau)  # "kd", the only other term of kd-aug


@register
class KDAug(MixedKD):
    """KD-aug, the paper's baseline: (1 - alpha) * L_CE^mix + alpha * tau^2 * KL(p^tau || q^tau) on mixed samples."""

    name = "kd-aug"
    summary = "KD on mixup/CutMix samples: (1-alpha)*mixed CE + alpha*tau^2*KL (IDA baseline)"
    Params = MixParams
    default_weights = {"ce": 0.05, "kd": 0.95}


class IsotonicKD(MixedKD):
    """KD-aug plus the order correction of ida / ida-p (``ratio``, ``mode``, ``ir_space``)."""

    Params = IsotonicParams

    def active_terms(self, info: StepInfo) -> list[str]:
        names = super().active_terms(info)
        return [n for n in names if n != "ida"] if self.params.mode == "replace" else names

    def order_correction(self, teacher: Tensor, mixed: MixedBatch, names: list[str],
                         info: StepInfo) -> tuple[bool, Tensor | None]:
        params = self.params
        if params.ratio in (0.0, 1.0):  # no draw: the mixing stream stays that of kd-aug
            corrected = params.ratio == 1.0
        else:
            corrected = bool(torch.rand((), generator=info.generator) < params.ratio)
        replace = params.mode == "replace"
        if not corrected or not (("ida" in names and not replace) or ("kd" in names and replace)):
            return corrected, None
        return True, isotonic_target(teacher, mixed.primary, mixed.secondary, params.tau, params.ir_space)

    def term(self, name: str, logits: Tensor, teacher: Tensor, mixed: MixedBatch, corrected: bool,
             target: Tensor | None) -> Tensor:
        if name == "kd" and self.params.mode == "replace" and target is not None:
            return losses.soft_target_kd(logits, target, self.params.tau)
        if name not in ("ida", "penalty"):
            return super().term(name, logits, teacher, mixed, corrected, target)
        if not corrected:
            return torch.zeros((), device=logits.device)
        if name == "ida":
            student = F.softmax(logits.float(), dim=1) if self.params.form == "released_code" else logits
            return losses.soft_target_kd(student, target, self.params.tau)
        # KD-p on the student's distribution at temperature 1, as the released code (docs/methods/ida-p.md)
        return order_penalty(F.softmax(logits.float(), dim=1), mixed.primary, mixed.secondary)


@register
class IDA(IsotonicKD):
    """KD-i (exact IDA): KD-aug + beta * tau^2 * KL(IR(p^tau) || q^tau), beta = weights.ida."""

    name = "ida"
    summary = "KD-i: KD-aug + beta*tau^2*KL(isotonic(teacher_tau) || student_tau), beta = weights.ida"
    default_weights = {"ce": 0.05, "kd": 0.95, "ida": 3.0}
    optional_terms: ClassVar[tuple[str, ...]] = ("penalty",)


@register
class IDAP(IsotonicKD):
    """KD-p (IDA's linear-time approximation): KD-aug + sigma * pen(softmax(z_S)), sigma = weights.penalty."""

    name = "ida-p"
    summary = "KD-p: KD-aug + sigma*order penalty on the student's softmax, sigma = weights.penalty"
    default_weights = {"ce": 0.05, "kd": 0.95, "penalty": 2.0}
    optional_terms: ClassVar[tuple[str, ...]] = ("ida",)
