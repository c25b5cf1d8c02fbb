"""Micro-benchmarks of the isotonic projection (``kdcli bench isotonic``).

:func:`bench_isotonic` times the batched IDA projection (:func:`kdcli.isotonic.project`) against the
per-sample reference loop (:func:`kdcli.isotonic.project_loop`) on the same inputs in one run;
:func:`bench_ida_step` compares one projection with one `kd-aug` and one `ida` training step.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import pandas as pd
import torch
from torch import Tensor, nn

from kdcli.augment import label_roles
from kdcli.bench.timing import intra_op_threads, median_ms, repeat
from kdcli.devices import timed
from kdcli.isotonic import project, project_loop
from kdcli.recipes import Recipe

KD_TEMPERATURE = 4.5  # IDA's tau: the projection runs on softmax(z_T / tau)


def teacher_like_batch(batch: int, classes: int, generator: torch.Generator, logit_noise: float = 2.0,
                       label_boost: float = 10.0) -> tuple[Tensor, Tensor, Tensor]:
    """Simulated teacher soft labels of a mixup batch: ``(probs, primary, secondary)`` on the CPU, float32.

    Logits are ``label_boost * h + N(0, logit_noise^2)`` with ``h`` the mixed hard label of two random
    labels and ``lam ~ U(0, 1)`` per sample; the soft labels are ``softmax(z / 4.5)``. With the defaults
    most rows violate the IDA order (a few large "other" logits beat the secondary label), as real
    teachers do on mixed samples; a large ``logit_noise`` gives nearly random inputs (the worst case).
    """
    labels_a = torch.randint(0, classes, (batch,), generator=generator)
    labels_b = torch.randint(0, classes, (batch,), generator=generator)
    lam = torch.rand(batch, generator=generator)
    hard = torch.zeros(batch, classes)
    hard.scatter_add_(1, labels_a[:, None], lam[:, None]).scatter_add_(1, labels_b[:, None], 1 - lam[:, None])
    logits = label_boost * hard + logit_noise * torch.randn(batch, classes, generator=generator)
    primary, secondary = label_roles(labels_a, labels_b, lam)
    return torch.softmax(logits / KD_TEMPERATURE, dim=1), primary, secondary


def bench_isotonic(devices: list[str] | None = None, batch: int = 128, classes: tuple[int, ...] = (100, 1000),
                   repeats: int = 30, logit_noise: float = 2.0, num_threads: int | None = None,
                   seed: int = 0) -> pd.DataFrame:
    """Time :func:`project` (batched) against :func:`project_loop` (per-sample loop) on the same inputs.

    For every device (default: CPU, plus CUDA when available) and class count, one teacher-like batch
    (:func:`teacher_like_batch`) is built, both implementations are warmed up, then timed alternately
    ``repeats`` times in blocks of back-to-back calls lasting about 5 ms each (alternating keeps background
    load from favouring one of them), synchronising the device around each block. Times are medians of
    the per-call time in milliseconds.

    Args:
        devices: torch device strings; ``None`` for CPU and, if available, CUDA.
        batch: rows per call (B).
        classes: class counts (C) to test.
        repeats: timed blocks per implementation.
        logit_noise: spread of the simulated "other" logits (larger: more violations to pool).
        num_threads: CPU intra-op threads during the benchmark (``None``: leave torch's setting).
        seed: seed of the input generator.

    Returns:
        One row per (device, C): ``device, B, C, batched_ms, loop_ms, speedup, max_abs_diff``, where
        ``speedup = loop_ms / batched_ms`` and ``max_abs_diff`` compares the two outputs.
    """
    devices = devices if devices is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with intra_op_threads(num_threads):
        for num_classes in classes:
            inputs = teacher_like_batch(batch, num_classes, generator, logit_noise)
            for device in devices:
                rows.append(_bench_one(device, [t.to(device) for t in inputs], repeats))
    return pd.DataFrame(rows)


def _bench_one(device: str, inputs: list[Tensor], repeats: int, block_ms: float = 5.0) -> dict[str, object]:
    values = inputs[0]
    solvers = {"batched": project, "loop": project_loop}
    # Warm-up (allocator, kernels, lazy init), then calls per timed block: enough for ~block_ms, so a
    # sub-millisecond call is timed in steady state (like timeit) rather than after the other solver
    # has just flushed the caches, and the timer's own overhead is amortised.
    calls = {}
    for name, solver in solvers.items():
        solver(*inputs)
        calls[name] = max(1, math.ceil(block_ms / max(timed(solver, *inputs)[1], 1e-3)))
    times: dict[str, list[float]] = {"batched": [], "loop": []}
    for _ in range(repeats):  # alternating blocks: background load hits both implementations alike
        for name, solver in solvers.items():
            times[name].append(timed(repeat, solver, calls[name], *inputs, device=values.device)[1] / calls[name])
    batched_ms, loop_ms = statistics.median(times["batched"]), statistics.median(times["loop"])
    diff = (project(*inputs).double() - project_loop(*inputs).double()).abs().max().item()
    return {"device": device, "B": values.shape[0], "C": values.shape[1], "batched_ms": batched_ms,
            "loop_ms": loop_ms, "speedup": loop_ms / batched_ms, "max_abs_diff": diff}


# -- the cost of the correction in a training step ------------------------------------------------
def bench_ida_step(device: torch.device, batch: int = 64, repeats: int = 3, seed: int = 0,
                   recipe_name: str = "cifar100-resnet-ida-mixup") -> pd.DataFrame:
    """Median time of one ``kd-aug`` and one ``ida`` training step vs one projection, on ``device``.

    The networks are the recipe's (by default resnet32x4 -> resnet8x4 with 100 classes; random weights:
    the step time does not depend on them), the batch is random 32x32 images. The projection is timed on a teacher-like
    batch of the same size (:func:`teacher_like_batch`, most rows violating), as it runs
    inside the ida step. Returns one row: ``device, B, C, teacher, student, kd_aug_step_ms, ida_step_ms,
    projection_ms, projection_share`` (= projection_ms / ida_step_ms) and ``ida_over_kd_aug``.
    """
    from kdcli.engine.pipeline import build_network, dataset_classes, resolve_recipe

    recipe = resolve_recipe(recipe_name)
    classes = dataset_classes(recipe)
    inputs = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=inputs).to(device)
    labels = torch.randint(0, classes, (batch,), generator=inputs).to(device)
    torch.manual_seed(seed)
    teacher = build_network(recipe.teacher.arch, classes).to(device).eval().requires_grad_(False)
    step_ms = {name: _step_ms(name, recipe, teacher, classes, images, labels, repeats, seed)
               for name in ("kd-aug", "ida")}
    soft, primary, secondary = (t.to(device) for t in teacher_like_batch(batch, classes, inputs))
    projection_ms = median_ms(project, soft, primary, secondary, repeats=max(repeats, 30))
    return pd.DataFrame([{
        "device": str(device), "B": batch, "C": classes, "teacher": recipe.teacher.arch,
        "student": recipe.student.arch, "kd_aug_step_ms": step_ms["kd-aug"], "ida_step_ms": step_ms["ida"],
        "projection_ms": projection_ms, "projection_share": projection_ms / step_ms["ida"],
        "ida_over_kd_aug": step_ms["ida"] / step_ms["kd-aug"],
    }])


def _step_ms(method_name: str, recipe: Recipe, teacher: nn.Module, classes: int, images: Tensor, labels: Tensor,
             repeats: int, seed: int) -> float:
    """Median milliseconds of one ``train_step`` of ``method_name`` with the recipe's weights and params
    (those the method knows) and a fresh student."""
    from kdcli.engine.pipeline import build_network
    from kdcli.engine.step import method_engine
    from kdcli.methods import get_method
    from kdcli.methods.base import Batch, StepInfo

    cls = get_method(method_name)
    known = {f.name for f in dataclasses.fields(cls.Params)}
    terms = set(cls.default_weights) | set(cls.optional_terms)
    config = dataclasses.replace(recipe.method, name=method_name,
                                 weights={k: v for k, v in recipe.method.weights.items() if k in terms},
                                 params={k: v for k, v in recipe.method.params.items() if k in known})
    student = build_network(recipe.student.arch, classes).to(images.device)
    engine = method_engine(config, {"student": student}, teacher, classes, images.shape[-1], recipe)
    batch = Batch(images, labels, torch.arange(images.shape[0], device=images.device))
    info = StepInfo(0, 1, 0, torch.Generator().manual_seed(seed))
    return median_ms(engine.train_step, batch, info, repeats=repeats, device=images.device)
