"""Micro-benchmarks of kdcli's numerical kernels.

:func:`bench_isotonic` times the batched IDA projection (:func:`kdcli.isotonic.project`) against the
per-sample reference loop (:func:`kdcli.isotonic.project_loop`) on the same inputs in one run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from torch import Tensor

from kdcli.augment import label_roles
from kdcli.isotonic import project, project_loop

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
    ``repeats`` times (alternating keeps background load from favouring one of them), synchronising the
    device around each call. Times are medians in milliseconds.

    Args:
        devices: torch device strings; ``None`` for CPU and, if available, CUDA.
        batch: rows per call (B).
        classes: class counts (C) to test.
        repeats: timed calls per implementation.
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
    with _intra_op_threads(num_threads):
        for num_classes in classes:
            inputs = teacher_like_batch(batch, num_classes, generator, logit_noise)
            for device in devices:
                rows.append(_bench_one(device, [t.to(device) for t in inputs], repeats))
    return pd.DataFrame(rows)


def _bench_one(device: str, inputs: list[Tensor], repeats: int) -> dict[str, object]:
    values = inputs[0]
    times: dict[str, list[float]] = {"batched": [], "loop": []}
    solvers = {"batched": project, "loop": project_loop}
    for solver in solvers.values():  # warm-up (allocator, kernels, lazy init)
        for _ in range(2):
            solver(*inputs)
    for _ in range(repeats):
        for name, solver in solvers.items():
            times[name].append(_timed_ms(lambda: solver(*inputs), values.device))
    batched_ms, loop_ms = statistics.median(times["batched"]), statistics.median(times["loop"])
    diff = (project(*inputs).double() - project_loop(*inputs).double()).abs().max().item()
    return {"device": device, "B": values.shape[0], "C": values.shape[1], "batched_ms": batched_ms,
            "loop_ms": loop_ms, "speedup": loop_ms / batched_ms, "max_abs_diff": diff}


def _timed_ms(call: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    call()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _intra_op_threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
