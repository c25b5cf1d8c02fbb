"""Batch loaders: epoch order, sharding, augmentation and normalisation, reproducible from (seed, epoch).

In-memory splits never go through a DataLoader: the uint8 tensor lives on the device, a batch is an
index gather, and random crop (zero padding in pixel space, as torchvision's ``RandomCrop(padding=p)``)
plus horizontal flip is one fused gather on the device. Decoded splits (ImageFolder trees, WebDataset shards)
use one DataLoader per loader whose persistent workers return uint8 crops into pinned memory. Both paths end
in the same on-device ``(x / 255 - mean) / std``.

Reproducibility: the epoch permutation comes from a generator seeded by (seed, epoch) and the
augmentation draws from one seeded by (seed, epoch, rank) (per sample position for decoded splits), all on
the CPU, so a run resumed at an epoch boundary or mid-epoch, or a second loader with the same seed, yields
bit-identical batches on any device and with any number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from kdcli.data.folder import DecodedImages, FolderSplit
from kdcli.data.seeding import derive_seed, generator
from kdcli.data.splits import TensorSplit


class LoadedBatch(NamedTuple):
    """A batch on the device: normalised images, labels, positions in the split, and the augmentation view
    of each image (:class:`ViewGrid` ids; ``None`` for evaluation and for ImageFolder crops)."""

    images: Tensor
    labels: Tensor
    indices: Tensor
    views: Tensor | None = None


@dataclass(frozen=True)
class ViewGrid:
    """The finite augmentation space of an in-memory split: crop offset ``(dy, dx)`` in ``0..2*padding``
    times horizontal flip (when enabled), numbered ``((dy * (2p + 1)) + dx) * flips + flip``.

    CIFAR's pad-4 crop and flip have ``9 * 9 * 2 = 162`` views, which is what makes an exact cache of the
    teacher's outputs possible (:mod:`kdcli.engine.cache`).
    """

    padding: int
    hflip: bool

    @property
    def flips(self) -> int:
        return 2 if self.hflip else 1

    @property
    def count(self) -> int:
        return (2 * self.padding + 1) ** 2 * self.flips

    def ids(self, offsets: Tensor, flips: Tensor) -> Tensor:
        """View ids of crop corners ``offsets`` (B, 2) and ``flips`` (B,)."""
        side = 2 * self.padding + 1
        return (offsets[:, 0] * side + offsets[:, 1]) * self.flips + flips.long()

    def params(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(offsets, flips)`` of view ids: the inverse of :meth:`ids`."""
        side = 2 * self.padding + 1
        position, flips = ids // self.flips, (ids % self.flips).bool()
        return torch.stack([position // side, position % side], dim=1), flips


def normalise(images: Tensor, mean: Tensor, std: Tensor, memory_format: torch.memory_format) -> Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` in ``memory_format`` (the one normalisation
    of every training, evaluation and cached teacher input)."""
    converted = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format)
    return converted.copy_(images).div_(255).sub_(mean).div_(std)  # one float copy, straight into the layout


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, shard: tuple[int, int] = (0, 1)) -> Tensor:
    """Dataset positions this rank visits in ``epoch`` (DistributedSampler semantics).

    The full order (a (seed, epoch)-seeded permutation, or ``0..n-1``) is padded by wrapping around to a
    multiple of ``world``; rank ``r`` takes every ``world``-th position starting at ``r``.
    """
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    order = torch.randperm(n, generator=generator("order", seed, epoch)) if shuffle else torch.arange(n)
    total = math.ceil(n / world) * world
    order = order.repeat(math.ceil(total / n))[:total]
    return order[rank:total:world]


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Random-crop-with-zero-padding and horizontal flip of a uint8 batch as one gather.

    ``offsets`` (B, 2) are the crop's top/left corners in the padded image (0..2*padding), ``flips`` (B,)
    mirrors a sample left-right. The result is (B, C, H, W) with channels-last strides.
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = offsets[:, :1] + torch.arange(height, device=images.device)
    cols = offsets[:, 1:] + torch.arange(width, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    sample = torch.arange(batch, device=images.device)[:, None, None]
    return padded[sample, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # gather gives (B, H, W, C)


class BatchLoader:
    """Iterable of :class:`LoadedBatch` on ``device``; see :func:`make_loader`."""

    def __init__(self, split: TensorSplit | FolderSplit, batch_size: int, *, train: bool, device: torch.device,
                 seed: int, drop_last: bool, channels_last: bool, shard: tuple[int, int]) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(split) == 0:
            raise ValueError("cannot load batches from an empty split")
        self.split, self.batch_size, self.train, self.device = split, batch_size, train, torch.device(device)
        self.seed, self.drop_last, self.shard = seed, drop_last, shard
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(split.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(split.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.epoch, self.start = 0, 0
        self._keys = _BatchKeys()
        self._decoder: DataLoader | None = None  # built on first use, its workers kept for every epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose order and augmentation the next iteration reproduces, from its batch ``start``
        on (a run resumed mid-epoch: the batches before are skipped, their random draws replayed)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        per_rank = math.ceil(len(self.split) / self.shard[1])
        return per_rank // self.batch_size if self._drops_last(per_rank) else math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[LoadedBatch]:
        order = epoch_order(len(self.split), shuffle=self.train, seed=self.seed, epoch=self.epoch, shard=self.shard)
        batches = list(order.split(self.batch_size))[: len(self)]
        augment_seed = derive_seed("augment", self.seed, self.epoch, self.shard[0])
        for images, labels, index, views in self._uint8_batches(batches, augment_seed):
            yield LoadedBatch(normalise(images, self.mean, self.std, self.memory_format), labels, index, views)

    def _drops_last(self, per_rank: int) -> bool:
        # A split smaller than one batch still yields its partial batch, so training never silently skips.
        return self.drop_last and per_rank >= self.batch_size

    def _uint8_batches(self, batches: list[Tensor], augment_seed: int) -> Iterator[LoadedBatch]:
        """:class:`LoadedBatch` with uint8 images on the device for each batch of split positions."""
        if isinstance(self.split, TensorSplit):
            return self._tensor_batches(self.split, batches, augment_seed)
        return self._folder_batches(self.split, batches, augment_seed)

    def _tensor_batches(self, split: TensorSplit, batches: list[Tensor],
                        augment_seed: int) -> Iterator[LoadedBatch]:
        images, labels = split.images_on(self.device), split.labels.to(self.device)
        augment = self.train and (split.crop_padding > 0 or split.hflip)
        grid = ViewGrid(split.crop_padding, split.hflip)
        gen = torch.Generator().manual_seed(augment_seed)
        for number, index in enumerate(batches):
            if augment:  # the view is drawn first, then the image is cut to it
                offsets = torch.randint(2 * split.crop_padding + 1, (index.numel(), 2), generator=gen)
                flips = (torch.rand(index.numel(), generator=gen) < 0.5) & split.hflip
            if number < self.start:
                continue
            index = index.to(self.device, non_blocking=True)
            batch, views = images[index], None
            if augment:
                views = grid.ids(offsets, flips).to(self.device, non_blocking=True)
                batch = crop_flip(batch, offsets.to(self.device), flips.to(self.device), split.crop_padding)
            elif self.train:  # no crop and no flip: every image has the one view 0
                views = torch.zeros(index.numel(), dtype=torch.int64, device=self.device)
            yield LoadedBatch(batch, labels[index], index, views)

    def _folder_batches(self, split: FolderSplit, batches: list[Tensor],
                        augment_seed: int) -> Iterator[LoadedBatch]:
        on_gpu = self.device.type == "cuda"
        batches = batches[self.start:]  # each sample's crop is seeded by its position: nothing to replay
        seed = augment_seed if self.train else None
        self._keys.batches = [[(position, seed) for position in index.tolist()] for index in batches]
        if self._decoder is None:
            self._decoder = DataLoader(DecodedImages(split), batch_sampler=self._keys, num_workers=split.num_workers,
                                       pin_memory=on_gpu, persistent_workers=split.num_workers > 0,
                                       generator=torch.Generator().manual_seed(self.seed))  # not the global RNG
        for index, (images, labels) in zip(batches, self._decoder, strict=True):
            images = images.permute(0, 3, 1, 2)  # (B, S, S, 3) -> (B, 3, S, S) with channels-last strides
            yield LoadedBatch(images.to(self.device, non_blocking=on_gpu), labels.to(self.device, non_blocking=on_gpu),
                              index.to(self.device))


class _BatchKeys:
    """The batch sampler of a decoded split's DataLoader: the ``(position, augment seed)`` keys of the batches
    the current epoch still has to load (set by :class:`BatchLoader` before each pass)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int | None]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(split: TensorSplit | FolderSplit, batch_size: int, *, train: bool, device: torch.device, seed: int,
                drop_last: bool | None = None, channels_last: bool = False,
                shard: tuple[int, int] = (0, 1)) -> BatchLoader:
    """A :class:`BatchLoader` yielding :class:`LoadedBatch` ``(images, labels, indices, views)`` on ``device``.

    ``images`` are float32 ``(x / 255 - mean) / std`` (channels-last if asked), ``labels`` int64, ``indices``
    the int64 positions of the batch in ``split``, ``views`` the :class:`ViewGrid` id of each training
    crop of an in-memory split (else ``None``). Train loaders shuffle, augment (random crop with zero
    padding, horizontal flip) and drop the last partial batch; eval loaders keep dataset order, do not
    augment and keep the partial batch (``drop_last`` overrides). ``shard=(rank, world)`` gives each rank a
    disjoint, equal-size slice of every epoch. Call ``set_epoch`` before each epoch.
    """
    return BatchLoader(split, batch_size, train=train, device=device, seed=seed,
                       drop_last=train if drop_last is None else drop_last, channels_last=channels_last, shard=shard)
