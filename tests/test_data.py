"""Data layer: synthetic generator, CIFAR files, ImageFolder trees, splits and the batch loaders."""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdcli.data import (
    DataConfig,
    TensorSplit,
    build_data,
    make_loader,
    smoke_data,
    synthetic,
    torchvision_sets,
)
from kdcli.data.loader import epoch_order
from kdcli.data.splits import channel_stats, stratified_split
from kdcli.data.synthetic import synthetic_split
from kdcli.errors import UserError

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def generated() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic_split(20, 4000, seed=0, split="train")


def test_synthetic_is_bitwise_deterministic_and_seeded():
    images, labels = synthetic_split(20, 1000, seed=0, split="train")
    again, again_labels = synthetic_split(20, 1000, seed=0, split="train")
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    other, _ = synthetic_split(20, 1000, seed=1, split="train")
    assert (other != images).float().mean() > 0.5


def test_synthetic_does_not_depend_on_thread_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, _ = synthetic_split(20, 1000, seed=0, split="train")
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(2)
    try:
        double, _ = synthetic_split(20, 1000, seed=0, split="train")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, double)


def test_synthetic_shapes_range_and_balance(generated):
    images, labels = generated
    assert images.dtype == torch.uint8 and images.shape == (4000, 3, 32, 32)
    assert labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels, minlength=20), torch.full((20,), 200))
    assert images.min() < 20 and images.max() > 235  # uses the whole range
    assert 0.3 < images.float().mean() / 255 < 0.7


def test_synthetic_test_split_does_not_depend_on_train_size():
    small = build_data(DataConfig("synthetic", train_size=100, test_size=60))
    large = build_data(DataConfig("synthetic", train_size=300, test_size=60))
    assert torch.equal(small.test.images, large.test.images)
    assert not torch.equal(small.test.images, small.train.images[:60])


def test_synthetic_has_real_within_class_variation(generated):
    images, labels = generated
    flat = images.flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == flat.shape[0]  # no two images identical
    x = flat[:1000].float() / 255
    y = labels[:1000]
    distances = torch.cdist(x, x)
    same = y[:, None] == y[None, :]
    off_diagonal = ~torch.eye(len(y), dtype=torch.bool)
    within, between = distances[same & off_diagonal].mean(), distances[~same].mean()
    # Samples of one class are nearly as far apart as samples of different classes: classes overlap.
    assert within > 0.85 * between
    assert within < between  # ...but not completely


def test_synthetic_is_not_linearly_solvable_but_class_means_differ(generated):
    images, labels = generated
    x = images.flatten(1).float() / 255
    mean = x[:3000].mean(0)
    train_x, test_x = x[:3000] - mean, x[3000:] - mean
    targets = F.one_hot(labels[:3000], 20).float()
    gram = train_x.T @ train_x
    accuracies = []
    for ridge in (10.0, 100.0, 1000.0):  # the best ridge-regression classifier over a range of regularisation
        weights = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), train_x.T @ targets)
        accuracies.append(((test_x @ weights).argmax(1) == labels[3000:]).float().mean().item())
    assert max(accuracies) < 0.6
    centroids = torch.stack([train_x[labels[:3000] == c].mean(0) for c in range(20)])
    nearest_mean = torch.cdist(test_x, centroids).argmin(1)
    assert (nearest_mean == labels[3000:]).float().mean() > 2 / 20  # class means carry signal (chance: 1/20)


def test_separable_rendering_equals_direct_evaluation():
    placed = synthetic._place_parts(torch.tensor([3, 7, 11]), synthetic._make_classes(20, 0),
                                    torch.Generator().manual_seed(1))
    axis = synthetic._pixel_axis(16)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    offset = torch.stack([x, y], -1) - placed.centre[:, :, None, None, :]  # (n, M, H, W, 2)
    window = torch.exp(-offset.square().sum(-1) / (2 * placed.sigma[..., None, None] ** 2))
    carrier = torch.cos((offset * placed.wave[:, :, None, None, :]).sum(-1) + placed.phase[..., None, None])
    direct = ((window * carrier)[:, :, None] * placed.colour[..., None, None]).sum(1)  # sum over parts
    assert torch.allclose(synthetic._render_parts(placed, 16).double(), direct, atol=1e-5)
    assert direct.abs().max() > 0.5


def test_build_synthetic_bundle():
    bundle = build_data(DataConfig("synthetic", num_classes=25, train_size=500, test_size=100, val_fraction=0.2))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (400, 100, 100)
    assert bundle.num_classes == 25 and bundle.image_size == 32 and bundle.class_names[:2] == ["class_00", "class_01"]
    full, _ = synthetic_split(25, 500, seed=0, split="train")
    assert (bundle.mean, bundle.std) == channel_stats(full)  # statistics of the whole generated train split
    assert torch.equal(bundle.train.labels.bincount(minlength=25), torch.full((25,), 16))
    assert torch.equal(bundle.val.labels.bincount(minlength=25), torch.full((25,), 4))


