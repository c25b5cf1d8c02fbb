"""In-memory splits (uint8 image tensors) and the stratified validation carve-out shared by all datasets."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdcli.data.seeding import generator


@dataclass
class TensorSplit:
    """A split held in memory: uint8 images (N, 3, H, W), int64 labels (N,), and how to feed them.

    ``mean``/``std`` are per channel on the [0, 1] scale; ``crop_padding``/``hflip`` configure the
    training augmentation applied batch-wise on the device by :mod:`kdcli.data.loader`. A split carved
    out of another (:meth:`subset`) remembers the positions of its rows in the source (``origin``) and the
    source's :meth:`digest`, so per-image data computed on the whole source (the teacher-output cache)
    is found again under any carve-out.
    """

    images: Tensor
    labels: Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_padding: int = 4
    hflip: bool = True
    origin: Tensor | None = None  # row -> position in the source split (None: this split is the source)
    source_digest: str | None = None
    _on_device: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, index: Tensor) -> TensorSplit:
        """A new split with the rows ``index`` (copied, so the parent can be freed)."""
        return TensorSplit(self.images[index], self.labels[index], self.mean, self.std, self.crop_padding, self.hflip,
                           origin=self.origins()[index], source_digest=self.digest())

    def origins(self) -> Tensor:
        """The position of every row in the source split."""
        return self.origin if self.origin is not None else torch.arange(len(self))

    def digest(self) -> str:
        """SHA-256 of the source split's images and labels (hashed once)."""
        if self.source_digest is None:
            sha = hashlib.sha256()
            sha.update(str((tuple(self.images.shape), tuple(self.labels.shape))).encode())
            sha.update(self.images.contiguous().numpy().tobytes())
            sha.update(self.labels.contiguous().numpy().tobytes())
            self.source_digest = sha.hexdigest()
        return self.source_digest

    def images_on(self, device: torch.device) -> Tensor:
        """The image tensor on ``device``, uploaded once and reused by every loader of this split."""
        if device.type == "cpu":
            return self.images
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self.images.to(device)
        return self._on_device[key]


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split positions ``0..N-1`` into (keep, held_out), holding out ``round(fraction * n_c)`` of each class.

    Which samples are held out depends only on (labels, fraction, seed); both index tensors are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    gen = generator("val-split", seed)
    held_out = []
    for cls in torch.unique(labels).tolist():
        members = (labels == cls).nonzero().flatten()
        count = round(fraction * members.numel())
        held_out.append(members[torch.randperm(members.numel(), generator=gen)[:count]])
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    mask[torch.cat(held_out)] = True
    return (~mask).nonzero().flatten(), mask.nonzero().flatten()


def channel_stats(images: Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Exact per-channel mean and (population) std of uint8 images on the [0, 1] scale, rounded to 4 digits.

    Uses a 256-bin histogram per channel, so it needs no float copy of the images.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].flatten(), minlength=256).double()
        mu = (counts * values).sum() / counts.sum()
        var = (counts * (values - mu) ** 2).sum() / counts.sum()
        mean.append(round(mu.item(), 4))
        std.append(round(var.sqrt().item(), 4))
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])
