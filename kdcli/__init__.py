"""kdcli: knowledge distillation for image classification.

Stable Python API::

    import kdcli
    model = kdcli.load_model("runs/x/kd/checkpoints/student-best.safetensors")   # eval mode
    model = kdcli.load_model("resnet32x4_vanilla/ckpt_epoch_240.pth", arch="resnet32x4")
    loss = kdcli.losses.kd(student_logits, teacher_logits, temperature=4.0)

``kdcli.losses``, ``kdcli.models`` and ``kdcli.load_model`` are imported on first use, so ``import kdcli``
(and the command line's start-up) does not pay for torch. Importing ``kdcli.models`` registers the CIFAR
model zoo in timm, so ``timm.create_model("resnet8x4")`` works after it.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("kdcli")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0+source"

__all__ = ["load_model", "losses", "models", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("losses", "models"):
        return import_module(f"kdcli.{name}")
    if name == "load_model":
        return import_module("kdcli.engine.checkpoint").load_model
    raise AttributeError(f"module 'kdcli' has no attribute {name!r}")
