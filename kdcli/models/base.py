"""The timm-style interface shared by every CIFAR zoo network, and the zoo's weight initialisers.

Each zoo network splits its forward pass the way timm models do:

* ``forward_features(x)`` returns the last feature map, (B, C, H, W): exactly the tensor the original
  RepDistiller network feeds to its global average pool, with the activation it applies before pooling;
* ``forward_head(x, pre_logits)`` global-average-pools and flattens it, giving the penultimate feature
  (B, D) (RepDistiller's ``feat[-1]``), and applies the final Linear unless ``pre_logits``;
* ``forward(x) = forward_head(forward_features(x))``.

The head is always pooling + one Linear, so ``feature_channels == num_features`` for the whole zoo.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.errors import UserError

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def linear_or_identity(in_features: int, num_classes: int) -> nn.Module:
    """The classifier; timm's convention is that ``num_classes=0`` means "no classifier"."""
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


class ZooNet(nn.Module):
    """Base class of the CIFAR zoo: timm's forward split, classifier access and data config.

    Subclasses set ``first_conv`` and ``classifier_path`` (dotted state_dict prefixes, as in timm's
    pretrained cfgs), build their layers, call ``init_head`` and define ``forward_features``.
    """

    first_conv: str = "conv1"
    classifier_path: str = "fc"
    # Pool as the original does, so published weights reproduce its outputs bit for bit: most originals
    # average with a kernel the size of the map, VGG and ResNet50 with an adaptive (1, 1) pool.
    adaptive_pool: bool = False

    @classmethod
    def data_cfg(cls) -> dict[str, Any]:
        """timm's pretrained-cfg fields for this architecture: CIFAR input and normalisation, layer names."""
        return {
            "input_size": (3, 32, 32),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "mean": CIFAR100_MEAN,
            "std": CIFAR100_STD,
            "first_conv": cls.first_conv,
            "classifier": cls.classifier_path,
        }

    def init_head(self, num_features: int, num_classes: int) -> None:
        """Record the feature sizes and the data config once the layers exist."""
        self.num_classes = num_classes
        self.num_features = num_features
        self.feature_channels = num_features  # forward_features returns the map that gets pooled
        self.pretrained_cfg = {**self.data_cfg(), "num_classes": num_classes}
        self.default_cfg = self.pretrained_cfg  # timm keeps both names for the same dict

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.adaptive_pool:
            pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        else:
            pooled = F.avg_pool2d(x, x.shape[-2:]).flatten(1)
        return pooled if pre_logits else self.get_classifier()(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_path)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the final Linear by a freshly initialised one with ``num_classes`` outputs (0: none)."""
        if global_pool not in (None, "avg"):
            raise UserError(f"the CIFAR zoo only pools with 'avg', not '{global_pool}'")
        like = next(self.parameters())
        head = linear_or_identity(self.num_features, num_classes).to(device=like.device, dtype=like.dtype)
        parent_path, _, leaf = self.classifier_path.rpartition(".")
        setattr(self.get_submodule(parent_path), leaf, head)
        self.num_classes = num_classes


def init_weights(model: nn.Module, linear: Literal["default", "zero_bias", "normal"]) -> None:
    """The zoo's He-normal initialisation.

    Conv weights ~ N(0, 2 / (k_h * k_w * C_out)) (identical to Kaiming-normal with fan_out), conv biases
    0; BatchNorm weight 1, bias 0. Linear layers keep PyTorch's default ("default"), get a zero bias
    ("zero_bias", the WRN scheme) or weight ~ N(0, 0.01) and zero bias ("normal", VGG/MobileNetV2).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """A bias-free 'same'-padded conv followed by BatchNorm, as a list to splice into a Sequential."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_ch)]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's shuffle: view channels as (groups, C/groups), transpose, flatten back."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "ZooNet", "channel_shuffle", "conv_bn", "init_weights",
           "linear_or_identity"]