def test_channel_stats_are_exact():
    images = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.double() / 255
    assert mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=5e-5)
    assert std == pytest.approx(x.std((0, 2, 3), unbiased=False).tolist(), abs=5e-5)


# ----------------------------------------------------------------------------------------- CIFAR files
def test_py2_pickle_matches_original_cifar_layout(tmp_path, cifar_files):
    files = cifar_files.cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "train", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")  # how the original files look when read as bytes
    assert set(raw) == {b"batch_label", b"data", b"fine_labels", b"coarse_labels", b"filenames"}
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (12, 3072)
    assert raw[b"filenames"][0] == files["train"]["filenames"][0].encode()


def test_cifar100_reads_real_format_through_torchvision(tmp_path, cifar_files):
    files = cifar_files.cifar100(tmp_path)
    bundle = build_data(DataConfig("cifar100", root=str(tmp_path)))
    expected = torch.from_numpy(files["train"]["data"]).view(12, 3, 32, 32)
    assert torch.equal(bundle.train.images, expected)  # rows are R, G, B planes of 32x32
    assert bundle.train.labels.tolist() == files["train"]["fine_labels"]
    assert torch.equal(bundle.test.images, torch.from_numpy(files["test"]["data"]).view(5, 3, 32, 32))
    assert bundle.class_names == files["meta"]["fine_label_names"] and bundle.num_classes == 100
    # RepDistiller's CIFAR-100 normalisation (dataset/cifar100.py), with which the published teachers were trained
    assert bundle.mean == (0.5071, 0.4867, 0.4408) and bundle.std == (0.2675, 0.2565, 0.2761)


def test_cifar10_reads_real_format_through_torchvision(tmp_path, cifar_files):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [cifar_files.batch(3, "labels", 10, seed) for seed in range(1, 6)]
    for i, batch in enumerate(batches, start=1):
        cifar_files.pickle(folder / f"data_batch_{i}", batch)
    cifar_files.pickle(folder / "test_batch", cifar_files.batch(4, "labels", 10, 9))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    cifar_files.pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": 3, "num_vis": 3072})
    bundle = build_data(DataConfig("cifar10", root=str(tmp_path), val_fraction=0.0))
    expected = torch.from_numpy(np.concatenate([b["data"] for b in batches])).view(15, 3, 32, 32)
    assert torch.equal(bundle.train.images, expected)
    assert bundle.train.labels.tolist() == [label for b in batches for label in b["labels"]]
    assert bundle.class_names == names and len(bundle.test) == 4
    assert bundle.mean == (0.4914, 0.4822, 0.4465)


def test_missing_cifar_is_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as error:
        build_data(DataConfig("cifar100", root=str(tmp_path)))
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "cifar-100-python/" in message and "data.download=true" in message


def test_failed_download_is_one_line_user_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution\nsecond line")

    monkeypatch.setattr(torchvision_sets, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as error:
        build_data(DataConfig("cifar10", root=str(tmp_path), download=True))
    assert "\n" not in str(error.value)
    assert "download" in str(error.value) and str(tmp_path / "cifar-10-batches-py") in str(error.value)


def test_unknown_dataset_and_bad_fraction_are_user_errors():
    with pytest.raises(UserError, match="unknown dataset"):
        build_data(DataConfig("mnist"))
    with pytest.raises(UserError, match="val_fraction"):
        build_data(DataConfig("synthetic", val_fraction=1.0))


# ----------------------------------------------------------------------------------------- splits
def test_stratified_split_is_stratified_disjoint_and_seeded():
    labels = torch.arange(300) % 3
    labels[:30] = 0  # unbalanced: class 0 has 120, classes 1/2 have 90
    keep, held = stratified_split(labels, 0.1, seed=5)
    assert torch.bincount(labels[held]).tolist() == [12, 9, 9]
    assert torch.equal(torch.sort(torch.cat([keep, held])).values, torch.arange(300))
    keep_again, held_again = stratified_split(labels, 0.1, seed=5)
    assert torch.equal(held, held_again) and torch.equal(keep, keep_again)
    assert not torch.equal(held, stratified_split(labels, 0.1, seed=6)[1])


def test_val_carve_out_leaves_test_untouched():
    plain = build_data(DataConfig("synthetic", train_size=200, test_size=40))
    carved = build_data(DataConfig("synthetic", train_size=200, test_size=40, val_fraction=0.25))
    assert torch.equal(plain.test.images, carved.test.images)
    keep, held = stratified_split(plain.train.labels, 0.25, seed=0)
    assert torch.equal(carved.train.images, plain.train.images[keep])
    assert torch.equal(carved.val.images, plain.train.images[held])


# ----------------------------------------------------------------------------------------- loaders
def _split(n: int = 50, crop_padding: int = 4, hflip: bool = True) -> TensorSplit:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
    return TensorSplit(images, torch.arange(n) % 5, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), crop_padding, hflip)


