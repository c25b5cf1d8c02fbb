"""The CIFAR KD benchmark zoo (RepDistiller / mdistiller / TTM ``model_dict``), registered in timm.

Importing this module registers one timm entrypoint per zoo name, so ``timm.create_model('resnet8x4',
num_classes=100)`` and ``timm.list_models(module='cifar_zoo')`` work. Each entrypoint takes
``pretrained=False, num_classes=100``; there are no hub weights (load published ``.pth`` teachers with
``kdcli.load_model``).

Name clash: timm ships ImageNet VGGs without BN called ``vgg11``, ``vgg13``, ``vgg16`` and ``vgg19``.
The zoo's names are the benchmark's, so registering them replaces those four timm entries (timm's
``vgg*_bn`` and every other timm model stay available); timm's overwrite warning is silenced for exactly
these four names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

from timm.models import register_model

from kdcli.errors import UserError
from kdcli.models.base import ZooNet
from kdcli.models.mobilenetv2 import CifarMobileNetV2
from kdcli.models.resnet import CifarResNet
from kdcli.models.resnet50 import BottleneckResNet
from kdcli.models.shufflenetv1 import ShuffleNetV1
from kdcli.models.shufflenetv2 import ShuffleNetV2
from kdcli.models.vgg import VGG, VGG_CONFIGS
from kdcli.models.wrn import WideResNet

# Arguments timm's create_model always passes to an entrypoint; they carry no information for the zoo.
_TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_SHADOWED_TIMM_NAMES = ("vgg11", "vgg13", "vgg16", "vgg19")

_PLAIN, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)


@dataclass(frozen=True)
class ZooSpec:
    """How to build one zoo model: ``cls(*args, num_classes=...)``, and a family label for listings."""

    cls: type[ZooNet]
    args: tuple[Any, ...]
    family: str


ZOO_SPECS: dict[str, ZooSpec] = {
    **{f"resnet{d}": ZooSpec(CifarResNet, (d, _PLAIN), "CIFAR ResNet") for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": ZooSpec(CifarResNet, (8, _X4), "CIFAR ResNet"),
    "resnet32x4": ZooSpec(CifarResNet, (32, _X4), "CIFAR ResNet"),
    **{f"wrn_{d}_{k}": ZooSpec(WideResNet, (d, k), "Wide ResNet") for d in (16, 40) for k in (1, 2)},
    **{name: ZooSpec(VGG, (cfg,), "VGG-BN") for name, cfg in VGG_CONFIGS.items()},
    "MobileNetV2": ZooSpec(CifarMobileNetV2, (6, 0.5), "MobileNetV2 (x0.5)"),
    "ShuffleV1": ZooSpec(ShuffleNetV1, (), "ShuffleNetV1"),
    "ShuffleV2": ZooSpec(ShuffleNetV2, (), "ShuffleNetV2"),
    "ResNet50": ZooSpec(BottleneckResNet, (), "ResNet (bottleneck)"),
}

# timm reads a module-level ``default_cfgs`` when registering, so timm.models.get_pretrained_cfg(name)
# reports CIFAR input size, normalisation and layer names (and no weights: url/hub stay empty).
default_cfgs: dict[str, dict[str, Any]] = {
    name: {**zoo.cls.data_cfg(), "num_classes": 100} for name, zoo in ZOO_SPECS.items()
}


def build_zoo_model(name: str, pretrained: bool = False, num_classes: int = 100, **kwargs: Any) -> ZooNet:
    """Build zoo model ``name`` with a fresh random initialisation."""
    if pretrained:
        raise UserError(f"'{name}' has no hub weights; load a checkpoint with kdcli.load_model(path, arch='{name}')")
    unsupported = sorted(k for k in kwargs if k not in _TIMM_PLUMBING)
    if unsupported:
        raise UserError(f"zoo model '{name}' accepts only num_classes, not {', '.join(unsupported)}")
    zoo = ZOO_SPECS[name]
    model = zoo.cls(*zoo.args, num_classes=num_classes)
    model.pretrained_cfg["architecture"] = name
    return model


def _entrypoint(name: str) -> Callable[..., ZooNet]:
    """A timm entrypoint named ``name``: timm registers functions under their ``__name__``."""

    def entrypoint(pretrained: bool = False, num_classes: int = 100, **kwargs: Any) -> ZooNet:
        return build_zoo_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"CIFAR zoo {ZOO_SPECS[name].family} '{name}' (no pretrained weights)."
    return entrypoint


def _register_all() -> None:
    with warnings.catch_warnings():
        for shadowed in _SHADOWED_TIMM_NAMES:
            warnings.filterwarnings("ignore", message=f"Overwriting {shadowed} in registry", category=UserWarning)
        for name in ZOO_SPECS:
            # register_model lists the name in this module's __all__, so it must also be an attribute.
            globals()[name] = register_model(_entrypoint(name))


_register_all()
