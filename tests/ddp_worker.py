"""Launched by test_distributed.py under torchrun (2 CPU ranks, gloo): do DDP replicas stay identical?

For each method named on the command line, every rank builds the same networks (same seed), builds the
method's engine as the trainer does (which wraps the whole method in DDP), and takes a few training steps on
*its own* random batch. If every gradient is averaged over the ranks (and crd's memory banks take every rank's
samples), the replicas end bitwise equal; if some update escaped DDP, they drift apart. Rank 0 prints one line
per method: ``<method> <max abs difference>``. ``--no-sync`` builds the engine without the DDP wrapper (the
check that the check can fail).
"""

from __future__ import annotations

import sys

import torch

from kdcli.engine import distributed, step
from kdcli.engine.pipeline import build_network, resolve_recipe
from kdcli.methods import get_method
from kdcli.methods.base import Batch, StepInfo, parse_params

STEPS = 3


def replica_gap(method_name: str, env: distributed.DistEnv) -> float:
    recipe = resolve_recipe("quickstart", [f"method={method_name}", "data.num_classes=10"])
    cls = get_method(method_name)
    torch.manual_seed(0)
    teacher = build_network(recipe.teacher.arch, 10).eval().requires_grad_(False)
    networks = {name: build_network(arch, 10) for name, arch in
                cls.networks_for(parse_params(cls, recipe.method.params), recipe.student.arch).items()}
    method = step.build_method(recipe.method, networks, teacher, 10, 32, torch.device("cpu"), env.world,
                               train_labels=torch.arange(64) % 10)
    engine = step.Engine(method, teacher, recipe, epochs=1, dist=env)
    method.train()
    data = torch.Generator().manual_seed(100 + env.rank)  # a different batch on every rank
    for i in range(STEPS):
        indices = torch.arange(8) + 8 * env.rank  # distinct samples: crd's memory rows
        batch = Batch(torch.randn(8, 3, 32, 32, generator=data), indices % 10, indices)
        engine.train_step(batch, StepInfo(0, 1, i, torch.Generator().manual_seed(i)))
    memories = [b for name, b in method.named_buffers() if name.endswith("memory")]  # crd's banks
    flat = torch.cat([t.detach().flatten() for t in [*method.parameters(), *memories]])
    gathered = [torch.empty_like(flat) for _ in range(env.world)]
    torch.distributed.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def main(argv: list[str]) -> None:
    if "--no-sync" in argv:
        step.wrap = lambda module, env, find_unused_parameters=False: module
    env = distributed.init_distributed(torch.device("cpu"))
    torch.set_num_threads(1)
    for name in (a for a in argv if not a.startswith("--")):
        gap = replica_gap(name, env)
        if env.is_main:
            print(name, f"{gap:.3e}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
