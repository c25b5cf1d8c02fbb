"""Wide ResNets WRN-depth-k for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) in the RepDistiller layout.

Stem: one 3x3 conv (no BN/ReLU). Three groups of pre-activation blocks (strides 1, 2, 2), then
BN -> ReLU -> global average pool -> Linear ``fc``. ``feature_info``: block1, block2, block3 (whose map
includes the final BN -> ReLU, so it equals ``forward_features``). state_dict: ``conv1``,
``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2[,convShortcut]}``, ``bn1``, ``fc``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.base import Stage, ZooNet, init_weights, linear_or_identity


class PreActBlock(nn.Module):
    """a = relu(bn1(x)); out = conv2(relu(bn2(conv1(a)))) + (x if in == out else convShortcut(a)).

    When the width changes, the projection shortcut sees the *activated* input ``a``, as in the
    original code; there is no activation after the addition.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        # The name is part of the published state_dict.
        self.convShortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class BlockGroup(nn.Module):
    """A group of blocks; exists so that the state_dict reads ``block1.layer.0...``."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            PreActBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(num_blocks)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(ZooNet):
    """WRN-``depth``-``widen`` with widths [16, 16k, 32k, 64k] and (depth-4)/6 blocks per group (dropout 0)."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = BlockGroup(widths[0], widths[1], n, stride=1)
        self.block2 = BlockGroup(widths[1], widths[2], n, stride=2)
        self.block3 = BlockGroup(widths[2], widths[3], n, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = linear_or_identity(widths[3], num_classes)
        self.init_head(widths[3], num_classes)
        self.init_stages([Stage(("block1",), widths[1], 1), Stage(("block2",), widths[2], 2),
                          Stage(("block3", "bn1"), widths[3], 4)])
        init_weights(self, linear="zero_bias")

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        """The third group ends with the network's final BN-ReLU, so its map is the one that gets pooled."""
        if index == 2:
            return F.relu(self.bn1(self.block3(x)))
        return super().forward_stage(index, x)
