"""Device helpers shared by the engine, the benchmarks and the measurements: precision and timing.

A leaf module (it imports only torch), so any layer may use it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a run's ``precision``: bf16 autocast on ``device``'s type, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
