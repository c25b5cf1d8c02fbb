"""Launched by test_decoded_data.py under torchrun (2 CPU ranks, gloo): which samples does each rank load?

Every rank builds the dataset at ``argv[1]`` (``imagefolder`` or ``webdataset``, ``argv[2]``) and its training
loader exactly as the trainer does (``shard=(rank, world)``, one DataLoader worker), loads epoch 1, and sends
the names of the samples it saw (file path, or shard:key) to rank 0, which prints them as one JSON line:
``[[rank 0's names in order], [rank 1's names in order]]``.
"""

from __future__ import annotations

import json
import sys

import torch

from kdcli.data import DataConfig, build_data, make_loader
from kdcli.engine import distributed


def main(root: str, dataset: str) -> None:
    env = distributed.init_distributed(torch.device("cpu"))
    torch.set_num_threads(1)
    train = build_data(DataConfig(dataset, root=root, image_size=16, num_workers=1)).train
    loader = make_loader(train, 4, train=True, device=torch.device("cpu"), seed=5, shard=(env.rank, env.world))
    loader.set_epoch(1)
    names = [train.source.name(int(train.indices[i])) for batch in loader for i in batch.indices.tolist()]
    gathered = [None] * env.world
    torch.distributed.all_gather_object(gathered, names)
    if env.is_main:
        print(json.dumps(gathered), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
