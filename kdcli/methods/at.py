"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017) over the last stage maps of student and teacher.

    L_at = Σ_pairs mean (a(f_S) − a(f_T))²,   a(f) = normalize(mean_c f^p)      (:func:`kdcli.losses.attention_transfer`)

The last ``pairs`` stages of each network are paired in order (RepDistiller's ``feat[1:-1]``: every stage of
the zoo's ResNets, WRNs, ShuffleNets, MobileNetV2 and ResNet50, the last four of its VGGs); of a pair, the
larger map is pooled to the smaller. RepDistiller's and mdistiller's CIFAR setting: p = 2, weight 1000.

Known differences: stages are paired from the deepest (RepDistiller's ``zip`` pairs from the first), which
differs only when the two networks have different stage counts; the zoo's last stage of MobileNetV2,
ShuffleV2 and the WRNs ends with the head conv (or the final BN-ReLU), where RepDistiller's last map is the
last block's output.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdcli import losses
from kdcli.errors import UserError
from kdcli.methods.base import Batch, FeatureTerm, MethodParams, StepInfo, last_stages, register_term
from kdcli.methods.logit import standalone
from kdcli.models import Features


@dataclass
class ATParams(MethodParams):
    """p: the power of the activations; pairs: how many of the last stages are paired (at most the shorter network's)."""

    p: float = 2.0
    pairs: int = 4

    def __post_init__(self) -> None:
        if not self.p > 0 or self.pairs < 1:
            raise UserError(f"method.params.at: p must be > 0 and pairs >= 1, got p={self.p}, pairs={self.pairs}")


@register_term
class ATTerm(FeatureTerm):
    """Zagoruyko & Komodakis 2017: match the spatial attention of paired stage maps."""

    name = "at"
    summary = "attention transfer over the last stage maps (p = 2)"
    Params = ATParams
    default_weight = 1000.0

    @classmethod
    def stages(cls, params: ATParams, student_stages: int, teacher_stages: int):
        return last_stages(params.pairs, student_stages, teacher_stages)

    def forward(self, student: Features, teacher: Features, batch: Batch, info: StepInfo) -> Tensor:
        return losses.attention_transfer(student.stages, teacher.stages, self.params.p)


AT = standalone(ATTerm)
