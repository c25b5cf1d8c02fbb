"""Information-theoretic representation distillation (Miles, Lopez-Rodriguez & Mikolajczyk, BMVC 2022), as the
TTM authors run it for WTTM+ITRD (``distiller_zoo/itrd.py::ITLoss``), on the pooled features:

    L_itrd = λ_corr · L_corr(W f_S, f_T) + λ_mi · L_mi(f'_S, f_T)
    (:func:`kdcli.losses.itrd_correlation`, :func:`kdcli.losses.itrd_mutual_information`)

W is a trainable linear embedding to the teacher's width (training only); L_mi uses the embedded student
f'_S = W f_S only when the widths differ, the raw one otherwise. Defaults are the code's: λ_corr = 2,
λ_mi = 1, α = 1.5 (the TTM paper passes α = 1.01 for same-architecture pairs and λ_mi = 0 for three
cross-architecture pairs; the grid recipes carry those), weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from kdcli import losses
from kdcli.errors import UserError
from kdcli.methods.base import Batch, FeatureTerm, MethodParams, StepInfo, register_term
from kdcli.methods.logit import standalone
from kdcli.models import Features


@dataclass
class ITRDParams(MethodParams):
    """lambda_corr, lambda_mutual: weights of the correlation and mutual-information parts; alpha: the order α."""

    lambda_corr: float = 2.0
    lambda_mutual: float = 1.0
    alpha: float = 1.5

    def __post_init__(self) -> None:
        if not self.alpha > 0 or self.lambda_corr < 0 or self.lambda_mutual < 0:
            raise UserError("method.params.itrd: alpha must be > 0 and the lambdas >= 0")


@register_term
class ITRDTerm(FeatureTerm):
    """Miles et al. 2022: correlation and mutual-information terms between embedded student and teacher features."""

    name = "itrd"
    summary = "information-theoretic representation distillation (correlation + mutual information)"
    Params = ITRDParams
    default_weight = 1.0
    reads = "pre_logits"

    def __init__(self, params: ITRDParams, ctx, student, teacher) -> None:
        super().__init__(params, ctx, student, teacher)
        self.same_width = student.pre_logits == teacher.pre_logits
        self.embed = nn.Linear(student.pre_logits[0], teacher.pre_logits[0])

    def forward(self, student: Features, teacher: Features, batch: Batch, info: StepInfo) -> Tensor:
        params, target = self.params, teacher.pre_logits.detach()
        embedded = self.embed(student.pre_logits)
        correlation = losses.itrd_correlation(embedded, target, params.alpha)
        mutual = losses.itrd_mutual_information(student.pre_logits if self.same_width else embedded, target)
        return params.lambda_corr * correlation + params.lambda_mutual * mutual


ITRD = standalone(ITRDTerm)
