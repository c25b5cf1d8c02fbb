"""``kdcli bench step``: a recipe's distillation step, kdcli's path against a plain PyTorch loop, in one run.

The reference is written the way the common KD code is (RepDistiller's ``train_distill``, mdistiller's
trainer): fp32, eager, a ``torch.utils.data.DataLoader`` over PIL images with torchvision's
``RandomCrop(32, 4)`` + flip + ``ToTensor`` + ``Normalize``, the teacher in eval mode under
``torch.no_grad``, separate CE and KD terms, SGD. kdcli's configurations run the recipe's real method
through its engine (teacher seam, DDP-ready pass, optimisers) on its in-memory loader. Every
configuration steps on the same images (the recipe's networks with random weights: a step's time does
not depend on them); they take turns in timed blocks (warm-up first, then ``repeats`` rounds of
``steps`` steps each, so background load hits all alike), synchronising only around each block.

Configurations are the reference plus ``variants``, each a ``+``-joined set of kdcli switches over a
plain fp32 engine (``fp32``), or over the recipe's own settings (``default``, the fast path):
``bf16``, ``fp16``, ``channels_last``, ``fold`` (teacher BatchNorm folding), ``compile``, ``cache``
(teacher outputs looked up in an in-memory cache of the real shape; its contents are random, the
lookup costs the same: building a real one is ``kdcli cache-teacher``).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcli.bench.timing import PILImages, median_ms
from kdcli.data import TensorSplit, ViewGrid, make_loader, smoke_data
from kdcli.data.registry import DATASETS
from kdcli.devices import resolve_precision, synchronize
from kdcli.engine.cache import CachedTeacher, serves
from kdcli.engine.pipeline import build_network, dataset_classes
from kdcli.engine.step import method_engine
from kdcli.errors import UserError
from kdcli.methods.base import Batch, StepInfo
from kdcli.models import Taps
from kdcli.recipes import Recipe

SWITCHES = ("fp32", "default", "bf16", "fp16", "channels_last", "fold", "compile", "cache")
BATCHES = 8  # distinct batches of generated images each configuration cycles through


@dataclass
class Config:
    """One timed configuration: ``step()`` runs one training step (data included), ``teacher()`` only the
    teacher part of one (forward or cache lookup) on a fixed batch; ``state`` holds what it keeps resident
    (networks, optimisers, cache), whose bytes count towards its peak memory."""

    name: str
    step: Callable[[], object]
    teacher: Callable[[], object]
    precision: str
    channels_last: bool
    state: list[object]

    def resident_bytes(self) -> int:
        tensors: dict[int, Tensor] = {}
        for item in self.state:
            if isinstance(item, torch.nn.Module):
                tensors.update((id(t), t) for t in (*item.parameters(), *item.buffers()))
            elif isinstance(item, torch.optim.Optimizer):
                tensors.update((id(t), t) for state in item.state.values() for t in state.values()
                               if isinstance(t, Tensor))
            elif isinstance(item, CachedTeacher):
                tensors.update((id(t), t) for t in item.outputs.values())
        return sum(t.numel() * t.element_size() for t in tensors.values())


def parse_variants(text: str) -> list[str]:
    """``default,default+cache`` -> the variant names, each checked against :data:`SWITCHES`."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    for variant in variants:
        unknown = [s for s in variant.split("+") if s not in SWITCHES]
        if unknown:
            raise UserError(f"--variants: unknown switch '{unknown[0]}' in '{variant}'; combine {', '.join(SWITCHES)} "
                            "with + (e.g. default+cache)")
    if not variants:
        raise UserError("--variants is empty; e.g. --variants default,default+cache")
    return variants


