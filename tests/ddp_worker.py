"""Launched by test_distributed.py under torchrun (2 CPU ranks, gloo): do DDP replicas stay identical?

For each method named on the command line, every rank builds the same networks (same seed), wraps them
with DDP as the pipeline does, and takes a few training steps on *its own* random batch. If the method
averages every gradient over the ranks, the replicas end bitwise-close; if some update bypasses DDP
unsynchronised, they drift apart. Rank 0 prints one line per method: ``<method> <max abs difference>``.
``--no-sync`` switches off the methods' own gradient averaging (the check that the check can fail).
"""

from __future__ import annotations

import sys

import torch

from kdcli.engine import distributed
from kdcli.engine.pipeline import build_network
from kdcli.methods import afd, base, get_method
from kdcli.methods.base import Batch, StepInfo
from kdcli.recipes import load_recipe

STEPS = 3


def replica_gap(method_name: str, env: distributed.DistEnv) -> float:
    recipe = load_recipe("quickstart", [f"method={method_name}", "data.num_classes=10"])
    method_cls = get_method(method_name)
    torch.manual_seed(0)
    teacher = build_network(recipe.teacher.arch, 10).eval().requires_grad_(False)
    networks = {name: distributed.wrap(build_network(arch, 10), env)
                for name, arch in method_cls.networks_for(recipe).items()}
    method = method_cls.create(networks, teacher, recipe, 10)
    method.build_optimizers(1)
    method.train()
    data = torch.Generator().manual_seed(100 + env.rank)  # a different batch on every rank
    for step in range(STEPS):
        batch = Batch(torch.randn(8, 3, 32, 32, generator=data), torch.randint(0, 10, (8,), generator=data),
                      torch.arange(8))
        method.train_step(batch, StepInfo(0, 1, step, torch.Generator().manual_seed(step)))
    flat = torch.cat([p.detach().flatten() for p in method.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(env.world)]
    torch.distributed.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def main(argv: list[str]) -> None:
    if "--no-sync" in argv:
        base.average_gradients = afd.average_gradients = lambda optimizer: None
    env = distributed.init_distributed(torch.device("cpu"))
    torch.set_num_threads(1)
    for name in (a for a in argv if not a.startswith("--")):
        gap = replica_gap(name, env)
        if env.is_main:
            print(name, f"{gap:.3e}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
