"""IDA measurements: how often a teacher's soft labels contradict mixed hard labels, and what fixing that costs.

:func:`measure_violations` (``kdcli measure-violations``) reproduces the statistics of the IDA paper's
Fig. 1 (``docs/methods/ida.md``) for one teacher: it runs the teacher over samples of a split (no
crop/flip) under each augmentation (``none``, ``mixup``, ``CutMix``), and summarises the order of its
soft labels ``p = softmax(z_T / tau)`` against the hard labels with :func:`kdcli.isotonic.violation_stats`,
before and after the exact projection :func:`kdcli.isotonic.project` (KD-i's correction), plus the L1
change the projection makes. The order statistics do not depend on ``tau``; the penalty and the L1
change do (``tau = 4.5`` is the temperature KD-i corrects at).

Mixing pairs every sample with a partner from a random permutation of its batch and draws one ``lam``
per sample from ``Beta(alpha, alpha)`` (the same marginal as the one-per-batch draw of training, with
less variance across batches). The samples are a seeded random subset of the split, in a seeded random
order, and every augmentation has its own generator seeded by ``(seed, augmentation)``: the numbers are
a function of ``seed`` (and the batch size), and an augmentation gives the same numbers whichever others
are measured with it.

:func:`bench_ida_step` (``kdcli bench isotonic --step``) times one training step of ``ida`` and of
``kd-aug`` on the paper's resnet32x4 -> resnet8x4 CIFAR-100 setting against the projection of one batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from rich.markup import escape
from torch import nn

from kdcli import figures
from kdcli.augment import MIX_KINDS, mix
from kdcli.data import Split, make_loader
from kdcli.data.seeding import generator
from kdcli.devices import synchronize, timed
from kdcli.engine.checkpoint import read_sidecar
from kdcli.errors import UserError
from kdcli.isotonic import ViolationStats, project, violation_stats
from kdcli.recipes import Recipe

SUMMARY_COLUMNS = ("kendall_tau", "top2_ratio", "violation_rate", "discordant_pairs", "penalty")


@dataclass(frozen=True)
class ViolationReport:
    """The result of :func:`measure_violations`.

    Attributes:
        table: one row per augmentation: ``augmentation, samples, kendall_tau, top2_ratio,
            violation_rate, discordant_pairs, penalty``, the same five statistics with the suffix
            ``_projected`` (after :func:`kdcli.isotonic.project`), ``l1_change`` (mean L1 distance between
            the soft labels and their projection), ``seconds`` (the whole pass) and ``projection_seconds``.
        per_class: one row per (augmentation, class): ``augmentation, class, class_name, samples`` and the
            statistics before projection; a mixed sample counts for its primary label.
        per_sample: per augmentation, one row per sample: the label roles ``primary``, ``secondary`` (-1: none)
            and ``primary_weight`` (the primary label's hard weight), the statistics before and after
            projection, and ``l1_change`` (e.g. for the Kendall-tau histogram of :func:`plot_kendall`).
    """

    table: pd.DataFrame
    per_class: pd.DataFrame
    per_sample: dict[str, pd.DataFrame]


def parse_augmentations(text: str) -> list[str]:
    """``"none,mixup,cutmix"`` -> a list of distinct augmentation names (order kept)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in MIX_KINDS]
    if not names or unknown:
        raise UserError(f"--augment '{text}': choose a comma-separated subset of {','.join(MIX_KINDS)}")
    return list(dict.fromkeys(names))


