"""VGG-BN for CIFAR without hidden FC layers (vgg8, vgg11, vgg13, vgg16, vgg19) in the RepDistiller layout.

Five blocks of 3x3 conv (with bias) -> BN -> ReLU; each block's container omits its final ReLU, which
``forward_features`` applies. 2x2 max-pools follow blocks 0, 1, 2 (and block 3 only for 64x64 inputs,
the original's Tiny-ImageNet rule), so CIFAR sizes are 32, 16, 8, 4, 4. ``feature_info``: the five blocks'
outputs after their ReLU (before the pool), RepDistiller's ``feat[0..4]``. Head: global average pool ->
Linear ``classifier``. state_dict: ``block{0..4}.{3j}`` (conv j), ``block*.{3j+1}`` (its BN), ``classifier``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.models.base import Stage, ZooNet, init_weights, linear_or_identity

# Conv widths per block.
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _block(in_ch: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_ch = width
    return nn.Sequential(*layers[:-1])  # the block's last ReLU runs in forward_features


class VGG(ZooNet):
    """VGG-BN with the five conv blocks given by ``config`` (see ``VGG_CONFIGS``)."""

    first_conv = "block0.0"
    classifier_path = "classifier"
    adaptive_pool = True

    def __init__(self, config: tuple[tuple[int, ...], ...], num_classes: int = 100) -> None:
        super().__init__()
        in_widths = (3,) + tuple(widths[-1] for widths in config[:-1])
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _block(in_ch, widths) for in_ch, widths in zip(in_widths, config)
        )
        self.classifier = linear_or_identity(config[-1][-1], num_classes)
        self.init_head(config[-1][-1], num_classes)
        self.init_stages([Stage((f"block{i}",), widths[-1], reduction)
                          for i, (widths, reduction) in enumerate(zip(config, (1, 2, 4, 8, 8)))])
        init_weights(self, linear="normal")

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        """Block ``index`` and its ReLU; a 2x2 max-pool precedes blocks 1-3, and block 4 only for 64x64
        inputs (its input is then 8x8), as in the original; the maps are taken before the pool."""
        if index in (1, 2, 3) or (index == 4 and x.shape[-2] == 8):
            x = F.max_pool2d(x, 2)
        return F.relu(self.get_submodule(f"block{index}")(x))
