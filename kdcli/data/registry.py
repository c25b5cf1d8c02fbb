"""The dataset registry: title, class count and normalisation statistics of each named dataset.

One table, read by the data layer (normalisation of CIFAR batches), the model zoo (timm's pretrained cfg)
and the engine (``--smoke`` data with the real class count). Statistics are per channel on the [0, 1]
scale; CIFAR's are the RepDistiller/mdistiller values, with which the published teachers were trained.
``synthetic`` takes its class count from the recipe and its statistics from the training images;
``imagefolder`` and ``webdataset`` take their class count from the folder tree or the shards; their entries
carry ``None`` there.
"""

from __future__ import annotations

from dataclasses import dataclass

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class DatasetInfo:
    title: str
    num_classes: int | None  # None: from the recipe (synthetic), the folder tree or the shards
    mean: Triple | None  # None: computed from the training images
    std: Triple | None
    train_images: int | None = None  # None: from the recipe (synthetic), the folder tree or the shards
    decoded: bool = False  # encoded files decoded by DataLoader workers (kdcli.data.folder), not held in memory


IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)

DATASETS: dict[str, DatasetInfo] = {
    "synthetic": DatasetInfo("built-in synthetic", None, None, None),
    "cifar10": DatasetInfo("CIFAR-10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 50_000),
    "cifar100": DatasetInfo("CIFAR-100", 100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 50_000),
    # STL-10's images are ImageNet photos: ImageNet's statistics (a probe normalises as its student was trained).
    "stl10": DatasetInfo("STL-10", 10, IMAGENET_MEAN, IMAGENET_STD, 5_000),
    "imagefolder": DatasetInfo("ImageFolder", None, IMAGENET_MEAN, IMAGENET_STD, decoded=True),
    "webdataset": DatasetInfo("WebDataset shards", None, IMAGENET_MEAN, IMAGENET_STD, decoded=True),
    # Named decoded datasets: a class folder tree or shards (found by themselves); the class count here is what
    # --smoke and --dry-run assume, a real run takes it from the files.
    "imagenet": DatasetInfo("ImageNet-1k", 1000, IMAGENET_MEAN, IMAGENET_STD, 1_281_167, decoded=True),
    "tiny-imagenet": DatasetInfo("Tiny-ImageNet", 200, IMAGENET_MEAN, IMAGENET_STD, 100_000, decoded=True),
}
