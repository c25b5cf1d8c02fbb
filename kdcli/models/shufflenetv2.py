"""ShuffleNetV2 for CIFAR (``ShuffleV2``, net size 1: stages 116/232/464 wide, 3/7/3 basic units), RepDistiller layout.

Stem 1x1 conv (3 -> 24) -> BN -> ReLU at 32x32 (no max-pool); each stage is a down unit followed by basic
units; then 1x1 conv (464 -> 1024) -> BN -> ReLU, global average pool, Linear ``linear``.
state_dict: ``conv1``, ``bn1``, ``layer{1,2,3}.0.{conv,bn}{1..5}`` (down unit),
``layer*.{i>0}.{conv,bn}{1..3}`` (basic units), ``conv2``, ``bn2``, ``linear``.
PyTorch's default initialisation, as in the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.base import Stage, ZooNet, channel_shuffle, linear_or_identity

STEM_CHANNELS = 24


class BasicUnit(nn.Module):
    """Split channels in halves (a, b); shuffle(cat(a, relu(bn3(conv3(bn2(dw2(relu(bn1(conv1(b)))))))))), 2 groups."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        passthrough, branch = x.chunk(2, dim=1)
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(branch)))))
        branch = F.relu(self.bn3(self.conv3(branch)))
        return channel_shuffle(torch.cat([passthrough, branch], 1), 2)


class DownUnit(nn.Module):
    """Halve the resolution; each path makes out/2 channels; the concatenation is shuffled with 2 groups.

    left = relu(bn2(conv2(bn1(dw1(x))))), right = relu(bn5(conv5(bn4(dw4(relu(bn3(conv3(x)))))))).
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, 2, 1, groups=in_ch, bias=False)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv2 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(ZooNet):
    """ShuffleNetV2 with stage widths ``widths``, ``depths`` basic units per stage and a ``last``-wide 1x1 conv."""

    classifier_path = "linear"

    def __init__(self, widths: tuple[int, int, int] = (116, 232, 464), depths: tuple[int, int, int] = (3, 7, 3),
                 last: int = 1024, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_widths = (STEM_CHANNELS,) + widths[:-1]
        self.layer1, self.layer2, self.layer3 = (
            nn.Sequential(DownUnit(in_ch, out_ch), *[BasicUnit(out_ch) for _ in range(depth)])
            for in_ch, out_ch, depth in zip(in_widths, widths, depths)
        )
        self.conv2 = nn.Conv2d(widths[-1], last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.linear = linear_or_identity(last, num_classes)
        self.init_head(last, num_classes)
        self.init_stages([Stage(("layer1",), widths[0], 2), Stage(("layer2",), widths[1], 4),
                          Stage(("layer3", "conv2", "bn2"), last, 8)])

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        """The last stage ends with the 1x1 conv -> BN -> ReLU to ``last`` channels (the map that gets pooled)."""
        if index == 2:
            return F.relu(self.bn2(self.conv2(self.layer3(x))))
        return super().forward_stage(index, x)
