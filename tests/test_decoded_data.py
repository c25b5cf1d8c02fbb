"""Decoded datasets: ImageFolder JPEG trees, WebDataset shards, Tiny-ImageNet's val/, STL-10's binaries; their
workers, epoch order, sharding over ranks and `kdcli bench data`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from imagefiles import class_colour, write_jpeg_tree, write_shards, write_stl10, write_tiny_imagenet
from PIL import Image
from test_distributed import torchrun
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.data import DataConfig, build_data, make_loader
from kdcli.data import folder as folder_module
from kdcli.errors import UserError

CPU = torch.device("cpu")
HERE = Path(__file__).resolve().parent


def _epoch(loader, epoch: int, start: int = 0) -> list:
    loader.set_epoch(epoch, start)
    return [(b.images, b.labels, b.indices) for b in loader]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q, strict=True))
                                    for p, q in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """The same 3 classes x (8 train, 2 val) images as a JPEG tree and as WebDataset shards of 5 samples."""
    root = tmp_path_factory.mktemp("decoded")
    write_jpeg_tree(root / "folder", 3, {"train": 8, "val": 2})
    write_shards(root / "shards", 3, {"train": 8, "val": 2}, per_shard=5)
    return {"imagefolder": root / "folder", "webdataset": root / "shards"}


def _shard_key_to_path(tree: Path, key: str) -> Path:
    split, label, index = key.rsplit("/", 1)[-1].split("_")
    return tree / split / f"n{int(label):08d}" / f"n{int(label):08d}_{int(index)}.JPEG"


def test_shards_hold_the_same_images_as_the_tree(trees):
    folder = build_data(DataConfig("imagefolder", root=str(trees["imagefolder"]), image_size=24, num_workers=0))
    shards = build_data(DataConfig("webdataset", root=str(trees["webdataset"]), image_size=24, num_workers=0))
    assert (len(shards.train), len(shards.test), shards.num_classes) == (24, 6, 3)
    assert shards.class_names == ["class_0", "class_1", "class_2"]  # no classes.txt
    assert shards.train.source.shards.size == 5 and shards.train.labels.tolist() == [0, 1, 2] * 8  # 24 in 5s
    paths = [str(p) for p in folder.train.source.paths]
    for position in range(len(shards.train)):
        key = str(shards.train.source.keys[position])
        twin = paths.index(str(_shard_key_to_path(trees["imagefolder"], key)))
        assert torch.equal(shards.train.load(position, None), folder.train.load(twin, None))
        assert torch.equal(shards.train.load(position, 9), folder.train.load(twin, 9)) == (position == twin)
        assert int(shards.train.labels[position]) == int(folder.train.labels[twin])


def test_class_names_of_shards_come_from_classes_txt(tmp_path, trees):
    (tmp_path / "train").symlink_to(trees["webdataset"] / "train")
    (tmp_path / "val").symlink_to(trees["webdataset"] / "val")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(UserError, match="class index 2, but classes.txt names 2 classes"):
        build_data(DataConfig("webdataset", root=str(tmp_path), num_workers=0))
    (tmp_path / "classes.txt").write_text("cat\ndog\nfox\n")
    assert build_data(DataConfig("webdataset", root=str(tmp_path), num_workers=0)).class_names == ["cat", "dog", "fox"]


def test_named_datasets_find_shards_or_folders_by_themselves(trees):
    for kind, root in trees.items():
        bundle = build_data(DataConfig("imagenet", root=str(root), image_size=16, num_workers=0))
        assert (len(bundle.train), bundle.num_classes) == (24, 3), kind  # classes from the files, not 1000


def test_a_shard_sample_without_a_label_names_the_key(tmp_path):
    import webdataset as wds

    image = _jpeg()
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        with wds.TarWriter(str(tmp_path / split / "a.tar")) as sink:
            sink.write({"__key__": "x1", "jpg": image, "cls": 0})
            sink.write({"__key__": "x2", "jpg": image})
    with pytest.raises(UserError, match=r"sample 'x2' has an image but no \.cls label"):
        build_data(DataConfig("webdataset", root=str(tmp_path), num_workers=0))


def _jpeg() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_workers_and_a_mid_epoch_start_give_the_same_batches(trees):
    """Worker count and scheduling do not change a batch; ``set_epoch(e, start=k)`` yields batches k.. of epoch e
    exactly (a resumed run); the DataLoader's workers persist across epochs, and each epoch still differs."""
    train = build_data(DataConfig("webdataset", root=str(trees["webdataset"]), image_size=16, num_workers=0)).train
    serial = make_loader(train, 4, train=True, device=CPU, seed=3)
    epoch1 = _epoch(serial, 1)
    parallel_split = train.subset(torch.arange(len(train)))
    parallel_split.num_workers = 2
    parallel = make_loader(parallel_split, 4, train=True, device=CPU, seed=3, channels_last=True)
    assert _same(_epoch(parallel, 1), epoch1)
    workers = parallel._decoder._iterator._workers
    assert _same(_epoch(parallel, 1, start=4), epoch1[4:]) and not _same(_epoch(parallel, 2), epoch1)
    assert parallel._decoder._iterator._workers == workers  # persistent: the same worker processes served all
    assert epoch1[0][0].shape == (4, 3, 16, 16) and len(epoch1) == 6
    assert _epoch(parallel, 1)[0][0].is_contiguous(memory_format=torch.channels_last)


