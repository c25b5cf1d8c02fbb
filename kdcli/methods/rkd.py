"""Relational KD (Park et al., CVPR 2019) on the pooled features.

    L_rkd = w_d · huber(ψ_D(S) − ψ_D(T)) + w_a · huber(ψ_A(S) − ψ_A(T))      (:func:`kdcli.losses.rkd`)

RepDistiller's CIFAR setting: distance weight 25, angle weight 50, the term itself at weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdcli import losses
from kdcli.methods.base import Batch, FeatureTerm, MethodParams, StepInfo, register_term
from kdcli.methods.logit import standalone
from kdcli.models import Features


@dataclass
class RKDParams(MethodParams):
    """distance_weight, angle_weight: w_d and w_a inside the term."""

    distance_weight: float = 25.0
    angle_weight: float = 50.0


@register_term
class RKDTerm(FeatureTerm):
    """Park et al. 2019: match the distances and angles within the batch of pooled features."""

    name = "rkd"
    summary = "relational KD (25*distance + 50*angle) on the pooled features"
    Params = RKDParams
    default_weight = 1.0
    reads = "pre_logits"

    def forward(self, student: Features, teacher: Features, batch: Batch, info: StepInfo) -> Tensor:
        return losses.rkd(student.pre_logits, teacher.pre_logits, self.params.distance_weight, self.params.angle_weight)


RKD = standalone(RKDTerm)
