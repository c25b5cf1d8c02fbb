"""The timm-style interface shared by every CIFAR zoo network, and the zoo's weight initialisers.

Each zoo network splits its forward pass the way timm models do:

* a stem, then ``len(feature_info)`` stages; ``feature_info[i]`` gives stage i's output channels
  (``num_chs``), its stride relative to the input (``reduction``) and its module (``module``);
* ``forward_features(x)`` runs the stem and every stage and returns the last stage's map, (B, C, H, W):
  exactly the tensor the original RepDistiller network feeds to its global average pool, with the
  activation it applies before pooling. The last stage therefore includes whatever runs between the
  last block group and the pool (WRN's final BN-ReLU, the 1x1 head convs of MobileNetV2/ShuffleV2);
* ``forward_intermediates(x, indices)`` returns the maps of the stages ``indices`` from the same pass
  (timm's signature and semantics); the last stage's map equals ``forward_features(x)``;
* ``forward_head(x, pre_logits)`` global-average-pools and flattens it, giving the penultimate feature
  (B, D) (RepDistiller's ``feat[-1]``), and applies the final Linear unless ``pre_logits``;
* ``forward(x) = forward_head(forward_features(x))``.

The head is always pooling + one Linear, so ``feature_channels == num_features`` for the whole zoo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from kdcli.data.registry import DATASETS
from kdcli.errors import UserError


@dataclass(frozen=True)
class Stage:
    """One stage of a zoo network: the modules it runs in order, its output channels and stride."""

    modules: tuple[str, ...]
    channels: int
    reduction: int


def linear_or_identity(in_features: int, num_classes: int) -> nn.Module:
    """The classifier; timm's convention is that ``num_classes=0`` means "no classifier"."""
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


class ZooNet(nn.Module):
    """Base class of the CIFAR zoo: timm's forward split, classifier access and data config.

    Subclasses set ``first_conv`` and ``classifier_path`` (dotted state_dict prefixes, as in timm's
    pretrained cfgs), build their layers, call ``init_head`` and define ``forward_features``.
    """

    first_conv: str = "conv1"
    stages: tuple[Stage, ...] = ()  # set per instance by init_stages
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
            "mean": DATASETS["cifar100"].mean,
            "std": DATASETS["cifar100"].std,
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

    def init_stages(self, stages: list[Stage]) -> None:
        """Declare the stages after the stem (timm's ``feature_info``: one dict per stage)."""
        self.stages = tuple(stages)
        self.feature_info = [{"num_chs": s.channels, "reduction": s.reduction, "module": s.modules[0]}
                             for s in stages]

    def forward_stem(self, x: Tensor) -> Tensor:
        """Everything before the first stage; subclasses with a stem override it."""
        return x

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        """Stage ``index``: its modules in order; subclasses override it for functional ops in between."""
        for name in self.stages[index].modules:
            x = self.get_submodule(name)(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.forward_stem(x)
        for index in range(len(self.stages)):
            x = self.forward_stage(index, x)
        return x

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: the maps of stages ``indices`` (an int n: the last n; None: all).

        Returns ``(forward_features(x), maps)``, or only ``maps`` with ``intermediates_only``. With
        ``stop_early`` (or ``intermediates_only``) the stages after the last one asked for are skipped.
        ``norm`` is accepted for timm compatibility; the zoo has no separate final norm (it lives in the
        last stage).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"the CIFAR zoo returns NCHW maps, not {output_fmt}")
        take, last = feature_take_indices(len(self.stages), indices)
        maps = []
        x = self.forward_stem(x)
        for index in range(last + 1 if stop_early or intermediates_only else len(self.stages)):
            x = self.forward_stage(index, x)
            if index in take:
                maps.append(x)
        return maps if intermediates_only else (x, maps)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the classifier with ``prune_head``), as timm does."""
        take, last = feature_take_indices(len(self.stages), indices)
        for stage in self.stages[last + 1:]:
            for name in stage.modules:
                parent, _, leaf = name.rpartition(".")
                setattr(self.get_submodule(parent), leaf, nn.Identity())
        self.init_stages(list(self.stages[:last + 1]))
        self.num_features = self.feature_channels = self.stages[-1].channels
        if prune_head:
            self.reset_classifier(0)
        return take

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


__all__ = ["Stage", "ZooNet", "channel_shuffle", "conv_bn", "init_weights",
           "linear_or_identity"]
