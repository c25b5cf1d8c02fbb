"""Helpers shared by the benchmarks: timing, and the reference loops' PIL dataset."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from kdcli.data import TensorSplit
from kdcli.devices import timed


def repeat(call: Callable[..., object], times: int, *args: object) -> None:
    """``call(*args)`` ``times`` times (one timed block)."""
    for _ in range(times):
        call(*args)


def median_ms(call: Callable[..., object], *args: object, repeats: int, device: torch.device | None = None) -> float:
    """Median wall time of ``call(*args)`` in ms over ``repeats`` calls, after one warm-up call."""
    call(*args)  # warm-up: allocator, kernels, lazy initialisation
    return statistics.median(timed(call, *args, device=device)[1] for _ in range(repeats))


@contextmanager
def intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` CPU intra-op threads (``None``: unchanged), then restore."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class PILImages(torch.utils.data.Dataset):
    """An in-memory split's uint8 images as PIL images through a torchvision transform, as torchvision's CIFAR
    dataset serves them (the reference loops' input)."""

    def __init__(self, split: TensorSplit, transform: Callable) -> None:
        self.images = split.images.permute(0, 2, 3, 1).numpy()  # HWC, as CIFAR's files
        self.labels, self.transform = split.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]
