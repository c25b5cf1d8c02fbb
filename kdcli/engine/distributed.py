"""DDP through torchrun: rank discovery, process group, the DDP wrapper, barriers.

``torchrun --nproc_per_node N -m kdcli distill ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; each rank trains
on a disjoint shard of every epoch (see ``kdcli.data.make_loader(shard=...)``), gradients are averaged by
DistributedDataParallel (one wrapper around the whole method, see :mod:`kdcli.engine.step`) and only
rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> DistEnv:
    """Read torchrun's environment and join the process group (a no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return env


def local_device(requested: torch.device, env: DistEnv) -> torch.device:
    """Each rank drives its own GPU."""
    if env.enabled and requested.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return requested


def wrap(module: nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel when several ranks train (unchanged for one process).

    ``device_ids`` stays None: the module and its inputs are already on this rank's device, so DDP moves
    nothing. Buffers are not broadcast from rank 0 at every forward: BN statistics in training mode do not
    enter the forward pass, only rank 0's are saved, and a method's other buffers (KDAV's queue) are kept
    identical by the method, so broadcasting them would only cost bandwidth.
    """
    if not env.enabled:
        return module
    return nn.parallel.DistributedDataParallel(module, broadcast_buffers=False,
                                               find_unused_parameters=find_unused_parameters)


def _group_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (a no-op for a single process): e.g. until rank 0 has written a checkpoint."""
    if _group_active():
        torch.distributed.barrier()


def agree(values: list[int], device: torch.device) -> list[int]:
    """The element-wise maximum of ``values`` over every rank (every rank must call it; unchanged alone)."""
    if not _group_active():
        return values
    tensor = torch.tensor(values, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def from_rank_zero(value: object) -> object:
    """Rank 0's ``value`` on every rank (e.g. a default output path that contains the time); unchanged alone."""
    if not _group_active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