def teacher_source(recipe: Recipe, checkpoint: Path | None, arch: str | None, smoke: bool) -> tuple[Path | None, str]:
    """Which teacher to measure: ``(checkpoint path, architecture)``, checked before any data is built.

    The path is ``checkpoint``, else the recipe's ``teacher.checkpoint``; without either, a recipe naming
    ``teacher.pretrained`` measures those weights (path ``None``); else the teacher of the newest ``kdcli
    distill``/``train-teacher`` run of this recipe under ``runs/`` (so ``kdcli measure-violations --recipe
    quickstart`` measures the teacher that the quickstart just trained). The architecture is ``arch``, else the
    checkpoint's sidecar, else the recipe's ``teacher.arch``. With ``smoke`` a missing checkpoint is allowed
    (``None``): a randomly initialised teacher stands in.
    """
    from kdcli.engine.pipeline import newest_trained_teacher

    path = checkpoint or (Path(recipe.teacher.checkpoint) if recipe.teacher and recipe.teacher.checkpoint else None)
    if path is None and pretrained_name(recipe) is not None:
        return None, recipe.teacher.arch
    if path is None and not smoke:
        path = newest_trained_teacher(recipe.name)
    path = path.expanduser() if path is not None else None
    if path is None and not smoke:
        raise UserError(f"recipe '{recipe.name}' gives no teacher checkpoint and runs/ has no trained one; "
                        f"run `kdcli distill --recipe {recipe.name}` (or `kdcli train-teacher --recipe "
                        f"{recipe.name}`) first, or pass --checkpoint PATH")
    if path is not None and not path.is_file():
        if not smoke:
            raise UserError(f"teacher checkpoint {path} does not exist; check --checkpoint (or teacher.checkpoint)")
        path = None
    arch = arch or (read_sidecar(path).get("arch") if path else None) or (recipe.teacher.arch if recipe.teacher else None)
    if arch is None:
        raise UserError("the teacher's architecture is unknown: pass --arch (e.g. --arch resnet32x4)")
    return path, arch


def pretrained_name(recipe: Recipe) -> str | None:
    """The recipe's ``teacher.pretrained`` (None without one)."""
    return recipe.teacher.pretrained if recipe.teacher is not None else None


def load_teacher(path: Path | None, arch: str, num_classes: int, console, recipe: Recipe,
                 smoke: bool = False) -> nn.Module:
    """The frozen teacher in eval mode: from ``path``, else the recipe's ``teacher.pretrained`` weights, else
    (``--smoke`` only) a random ``arch``."""
    from kdcli.engine.pipeline import build_network, load_named_teacher
    from kdcli.engine.pipeline import load_teacher as load_checkpoint

    if path is not None:
        return load_checkpoint(str(path), arch, num_classes, smoke=False, console=console)
    if pretrained_name(recipe) is not None:
        return load_named_teacher(recipe.teacher, num_classes, smoke, console)
    console.print(f"[yellow]smoke: no teacher checkpoint, using a random {escape(arch)}[/]")
    return build_network(arch, num_classes).eval().requires_grad_(False)


@torch.inference_mode()
def measure_violations(teacher: nn.Module, split: Split, augmentations: Sequence[str], *, batch_size: int,
                       device: torch.device, tau: float = 4.5, alpha: float = 1.0, samples: int | None = None,
                       seed: int = 0, class_names: Sequence[str] = ()) -> ViolationReport:
    """Order-violation statistics of ``teacher``'s soft labels on ``split`` under each augmentation.

    Args:
        teacher: the network (moved to ``device``, put in eval mode).
        split: the samples (read without crop/flip).
        augmentations: names among ``none``, ``mixup``, ``cutmix``.
        batch_size: images per teacher forward; mixing partners come from the same batch.
        device: where the teacher and the statistics run.
        tau: temperature of the soft labels (changes only ``penalty`` and ``l1_change``).
        alpha: ``lam ~ Beta(alpha, alpha)`` for mixup and CutMix.
        samples: how many samples (a seeded random subset); ``None``: the whole split.
        seed: seed of the subset, its order and the mixing.
        class_names: names for the per-class table (optional).
    """
    if not tau > 0 or not alpha > 0:
        raise UserError(f"--tau and --alpha must be > 0, got tau={tau}, alpha={alpha}")
    if samples is not None and samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    order = torch.randperm(len(split), generator=generator("violations-subset", seed))[:samples]
    loader = make_loader(split.subset(order), batch_size, train=False, device=device, seed=seed)
    teacher = teacher.to(device).eval()
    rows, per_class, per_sample = [], [], {}
    for kind in augmentations:
        frame, row = _measure_one(teacher, loader, kind, tau, alpha, generator("violations-mix", seed, kind))
        rows.append(row)
        per_sample[kind] = frame
        per_class.append(_per_class(frame, class_names).assign(augmentation=kind))
    per_class_frame = pd.concat(per_class, ignore_index=True)
    columns = ["augmentation"] + [c for c in per_class_frame.columns if c != "augmentation"]
    return ViolationReport(pd.DataFrame(rows), per_class_frame[columns], per_sample)


