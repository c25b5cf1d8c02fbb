"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) in the RepDistiller layout.

Stem 3x3 conv-BN-ReLU, three stages of post-activation BasicBlocks (strides 1, 2, 2; 32 -> 32 -> 16 -> 8;
``feature_info``: layer1, layer2, layer3), global average pool, Linear ``fc``. state_dict: ``conv1``, ``bn1``,
``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``layer*.0.downsample.{0,1}``, ``fc``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.base import Stage, ZooNet, conv_bn, init_weights, linear_or_identity


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut projects when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        needs_projection = stride != 1 or in_ch != out_ch
        self.downsample = nn.Sequential(*conv_bn(in_ch, out_ch, 1, stride)) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(ZooNet):
    """ResNet-(6n+2) with stem width ``widths[0]`` and stage widths ``widths[1:]``."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = _stage(widths[0], widths[1], blocks_per_stage, stride=1)
        self.layer2 = _stage(widths[1], widths[2], blocks_per_stage, stride=2)
        self.layer3 = _stage(widths[2], widths[3], blocks_per_stage, stride=2)
        self.fc = linear_or_identity(widths[3], num_classes)
        self.init_head(widths[3], num_classes)
        self.init_stages([Stage(("layer1",), widths[1], 1), Stage(("layer2",), widths[2], 2),
                          Stage(("layer3",), widths[3], 4)])
        init_weights(self, linear="default")

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))


def _stage(in_ch: int, out_ch: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(num_blocks)]
    return nn.Sequential(*blocks)
