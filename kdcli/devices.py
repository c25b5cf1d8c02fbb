"""Device helpers shared by the engine, the data layer, the benchmarks and the measurements: precision, timing and
the CPUs at hand.

A leaf module (it imports only torch), so any layer may use it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, e.g. under a batch scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved ``precision`` (see :func:`resolve_precision`): bf16 or fp16 autocast
    on ``device``'s type, or nothing for fp32."""
    if precision in HALF:
        return torch.autocast(device_type=device.type, dtype=HALF[precision])
    if precision != "fp32":
        raise ValueError(f"precision must be resolved to fp32, bf16 or fp16 first, got {precision!r}")
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where ``device`` computes bf16 natively (:func:`native_bf16`), else ``fp32``."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 is faster than fp32 here: a CUDA GPU with bf16 units (Ampere and later), or an x86 CPU
    with AVX512-BF16 or AMX instructions. Elsewhere oneDNN emulates bf16 on fp32 units, which measured
    2x *slower* than fp32 for a CIFAR ResNet step on an AVX512 Xeon without them."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags the Linux kernel reports (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def synchronize(device: torch.device) -> None:
    """Wait for the queued kernels of a CUDA device (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[..., T], *args: object, device: torch.device | None = None) -> tuple[T, float]:
    """``call(*args)`` and its wall time in milliseconds.

    A CUDA ``device`` (default: that of the first tensor argument) is synchronised before and after,
    so the time covers the queued kernels and not only their launch.
    """
    device = device or next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))
    synchronize(device)
    start = time.perf_counter()
    result = call(*args)
    synchronize(device)
    return result, (time.perf_counter() - start) * 1e3
