"""Small image datasets written in the real formats: ImageFolder JPEG trees, WebDataset shards, Tiny-ImageNet's val/.

Each class has its own colour, and each image a white band of random width at the left plus mild noise, so
images differ, classes are learnable, and JPEGs have photo-like sizes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def _image(label: int, index: int, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, label, index])
    width, height = size
    colour = np.array([(53 * label) % 256, (97 * label + 80) % 256, (151 * label + 160) % 256], dtype=np.float64)
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
