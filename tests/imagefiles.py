"""Small image datasets written in the real formats: ImageFolder JPEG trees, WebDataset shards, Tiny-ImageNet's
layout, STL-10's binaries.

Each class has its own colour, and each image a white band of random width at the left plus mild noise, so
images differ, classes are learnable, and JPEGs have photo-like sizes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def class_colour(label: int) -> np.ndarray:
    """The RGB colour of class ``label`` (float64)."""
    label = int(label)
    return np.array([(53 * label) % 256, (97 * label + 80) % 256, (151 * label + 160) % 256], dtype=np.float64)


def _image(label: int, index: int, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, label, index])
    width, height = size
    colour = class_colour(label)
    pixels = np.broadcast_to(colour, (height, width, 3)).copy()
    pixels[:, : int(rng.integers(2, max(3, width // 3)))] = 255
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_jpeg_tree(root: Path, classes: int, per_split: dict[str, int], size: tuple[int, int] = (80, 64),
                    seed: int = 0) -> list[str]:
    """``root/<split>/<class>/<i>.JPEG`` for each split and class; returns the class names."""
    names = [f"n{label:08d}" for label in range(classes)]
    for split, count in per_split.items():
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{name}_{i}.JPEG").write_bytes(_encoded(_image(label, i + 1000 * len(split), size, seed),
                                                                   "JPEG"))
    return names


def write_shards(root: Path, classes: int, per_split: dict[str, int], per_shard: int, size: tuple[int, int] = (80, 64),
                 seed: int = 0) -> None:
    """``root/<split>/shard-<n>.tar`` written by the webdataset library's own ``ShardWriter`` (``<key>.jpg`` +
    ``<key>.cls``), ``per_shard`` samples each, in class-interleaved order."""
    import webdataset as wds

    for split, count in per_split.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        with wds.ShardWriter(str(root / split / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i in range(count):
                for label in range(classes):
                    image = _encoded(_image(label, i + 1000 * len(split), size, seed), "JPEG")
                    sink.write({"__key__": f"{split}_{label:03d}_{i:05d}", "jpg": image, "cls": label})


def write_tiny_imagenet(root: Path, classes: int, train: int, val: int, seed: int = 0) -> list[str]:
    """Tiny-ImageNet's layout: ``train/<wnid>/images/<wnid>_<i>.JPEG`` and ``val/images/val_<j>.JPEG`` labelled by
    ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>box``); 64 x 64 images."""
    names = [f"n{label:08d}" for label in range(classes)]
    for label, name in enumerate(names):
        folder = root / "train" / name / "images"
        folder.mkdir(parents=True)
        for i in range(train):
            (folder / f"{name}_{i}.JPEG").write_bytes(_encoded(_image(label, i, (64, 64), seed), "JPEG"))
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for j in range(val * classes):
        label = (j * 7) % classes  # not in class order, as the real file
        (root / "val" / "images" / f"val_{j}.JPEG").write_bytes(_encoded(_image(label, 500 + j, (64, 64), seed), "JPEG"))
        lines.append(f"val_{j}.JPEG\t{names[label]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return names


def write_stl10(root: Path, n_train: int, n_test: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """STL-10's binary layout: ``*_X.bin`` uint8 (N, 3, 96, 96) stored column-major per channel, ``*_y.bin`` labels
    1..10 (torchvision's reader transposes the last two axes and subtracts 1). Every image of a class is the same
    picture: the class colour (:func:`class_colour` of the 0-based label), black in the bottom half."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    written = {}
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(1, 11, n).astype(np.uint8)
        images = np.zeros((n, 3, 96, 96), dtype=np.uint8)
        images[:, :, :48] = np.stack([class_colour(label - 1) for label in labels]).astype(np.uint8)[:, :, None, None]
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        labels.tofile(folder / f"{split}_y.bin")
        written[split] = (images, labels)
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    return written