def _normalise(split: TensorSplit, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(split.mean).view(1, 3, 1, 1)
    std = torch.tensor(split.std).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch)
    return list(loader)


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        all(x is y is None or torch.equal(x, y) for x, y in zip(p, q, strict=True)) for p, q in zip(a, b, strict=True))


def test_loader_is_reproducible_from_seed_and_epoch():
    split = _split()
    first = make_loader(split, 16, train=True, device=CPU, seed=3)
    second = make_loader(split, 16, train=True, device=CPU, seed=3)
    epoch0, epoch1 = _epoch(first, 0), _epoch(first, 1)
    assert _same_batches(epoch0, _epoch(second, 0))
    assert _same_batches(epoch0, _epoch(first, 0))  # going back to an epoch replays it bit-exactly
    assert not torch.equal(epoch0[0][2], epoch1[0][2])
    assert not torch.equal(epoch0[0][2], _epoch(make_loader(split, 16, train=True, device=CPU, seed=4), 0)[0][2])


def test_a_loader_started_mid_epoch_yields_the_rest_of_that_epoch_exactly(tmp_path):
    """What a step-exact resume relies on: ``set_epoch(e, start=k)`` gives batches k.. of the full epoch e (the
    in-memory path replays the skipped batches' crop and flip draws; folder crops are seeded per sample)."""
    loader = make_loader(_split(), 8, train=True, device=CPU, seed=3)
    full = _epoch(loader, 2)
    loader.set_epoch(2, start=3)
    assert len(full) == 6 and _same_batches(list(loader), full[3:])
    _write_tree(tmp_path, {"train": 4, "test": 1})
    folder = build_data(DataConfig("imagefolder", root=str(tmp_path), image_size=12, num_workers=0)).train
    loader = make_loader(folder, 2, train=True, device=CPU, seed=7)
    full = _epoch(loader, 1)
    loader.set_epoch(1, start=2)
    assert len(full) == 4 and _same_batches(list(loader), full[2:])


def test_train_and_eval_batching():
    split = _split(50)
    train = make_loader(split, 16, train=True, device=CPU, seed=0)
    assert len(train) == 3 and [len(b[1]) for b in train] == [16, 16, 16]
    indices = torch.cat([b[2] for b in train])
    assert indices.unique().numel() == 48 and not torch.equal(indices, torch.arange(48))
    evaluation = make_loader(split, 16, train=False, device=CPU, seed=0)
    batches = list(evaluation)
    assert len(evaluation) == 4 and [len(b[1]) for b in batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(50))
    assert all(torch.equal(b[0], _normalise(split, split.images[b[2]])) for b in batches)
    assert all(torch.equal(b[1], split.labels[b[2]]) for b in batches)
    assert len(make_loader(split, 64, train=True, device=CPU, seed=0)) == 1  # smaller than a batch: kept


def test_unaugmented_training_batch_is_exact_normalisation():
    split = _split(crop_padding=0, hflip=False)
    images, labels, indices, _ = next(iter(make_loader(split, 16, train=True, device=CPU, seed=0)))
    assert images.dtype == torch.float32 and labels.dtype == torch.int64 and indices.dtype == torch.int64
    assert torch.equal(images, _normalise(split, split.images[indices]))
    assert torch.equal(labels, split.labels[indices])


def test_flips_are_mirror_images():
    split = _split(crop_padding=0, hflip=True)
    images, _, indices, _ = next(iter(make_loader(split, 50, train=True, device=CPU, seed=0)))
    plain = _normalise(split, split.images[indices])
    mirrored = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(images, plain, strict=True)])
    unchanged = torch.tensor([torch.equal(a, b) for a, b in zip(images, plain, strict=True)])
    assert torch.all(mirrored ^ unchanged)
    assert 10 < mirrored.sum() < 40


def test_crops_are_shifts_with_zero_padding_in_pixel_space():
    split = _split(crop_padding=2, hflip=False)
    images, _, indices, _ = next(iter(make_loader(split, 50, train=True, device=CPU, seed=0)))
    padded = _normalise(split, F.pad(split.images[indices], (2, 2, 2, 2)))  # pad with pixel value 0
    shifts = []
    for image, source in zip(images, padded, strict=True):
        windows = {(dy, dx): source[:, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)}
        matches = [shift for shift, window in windows.items() if torch.equal(image, window)]
        assert len(matches) == 1
        shifts.append(matches[0])
    assert len(set(shifts)) > 10  # offsets are spread over the 5x5 possibilities


