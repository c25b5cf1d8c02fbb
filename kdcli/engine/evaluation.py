"""`kdcli evaluate`: metrics of one or more checkpoints on a dataset split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from kdcli.data import make_loader
from kdcli.engine.checkpoint import load_model, read_sidecar
from kdcli.engine.io import atomic_save, write_csv
from kdcli.engine.metrics import agreement_metrics, classification_metrics, predict
from kdcli.engine.pipeline import prepare_data
from kdcli.engine.runs import RECIPE_FILE
from kdcli.errors import UserError
from kdcli.recipes import Recipe, find_recipe


def evaluate_checkpoints(checkpoints: list[Path], recipe: Recipe, split: str, device: torch.device, out: Path, *,
                         arch: str | None = None, teacher: Path | None = None, teacher_arch: str | None = None,
                         save_logits: Path | None = None, smoke: bool = False, seed: int = 0,
                         console=None) -> tuple[pd.DataFrame, Path]:
    """Evaluate each checkpoint; returns the table and the path of ``evaluation.csv``: per checkpoint its recipe,
    dataset, split and sample count, top-1 and top-5 (%), NLL (nats), ECE (%, 15 equal-width bins), and with a
    teacher, the teacher's path, top-1 agreement (%) and KL(teacher || student) (nats)."""
    data = prepare_data(recipe, smoke)
    dataset = {"train": data.train, "val": data.val, "test": data.test}.get(split)
    if dataset is None:
        raise UserError(f"split '{split}' is not available for recipe '{recipe.name}'; use test, train, "
                        "or val with --set data.val_fraction=0.1")
    loader = make_loader(dataset, recipe.train.eval_batch_size, train=False, device=device, seed=seed)
    teacher_logits = None
    if teacher is not None:
        teacher_logits = _logits(teacher, teacher_arch, data.num_classes, loader, device)[0]
    rows, saved = [], {}
    for i, path in enumerate(checkpoints):
        logits, labels, indices = _logits(path, arch, data.num_classes, loader, device)
        row = {"checkpoint": str(path), "recipe": recipe.name, "dataset": recipe.data.dataset, "split": split,
               "samples": len(labels), **classification_metrics(logits, labels)}
        if teacher_logits is not None:  # the agreement and KL columns are against this teacher
            row.update({"teacher": str(teacher), **agreement_metrics(logits, teacher_logits)})
        rows.append(row)
        saved[f"logits.{i}"] = logits.contiguous()
        saved["labels"], saved["indices"] = labels.contiguous(), indices.contiguous()
    if save_logits is not None:
        meta = {f"checkpoint.{i}": str(p) for i, p in enumerate(checkpoints)} | {"split": split, "recipe": recipe.name}
        atomic_save(save_logits, lambda tmp: save_file(saved, tmp, metadata=meta))
    frame = pd.DataFrame(rows)
    path = out / "evaluation.csv"
    write_csv(path, frame)
    return frame, path


def _logits(path: Path, arch: str | None, num_classes: int, loader, device: torch.device):
    return predict(load_model(path, arch=arch, num_classes=num_classes).to(device), loader)


def recipe_of(checkpoint: Path) -> str:
    """The recipe a checkpoint was trained with, for ``evaluate`` without ``--recipe``: the ``recipe.yaml`` of the
    run it sits in (``<run>/<stage>/checkpoints/``, or one level deeper under ``seed-<s>/``), else the shipped
    recipe its sidecar names."""
    checkpoint = Path(checkpoint).expanduser().resolve()
    if not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist; check the path")
    for folder in list(checkpoint.parents)[2:4]:
        if (folder / RECIPE_FILE).is_file():
            return str(folder / RECIPE_FILE)
    name = read_sidecar(checkpoint).get("recipe") if checkpoint.suffix == ".safetensors" else None
    if name is None:
        raise UserError(f"{checkpoint} names no recipe (no run's recipe.yaml above it, no sidecar); pass --recipe NAME")
    try:
        find_recipe(name)
    except UserError:
        raise UserError(f"{checkpoint} was trained with recipe '{name}', which is neither shipped nor beside it; "
                        "pass --recipe PATH to that recipe's YAML") from None
    return name
