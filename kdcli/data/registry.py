"""The dataset registry: title, class count and normalisation statistics of each named dataset.

One table, read by the data layer (normalisation of CIFAR batches), the model zoo (timm's pretrained cfg)
and the engine (``--smoke`` data with the real class count). Statistics are per channel on the [0, 1]
scale; CIFAR's are the RepDistiller/mdistiller values, with which the published teachers were trained.
``synthetic`` and ``imagefolder`` take their class count from the recipe or the folder tree and their
statistics from the training images, so their entries carry ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class DatasetInfo:
    title: str
    num_classes: int | None  # None: from the recipe (synthetic) or the folder tree (imagefolder)
    mean: Triple | None  # None: computed from the training images
    std: Triple | None
    train_images: int | None = None  # None: from the recipe (synthetic) or the folder tree (imagefolder)


IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)

DATASETS: dict[str, DatasetInfo] = {
    "synthetic": DatasetInfo("built-in synthetic", None, None, None),
    "cifar10": DatasetInfo("CIFAR-10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 50_000),
    "cifar100": DatasetInfo("CIFAR-100", 100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 50_000),
    "imagefolder": DatasetInfo("ImageFolder", None, IMAGENET_MEAN, IMAGENET_STD),
}
