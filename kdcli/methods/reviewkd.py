"""ReviewKD (Chen, Liu, Zhao & Jia, CVPR 2021): the student's features, fused deep to shallow by attention-based
fusion (ABF) modules, are matched to the teacher's level by level with the hierarchical context loss.

    L_reviewkd = Σ_levels HCL(ABF-fused student feature, teacher feature)      (:func:`kdcli.losses.hierarchical_context`)

The levels are the last ``stage_maps`` stage maps of each network plus its pooled feature as a 1x1 map. Going
from the deepest level up, each ABF maps the student's feature through a 1x1 conv (to ``min(512, deepest
width)`` channels), fuses it with the residual from the level below by a per-pixel attention over the two,
resizes it to the teacher's size and outputs a 3x3 conv to the teacher's width; the channel counts and
sizes come from the two networks (the authors' per-architecture shapes, derived instead of written down).
The ABFs train with the student and are never exported. Weight 5 (the authors' CIFAR-100 value for most
pairs; 0.6 for resnet56 -> resnet20, 1 for resnet110 -> resnet32, 8 for ShuffleV2 students, in the grid
recipes), ramped up linearly over the first 20 epochs (mdistiller's min(epoch / 20, 1), epochs from 1).

Known differences: the authors compare with the teacher's *pre-activation* stage maps (mdistiller's
``preact_feats``); the zoo exposes post-activation maps, so both sides here are post-activation. The zoo's last
stage of MobileNetV2, ShuffleV2 and the WRNs ends with the network's head conv (or final BN-ReLU), so the
deepest reviewed map there is that output, where the authors take the last block's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli import losses
from kdcli.errors import UserError
from kdcli.methods.base import Batch, FeatureTerm, MethodParams, StepInfo, last_stages, linear_ramp, register_term
from kdcli.methods.logit import standalone
from kdcli.models import Features, Taps

MAX_MID_CHANNELS = 512


@dataclass
class ReviewKDParams(MethodParams):
    """stage_maps: at most how many of the last stage maps (plus the pooled feature) are reviewed, 4 as the authors
    do for VGG and MobileNetV2 students (3, all, for the CIFAR ResNets, WRNs and ShuffleNets); warmup_epochs: the
    ramp."""

    stage_maps: int = 4
    warmup_epochs: int = 20

    def __post_init__(self) -> None:
        if self.stage_maps < 1 or self.warmup_epochs < 0:
            raise UserError("method.params.reviewkd: stage_maps must be >= 1 and warmup_epochs >= 0")


class ABF(nn.Module):
    """Attention-based fusion of one level: ``(output, residual) = abf(x, residual from the level below)``."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: int) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, :1] + residual * attention[:, 1:]
        if x.shape[-1] != out_size:
            x = F.interpolate(x, (out_size, out_size), mode="nearest")
        return self.conv2(x), x


@register_term
class ReviewKDTerm(FeatureTerm):
    """Chen et al. 2021: review the student's features through attention-based fusion, level by level."""

    name = "reviewkd"
    summary = "knowledge review: ABF-fused student features vs the teacher's, hierarchical context loss"
    Params = ReviewKDParams
    default_weight = 5.0

    @classmethod
    def stages(cls, params: ReviewKDParams, student_stages: int, teacher_stages: int):
        return last_stages(params.stage_maps, student_stages, teacher_stages)

    @classmethod
    def taps(cls, params, student_stages, teacher_stages) -> tuple[Taps, Taps]:
        return (Taps(logits=False, pre_logits=True, stages=student_stages),
                Taps(logits=False, pre_logits=True, stages=teacher_stages))

    def __init__(self, params: ReviewKDParams, ctx, student, teacher) -> None:
        super().__init__(params, ctx, student, teacher)
        inputs = [shape[0] for shape in student.stages] + [student.pre_logits[0]]  # shallow to deep
        outputs = [shape[0] for shape in teacher.stages] + [teacher.pre_logits[0]]
        mid = min(MAX_MID_CHANNELS, inputs[-1])
        # deepest first: the deepest level has nothing below it to fuse with
        self.abfs = nn.ModuleList(ABF(i, mid, o, fuse=level > 0) for level, (i, o)
                                  in enumerate(zip(reversed(inputs), reversed(outputs))))
        self.out_sizes = [1] + [shape[-1] for shape in reversed(teacher.stages)]

    def ramp(self, info: StepInfo) -> float:
        return linear_ramp(info, self.params.warmup_epochs)

    def forward(self, student: Features, teacher: Features, batch: Batch, info: StepInfo) -> Tensor:
        levels = [*student.stages, student.pre_logits[:, :, None, None]][::-1]  # deepest first
        fused, residual = [], None
        for abf, feature, size in zip(self.abfs, levels, self.out_sizes):
            output, residual = abf(feature, residual, size)
            fused.append(output)
        targets = [*teacher.stages, teacher.pre_logits[:, :, None, None]][::-1]
        return losses.hierarchical_context(fused, [t.detach() for t in targets])


ReviewKD = standalone(ReviewKDTerm)
