"""ResNet50 for CIFAR (RepDistiller's resnetv2 ``ResNet50``): bottleneck blocks [3, 4, 6, 3], 3x3 stem, no max-pool.

Stem 3x3 conv (3 -> 64, stride 1) -> BN -> ReLU at 32x32; stages of widths 64/128/256/512 (expansion 4,
strides 1/2/2/2, the stride on the 3x3 conv); global average pool; Linear ``linear``.
state_dict: ``conv1``, ``bn1``, ``layer{1..4}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}``,
``layer*.0.shortcut.{0,1}``, ``linear``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.base import Stage, ZooNet, conv_bn, init_weights, linear_or_identity

EXPANSION = 4


class Bottleneck(nn.Module):
    """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)), 1x1 -> 3x3 (stride) -> 1x1."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        needs_projection = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Sequential(*conv_bn(in_ch, out_ch, 1, stride)) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class BottleneckResNet(ZooNet):
    """CIFAR ResNet with bottleneck stages of ``depths`` blocks (ResNet50: (3, 4, 6, 3))."""

    classifier_path = "linear"
    adaptive_pool = True

    def __init__(self, depths: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_ch = 64
        stages = []
        for width, depth, stride in zip((64, 128, 256, 512), depths, (1, 2, 2, 2)):
            blocks = [Bottleneck(in_ch if i == 0 else width * EXPANSION, width, stride if i == 0 else 1)
                      for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width * EXPANSION
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = linear_or_identity(in_ch, num_classes)
        self.init_head(in_ch, num_classes)
        self.init_stages([Stage((f"layer{i + 1}",), width * EXPANSION, 2 ** i)
                          for i, width in enumerate((64, 128, 256, 512))])
        init_weights(self, linear="default")

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))