def bench_step(recipe: Recipe, variants: list[str], device: torch.device, *, warmup: int = 2, repeats: int = 5,
               steps: int = 2, workers: int = 0, seed: int = 0) -> pd.DataFrame:
    """Time the reference loop and every variant of ``recipe``'s step; one row per configuration.

    Columns (timm ``benchmark.py`` style): ``config, teacher, student, method, device, precision,
    channels_last, batch_size, samples_per_sec, step_time`` (median ms), ``step_time_min/max``, ``speedup``
    (reference step time / this one), ``teacher_share`` (teacher part / step), ``peak_mem_mb`` (CUDA only:
    the configuration's resident tensors plus the peak a step allocates above them; NaN on the CPU, which
    keeps no per-allocation statistics), ``projected_run_h`` (the recipe's epochs x steps per epoch x step
    time, training steps only). Configurations take turns in a rotating order.
    """
    if recipe.teacher is None or recipe.student is None:
        raise UserError(f"bench step: recipe '{recipe.name}' needs teacher.arch and student.arch")
    classes, batch = dataset_classes(recipe), recipe.train.batch_size
    size = recipe.data.image_size
    data = smoke_data(classes, size, n_train=batch * BATCHES, seed=seed).train
    data = dataclasses.replace(data, crop_padding=recipe.data.crop_padding, hflip=recipe.data.hflip)
    configs = [_reference(recipe, data, classes, device, workers, seed)]
    configs += [_kdcli(recipe, variant, data, classes, device, seed) for variant in variants]
    times: dict[str, list[float]] = {c.name: [] for c in configs}
    step_peaks: dict[str, list[int]] = {c.name: [] for c in configs}
    for config in configs:  # warm-up: allocator, kernels, compilation, DataLoader workers
        for _ in range(warmup):
            config.step()
    for round_ in range(repeats):
        for config in configs[round_ % len(configs):] + configs[:round_ % len(configs)]:
            base = _start_peak(device)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                config.step()
            synchronize(device)
            times[config.name].append((time.perf_counter() - start) * 1e3 / steps)
            if device.type == "cuda":
                step_peaks[config.name].append(torch.cuda.max_memory_allocated(device) - base)
    peaks = {c.name: (c.resident_bytes() + max(step_peaks[c.name])) / 2**20 if step_peaks[c.name] else float("nan")
             for c in configs}
    teacher_ms = {c.name: median_ms(c.teacher, repeats=max(repeats, 3), device=device) for c in configs}
    return _table(recipe, configs, times, teacher_ms, peaks, device)


def _start_peak(device: torch.device) -> int:
    """Reset the CUDA peak counter; the bytes allocated now (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _table(recipe: Recipe, configs: list[Config], times: dict[str, list[float]], teacher_ms: dict[str, float],
           peaks: dict[str, float], device: torch.device) -> pd.DataFrame:
    batch = recipe.train.batch_size
    reference = statistics.median(times["reference"])
    images = _train_images(recipe)
    steps_per_epoch = images // batch if images is not None else float("nan")
    rows = []
    for config in configs:
        step = statistics.median(times[config.name])
        rows.append({
            "config": config.name, "teacher": recipe.teacher.arch, "student": recipe.student.arch,
            "method": "ce+kd" if config.name == "reference" else recipe.method.name, "device": str(device),
            "precision": config.precision, "channels_last": config.channels_last, "batch_size": batch,
            "samples_per_sec": round(batch * 1e3 / step, 1), "step_time": round(step, 2),
            "step_time_min": round(min(times[config.name]), 2), "step_time_max": round(max(times[config.name]), 2),
            "speedup": round(reference / step, 3), "teacher_share": round(teacher_ms[config.name] / step, 3),
            "peak_mem_mb": round(peaks[config.name], 1),
            "projected_run_h": round(steps_per_epoch * recipe.train.epochs * step / 3.6e6, 3),
        })
    return pd.DataFrame(rows)


def _train_images(recipe: Recipe) -> int | None:
    """Training images per epoch of the recipe's dataset after its validation carve-out (None: a folder tree)."""
    data = recipe.data
    total = data.train_size if data.dataset == "synthetic" else DATASETS[data.dataset].train_images
    return None if total is None else round(total * (1 - data.val_fraction))


