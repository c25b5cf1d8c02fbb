"""Where encoded images come from: files named in a list (an ImageFolder tree), or members of tar shards.

Both are random-access lists of ``(encoded image, label)``, so every decoded dataset shares one epoch order,
one DistributedSampler split and one step-exact resume (:mod:`kdcli.data.loader`). Their tables are NumPy
arrays, not lists of Python objects: DataLoader workers forked from the main process then share them instead of
copying every page that a reference count touches (PyTorch's "copy-on-access" memory growth with big lists).

* :class:`FileSource`: image paths with labels: torchvision's ImageFolder scan of ``train/<class>/...``, or
  Tiny-ImageNet's ``val/images`` read through ``val/val_annotations.txt``.
* :class:`ShardSource`: WebDataset shards: tar files whose members ``<key>.jpg`` (or ``.jpeg``/``.png``/``.webp``)
  and ``<key>.cls`` (the class index as text) form one sample, as WebDataset's ``ShardWriter`` writes them. The
  shards are indexed once (each member's byte offset, from the tar headers); a sample is then one ``seek`` and
  one ``read``, so shards on a local or network file system are read in any order. Streaming URLs (``pipe:``,
  ``http://``) are not supported: an exact epoch order needs random access.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kdcli.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm")
LABEL_EXTENSION = "cls"


@dataclass(frozen=True)
class FileSource:
    """Images stored one per file: ``paths[i]`` has class ``targets[i]``."""

    paths: Sequence[str]
    targets: Sequence[int]

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, index: int) -> Image.Image:
        """The image, opened lazily (decoded on first pixel access, so a JPEG can still be drafted smaller)."""
        return Image.open(str(self.paths[index]))

    def name(self, index: int) -> str:
        return str(self.paths[index])


@dataclass(frozen=True)
class ShardSource:
    """Images stored in tar shards: sample ``i`` is ``sizes[i]`` bytes at ``offsets[i]`` of ``shards[shard_of[i]]``."""

    shards: Sequence[str]
    shard_of: Sequence[int]
    offsets: Sequence[int]
    sizes: Sequence[int]
    targets: Sequence[int]
    keys: Sequence[str]

    def __len__(self) -> int:
        return len(self.keys)

    def open(self, index: int) -> Image.Image:
        with open(str(self.shards[self.shard_of[index]]), "rb") as shard:
            shard.seek(int(self.offsets[index]))
            data = shard.read(int(self.sizes[index]))
        return Image.open(io.BytesIO(data))

    def name(self, index: int) -> str:
        return f"{self.shards[self.shard_of[index]]}:{self.keys[index]}"


def _split_name(member: str) -> tuple[str, str]:
    """WebDataset's grouping: the key is the path up to the first dot of the file name, the extension the rest."""
    folder, _, base = member.rpartition("/")
    stem, _, extension = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, extension.lower()


def _index_shard(path: Path) -> list[tuple[str, int, int, int]]:
    """``(key, offset, size, label)`` of every sample in one shard, in member order."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed only; a compressed shard cannot be seeked into
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _split_name(member.name)
                if extension in IMAGE_EXTENSIONS:
                    images[key] = (member.offset_data, member.size)
                elif extension == LABEL_EXTENSION:
                    labels[key] = int(tar.extractfile(member).read().decode().strip())
    except (tarfile.TarError, OSError, ValueError) as error:
        raise UserError(f"cannot index shard {path} ({type(error).__name__}: {error}); it must be an uncompressed "
                        "tar of <key>.jpg + <key>.cls members (WebDataset layout)") from None
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise UserError(f"shard {path}: sample {unlabelled[0]!r} has an image but no .{LABEL_EXTENSION} label "
                        f"({len(unlabelled)} such); every sample needs <key>.{LABEL_EXTENSION} holding its class index")
    return [(key, offset, size, labels[key]) for key, (offset, size) in images.items()]


def index_shards(folder: Path) -> ShardSource:
    """Index every ``*.tar`` in ``folder`` (sorted by name); the shards are read in parallel threads."""
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise UserError(f"no .tar shards in {folder}; put the WebDataset shards of this split there")
    with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
        indexed = list(pool.map(_index_shard, shards))
    shard_of, offsets, sizes, targets, keys = [], [], [], [], []
    for number, samples in enumerate(indexed):
        for key, offset, size, label in samples:
            shard_of.append(number)
            offsets.append(offset)
            sizes.append(size)
            targets.append(label)
            keys.append(key)
    if not keys:
        raise UserError(f"the shards in {folder} hold no image with a label; they must hold <key>.jpg + <key>.cls members")
    return ShardSource(np.array([str(s) for s in shards]), np.array(shard_of), np.array(offsets, dtype=np.int64),
                       np.array(sizes, dtype=np.int64), np.array(targets, dtype=np.int64), np.array(keys))
