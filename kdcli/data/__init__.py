"""Data layer: datasets as splits, and loaders that batch, augment and normalise on the target device.

* ``synthetic``: procedurally rendered 32x32 classes (:mod:`kdcli.data.synthetic`), generated in memory.
* ``cifar10`` / ``cifar100``: torchvision's files, converted once to uint8 tensors.
* ``stl10``: torchvision's binary files, resized once to ``image_size``.
* ``imagefolder`` / ``webdataset`` / ``imagenet`` / ``tiny-imagenet``: ``root/train`` and ``root/val`` (or
  ``root/test``) class folders or tar shards, decoded by persistent DataLoader workers.

Usage::

    bundle = build_data(DataConfig("cifar100", download=True, val_fraction=0.1))
    loader = make_loader(bundle.train, 64, train=True, device=torch.device("cuda"), seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels, indices, views in loader: ...
"""

from kdcli.data.build import build_data, smoke_data
from kdcli.data.bundle import DataBundle, Split
from kdcli.data.folder import FolderSplit
from kdcli.data.loader import BatchLoader, LoadedBatch, ViewGrid, make_loader
from kdcli.data.splits import TensorSplit
from kdcli.recipes import DataConfig

__all__ = ["BatchLoader", "DataBundle", "DataConfig", "FolderSplit", "LoadedBatch", "Split", "TensorSplit", "ViewGrid",
           "build_data", "make_loader", "smoke_data"]