# -- the reference loop ---------------------------------------------------------------------------------
def _reference(recipe: Recipe, data: TensorSplit, classes: int, device: torch.device, workers: int,
               seed: int) -> Config:
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.RandomCrop(data.image_size, padding=data.crop_padding), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(data.mean, data.std)])
    images = PILImages(data, transform)
    # One endless shuffled stream: no epoch boundary (a new iterator restarts the workers' prefetch) lands in
    # a timed block.
    sampler = torch.utils.data.RandomSampler(images, replacement=True, num_samples=2**40,
                                             generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(images, batch_size=recipe.train.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    torch.manual_seed(seed)
    teacher = build_network(recipe.teacher.arch, classes).to(device).eval()
    student = build_network(recipe.student.arch, classes).to(device).train()
    optim = recipe.optim
    sgd = torch.optim.SGD(student.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    temperature = float(recipe.method.params.get("temperature", 4.0))
    weights = recipe.method.weights if recipe.method.name == "kd" else {}
    batches = iter(loader)

    def step() -> None:
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = student(images)
        ce = F.cross_entropy(logits, labels)
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                      reduction="batchmean") * temperature**2
        loss = weights.get("ce", 0.1) * ce + weights.get("kd", 0.9) * kd
        sgd.zero_grad()
        loss.backward()
        sgd.step()

    fixed = next(iter(torch.utils.data.DataLoader(PILImages(data, transform), batch_size=recipe.train.batch_size)))
    fixed_images = fixed[0].to(device)

    def teacher_part() -> None:
        with torch.no_grad():
            teacher(fixed_images)

    return Config("reference", step, teacher_part, "fp32", False, [teacher, student, sgd])


def _forever(loader: Iterable) -> Iterator:
    while True:
        yield from loader


# -- kdcli's configurations ----------------------------------------------------------------------------
def _variant_recipe(recipe: Recipe, variant: str, device: torch.device) -> Recipe:
    """The recipe with a variant's switches: over the recipe's own settings (``default``) or a plain fp32 engine."""
    switches = set(variant.split("+"))
    train, teacher = recipe.train, recipe.teacher
    if "default" not in switches:
        train = dataclasses.replace(train, precision="fp32", channels_last=False, compile=False)
        teacher = dataclasses.replace(teacher, precision="fp32", fold_bn=False, compile=False)
    half = next((precision for precision in ("bf16", "fp16") if precision in switches), None)
    if half is not None:
        train, teacher = dataclasses.replace(train, precision=half), dataclasses.replace(teacher, precision=half)
    if "channels_last" in switches:
        train = dataclasses.replace(train, channels_last=True)
    if "fold" in switches:
        teacher = dataclasses.replace(teacher, fold_bn=True)
    if "compile" in switches:
        train, teacher = dataclasses.replace(train, compile=True), dataclasses.replace(teacher, compile=True)
    train = dataclasses.replace(train, precision=resolve_precision(train.precision, device))
    teacher = dataclasses.replace(teacher, precision=resolve_precision(teacher.precision, device), cache="off")
    return dataclasses.replace(recipe, train=train, teacher=teacher)


def _kdcli(recipe: Recipe, variant: str, data: TensorSplit, classes: int, device: torch.device, seed: int) -> Config:
    run = _variant_recipe(recipe, variant, device)
    torch.manual_seed(seed)
    teacher = build_network(recipe.teacher.arch, classes).to(device).eval()
    student = build_network(recipe.student.arch, classes, run.train.channels_last).to(device)
    cache = _random_cache(data, classes, device, seed) if "cache" in variant.split("+") else None
    engine = method_engine(run.method, {"student": student}, teacher, classes, data.image_size, run,
                           epochs=run.train.epochs, device=device, train_labels=data.labels)
    if cache is not None and not serves(["logits"], engine.method.teacher_taps or Taps()):
        raise UserError(f"bench step: variant '{variant}': method '{recipe.method.name}' reads more of the teacher "
                        "(its feature terms included) than a logits cache holds; drop +cache")
    if cache is not None:
        engine.teacher_seam.cache = cache
    loader = make_loader(data, recipe.train.batch_size, train=True, device=device, seed=seed,
                         channels_last=run.train.channels_last)
    batches = _forever(loader)
    info = StepInfo(0, run.train.epochs, 0, torch.Generator().manual_seed(seed))
    engine.method.train()
    if cache is not None and not engine.method.shows_loader_views():
        raise UserError(f"bench step: variant '{variant}': method '{recipe.method.name}' shows the teacher mixed "
                        "images, which a cache cannot serve; drop +cache")

    def step() -> None:
        images, labels, indices, views = next(batches)
        engine.train_step(Batch(images, labels, indices, views=views), info)

    first = next(iter(loader))
    fixed = Batch(first.images, first.labels, first.indices, views=first.views)

    def teacher_part() -> None:
        if engine.teacher_seam is not None:
            engine.teacher_seam(fixed)

    seam = engine.teacher_seam  # the teacher as it runs (folded: a copy of the one built above)
    resident = [engine.method, seam.network if seam is not None else teacher, *engine.optimizers.values()]
    return Config(variant, step, teacher_part, run.train.precision, run.train.channels_last,
                  resident + ([cache] if cache is not None else []))


def _random_cache(data: TensorSplit, classes: int, device: torch.device, seed: int) -> CachedTeacher:
    views = ViewGrid(data.crop_padding, data.hflip).count
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(len(data), views, classes, generator=gen).half().to(device)
    return CachedTeacher({"logits": table}, data.origins().to(device))
