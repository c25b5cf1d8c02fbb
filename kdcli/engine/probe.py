"""`kdcli probe`: how well a trained network's features transfer: a linear classifier on its frozen features.

The protocol of CRD's transfer experiment (Tian et al., ICLR 2020, Sec. 4.3), which KDAV repeats on STL-10 and
Tiny-ImageNet: freeze the whole network, take the layer before its classifier (timm's ``forward_head(...,
pre_logits=True)``: the pooled feature), and train a linear classifier on another dataset, whose images are
resized to the network's input size (32 px for CIFAR students). The features of the train and test images are
extracted once, without augmentation, and held in memory; the classifier then trains for the recipe's
``train.epochs`` over them (``optim``, ``schedule``, ``train.batch_size``, a seeded shuffle). Images are
normalised as the network was trained (its checkpoint's statistics), not with the probe dataset's.

The reported top-1 is the last epoch's on the probe dataset's test split (nothing is selected on it).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdcli
from kdcli.data import Split, make_loader
from kdcli.data.seeding import generator
from kdcli.engine.checkpoint import load_model
from kdcli.engine.io import write_csv
from kdcli.engine.metrics import classification_metrics
from kdcli.engine.optim import build_optimizer, build_scheduler
from kdcli.engine.pipeline import prepare_data
from kdcli.recipes import Recipe

PROBE_FILE = "probe.csv"


@torch.no_grad()
def extract_features(network: nn.Module, split: Split, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(pre-logit features (N, D) float32 on the CPU, labels (N,)) of ``split`` in dataset order."""
    loader = make_loader(split, batch_size, train=False, device=device, seed=0)
    features, labels = [], []
    for batch in loader:
        features.append(network.forward_head(network.forward_features(batch.images), pre_logits=True).float().cpu())
        labels.append(batch.labels.cpu())
    return torch.cat(features), torch.cat(labels)


def train_linear(train: tuple[Tensor, Tensor], num_classes: int, recipe: Recipe, seed: int) -> nn.Linear:
    """A linear classifier trained on fixed ``(features, labels)`` with the recipe's optimiser and schedule."""
    features, labels = train
    torch.manual_seed(seed)  # the classifier's initial weights
    head = nn.Linear(features.shape[1], num_classes)
    optimiser = build_optimizer(list(head.parameters()), recipe.optim)
    scheduler = build_scheduler(optimiser, recipe.schedule, recipe.train.epochs)
    for epoch in range(recipe.train.epochs):
        order = torch.randperm(len(labels), generator=generator("probe-order", seed, epoch))
        for index in order.split(recipe.train.batch_size):
            loss = F.cross_entropy(head(features[index]), labels[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        scheduler.step()
    return head


def probe(checkpoint: Path, recipe: Recipe, device: torch.device, out: Path, *, seed: int = 0,
          smoke: bool = False) -> pd.DataFrame:
    """Linear-probe top-1 of ``checkpoint``'s features on the recipe's dataset; writes and returns ``probe.csv``."""
    started = time.perf_counter()
    network = load_model(checkpoint).to(device).eval()
    meta = getattr(network, "kdcli_meta", {})
    data = prepare_data(recipe, smoke)
    mean, std = tuple(meta.get("mean", data.mean)), tuple(meta.get("std", data.std))
    splits = [dataclasses.replace(split, mean=mean, std=std) for split in (data.train, data.test)]
    batch = recipe.train.eval_batch_size
    train, test = (extract_features(network, split, batch, device) for split in splits)
    head = train_linear(train, data.num_classes, recipe, seed)
    with torch.no_grad():
        metrics = classification_metrics(head(test[0]), test[1])
    row = {"checkpoint": str(checkpoint), "arch": meta.get("arch", type(network).__name__),
           "trained_on": meta.get("recipe", ""), "probe_recipe": recipe.name, "dataset": recipe.data.dataset,
           "image_size": data.image_size, "feature_dim": train[0].shape[1], "classes": data.num_classes,
           "train_samples": len(train[1]), "test_samples": len(test[1]), "epochs": recipe.train.epochs,
           "top1": metrics["top1"], "top5": metrics["top5"], "seconds": time.perf_counter() - started, "seed": seed,
           "config_hash": recipe.config_hash(), "kdcli": kdcli.__version__, "torch": torch.__version__}
    frame = pd.DataFrame([row])
    write_csv(out / PROBE_FILE, frame)
    return frame