def _measure_one(teacher: nn.Module, loader, kind: str, tau: float, alpha: float,
                 mix_generator: torch.Generator) -> tuple[pd.DataFrame, dict[str, object]]:
    """One augmentation over the whole loader: per-sample frame and the summary row."""
    before, after, l1, roles = [], [], [], []
    projection_seconds = 0.0
    started = time.perf_counter()
    for images, labels, _, _ in loader:
        mixed = mix(kind, images, labels, alpha, mix_generator, per_sample=True)
        soft = F.softmax(teacher(mixed.images).float() / tau, dim=1)
        projected, ms = timed(project, soft, mixed.primary, mixed.secondary)
        projection_seconds += ms / 1e3
        before.append(violation_stats(soft, mixed.primary, mixed.secondary, mixed.lam))
        after.append(violation_stats(projected, mixed.primary, mixed.secondary, mixed.lam))
        l1.append((projected - soft).abs().sum(dim=1))
        roles.append(torch.stack([mixed.primary.double(), mixed.secondary.double(),
                                  torch.maximum(mixed.lam, 1 - mixed.lam).double()], dim=1))
    synchronize(loader.device)
    seconds = time.perf_counter() - started
    stats_before, stats_after = ViolationStats.concat(before), ViolationStats.concat(after)
    l1_change = torch.cat(l1)
    summary, summary_after = stats_before.summary(), stats_after.summary()
    row: dict[str, object] = {"augmentation": kind, "samples": int(summary["samples"])}
    row.update({name: summary[name] for name in SUMMARY_COLUMNS})
    row.update({f"{name}_projected": summary_after[name] for name in SUMMARY_COLUMNS})
    row.update({"l1_change": l1_change.double().mean().item(), "seconds": seconds,
                "projection_seconds": projection_seconds})
    primary, secondary, primary_weight = torch.cat(roles).cpu().T.numpy()
    frame = pd.DataFrame({"primary": primary.astype(np.int64), "secondary": secondary.astype(np.int64),
                          "primary_weight": primary_weight, **_columns(stats_before, ""),
                          **_columns(stats_after, "_projected"), "l1_change": l1_change.cpu().numpy()})
    return frame, row


def _columns(stats: ViolationStats, suffix: str) -> dict[str, np.ndarray]:
    values = {"kendall_tau": stats.kendall_tau, "discordant_pairs": stats.discordant_pairs,
              "has_violation": stats.has_violation, "top2_hit": stats.top2_hit, "penalty": stats.penalty}
    return {f"{name}{suffix}": value.cpu().numpy() for name, value in values.items()}


def _per_class(frame: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    grouped = frame.groupby("primary", sort=True)
    table = pd.DataFrame({
        "samples": grouped.size(),
        "kendall_tau": grouped["kendall_tau"].mean(),
        "top2_ratio": grouped["top2_hit"].mean(),
        "violation_rate": grouped["has_violation"].mean(),
        "discordant_pairs": grouped["discordant_pairs"].mean(),
    }).rename_axis("class").reset_index()
    names = list(class_names)
    table.insert(1, "class_name", [names[c] if c < len(names) else str(c) for c in table["class"]])
    return table


def plot_kendall(report: ViolationReport, path: Path, title: str = "teacher soft labels vs hard labels") -> None:
    """Per augmentation, one panel: the histogram of the per-sample Kendall tau over known-order label pairs
    before (filled) and after (outline) the isotonic fix, with the sample count; saved as PNG, PDF or SVG (from
    the name). Separate panels keep the spike of unmixed samples at tau = 1 from flattening the others."""
    plt = figures.pyplot()
    kinds = list(report.per_sample)
    with plt.rc_context({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8}):
        figure, panels = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.2), squeeze=False,
                                      constrained_layout=True)
        bins = np.linspace(-1.0, 1.0, 41)
        for axes, kind in zip(panels[0], kinds, strict=True):
            frame = report.per_sample[kind]
            share = np.full(len(frame), 1.0 / max(len(frame), 1))
            before, after = frame["kendall_tau"].to_numpy(), frame["kendall_tau_projected"].to_numpy()
            axes.hist(before, bins=bins, weights=share, alpha=0.55, label=f"as given (mean {before.mean():.3f})")
            axes.hist(after, bins=bins, weights=share, histtype="step", linewidth=1.4, color="black",
                      label=f"after the fix (mean {after.mean():.3f})")
            axes.set(title=f"{kind} ({len(frame):,} samples)", xlabel="Kendall tau (known-order label pairs)",
                     xlim=(-1.05, 1.05))
            axes.legend(loc="upper left", frameon=False)
        panels[0][0].set_ylabel("share of samples")
        figure.suptitle(title)
        figures.save(figure, path)
