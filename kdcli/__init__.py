"""kdcli: knowledge distillation for image classification.

Stable Python API::

    import kdcli
    model = kdcli.load_model("runs/x/kd/checkpoints/student-best.safetensors")   # eval mode
    model = kdcli.load_model("resnet32x4_vanilla/ckpt_epoch_240.pth", arch="resnet32x4")
    loss = kdcli.losses.kd(student_logits, teacher_logits, temperature=4.0)

Importing kdcli registers the CIFAR model zoo in timm, so ``timm.create_model("resnet8x4")`` works.
"""

from importlib.metadata import PackageNotFoundError, version

from kdcli import losses, models  # noqa: F401  (models registers the zoo in timm)
from kdcli.engine.checkpoint import load_model

try:
    __version__ = version("kdcli")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0+source"

__all__ = ["load_model", "losses", "models", "__version__"]