def test_evaluation_view_is_resize_then_centre_crop(tmp_path):
    """A 40 x 20 image of four vertical bars (10 px each), eval view at 8 px with crop_fraction 0.5: the shorter
    side goes to 16 px (the image to 32 x 16), the centre 8 x 8 crop is the two middle bars' inner halves."""
    bars = np.zeros((20, 40, 3), dtype=np.uint8)
    for bar, value in enumerate((0, 80, 160, 240)):
        bars[:, 10 * bar: 10 * bar + 10] = value
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(bars).save(tmp_path / split / "a" / "bars.png")
    split = build_data(DataConfig("imagefolder", root=str(tmp_path), image_size=8, crop_fraction=0.5,
                                  num_workers=0)).test
    view = split.load(0, None)[..., 0].float()
    assert view.shape == (8, 8)
    assert torch.allclose(view[:, :3], torch.full((8, 3), 80.0), atol=1)
    assert torch.allclose(view[:, 5:], torch.full((8, 3), 160.0), atol=1)


def test_tiny_imagenet_val_is_read_through_its_annotations(tmp_path):
    names = write_tiny_imagenet(tmp_path, classes=4, train=3, val=2)
    bundle = build_data(DataConfig("tiny-imagenet", root=str(tmp_path), image_size=32, num_workers=0))
    assert bundle.class_names == names and (len(bundle.train), len(bundle.test)) == (12, 8)
    assert bundle.train.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3  # train/<wnid>/images/*.JPEG
    assert bundle.test.labels.tolist() == [(j * 7) % 4 for j in range(8)]  # from val_annotations.txt, file order
    colours = torch.stack([bundle.test.load(j, None)[16:, 28:].float().mean((0, 1)) for j in range(8)])
    expected = torch.as_tensor(np.stack([class_colour(c) for c in bundle.test.labels.tolist()])).float()
    assert torch.allclose(colours, expected, atol=10)  # the class colour right of the white band: labels match images


def test_stl10_binaries_are_read_labelled_and_resized(tmp_path):
    written = write_stl10(tmp_path, 6, 4)
    bundle = build_data(DataConfig("stl10", root=str(tmp_path), image_size=32))
    assert bundle.num_classes == 10 and bundle.class_names == [f"c{i}" for i in range(10)]
    assert bundle.train.images.shape == (6, 3, 32, 32) and bundle.test.images.shape == (4, 3, 32, 32)
    assert bundle.train.labels.tolist() == (written["train"][1].astype(int) - 1).tolist()
    colours = torch.as_tensor(np.stack([class_colour(label - 1) for label in written["train"][1]])).to(torch.uint8)
    assert torch.equal(bundle.train.images[:, :, 5, 5], colours)  # the top half, row-major (the file is not)
    assert (bundle.train.images[:, :, 17:] == 0).all()
    with pytest.raises(UserError, match="test_X.bin"):
        (tmp_path / "stl10_binary" / "test_X.bin").unlink()
        build_data(DataConfig("stl10", root=str(tmp_path), image_size=32))


@pytest.mark.parametrize(("cpus", "local_ranks", "expected"), [(2, 1, 1), (16, 1, 8), (16, 2, 7), (96, 8, 8),
                                                                 (4, 8, 1)])
def test_auto_workers_share_the_cpus_between_the_ranks_of_a_node(monkeypatch, cpus, local_ranks, expected):
    monkeypatch.setattr(folder_module, "available_cpus", lambda: cpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert folder_module.resolve_workers("auto") == expected and folder_module.resolve_workers(3) == 3


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")
def test_two_ranks_load_disjoint_halves_of_the_epoch(trees):
    """Under torchrun (2 gloo ranks, a worker each): each rank loads 12 of the 24 training images, no image twice,
    together the whole epoch; the order is the single-process epoch order dealt out in turn (DistributedSampler)."""
    for dataset, root in trees.items():
        result = torchrun(str(HERE / "data_worker.py"), str(root), dataset)
        assert result.returncode == 0, result.stderr[-3000:]
        ranks = json.loads(result.stdout.strip().splitlines()[-1])
        train = build_data(DataConfig(dataset, root=str(root), image_size=16, num_workers=0)).train
        alone = make_loader(train, 4, train=True, device=CPU, seed=5)
        order = [train.source.name(int(train.indices[i])) for _, _, batch in _epoch(alone, 1) for i in batch.tolist()]
        assert [len(names) for names in ranks] == [12, 12] and not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == sorted(order) and len(set(order)) == 24
        assert ranks[0] == order[0::2] and ranks[1] == order[1::2]


def test_bench_data_compares_kdcli_with_torchvision_on_the_same_files(tmp_path, trees):
    results = tmp_path / "bench.csv"
    args = ["bench", "data", "--recipe", "quickstart", "--set", "data.dataset=imagefolder", "--set",
            f"data.root={trees['imagefolder']}", "--set", "data.image_size=32", "--set", "train.batch_size=4",
            "--batches", "2", "--warmup", "1", "--repeats", "2", "--workers", "1", "--results-file", str(results)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(results)
    assert list(frame.loader) == ["torchvision", "kdcli"] and list(frame.workers) == [1, 1]
    assert frame.ratio.tolist() == pytest.approx([1.0, frame.images_per_sec[1] / frame.images_per_sec[0]])
    assert frame.batch_ms.tolist() == pytest.approx((4000 / frame.images_per_sec).tolist())
    assert (frame.images_per_sec_min <= frame.images_per_sec).all()
    assert (frame.images_per_sec <= frame.images_per_sec_max).all()
    assert "x torchvision's loader" in result.output
