"""FitNet (Romero et al., ICLR 2015): a hint from the teacher's middle stage, through a learned regressor.

    L_fitnet = mean (r(f_S) − f_T)²

f_S, f_T are the stage maps named by ``student_stage`` / ``teacher_stage``; the regressor r (training only)
maps the student's channels and size onto the teacher's as RepDistiller's ``ConvReg`` does: a stride-2 3x3
conv when the student's map is twice the teacher's, a stride-2 4x4 transposed conv when it is half, else a
conv whose kernel absorbs the size difference; then BatchNorm and ReLU. RepDistiller's and mdistiller's
CIFAR setting: weight 100 next to CE (``-r 1 -a 0 -b 100``), the hint on ``feat[2]``, which is stage 1 of
the zoo's ResNets, WRNs, ShuffleNets, MobileNetV2 and ResNet50 and stage 2 of its VGGs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.errors import UserError
from kdcli.methods.base import Batch, FeatureTerm, MethodParams, StepInfo, register_term
from kdcli.methods.logit import standalone
from kdcli.models import Features


@dataclass
class FitNetParams(MethodParams):
    """student_stage, teacher_stage: the stages whose maps the hint joins (negative counts from the end)."""

    student_stage: int = 1
    teacher_stage: int = 1


def hint_regressor(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module:
    """RepDistiller's ConvReg from a (C, H, W) student map to a (C', H', W') teacher map."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = student, teacher
    if s_h == 2 * t_h:
        conv = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
    elif 2 * s_h == t_h:
        conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
    elif s_h >= t_h and s_w >= t_w:
        conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise UserError(f"fitnet: the student's {s_h}x{s_w} map cannot be regressed onto the teacher's {t_h}x{t_w} one; "
                        "pick stages of equal size with method.params.fitnet.student_stage / teacher_stage")
    return nn.Sequential(conv, nn.BatchNorm2d(t_c), nn.ReLU(inplace=True))


@register_term
class FitNetTerm(FeatureTerm):
    """Romero et al. 2015: MSE between the regressed student stage map and the teacher's."""

    name = "fitnet"
    summary = "FitNet hint: MSE(regressor(student stage map), teacher stage map)"
    Params = FitNetParams
    default_weight = 100.0

    @classmethod
    def stages(cls, params: FitNetParams, student_stages: int, teacher_stages: int):
        for which, index, count in (("student", params.student_stage, student_stages),
                                    ("teacher", params.teacher_stage, teacher_stages)):
            if not -count <= index < count:
                raise UserError(f"method.params.fitnet.{which}_stage={index}: the {which} has {count} stages "
                                f"(0..{count - 1}, or negative from the end)")
        return (params.student_stage % student_stages,), (params.teacher_stage % teacher_stages,)

    def __init__(self, params: FitNetParams, ctx, student, teacher) -> None:
        super().__init__(params, ctx, student, teacher)
        self.regressor = hint_regressor(student.stages[0], teacher.stages[0])

    def forward(self, student: Features, teacher: Features, batch: Batch, info: StepInfo) -> Tensor:
        return F.mse_loss(self.regressor(student.stages[0]), teacher.stages[0].detach())


FitNet = standalone(FitNetTerm)