def test_channels_last_output():
    split = _split()
    images, _, _, _ = next(iter(make_loader(split, 16, train=True, device=CPU, seed=0, channels_last=True)))
    assert images.is_contiguous(memory_format=torch.channels_last)
    plain, _, _, _ = next(iter(make_loader(split, 16, train=True, device=CPU, seed=0)))
    assert plain.is_contiguous() and torch.equal(plain, images)


def test_shards_are_disjoint_equal_and_cover_the_epoch():
    order = epoch_order(10, shuffle=True, seed=1, epoch=2, shard=(0, 1))
    shards = [epoch_order(10, shuffle=True, seed=1, epoch=2, shard=(rank, 4)) for rank in range(4)]
    assert all(len(shard) == 3 for shard in shards)
    padded = torch.cat([order, order[:2]])  # DistributedSampler pads by wrapping around
    assert torch.equal(torch.stack(shards, 1).flatten(), padded)
    split = _split(50)
    loaders = [make_loader(split, 5, train=True, device=CPU, seed=0, shard=(rank, 2)) for rank in range(2)]
    seen = [torch.cat([batch[2] for batch in _epoch(loader, 3)]) for loader in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 5
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(range(50))


# ----------------------------------------------------------------------------------------- ImageFolder
COLOURS = {"apple": (200, 30, 40), "sky": (20, 90, 220)}


def _write_tree(root: Path, counts: dict[str, int]) -> None:
    for folder, count in counts.items():
        for name, colour in COLOURS.items():
            (root / folder / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.zeros((20, 24, 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
                pixels[:, : 2 + i] = 255  # a white band of varying width on the left
                Image.fromarray(pixels).save(root / folder / name / f"{i}.png")


def test_imagefolder_tree(tmp_path):
    _write_tree(tmp_path, {"train": 4, "val": 2})
    bundle = build_data(DataConfig("imagefolder", root=str(tmp_path), image_size=16, num_workers=0))
    assert bundle.class_names == ["apple", "sky"] and bundle.num_classes == 2 and bundle.image_size == 16
    assert (len(bundle.train), len(bundle.test)) == (8, 4) and bundle.train.labels.tolist() == [0] * 4 + [1] * 4
    images, labels, indices, _ = next(iter(make_loader(bundle.test, 4, train=False, device=CPU, seed=0)))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1] and indices.tolist() == [0, 1, 2, 3]
    centre_colour = (images[:, :, 8, 12] * torch.tensor(bundle.std) + torch.tensor(bundle.mean)) * 255
    # Right of the white band the resized, centre-cropped image shows the class colour.
    assert torch.allclose(centre_colour, torch.tensor([COLOURS["apple"]] * 2 + [COLOURS["sky"]] * 2).float(), atol=1)


def test_imagefolder_training_views_are_seeded_and_worker_independent(tmp_path):
    _write_tree(tmp_path, {"train": 4, "test": 1})
    spec = DataConfig("imagefolder", root=str(tmp_path), image_size=12, num_workers=0, val_fraction=0.5)
    bundle = build_data(spec)
    assert len(bundle.val) == 4 and bundle.val.labels.tolist() == [0, 0, 1, 1]
    serial = make_loader(bundle.train, 2, train=True, device=CPU, seed=7)
    epoch0 = _epoch(serial, 0)
    assert [b[0].shape for b in epoch0] == [(2, 3, 12, 12)] * 2
    assert _same_batches(epoch0, _epoch(serial, 0)) and not _same_batches(epoch0, _epoch(serial, 1))
    bundle.train.num_workers = 1
    assert _same_batches(epoch0, _epoch(make_loader(bundle.train, 2, train=True, device=CPU, seed=7), 0))


def test_imagefolder_missing_folders_name_the_path(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError) as error:
        build_data(DataConfig("imagefolder", root=str(tmp_path)))
    assert str(tmp_path) in str(error.value) and "val/" in str(error.value)


# ----------------------------------------------------------------------------------------- smoke
def test_smoke_data_matches_recipe_shape():
    bundle = smoke_data(num_classes=100, image_size=40, n_train=24, n_test=8)
    assert bundle.train.images.shape == (24, 3, 40, 40) and bundle.test.images.shape == (8, 3, 40, 40)
    assert bundle.num_classes == 100 and len(bundle.class_names) == 100 and bundle.image_size == 40
    assert bundle.val is None
    images, labels, _, _ = next(iter(make_loader(bundle.train, 8, train=True, device=CPU, seed=0)))
    assert images.shape == (8, 3, 40, 40) and labels.max() < 100
