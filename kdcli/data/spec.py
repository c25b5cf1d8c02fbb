"""What the engine asks for (:class:`DataSpec`) and what it gets back (:class:`DataBundle`)."""

from __future__ import annotations

from dataclasses import dataclass

from kdcli.data.folder import FolderSplit
from kdcli.data.splits import TensorSplit

Split = TensorSplit | FolderSplit


@dataclass(frozen=True)
class DataSpec:
    """Dataset choice, split and augmentation settings (mirrors the recipe's ``data`` section).

    ``root`` is the torchvision root for CIFAR and, for ``imagefolder``, a tree with ``train/`` and ``val/``
    (or ``test/``) class folders. ``val_fraction`` carves a stratified, ``data_seed``-seeded validation split
    out of train; test is never touched. ``crop_padding`` is the zero padding of the random crop for in-memory
    datasets (0 disables the crop); for ``imagefolder`` any value > 0 enables RandomResizedCrop instead.
    ``num_classes``/``train_size``/``test_size`` apply to ``synthetic`` only, ``image_size``/``num_workers``
    to ``imagefolder`` only (CIFAR and synthetic are 32x32).
    """

    dataset: str
    root: str = "~/.cache/kdcli/data"
    download: bool = False
    val_fraction: float = 0.0
    image_size: int = 32
    crop_padding: int = 4
    hflip: bool = True
    num_classes: int = 20
    train_size: int = 10000
    test_size: int = 2000
    data_seed: int = 0
    num_workers: int = 2


@dataclass
class DataBundle:
    """The splits of one dataset plus what a model needs to consume it (class count, normalisation, size)."""

    train: Split
    val: Split | None
    test: Split
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    class_names: list[str]
