"""Logit-level methods: plain cross-entropy training and Hinton KD.

Each is a set of named terms computed from the student's and the teacher's logits; the recipe's
``method.weights`` can switch on any further term the method knows (``optional_terms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdcli import losses
from kdcli.methods import register
from kdcli.methods.base import Batch, Method, MethodParams, StepInfo


@register
class CrossEntropy(Method):
    """Train a network alone on the labels (teachers, and the student-alone baseline)."""

    name = "ce"
    summary = "cross-entropy on the labels only (teacher training, student-alone baseline)"
    default_weights = {"ce": 1.0}
    needs_teacher = False

    def loss_terms(self, batch: Batch, info: StepInfo) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.main(batch.images)
        return logits, {"ce": F.cross_entropy(logits, batch.labels)}


@dataclass
class KDParams(MethodParams):
    temperature: float = 4.0


@register
class KD(Method):
    """Hinton et al. 2015: CE + T^2 * KL(teacher_T || student_T)."""

    name = "kd"
    summary = "Hinton KD: w_ce*CE + w_kd*T^2*KL(p_T^tau || p_S^tau)"
    Params = KDParams
    default_weights = {"ce": 0.1, "kd": 0.9}

    def loss_terms(self, batch: Batch, info: StepInfo) -> tuple[Tensor, dict[str, Tensor]]:
        teacher = self.teacher_logits(batch.images)
        logits = self.main(batch.images)
        return logits, {
            "ce": F.cross_entropy(logits, batch.labels),
            "kd": losses.kd(logits, teacher, self.params.temperature),
        }
