"""Benchmarks: each compares kdcli against a reference measured in the same run, on the same inputs.

* :mod:`kdcli.bench.step` (``kdcli bench step``): a recipe's distillation step against a plain PyTorch loop;
* :mod:`kdcli.bench.isotonic` (``kdcli bench isotonic``): the batched isotonic projection against a loop;
* :mod:`kdcli.bench.data` (``kdcli bench data``): a recipe's training loader against torchvision's.
"""

from kdcli.bench.isotonic import bench_ida_step, bench_isotonic, teacher_like_batch

__all__ = ["bench_ida_step", "bench_isotonic", "teacher_like_batch"]
