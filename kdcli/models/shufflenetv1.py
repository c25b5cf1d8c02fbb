"""ShuffleNetV1 for CIFAR (``ShuffleV1``: 3 groups, stage outputs 240/480/960, 4/8/4 blocks), RepDistiller layout.

Stem 1x1 conv (3 -> 24) -> BN -> ReLU at 32x32 (no max-pool); three stages whose first block has stride 2
and concatenates its branch with a 3x3 average pool of the input; global average pool; Linear ``linear``.
state_dict: ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}``, ``linear``.
PyTorch's default initialisation, as in the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.base import Stage, ZooNet, channel_shuffle, linear_or_identity

STEM_CHANNELS = 24


class ShuffleUnit(nn.Module):
    """relu(combine(bn3(gconv3(relu(bn2(dwconv2(shuffle(relu(bn1(gconv1(x)))))))), shortcut(x))).

    Stride 2: combine = concatenation with avg_pool3x3/2(x) (the branch makes ``out_ch - in_ch`` channels);
    stride 1: combine = addition of x. The first group conv is ungrouped when it reads the 24-channel stem.
    """

    def __init__(self, in_ch: int, branch_ch: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = branch_ch // 4
        self.stride = stride
        self.first_groups = 1 if in_ch == STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_ch, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_ch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_ch)

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(ZooNet):
    """ShuffleNetV1 with ``groups`` groups, stage output widths ``widths`` and ``depths`` units per stage."""

    classifier_path = "linear"

    def __init__(self, widths: tuple[int, int, int] = (240, 480, 960), depths: tuple[int, int, int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_widths = (STEM_CHANNELS,) + widths[:-1]
        self.layer1, self.layer2, self.layer3 = (
            _stage(in_ch, out_ch, depth, groups) for in_ch, out_ch, depth in zip(in_widths, widths, depths)
        )
        self.linear = linear_or_identity(widths[-1], num_classes)
        self.init_head(widths[-1], num_classes)
        self.init_stages([Stage((f"layer{i + 1}",), w, 2 ** (i + 1)) for i, w in enumerate(widths)])

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))


def _stage(in_ch: int, out_ch: int, depth: int, groups: int) -> nn.Sequential:
    first = ShuffleUnit(in_ch, out_ch - in_ch, stride=2, groups=groups)
    rest = [ShuffleUnit(out_ch, out_ch, stride=1, groups=groups) for _ in range(depth - 1)]
    return nn.Sequential(first, *rest)
