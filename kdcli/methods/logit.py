"""Logit-level methods: cross-entropy, Hinton KD, TTM, WTTM, DKD and DIST as one family.

Every method here trains one student from the student's and the teacher's logits with

    total = sum_i w_i(epoch) * term_i(student_logits, teacher_logits, labels)

where the terms come from one table, :data:`TERMS`. The methods differ only in their default
weights (``default_weights``), the further terms a recipe may switch on (``optional_terms``) and their
typed hyper-parameters (``Params``). A term's hyper-parameters are read from the method's Params by
fixed field names (``TERMS[name].params``): ``temperature`` for kd (and dkd), ``gamma`` for ttm and
wttm, ``alpha``/``beta``/``temperature`` for dkd, ``beta``/``gamma``/``tau`` for dist. So a WTTM recipe
with ``method.weights.kd: 0.5`` adds ``0.5 * kd`` computed at ``method.params.temperature``.

Only the terms with a non-zero weight are computed; the engine runs the teacher (its logits) unless the
method declares no teacher (``ce``). Each computed term is logged unweighted in ``history.csv`` under its
own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from kdcli import losses
from kdcli.errors import UserError
from kdcli.methods import register
from kdcli.methods.base import Batch, FeatureTerm, Method, MethodParams, Outputs, StepInfo, linear_ramp, main_output
from kdcli.models import Features

TermFn = Callable[[Tensor, Tensor | None, Tensor, MethodParams], Tensor]


@dataclass(frozen=True)
class Term:
    """One loss term: ``compute(student_logits, teacher_logits, labels, params)`` -> scalar."""

    compute: TermFn
    params: tuple[str, ...]  # the Params fields it reads


# The calls go through the ``losses`` module at run time (not bound here), so each term always uses
# the current kdcli.losses function.
TERMS: dict[str, Term] = {
    # CE = mean_b -log σ(s)_y
    "ce": Term(lambda s, t, y, p: F.cross_entropy(s, y), ()),
    # KD = T² · mean_b KL(σ(t/T) ‖ σ(s/T))
    "kd": Term(lambda s, t, y, p: losses.kd(s, t, p.temperature), ("temperature",)),
    # TTM = mean_b KL(p̂ ‖ σ(s)),  p̂ = σ(t)^γ / Σ_j σ(t)_j^γ
    "ttm": Term(lambda s, t, y, p: losses.ttm(s, t, p.gamma), ("gamma",)),
    # WTTM = mean_b U · KL(p̂ ‖ σ(s)),  U = Σ_j σ(t)_j^γ
    "wttm": Term(lambda s, t, y, p: losses.wttm(s, t, p.gamma), ("gamma",)),
    # DKD = α · TCKD + β · NCKD at temperature T
    "dkd": Term(lambda s, t, y, p: losses.dkd(s, t, y, p.alpha, p.beta, p.temperature),
                ("alpha", "beta", "temperature")),
    # DIST = τ² · (β · inter-class + γ · intra-class Pearson distance) of σ(s/τ), σ(t/τ)
    "dist": Term(lambda s, t, y, p: losses.dist(s, t, p.beta, p.gamma, p.tau), ("beta", "gamma", "tau")),
}


def _require_positive(params: MethodParams, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        if not value > 0:
            raise UserError(f"'method.params.{name}' must be > 0, got {value}")


class LogitMethod(Method):
    """Shared implementation: the student's and the teacher's logits, the weighted terms of :data:`TERMS`."""

    def active_terms(self, info: StepInfo) -> list[str]:
        """The logit terms with a non-zero weight at this step, in the order of ``self.weights`` (feature terms are
        the base class's)."""
        return [name for name in self.weights if name not in self.feature_terms and self.term_weight(name, info) != 0.0]

    def uses_teacher(self, info: StepInfo) -> bool:
        teacher_terms = [name for name in self.weights if name != "ce" and self.term_weight(name, info) != 0.0]
        return self.teacher_taps is not None and bool(teacher_terms)

    def loss_terms(self, batch: Batch, outputs: Outputs, teacher: Features | None, info: StepInfo) -> dict[str, Tensor]:
        logits = main_output(outputs).logits
        teacher_logits = teacher.logits if teacher is not None else None
        return {name: TERMS[name].compute(logits, teacher_logits, batch.labels, self.params)
                for name in self.active_terms(info)}


@register
class CrossEntropy(LogitMethod):
    """Train a network alone on the labels (teachers, and the student-alone baseline)."""

    name = "ce"
    summary = "cross-entropy on the labels only (teacher training, student-alone baseline)"
    default_weights = {"ce": 1.0}
    teacher_taps = None


@dataclass
class KDParams(MethodParams):
    """temperature: T of KD, applied to teacher and student."""

    temperature: float = 4.0

    def __post_init__(self) -> None:
        _require_positive(self, "temperature")


@register
class KD(LogitMethod):
    """Hinton et al. 2015, RepDistiller weights: 0.1 * CE + 0.9 * T² * KL(σ(t/T) ‖ σ(s/T))."""

    name = "kd"
    summary = "Hinton KD: CE + T^2*KL(teacher_T || student_T)"
    Params = KDParams
    default_weights = {"ce": 0.1, "kd": 0.9}


@dataclass
class TTMParams(MethodParams):
    """gamma: power γ = 1/T applied to the teacher's softmax (ttm, wttm).
    temperature: T of a kd term added with ``method.weights.kd``.

    The defaults are the paper's resnet110 -> resnet20 setting (γ 0.2 for both TTM and WTTM).
    """

    gamma: float = 0.2
    temperature: float = 4.0

    def __post_init__(self) -> None:
        _require_positive(self, "gamma", "temperature")


@register
class TTM(LogitMethod):
    """Transformed Teacher Matching (Zheng & Yang, ICLR 2024, eq. 2): CE + β · KL(p̂ ‖ σ(s)).

    The recipe's ``method.weights.ttm`` is the paper's β (default 8, resnet110 -> resnet20).
    """

    name = "ttm"
    summary = "TTM: CE + beta*KL(teacher^gamma || student), beta = weights.ttm"
    Params = TTMParams
    default_weights = {"ce": 1.0, "ttm": 8.0}
    optional_terms = ("kd", "wttm")


@register
class WTTM(LogitMethod):
    """Weighted TTM (Zheng & Yang, ICLR 2024, eq. 23): CE + β · mean_b U · KL(p̂ ‖ σ(s)).

    The recipe's ``method.weights.wttm`` is the paper's β (default 2, resnet110 -> resnet20).
    """

    name = "wttm"
    summary = "WTTM: CE + beta*U*KL(teacher^gamma || student), beta = weights.wttm"
    Params = TTMParams
    default_weights = {"ce": 1.0, "wttm": 2.0}
    optional_terms = ("kd", "ttm")


@dataclass
class DKDParams(MethodParams):
    """alpha, beta: weights of DKD's target (TCKD) and non-target (NCKD) parts.
    temperature: T of DKD (and of a kd term added with ``method.weights.kd``).
    warmup_epochs: the dkd weight grows linearly over these epochs (0: no warm-up).

    Defaults are DKD's CIFAR-100 setting (mdistiller): α 1, β 8, T 4, 20 warm-up epochs.
    """

    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup_epochs: int = 20

    def __post_init__(self) -> None:
        _require_positive(self, "temperature")
        if self.warmup_epochs < 0:
            raise UserError(f"'method.params.warmup_epochs' must be >= 0, got {self.warmup_epochs}")


@register
class DKD(LogitMethod):
    """Decoupled KD (Zhao et al., CVPR 2022): CE + min(1, epoch/warmup) * (α · TCKD + β · NCKD)."""

    name = "dkd"
    summary = "DKD: CE + ramp*(alpha*TCKD + beta*NCKD), ramp over warmup_epochs"
    Params = DKDParams
    default_weights = {"ce": 1.0, "dkd": 1.0}
    optional_terms = ("kd",)

    def term_weight(self, name: str, info: StepInfo) -> float:
        """The dkd weight times min(1, e / warmup_epochs) with e the 1-based epoch (DKD's convention:
        1/20 of the weight in the first epoch, the full weight from epoch 20 on)."""
        weight = super().term_weight(name, info)
        return weight * linear_ramp(info, self.params.warmup_epochs) if name == "dkd" else weight


@dataclass
class DISTParams(MethodParams):
    """beta, gamma: weights of DIST's inter-class and intra-class relation terms.
    tau: DIST's temperature. temperature: T of a kd term added with ``method.weights.kd``.

    Defaults are the DIST code's (β 1, γ 1, τ 4), as used by the TTM authors' code.
    """

    beta: float = 1.0
    gamma: float = 1.0
    tau: float = 4.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        _require_positive(self, "tau", "temperature")


@register
class DIST(LogitMethod):
    """DIST (Huang et al., NeurIPS 2022): CE + 2 · τ² · (β · inter + γ · intra) Pearson distances (the DIST
    authors' CIFAR weight 2, with β = γ = 1 and τ = 4)."""

    name = "dist"
    summary = "DIST: CE + 2*tau^2*(beta*inter + gamma*intra) relation losses"
    Params = DISTParams
    default_weights = {"ce": 1.0, "dist": 2.0}
    optional_terms = ("kd",)


def standalone(term: type[FeatureTerm]) -> type[LogitMethod]:
    """The method of a feature term on its own, as published: CE + weight · term (plus ``kd`` by weight, at
    ``method.params.temperature``). Other methods add the term by weight, e.g. wttm + crd."""
    method = type(term.__name__.removesuffix("Term"), (LogitMethod,), {
        "__doc__": f"CE + {term.default_weight:g} · {term.name} ({term.__doc__.splitlines()[0]})",
        "name": term.name, "summary": f"CE + {term.default_weight:g}*{term.summary}", "Params": KDParams,
        "default_weights": {"ce": 1.0, term.name: term.default_weight}, "optional_terms": ("kd",),
        "__module__": term.__module__})
    return register(method)
