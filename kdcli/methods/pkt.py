"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) on the pooled features.

    L_pkt = mean P · log((P + ε) / (Q + ε))      (:func:`kdcli.losses.pkt`)

P and Q are the teacher's and the student's batch similarity distributions. RepDistiller's CIFAR setting:
weight 30000.
"""

from __future__ import annotations

from torch import Tensor

from kdcli import losses
from kdcli.methods.base import Batch, FeatureTerm, StepInfo, register_term
from kdcli.methods.logit import standalone
from kdcli.models import Features


@register_term
class PKTTerm(FeatureTerm):
    """Passalis & Tefas 2018: match the batch's cosine-similarity distributions of the pooled features."""

    name = "pkt"
    summary = "probabilistic knowledge transfer on the pooled features"
    default_weight = 30000.0
    reads = "pre_logits"

    def forward(self, student: Features, teacher: Features, batch: Batch, info: StepInfo) -> Tensor:
        return losses.pkt(student.pre_logits, teacher.pre_logits)


PKT = standalone(PKTTerm)
