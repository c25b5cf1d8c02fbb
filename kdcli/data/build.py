"""Turn a :class:`DataConfig` into a :class:`DataBundle` (and the generated stand-in used by ``--smoke``)."""

from __future__ import annotations

from kdcli.data.bundle import DataBundle
from kdcli.data.folder import load_decoded
from kdcli.data.registry import DATASETS
from kdcli.data.splits import TensorSplit, channel_stats, stratified_split
from kdcli.data.synthetic import synthetic_split
from kdcli.data.torchvision_sets import TORCHVISION_SETS, load_torchvision_set
from kdcli.errors import UserError
from kdcli.recipes import DataConfig


def build_data(cfg: DataConfig) -> DataBundle:
    """Load (or generate) the dataset of ``cfg`` and carve the validation split out of train."""
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.dataset == "synthetic":
        bundle = _synthetic_bundle(cfg.num_classes, 32, cfg.train_size, cfg.test_size, cfg.data_seed,
                                   cfg.crop_padding, cfg.hflip)
    elif cfg.dataset in TORCHVISION_SETS:
        train, test, names = load_torchvision_set(cfg.dataset, cfg.root, cfg.download, cfg.image_size,
                                                  cfg.crop_padding, cfg.hflip)
        bundle = DataBundle(train, None, test, len(names), train.mean, train.std, train.image_size, names)
    else:  # decoded from files
        train, test, names = load_decoded(cfg.dataset, cfg.root, image_size=cfg.image_size,
                                          crop_padding=cfg.crop_padding, hflip=cfg.hflip,
                                          crop_fraction=cfg.crop_fraction, num_workers=cfg.num_workers)
        bundle = DataBundle(train, None, test, len(names), train.mean, train.std, cfg.image_size, names)
    return _carve_validation(bundle, cfg.val_fraction, cfg.data_seed)


def _carve_validation(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    if fraction == 0:
        return bundle
    keep, held_out = stratified_split(bundle.train.labels, fraction, seed)
    if held_out.numel() == 0:
        raise UserError(f"data.val_fraction={fraction} holds out no image of a {len(bundle.train)}-image train "
                        "split; use a larger fraction")
    bundle.train, bundle.val = bundle.train.subset(keep), bundle.train.subset(held_out)
    return bundle


def _synthetic_bundle(num_classes: int, image_size: int, n_train: int, n_test: int, seed: int,
                      crop_padding: int = 4, hflip: bool = True) -> DataBundle:
    if num_classes < 2 or n_train < 1 or n_test < 1:
        raise UserError(f"synthetic data needs num_classes >= 2 and train/test sizes >= 1, got {num_classes} "
                        f"classes, {n_train} train, {n_test} test")
    train_images, train_labels = synthetic_split(num_classes, n_train, seed, "train", image_size)
    test_images, test_labels = synthetic_split(num_classes, n_test, seed, "test", image_size)
    mean, std = channel_stats(train_images)
    width = len(str(num_classes - 1))
    train = TensorSplit(train_images, train_labels, mean, std, crop_padding, hflip)
    test = TensorSplit(test_images, test_labels, mean, std, crop_padding, hflip)
    names = [f"class_{c:0{width}d}" for c in range(num_classes)]
    return DataBundle(train, None, test, num_classes, mean, std, image_size, names)


def smoke_data(num_classes: int, image_size: int, n_train: int = 64, n_test: int = 32, seed: int = 0) -> DataBundle:
    """Small generated data with a recipe's class count and image size: exercises a pipeline without a download.

    Uses the synthetic renderer (any size); normalisation statistics come from the generated train images.
    """
    return _synthetic_bundle(num_classes, image_size, n_train, n_test, seed)


