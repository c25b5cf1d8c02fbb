"""What the data layer gives the engine: :class:`DataBundle` (it is asked with the recipe's ``DataConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from kdcli.data.folder import FolderSplit
from kdcli.data.splits import TensorSplit

Split = TensorSplit | FolderSplit


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
