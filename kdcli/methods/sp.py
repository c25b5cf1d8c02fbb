"""Similarity-preserving KD (Tung & Mori, ICCV 2019) on the last feature map.

    L_sp = Σ (G(f_T) − G(f_S))² / B²,   G(f) = row-normalize(f fᵀ)      (:func:`kdcli.losses.similarity_preserving`)

f is the map each network pools (``forward_features``, RepDistiller's ``feat[-2]``). RepDistiller's and
mdistiller's CIFAR setting: weight 3000. Known difference: for MobileNetV2, ShuffleV2 and the WRNs that map
includes the head conv (or the final BN-ReLU), where RepDistiller's ``feat[-2]`` is the last block's output.
"""

from __future__ import annotations

from torch import Tensor

from kdcli import losses
from kdcli.methods.base import Batch, FeatureTerm, StepInfo, register_term
from kdcli.methods.logit import standalone
from kdcli.models import Features


@register_term
class SPTerm(FeatureTerm):
    """Tung & Mori 2019: match the batch's pairwise similarities of the last maps."""

    name = "sp"
    summary = "similarity-preserving loss on the last feature map"
    default_weight = 3000.0
    reads = "feature_map"

    def forward(self, student: Features, teacher: Features, batch: Batch, info: StepInfo) -> Tensor:
        return losses.similarity_preserving(student.feature_map, teacher.feature_map)


SP = standalone(SPTerm)
