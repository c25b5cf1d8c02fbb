"""MobileNetV2 for CIFAR, RepDistiller's ``mobile_half`` (expansion 6, width 0.5), registered as ``MobileNetV2``.

Stem 3x3 conv stride 2 -> BN -> ReLU (16x16), seven stages of inverted residual blocks, 1x1 conv to 1280
-> BN -> ReLU (1280x2x2), global average pool, Linear ``classifier.0``. ``feature_info`` groups the blocks
as RepDistiller's ``feat[1..4]`` (16x16, 8x8, 4x4, 2x2), the last stage ending with the 1x1 conv to 1280.
Unlike the original MobileNetV2, every block has the 1x1 expansion conv, even with expansion 1. state_dict: ``conv1.{0,1}``,
``blocks.{stage}.{i}.conv.{0,1,3,4,6,7}``, ``conv2.{0,1}``, ``classifier.0``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdcli.models.base import Stage, ZooNet, conv_bn, init_weights, linear_or_identity

# (expansion or None for the model's T, base output channels, blocks, stride of the first block)
STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
    (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1),
)
LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU -> 3x3 depthwise (stride) -> BN -> ReLU -> 1x1 project -> BN (+ x if shapes match)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            *conv_bn(in_ch, hidden, 1), nn.ReLU(inplace=True),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU(inplace=True),
            *conv_bn(hidden, out_ch, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(ZooNet):
    """MobileNetV2 with expansion ``expansion`` and channel multiplier ``width`` (channels truncated by int())."""

    first_conv = "conv1.0"
    classifier_path = "classifier.0"

    def __init__(self, expansion: int = 6, width: float = 0.5, num_classes: int = 100) -> None:
        super().__init__()
        in_ch = int(32 * width)
        self.conv1 = nn.Sequential(*conv_bn(3, in_ch, 3, stride=2), nn.ReLU(inplace=True))
        stages = []
        for stage_expansion, base_channels, num_blocks, stride in STAGES:
            out_ch = int(base_channels * width)
            blocks = []
            for i in range(num_blocks):
                blocks.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, stage_expansion or expansion))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(stages)
        last = int(LAST_CHANNELS * width) if width > 1.0 else LAST_CHANNELS
        self.conv2 = nn.Sequential(*conv_bn(in_ch, last, 1), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(linear_or_identity(last, num_classes))
        self.init_head(last, num_classes)
        widths = [int(base * width) for _, base, _, _ in STAGES]
        self.init_stages([Stage(("blocks.0", "blocks.1"), widths[1], 2), Stage(("blocks.2",), widths[2], 4),
                          Stage(("blocks.3", "blocks.4"), widths[4], 8),
                          Stage(("blocks.5", "blocks.6", "conv2"), last, 16)])
        init_weights(self, linear="normal")

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)
