"""ImageFolder trees (any size): decoded and cropped per sample on CPU DataLoader workers.

Workers return uint8 (3, S, S) tensors; float conversion and normalisation happen batched on the device
(:mod:`kdcli.data.loader`), as for in-memory data. Training views are RandomResizedCrop (scale 0.08-1,
aspect 3/4-4/3) plus a horizontal flip; evaluation views resize the shorter side to ``S / 0.875`` and
centre-crop ``S`` (the ImageNet convention). Every random draw comes from a generator seeded by
(epoch seed, sample position), so augmentation does not depend on worker count or scheduling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from kdcli.data.registry import IMAGENET_MEAN, IMAGENET_STD
from kdcli.data.seeding import generator
from kdcli.errors import UserError

EVAL_CROP_FRACTION = 0.875
CROP_SCALE = (0.08, 1.0)
CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
EVAL_FOLDERS = ("val", "test")


@dataclass
class FolderSplit:
    """A subset (``indices``) of an ImageFolder tree and how to view its images."""

    folder: ImageFolder
    indices: Tensor
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    random_crop: bool = True
    hflip: bool = True
    num_workers: int = 2
    labels: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.folder.targets, dtype=torch.int64)[self.indices]

    def __len__(self) -> int:
        return self.indices.numel()

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        return self.load(position, augment_seed=None), int(self.labels[position])

    def subset(self, index: Tensor) -> FolderSplit:
        return FolderSplit(self.folder, self.indices[index], self.image_size, self.mean, self.std,
                           self.random_crop, self.hflip, self.num_workers)

    def load(self, position: int, augment_seed: int | None) -> Tensor:
        """Sample ``position`` as uint8 (3, S, S): the eval view, or the training view drawn from the seed."""
        path, _ = self.folder.samples[int(self.indices[position])]
        image = self.folder.loader(path)
        if augment_seed is None:
            image = _eval_view(image, self.image_size)
        else:
            image = self._train_view(image, generator("folder-augment", augment_seed, position))
        return TF.pil_to_tensor(image)

    def _train_view(self, image: Image.Image, gen: torch.Generator) -> Image.Image:
        if self.random_crop:
            top, left, height, width = _random_resized_box(image.width, image.height, gen)
            image = TF.resized_crop(image, top, left, height, width, [self.image_size, self.image_size])
        else:
            image = _eval_view(image, self.image_size)
        if self.hflip and torch.rand((), generator=gen).item() < 0.5:
            image = TF.hflip(image)
        return image


class EpochView(Dataset):
    """What a DataLoader worker sees for one epoch: ``(uint8 image, label)`` by split position."""

    def __init__(self, split: FolderSplit, augment_seed: int | None) -> None:
        self.split, self.augment_seed = split, augment_seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        return self.split.load(position, self.augment_seed), self.split.labels[position]


def _eval_view(image: Image.Image, size: int) -> Image.Image:
    image = TF.resize(image, round(size / EVAL_CROP_FRACTION))
    return TF.center_crop(image, [size, size])


def _random_resized_box(width: int, height: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop box: random area fraction and log-uniform aspect."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=gen).item()

    for _ in range(10):
        target = width * height * uniform(*CROP_SCALE)
        ratio = math.exp(uniform(*CROP_LOG_RATIO))
        box_w, box_h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < box_w <= width and 0 < box_h <= height:
            top = int(torch.randint(height - box_h + 1, (), generator=gen))
            left = int(torch.randint(width - box_w + 1, (), generator=gen))
            return top, left, box_h, box_w
    # Fallback after 10 misses (very elongated images): the largest centred box with an allowed aspect.
    box_w = min(width, round(height * math.exp(CROP_LOG_RATIO[1])))
    box_h = min(height, round(width / math.exp(CROP_LOG_RATIO[0])))
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def _open_folder(path: Path) -> ImageFolder:
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, OSError) as error:  # no class folder, or class folders without images
        message = str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__
        raise UserError(f"cannot read image folder {path}: {message}; it needs one folder per class holding images "
                        f"({', '.join(IMG_EXTENSIONS[:4])}, ...)") from None


def load_imagefolder(root: str, image_size: int, crop_padding: int, hflip: bool,
                     num_workers: int) -> tuple[FolderSplit, FolderSplit, list[str]]:
    """(train, test, class names) from ``root/train`` and ``root/val`` (or ``root/test``)."""
    base = Path(root).expanduser()
    train_dir = base / "train"
    eval_dir = next((base / name for name in EVAL_FOLDERS if (base / name).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        raise UserError(f"image folder {base} needs train/ and val/ (or test/) subfolders with one folder per class; "
                        "set data.root to such a tree")
    train, test = _open_folder(train_dir), _open_folder(eval_dir)
    if test.classes != train.classes:
        raise UserError(f"class folders differ between {train_dir} ({len(train.classes)} classes) and {eval_dir} "
                        f"({len(test.classes)} classes); both must contain the same class folders")

    def split(folder: ImageFolder) -> FolderSplit:
        return FolderSplit(folder, torch.arange(len(folder)), image_size, random_crop=crop_padding > 0,
                           hflip=hflip, num_workers=num_workers)

    return split(train), split(test), list(train.classes)
