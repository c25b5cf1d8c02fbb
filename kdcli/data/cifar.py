"""CIFAR-10/100 through torchvision, converted once to in-memory uint8 tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from kdcli.data.registry import DATASETS
from kdcli.data.splits import TensorSplit
from kdcli.errors import UserError

CIFAR: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}  # title and statistics: DATASETS


def _presence_checked(dataset: type[CIFAR10]) -> type[CIFAR10]:
    """The torchvision class with its md5 sums dropped: torchvision then only checks that the files exist.

    The archive's md5 is still verified on download; re-hashing ~170 MB on every load buys nothing.
    """
    return type(f"PresenceChecked{dataset.__name__}", (dataset,), {
        "train_list": [[name, None] for name, _ in dataset.train_list],
        "test_list": [[name, None] for name, _ in dataset.test_list],
        "meta": {**dataset.meta, "md5": None},
    })


def _missing_files(dataset: type[CIFAR10], root: Path) -> list[str]:
    names = [name for name, _ in dataset.train_list + dataset.test_list] + [dataset.meta["filename"]]
    return [name for name in names if not (root / dataset.base_folder / name).is_file()]


def _download(name: str, root: Path) -> None:
    dataset = CIFAR[name]
    try:
        download_and_extract_archive(dataset.url, str(root), filename=dataset.filename, md5=dataset.tgz_md5)
    except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError; bad md5 is a RuntimeError
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"{DATASETS[name].title} download to {root} failed ({reason}); check the network or put "
                        f"the extracted files in {root / dataset.base_folder}") from error


def _read_split(name: str, root: Path, train: bool, crop_padding: int,
                hflip: bool) -> tuple[TensorSplit, list[str]]:
    info, dataset = DATASETS[name], CIFAR[name]
    try:
        data = _presence_checked(dataset)(str(root), train=train, download=False)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
        raise UserError(f"{info.title} files under {root / dataset.base_folder} are unreadable "
                        f"({type(error).__name__}: {error}); delete them and download again") from error
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) HWC -> NCHW
    labels = torch.as_tensor(data.targets, dtype=torch.int64)
    return TensorSplit(images, labels, info.mean, info.std, crop_padding, hflip), list(data.classes)


def load_cifar(name: str, root: str, download: bool, crop_padding: int = 4,
               hflip: bool = True) -> tuple[TensorSplit, TensorSplit, list[str]]:
    """(train, test, class names) of ``name`` ('cifar10' or 'cifar100') under ``root`` (``~`` expanded)."""
    dataset = CIFAR[name]
    base = Path(root).expanduser()
    if download and _missing_files(dataset, base):
        _download(name, base)
    missing = _missing_files(dataset, base)
    if missing:
        raise UserError(f"{DATASETS[name].title} not found under {base} (expected {dataset.base_folder}/ with "
                        f"{', '.join(missing)}); pass --set data.download=true or put the extracted files there")
    train, class_names = _read_split(name, base, True, crop_padding, hflip)
    test, _ = _read_split(name, base, False, crop_padding, hflip)
    return train, test, class_names
