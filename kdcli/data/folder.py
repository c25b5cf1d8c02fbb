"""Datasets of encoded images (ImageFolder trees, WebDataset shards), decoded per sample on DataLoader workers.

Workers return uint8 (S, S, 3) tensors, PIL's own pixel layout (no transposing copy); a batch of them seen as
(B, 3, S, S) is already channels-last. Float conversion and normalisation happen batched on the device
(:mod:`kdcli.data.loader`), as for in-memory data, so a worker sends a quarter of the bytes a float pipeline
sends. Training views are RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3) plus a horizontal flip; evaluation
views resize the shorter side to ``S / crop_fraction`` and centre-crop ``S`` (0.875: the ImageNet convention,
256 -> 224). Every random draw comes from a generator seeded by (epoch seed, sample position), so augmentation
does not depend on worker count or scheduling.

Speed: the crop box is drawn before decoding, so a JPEG is decoded at the smallest power-of-two reduction
(libjpeg's DCT scaling, PIL's ``draft``) that still covers the box at ``S`` pixels, and the box is resampled to
``S x S`` in one antialiased resize. An ImageNet photo (~400 x 350) cropped to 224 decodes at 1/2 scale for most
boxes; ``kdcli bench data`` measures the result against torchvision's ImageFolder pipeline.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from kdcli.data.registry import IMAGENET_MEAN, IMAGENET_STD
from kdcli.data.seeding import generator
from kdcli.data.sources import FileSource, ShardSource, index_shards
from kdcli.devices import available_cpus
from kdcli.errors import UserError

CROP_SCALE = (0.08, 1.0)
CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
EVAL_FOLDERS = ("val", "test")
TINY_IMAGENET_ANNOTATIONS = "val_annotations.txt"
MAX_AUTO_WORKERS = 8

Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels of the full-size image


@dataclass
class FolderSplit:
    """A subset (``indices``) of a :class:`FileSource` or :class:`ShardSource` and how to view its images."""

    source: FileSource | ShardSource
    indices: Tensor
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    random_crop: bool = True
    hflip: bool = True
    crop_fraction: float = 0.875
    num_workers: int = 2
    labels: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(np.asarray(self.source.targets), dtype=torch.int64)[self.indices]

    def __len__(self) -> int:
        return self.indices.numel()

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        return self.load(position, augment_seed=None).permute(2, 0, 1), int(self.labels[position])

    def subset(self, index: Tensor) -> FolderSplit:
        return dataclasses.replace(self, indices=self.indices[index])

    def load(self, position: int, augment_seed: int | None) -> Tensor:
        """Sample ``position`` as uint8 (S, S, 3): the eval view, or the training view drawn from the seed."""
        index = int(self.indices[position])
        try:
            image = self.source.open(index)
            width, height = image.size
            flip = False
            if augment_seed is None or not self.random_crop:
                box = _centre_box(width, height, self.image_size, self.crop_fraction)
            if augment_seed is not None:
                gen = generator("folder-augment", augment_seed, position)
                if self.random_crop:
                    box = _random_resized_box(width, height, gen)
                flip = self.hflip and torch.rand((), generator=gen).item() < 0.5
            image = _resample(image, box, self.image_size)
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"cannot decode image {self.source.name(index)} ({error}); replace or remove it") from None
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(image))


class DecodedImages(Dataset):
    """What a DataLoader worker serves: ``(uint8 (S, S, 3) image, label)`` for a ``(position, augment seed or None)``
    key.

    The seed travels with each key, so persistent workers serve every epoch without being told which it is.
    """

    def __init__(self, split: FolderSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[Tensor, Tensor]:
        position, augment_seed = key
        return self.split.load(position, augment_seed), self.split.labels[position]


def _centre_box(width: int, height: int, size: int, crop_fraction: float) -> Box:
    """The evaluation view's box: what ``resize(shorter side -> size / crop_fraction)`` then ``centre_crop(size)``
    keeps, in full-size pixels."""
    side = min(width, height) * crop_fraction
    return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


def _random_resized_box(width: int, height: int, gen: torch.Generator) -> Box:
    """A RandomResizedCrop box: random area fraction and log-uniform aspect, 10 tries (torchvision's rule)."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=gen).item()

    for _ in range(10):
        target = width * height * uniform(*CROP_SCALE)
        ratio = math.exp(uniform(*CROP_LOG_RATIO))
        box_w, box_h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < box_w <= width and 0 < box_h <= height:
            top = int(torch.randint(height - box_h + 1, (), generator=gen))
            left = int(torch.randint(width - box_w + 1, (), generator=gen))
            return left, top, left + box_w, top + box_h
    # Fallback after 10 misses (very elongated images): the largest centred box with an allowed aspect.
    box_w = min(width, round(height * math.exp(CROP_LOG_RATIO[1])))
    box_h = min(height, round(width / math.exp(CROP_LOG_RATIO[0])))
    left, top = (width - box_w) // 2, (height - box_h) // 2
    return left, top, left + box_w, top + box_h


def _resample(image: Image.Image, box: Box, size: int) -> Image.Image:
    """``box`` of the (still encoded) ``image`` as an RGB ``size x size`` image: a JPEG is decoded at the smallest
    scale at which the box still spans ``size`` pixels, then one antialiased bilinear resize."""
    width, height = image.size
    left, top, right, bottom = box
    if image.format == "JPEG":
        image.draft("RGB", (math.ceil(width * size / (right - left)), math.ceil(height * size / (bottom - top))))
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    image = image.convert("RGB")
    return image.resize((size, size), Image.Resampling.BILINEAR,
                        box=(left * scale_x, top * scale_y, right * scale_x, bottom * scale_y))


def resolve_workers(value: int | str) -> int:
    """``data.num_workers``: a count, or ``auto``: the CPUs this process may use, shared by the ranks on this node,
    less one for the training loop, between 1 and 8."""
    if value != "auto":
        return int(value)
    cpus = available_cpus()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, cpus // local_ranks - 1))


@dataclass(frozen=True)
class _Named:
    """A source and its class names."""

    source: FileSource | ShardSource
    classes: list[str]


def _scan(path: Path) -> _Named:
    """An ImageFolder tree (``<class>/**/<image>``, any depth), or Tiny-ImageNet's ``val/`` with its annotations."""
    if (path / TINY_IMAGENET_ANNOTATIONS).is_file():
        return _tiny_imagenet_val(path)
    try:
        folder = ImageFolder(str(path), loader=lambda p: p)  # the scan only; kdcli decodes by itself
    except (FileNotFoundError, OSError) as error:  # no class folder, or class folders without images
        message = str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__
        raise UserError(f"cannot read image folder {path}: {message}; it needs one folder per class holding images "
                        f"({', '.join(IMG_EXTENSIONS[:4])}, ...)") from None
    paths = np.array([sample for sample, _ in folder.samples])
    return _Named(FileSource(paths, np.array(folder.targets, dtype=np.int64)), list(folder.classes))


def _tiny_imagenet_val(path: Path) -> _Named:
    """Tiny-ImageNet's validation split as shipped: ``images/<file>`` labelled by ``val_annotations.txt`` lines
    ``<file> <wnid> <box>``; classes are the sorted wnids, as ImageFolder orders ``train/``."""
    rows = [line.split("\t")[:2] for line in (path / TINY_IMAGENET_ANNOTATIONS).read_text().splitlines() if line]
    classes = sorted({wnid for _, wnid in rows})
    number = {wnid: i for i, wnid in enumerate(classes)}
    paths = np.array([str(path / "images" / name) for name, _ in rows])
    return _Named(FileSource(paths, np.array([number[w] for _, w in rows], dtype=np.int64)), classes)


def _shard_classes(root: Path, source: ShardSource) -> list[str]:
    """Class names of a shard set: ``classes.txt`` (one per line) beside ``train/``, else ``class_<i>``."""
    names_file = root / "classes.txt"
    if names_file.is_file():
        return [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    count = int(np.max(source.targets)) + 1
    return [f"class_{c:0{len(str(count - 1))}d}" for c in range(count)]


def load_decoded(dataset: str, root: str, *, image_size: int, crop_padding: int, hflip: bool, crop_fraction: float,
                 num_workers: int | str) -> tuple[FolderSplit, FolderSplit, list[str]]:
    """(train, test, class names) of a decoded dataset under ``root``: its ``train/`` and ``val/`` (or ``test/``)
    folders hold class folders (``imagefolder``) or ``*.tar`` shards (``webdataset``); a named dataset
    (``imagenet``, ``tiny-imagenet``) may be either."""
    base = Path(root).expanduser()
    train_dir = base / "train"
    eval_dir = next((base / name for name in EVAL_FOLDERS if (base / name).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        what = {"imagefolder": "one folder per class", "webdataset": "WebDataset .tar shards"}.get(
            dataset, "one folder per class or WebDataset .tar shards")
        raise UserError(f"{dataset} root {base} needs train/ and val/ (or test/) subfolders holding {what}; "
                        "set data.root to such a folder")
    shards = dataset == "webdataset" or dataset != "imagefolder" and any(train_dir.glob("*.tar"))
    if not shards:
        train, test = _scan(train_dir), _scan(eval_dir)
        if test.classes != train.classes:
            raise UserError(f"class folders differ between {train_dir} ({len(train.classes)} classes) and {eval_dir} "
                            f"({len(test.classes)} classes); both must contain the same class folders")
        classes = train.classes
    else:
        train, test = _Named(index_shards(train_dir), []), _Named(index_shards(eval_dir), [])
        classes = _shard_classes(base, train.source)
        highest = max(int(np.max(train.source.targets)), int(np.max(test.source.targets)))
        if highest >= len(classes):
            raise UserError(f"the shards under {base} hold class index {highest}, but classes.txt names "
                            f"{len(classes)} classes; list every class in {base / 'classes.txt'}")
    workers = resolve_workers(num_workers)

    def split(named: _Named) -> FolderSplit:
        return FolderSplit(named.source, torch.arange(len(named.source)), image_size, random_crop=crop_padding > 0,
                           hflip=hflip, crop_fraction=crop_fraction, num_workers=workers)

    return split(train), split(test), classes
