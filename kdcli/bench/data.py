"""``kdcli bench data``: a recipe's training loader alone, kdcli's against torchvision's standard one, in one run.

The reference is the loader every ImageNet training script starts from (torchvision's reference recipe, timm's
and torchdistill's defaults): ``torchvision.datasets.ImageFolder`` with ``RandomResizedCrop(S)`` +
``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` in a ``DataLoader`` (shuffled, ``drop_last``, pinned
memory on CUDA, persistent workers) over the same files with the same number of workers. For WebDataset shards
the reference is the ``webdataset`` library's pipeline with the same transforms; for in-memory datasets (CIFAR,
synthetic) it is a DataLoader over PIL images with ``RandomCrop(S, padding)`` + flip, as RepDistiller and
mdistiller load CIFAR. Both loaders deliver normalised float batches on the device; a batch counts once it is
there. The loaders take turns in rounds, so background load hits both alike: each round builds the loader,
loads ``warmup`` batches untimed (worker start-up and the batches its workers prefetched), times ``batches``
batches, and shuts its workers down, so that only one loader's workers run at a time; the median round is
reported. On the CPU the main process
runs ``CPUs - workers`` intra-op threads (at least 1) for both, so that its threads do not take the workers' cores.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

from kdcli.bench.timing import PILImages, intra_op_threads
from kdcli.data import DataBundle, FolderSplit, TensorSplit, make_loader
from kdcli.data.sources import ShardSource
from kdcli.devices import available_cpus, synchronize
from kdcli.errors import UserError
from kdcli.recipes import Recipe

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def bench_data(recipe: Recipe, data: DataBundle, device: torch.device, *, workers: int, batches: int, warmup: int,
               repeats: int, seed: int) -> pd.DataFrame:
    """Images/s of kdcli's training loader and of the reference over ``data.train``; one row each.

    Columns: ``loader`` (``torchvision`` or ``webdataset``: the reference, first; then ``kdcli``), ``dataset,
    workers, batch_size, image_size, images_per_sec`` (median round),
    ``images_per_sec_min/max``, ``batch_ms`` (median ms per batch), ``ratio`` (this loader's images/s over the
    reference's, measured in the same run).
    """
    if len(data.train) < recipe.train.batch_size:
        raise UserError(f"bench data: the train split has {len(data.train)} images, fewer than one batch of "
                        f"{recipe.train.batch_size}; lower train.batch_size")
    threads = max(1, available_cpus() - workers) if device.type == "cpu" else None
    with intra_op_threads(threads):
        return _measure(recipe, data, device, workers=workers, batches=batches, warmup=warmup, repeats=repeats,
                        seed=seed)


def _measure(recipe: Recipe, data: DataBundle, device: torch.device, *, workers: int, batches: int, warmup: int,
             repeats: int, seed: int) -> pd.DataFrame:
    split, batch_size = data.train, recipe.train.batch_size
    reference = "webdataset" if _shards(split) else "torchvision"
    streams = {reference: lambda: _reference(recipe, split, device, workers, batch_size, seed),
               "kdcli": lambda: _kdcli(split, device, workers, batch_size, seed, recipe.train.channels_last)}
    rates: dict[str, list[float]] = {name: [] for name in streams}
    for round_ in range(repeats):
        for name in list(streams) if round_ % 2 == 0 else list(reversed(streams)):
            rates[name].append(_timed_block(streams[name](), device, batches, warmup) * batch_size)
    rows = []
    for name, values in rates.items():
        median = statistics.median(values)
        rows.append({"loader": name, "dataset": recipe.data.dataset, "workers": workers, "batch_size": batch_size,
                     "image_size": data.image_size, "images_per_sec": median, "images_per_sec_min": min(values),
                     "images_per_sec_max": max(values), "batch_ms": 1000 * batch_size / median})
    frame = pd.DataFrame(rows)
    frame["ratio"] = frame.images_per_sec / frame.images_per_sec.iloc[0]
    return frame


def _timed_block(stream: Batches, device: torch.device, batches: int, warmup: int) -> float:
    """Batches/s of ``batches`` batches after ``warmup`` untimed ones (worker start-up, and the batches the workers
    prefetched: they are not the steady state). Only this stream's workers live meanwhile: it is closed after."""
    try:
        for _ in range(warmup):
            next(stream)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        synchronize(device)
        return batches / (time.perf_counter() - start)
    finally:
        stream.close()  # the loader and its workers go with the generator
        gc.collect()


def _kdcli(split: TensorSplit | FolderSplit, device: torch.device, workers: int, batch_size: int, seed: int,
           channels_last: bool) -> Batches:
    if isinstance(split, FolderSplit):
        split = dataclasses.replace(split, num_workers=workers)
    loader = make_loader(split, batch_size, train=True, device=device, seed=seed, channels_last=channels_last)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch.images, batch.labels
        epoch += 1


def _reference(recipe: Recipe, split: TensorSplit | FolderSplit, device: torch.device, workers: int, batch_size: int,
               seed: int) -> Batches:
    from torchvision import transforms

    cfg, size = recipe.data, split.image_size
    if isinstance(split, TensorSplit):
        crop = [transforms.RandomCrop(size, padding=split.crop_padding)] if split.crop_padding else []
    elif split.random_crop:
        crop = [transforms.RandomResizedCrop(size)]
    else:
        crop = [transforms.Resize(round(size / split.crop_fraction)), transforms.CenterCrop(size)]
    flip = [transforms.RandomHorizontalFlip()] if cfg.hflip else []
    transform = transforms.Compose([*crop, *flip, transforms.ToTensor(), transforms.Normalize(split.mean, split.std)])
    on_gpu = device.type == "cuda"
    if isinstance(split, TensorSplit):
        dataset = PILImages(split, transform)
    elif _shards(split):
        return _webdataset_reference(cfg.root, transform, device, workers, batch_size)
    else:
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(str(Path(cfg.root).expanduser() / "train"), transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=on_gpu, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return _on_device(loader, device, on_gpu)


def _on_device(loader, device: torch.device, on_gpu: bool) -> Batches:
    while True:
        for images, labels in loader:
            yield images.to(device, non_blocking=on_gpu), labels.to(device, non_blocking=on_gpu)


def _shards(split: TensorSplit | FolderSplit) -> bool:
    return isinstance(split, FolderSplit) and isinstance(split.source, ShardSource)


def _webdataset_reference(root: str, transform: Callable, device: torch.device, workers: int,
                          batch_size: int) -> Batches:
    try:
        import webdataset as wds
    except ImportError:
        raise UserError("bench data: the reference loader for shards is the webdataset library; "
                        "pip install 'kdcli[webdataset]'") from None
    urls = sorted(str(p) for p in (Path(root).expanduser() / "train").glob("*.tar"))
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, empty_check=False)
               .shuffle(1000).decode("pil").to_tuple("jpg;jpeg;png;webp", "cls").map_tuple(transform, int)
               .batched(batch_size, partial=False))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                           persistent_workers=workers > 0)
    return _on_device(loader, device, device.type == "cuda")
