"""DDP through torchrun: rank discovery, process group, wrapping and unwrapping networks.

``torchrun --nproc_per_node N -m kdcli distill ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; each rank trains
on a disjoint shard of every epoch (see ``kdcli.data.make_loader(shard=...)``), gradients are averaged by
DistributedDataParallel and only rank 0 writes files.
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


def wrap(network: nn.Module, env: DistEnv) -> nn.Module:
    if not env.enabled:
        return network
    device_ids = [env.local_rank] if next(network.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def unwrap(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


def _group_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (a no-op for a single process): e.g. until rank 0 has written a checkpoint."""
    if _group_active():
        torch.distributed.barrier()


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Average the gradients of ``optimizer``'s parameters over the ranks (a no-op for a single process).

    DistributedDataParallel only synchronises gradients of a backward that follows its own ``forward``.
    Updates whose forward bypasses it (feature taps through ``unwrap(net).forward_features``, projectors,
    discriminators) call this between ``backward()`` and ``step()`` so every rank applies the same update.
    """
    if not _group_active():
        return
    world = torch.distributed.get_world_size()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)
