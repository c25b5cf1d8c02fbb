"""Datasets torchvision downloads (CIFAR-10, CIFAR-100, STL-10), converted once to in-memory uint8 tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, CIFAR100, STL10, VisionDataset
from torchvision.datasets.utils import download_and_extract_archive

from kdcli.data.registry import DATASETS
from kdcli.data.splits import TensorSplit
from kdcli.errors import UserError

# name -> torchvision class; title and statistics: DATASETS
TORCHVISION_SETS: dict[str, type[VisionDataset]] = {"cifar10": CIFAR10, "cifar100": CIFAR100, "stl10": STL10}


def _presence_checked(dataset: type[VisionDataset]) -> type[VisionDataset]:
    """The torchvision class with its md5 sums dropped and only the labelled files listed (STL-10's 2.6 GB
    unlabelled file is not read): torchvision then only checks that those files exist. The archive's md5 is still
    verified on download; re-hashing ~170 MB (CIFAR) or 2.6 GB (STL-10) on every load buys nothing."""
    train_files = dataset.train_list[:2] if dataset is STL10 else dataset.train_list
    lists = {"train_list": [[name, None] for name, _ in train_files],
             "test_list": [[name, None] for name, _ in dataset.test_list]}
    if hasattr(dataset, "meta"):
        lists["meta"] = {**dataset.meta, "md5": None}
    return type(f"PresenceChecked{dataset.__name__}", (dataset,), lists)


def _labelled_files(dataset: type[VisionDataset]) -> list[str]:
    checked = _presence_checked(dataset)
    names = [name for name, _ in checked.train_list + checked.test_list]
    return names + ([checked.meta["filename"]] if hasattr(checked, "meta") else [])


def _missing_files(dataset: type[VisionDataset], root: Path) -> list[str]:
    return [name for name in _labelled_files(dataset) if not (root / dataset.base_folder / name).is_file()]


def _download(name: str, root: Path) -> None:
    dataset = TORCHVISION_SETS[name]
    try:
        download_and_extract_archive(dataset.url, str(root), filename=dataset.filename, md5=dataset.tgz_md5)
    except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError; bad md5 is a RuntimeError
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"{DATASETS[name].title} download to {root} failed ({reason}); check the network or put "
                        f"the extracted files in {root / dataset.base_folder}") from error


def _read_split(name: str, root: Path, train: bool, image_size: int, crop_padding: int,
                hflip: bool) -> tuple[TensorSplit, list[str]]:
    info, dataset = DATASETS[name], TORCHVISION_SETS[name]
    split = {"split": "train" if train else "test"} if dataset is STL10 else {"train": train}
    try:
        data = _presence_checked(dataset)(str(root), download=False, **split)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
        raise UserError(f"{info.title} files under {root / dataset.base_folder} are unreadable "
                        f"({type(error).__name__}: {error}); delete them and download again") from error
    if dataset is STL10:  # (N, 3, 96, 96) CHW already; labels 0-based
        images, labels = torch.from_numpy(data.data).contiguous(), torch.as_tensor(data.labels, dtype=torch.int64)
    else:  # (N, 32, 32, 3) HWC
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(data.targets, dtype=torch.int64)
    if images.shape[-1] != image_size:
        images = _resized(images, image_size)
    classes = list(getattr(data, "classes", [])) or [f"class_{c}" for c in range(info.num_classes)]
    return TensorSplit(images, labels, info.mean, info.std, crop_padding, hflip), classes


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """Every image resized to ``size x size`` once (antialiased bilinear: STL-10's 96 px to the 32 px of the CRD
    transfer protocol), in chunks to bound the float copy."""
    chunks = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
              .round_().clamp_(0, 255).to(torch.uint8) for chunk in images.split(1024)]
    return torch.cat(chunks)


def load_torchvision_set(name: str, root: str, download: bool, image_size: int, crop_padding: int = 4,
                         hflip: bool = True) -> tuple[TensorSplit, TensorSplit, list[str]]:
    """(train, test, class names) of ``name`` (``cifar10``, ``cifar100``, ``stl10``) under ``root`` (``~`` expanded).

    STL-10's train split is its 5,000 labelled images (the 100,000 unlabelled ones are not read)."""
    dataset = TORCHVISION_SETS[name]
    base = Path(root).expanduser()
    if download and _missing_files(dataset, base):
        _download(name, base)
    missing = _missing_files(dataset, base)
    if missing:
        raise UserError(f"{DATASETS[name].title} not found under {base} (expected {dataset.base_folder}/ with "
                        f"{', '.join(missing)}); pass --set data.download=true or put the extracted files there")
    train, class_names = _read_split(name, base, True, image_size, crop_padding, hflip)
    test, _ = _read_split(name, base, False, image_size, crop_padding, hflip)
    return train, test, class_names
