"""The one training loop shared by teacher training, the student-alone baseline and every method.

Per epoch: the loader is re-seeded from (seed, epoch), the method takes its steps, the schedulers
step, the networks are evaluated every ``eval_every`` epochs (and at the last one), a row goes to
``history.csv`` and the last (and best) checkpoints plus the full training state are written
atomically. In between, recovery points (:mod:`kdcli.engine.recovery`) are written every
``train.save_every_steps`` steps or ``train.save_every_minutes``, and when SIGINT or SIGTERM asks the run to
stop. Because every random draw is derived from (seed, epoch) or restored from the saved states, a run
resumed from any of them reproduces the uninterrupted run bit for bit (on the CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from kdcli.data import DataBundle, make_loader
from kdcli.engine import checkpoint
from kdcli.engine.cache import CachedTeacher
from kdcli.engine.distributed import DistEnv, agree, barrier
from kdcli.engine.io import remove_stale_temporaries, write_csv
from kdcli.engine.metrics import classification_metrics, ensemble_logits, predict
from kdcli.engine.recovery import (
    EpochProgress,
    RecoveryClock,
    StopSignals,
    interruption,
    load_latest,
    prune,
    recovery_points,
    rng_state,
    save_recovery,
    set_rng_state,
)
from kdcli.engine.step import Engine
from kdcli.engine.tracking import Tracker
from kdcli.errors import RunStopped, UserError
from kdcli.methods.base import Batch, Method, StepInfo
from kdcli.recipes import Recipe


@dataclass
class RunContext:
    """Everything about a run that is not the recipe."""

    out_dir: Path
    device: torch.device
    seed: int
    console: Console
    max_steps: int | None = None  # --smoke: cap on steps per epoch
    resume: bool = False
    dist: DistEnv = field(default_factory=DistEnv)
    signals: StopSignals = field(default_factory=StopSignals)  # shared by the stages of a run
    tracker: Tracker | None = None  # the recipe's experiment trackers (rank 0 only)
    label: str = ""  # prefix of this seed's series in the trackers ("seed-<s>/" in a --seeds run)


@dataclass
class NetworkResult:
    network: str
    arch: str
    best_epoch: int
    best_top1: float
    last_top1: float
    best_top5: float | None
    last_top5: float | None
    test_top1_at_best: float | None
    test_top1_last: float | None
    checkpoint: str


@dataclass
class RunSummary:
    stage: str
    results: list[NetworkResult]
    seconds: float
    images_per_s: float
    out_dir: Path
    teacher_outputs: str = ""  # "live", "cache <folder>", or "" without a teacher
    teacher_top1: float | None = None  # the loaded teacher's top-1 (%) on the evaluation split


class NonFiniteWatch:
    """Remembers, on the device, the first step whose logged loss terms were not all finite (no host sync per
    step: the trainer reads it only at the steps where it may wait for the device, see ``Trainer._synced``)."""

    def __init__(self) -> None:
        self.step: torch.Tensor | None = None
        self.finite: torch.Tensor | None = None
        self.names: list[str] = []

    def update(self, logs: dict[str, torch.Tensor], step: int) -> None:
        finite = torch.stack([torch.isfinite(value) for value in logs.values()])
        if self.step is None:
            self.step, self.finite, self.names = torch.full((), -1, device=finite.device), finite, list(logs)
        first = (self.step < 0) & ~finite.all()
        self.step = torch.where(first, step, self.step)
        self.finite = torch.where(first, finite, self.finite)

    def first(self) -> tuple[int, list[str]] | None:
        """``(step, non-finite term names)`` of the first bad step, or None."""
        step = -1 if self.step is None else int(self.step.item())
        if step < 0:
            return None
        return step, [name for name, ok in zip(self.names, self.finite.tolist()) if not ok]


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """Independent, reproducible seeds per (run seed, epoch, stream)."""
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2**63 - 1)


class Trainer:
    def __init__(self, method: Method, teacher: nn.Module | None, data: DataBundle, recipe: Recipe, ctx: RunContext,
                 stage: str, cache: CachedTeacher | None = None, teacher_top1: float | None = None) -> None:
        self.method, self.data, self.recipe, self.ctx, self.stage = method, data, recipe, ctx, stage
        self.teacher_top1 = teacher_top1  # the loaded teacher's accuracy, recorded in the summary
        self.engine = Engine(method, teacher, recipe, recipe.train.epochs, ctx.dist, cache, (data.mean, data.std))
        self.dir = ctx.out_dir
        self.ckpt_dir = ctx.out_dir / "checkpoints"
        train = recipe.train
        self.train_loader = make_loader(data.train, train.batch_size, train=True, device=ctx.device, seed=ctx.seed,
                                        channels_last=train.channels_last, shard=(ctx.dist.rank, ctx.dist.world))
        self.eval_loaders = {
            split: make_loader(ds, train.eval_batch_size, train=False, device=ctx.device, seed=ctx.seed,
                               channels_last=train.channels_last)
            for split, ds in (("val", data.val), ("test", data.test)) if ds is not None
        }
        seam = self.engine.teacher_seam
        self.teacher_outputs = "" if seam is None else f"cache {seam.cache.folder}" if seam.cache is not None else "live"
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.step = 0
        self.clock = RecoveryClock(train.save_every_steps, train.save_every_minutes)

    # -- public -----------------------------------------------------------------------------------
    def fit(self) -> RunSummary:
        epochs = self.recipe.train.epochs
        seam = self.engine.teacher_seam
        if seam is not None and self.ctx.dist.is_main:
            self.ctx.console.print(f"{self.stage}: teacher runs {seam.describe()}", highlight=False, markup=False)
        self._say_notes()
        progress = self._restore() if self.ctx.resume else None
        started = time.perf_counter() - sum(row["seconds"] for row in self.history) - (progress.seconds if progress else 0)
        with self.ctx.signals:
            if self.start_epoch < epochs:
                self._stop_if_signalled(f"stopped before {self.stage} began; the stages before it are saved")
            for epoch in range(self.start_epoch, epochs):
                row = self._train_epoch(progress or self._new_epoch(epoch))
                progress = None
                if (epoch + 1) % self.recipe.train.eval_every == 0 or epoch + 1 == epochs:
                    row.update(self._evaluate())
                self.history.append(row)
                self._save(epoch)
                self._report(row)
                if self.ctx.tracker is not None:
                    self.ctx.tracker.epoch(self.ctx.label + self.stage, row)
                if epoch + 1 < epochs:  # after the last epoch the stage is complete: the next one stops before it starts
                    self._stop_if_signalled(f"{self.stage} stopped after epoch {epoch + 1}, which is saved")
        seconds = time.perf_counter() - started
        barrier()  # rank 0's checkpoints are on disk before any rank goes on (e.g. to load the teacher)
        return self._summary(seconds)

    # -- training ---------------------------------------------------------------------------------
    def _new_epoch(self, epoch: int) -> EpochProgress:
        return EpochProgress(epoch, self._lr(), torch.Generator().manual_seed(epoch_seed(self.ctx.seed, epoch, 1)))

    def _train_epoch(self, progress: EpochProgress) -> dict[str, Any]:
        """Train ``progress.epoch`` from batch ``progress.batches`` on; the epoch's history row."""
        method, loader, epoch = self.method, self.train_loader, progress.epoch
        method.train()
        loader.set_epoch(epoch, start=progress.batches)
        info = StepInfo(epoch, self.recipe.train.epochs, self.step, progress.generator)
        steps = len(loader) if self.ctx.max_steps is None else min(len(loader), self.ctx.max_steps)
        begin = time.perf_counter() - progress.seconds
        shown = self._bar_shown()
        watch = NonFiniteWatch()
        with self._progress() as bar:
            task = bar.add_task(f"{self.stage} epoch {epoch + 1}/{info.epochs}", total=steps,
                                completed=progress.batches, stats="")
            for i, (images, labels, indices, views) in enumerate(loader, start=progress.batches):
                if i >= steps:
                    break
                info.step = self.step
                out = self.engine.train_step(Batch(images, labels, indices, views=views), info)
                self._say_notes()
                watch.update(out.logs, self.step)
                if self.ctx.tracker is not None and self.ctx.tracker.due(self.step):  # reads the device: every N
                    self.ctx.tracker.step(self.ctx.label + self.stage, self.step,
                                          {**{k: v.item() for k, v in out.logs.items()}, "lr": self._lr()})
                progress.add(out.logs, (out.logits.argmax(1) == labels).sum(), labels.numel())
                progress.batches, self.step = i + 1, self.step + 1
                if i + 1 < steps:  # the last step's state is saved whole at the end of the epoch
                    self._step_boundary(progress, begin, watch)
                # .item() waits for the GPU: only for a visible bar, and only every 10 steps.
                if shown and ((i + 1) % 10 == 0 or i + 1 == steps):
                    rate = progress.seen / max(time.perf_counter() - begin, 1e-9)
                    accuracy = 100 * progress.correct.item() / progress.seen
                    stats = f"loss {progress.sums['loss'].item() / (i + 1):.4f} acc {accuracy:.1f}% {rate:.0f} img/s"
                    bar.update(task, completed=i + 1, stats=stats)
        self._stop_if_diverged(watch, epoch, *agree([watch.first() is not None], self.ctx.device))
        self.engine.end_epoch()
        seconds = time.perf_counter() - begin
        row = {"epoch": epoch + 1, "lr": progress.lr}
        row.update({name: (value / max(steps, 1)).item() for name, value in progress.sums.items()})
        correct = 0.0 if progress.correct is None else progress.correct.item()
        row.update({"train_top1": 100.0 * correct / max(progress.seen, 1), "seconds": seconds,
                    "images_per_s": progress.seen * self.ctx.dist.world / max(seconds, 1e-9)})
        return row

    def _synced(self, steps_done: int) -> bool:
        """Whether the host may wait for the device, and the ranks for each other, after this step: every step for
        one CPU process (free), every 10th on a GPU or under torchrun."""
        sync_every = 1 if self.ctx.device.type == "cpu" and not self.ctx.dist.enabled else 10
        return steps_done % sync_every == 0

    def _step_boundary(self, progress: EpochProgress, begin: float, watch: NonFiniteWatch) -> None:
        """Between two steps: stop on a non-finite loss; write a recovery point when one is due or a signal asked
        for one, and stop after it if asked. Under torchrun the ranks decide together, every 10th step."""
        synced = self._synced(progress.batches)
        if self.ctx.dist.enabled and not synced:
            return
        signum, due = self.ctx.signals.received or 0, self.clock.due(self.step)
        if not (synced or signum or due):
            return
        signum, due, diverged = agree([signum, int(due), int(watch.first() is not None)], self.ctx.device)
        self._stop_if_diverged(watch, progress.epoch, diverged)  # a recovery point never follows a bad step
        if not (signum or due):
            return
        progress.seconds = time.perf_counter() - begin
        if self.ctx.dist.is_main:
            save_recovery(self.ckpt_dir, self._state(progress.epoch, progress))
        self.clock.saved()
        barrier()  # no rank exits before rank 0 has saved
        if signum:
            raise interruption(signum, f"{self.stage} stopped at epoch {progress.epoch + 1}, step {self.step}, and "
                                       f"saved a recovery point in {self.ckpt_dir}")

    def _stop_if_signalled(self, where: str) -> None:
        (signum,) = agree([self.ctx.signals.received or 0], self.ctx.device)
        if signum:
            raise interruption(signum, where)

    def _stop_if_diverged(self, watch: NonFiniteWatch, epoch: int, anywhere: bool | int) -> None:
        """Stop the run (exit code 3) if a step's loss was NaN or infinite here (or, ``anywhere``, on another rank)."""
        if not anywhere:
            return
        found = watch.first()
        where = (f"at epoch {epoch + 1}, step {found[0]} ({', '.join(found[1])})" if found is not None
                 else f"on another rank in epoch {epoch + 1}")
        saved = sorted(recovery_points(self.ckpt_dir))
        kept = (f"the last good state is in {self.ckpt_dir} (step {saved[-1]})" if saved else
                f"the last good checkpoints are in {self.ckpt_dir} (epoch {self.history[-1]['epoch']})" if self.history
                else "nothing had been saved yet")
        raise RunStopped(f"{self.stage}: the loss became non-finite {where}; training stopped and {kept}; lower "
                         f"optim.lr (now {self._lr():g}) or check the data, then run again")

    def _say_notes(self) -> None:
        seam = self.engine.teacher_seam
        while seam is not None and seam.notes:
            line = seam.notes.pop(0)
            if self.ctx.dist.is_main:
                self.ctx.console.print(f"{self.stage}: {line}", highlight=False, markup=False)

    def _report(self, row: dict[str, Any]) -> None:
        """One line per epoch: the progress bar is transient, and absent in pipes and CI logs."""
        if not self.ctx.dist.is_main:
            return
        evals = "".join(f" {k.removesuffix('_top1')} {v:.2f}%" for k, v in row.items() if k.endswith("_top1")
                        and k != "train_top1")
        self.ctx.console.print(f"{self.stage} epoch {row['epoch']}/{self.recipe.train.epochs}: loss {row['loss']:.4f}"
                               f" train {row['train_top1']:.2f}%{evals} {row['seconds']:.1f}s "
                               f"{row['images_per_s']:.0f} img/s", highlight=False)

    def _lr(self) -> float:
        optimizer = next(iter(self.engine.optimizers.values()))
        return optimizer.param_groups[0]["lr"]

    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[stats]}"), console=self.ctx.console, transient=True,
                        disable=not self._bar_shown())

    def _bar_shown(self) -> bool:
        return self.ctx.dist.is_main and self.ctx.console.is_terminal

    # -- evaluation -------------------------------------------------------------------------------
    def _evaluate(self) -> dict[str, float]:
        """Top-1 of every network (and their ensemble when there are several) on every eval split."""
        row: dict[str, float] = {}
        names = list(self.method.networks)
        precision = self.engine.precision
        for split, loader in self.eval_loaders.items():
            logits = {name: predict(self.method.networks[name], loader, precision) for name in names}
            for name, (out, labels, _) in logits.items():
                metrics = classification_metrics(out, labels)
                suffix = "" if name == names[0] else f"_{name}"
                row[f"{split}_top1{suffix}"] = metrics["top1"]
                if suffix == "":
                    row[f"{split}_top5"] = metrics["top5"]
                    row[f"{split}_nll"] = metrics["nll"]
            if len(names) > 1:
                labels = logits[names[0]][1]
                mixed = ensemble_logits([logits[n][0] for n in names])
                row[f"{split}_top1_ensemble"] = classification_metrics(mixed, labels)["top1"]
        self.method.train()
        return row

    # -- checkpoints ------------------------------------------------------------------------------
    def _meta(self, name: str, epoch: int) -> dict[str, Any]:
        net = self.method.networks[name]
        return {
            "arch": getattr(net, "kdcli_arch", type(net).__name__),
            "num_classes": self.data.num_classes,
            "mean": list(self.data.mean), "std": list(self.data.std), "image_size": self.data.image_size,
            "recipe": self.recipe.name, "config_hash": self.recipe.config_hash(), "stage": self.stage,
            "network": name, "epoch": epoch + 1, "seed": self.ctx.seed,
        }

    def _save(self, epoch: int) -> None:
        if not self.ctx.dist.is_main:
            return
        write_csv(self.dir / "history.csv", pd.DataFrame(self.history))
        row = self.history[-1]
        is_best = self._best_row() is row  # None until the first evaluated epoch (train.eval_every > 1)
        for name in self.method.networks:
            net = self.method.networks[name]
            checkpoint.save_weights(net, self.ckpt_dir / f"{name}-last", self._meta(name, epoch))
            if is_best:
                checkpoint.save_weights(net, self.ckpt_dir / f"{name}-best", self._meta(name, epoch))
        checkpoint.save_train_state(self.ckpt_dir, self._state(epoch + 1))
        prune(self.ckpt_dir, below=self.step + 1)  # the epoch's recovery points are superseded
        self.clock.saved()

    def _state(self, epochs_done: int, progress: EpochProgress | None = None) -> dict[str, Any]:
        """Everything --resume needs: after ``epochs_done`` epochs, plus ``progress`` into the next one."""
        return {
            "epoch": epochs_done, "step": self.step, "history": self.history,
            "method": self.method.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.engine.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.engine.schedulers.items()},
            "scaler": self.engine.scaler.state_dict(), "rng": rng_state(),
            "progress": None if progress is None else progress.state_dict(), "world": self.ctx.dist.world,
            "config_hash": self.recipe.config_hash(), "teacher_outputs": self.teacher_outputs,
        }

    def _restore(self) -> EpochProgress | None:
        """Load the newest saved state (an epoch end or a recovery point); the unfinished epoch's progress."""
        remove_stale_temporaries(self.dir)  # what a kill during a write left behind
        state = load_latest(self.ckpt_dir)
        if state is None:
            return None
        self.method.load_state_dict(state["method"])
        for key, optimizer in self.engine.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
        for key, scheduler in self.engine.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][key])
        if state.get("scaler"):
            self.engine.scaler.load_state_dict(state["scaler"])
        set_rng_state(state.get("rng") or {"torch": state["rng_cpu"], "cuda": state.get("rng_cuda")})
        self.start_epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        progress = state.get("progress")
        if progress is not None and state["world"] != self.ctx.dist.world:  # each rank's share of the epoch differs
            raise UserError(f"{self.stage}: the recovery point in {self.ckpt_dir} was written by {state['world']} "
                            f"process(es) and this run has {self.ctx.dist.world}; resume with the same number (torchrun "
                            f"--nproc_per_node), or delete {self.ckpt_dir}/recovery-step*.pt to redo that epoch")
        progress = None if progress is None else EpochProgress.from_state(progress, self.ctx.device)
        if self.ctx.dist.is_main:
            where = (f"at epoch {progress.epoch + 1}, step {self.step}" if progress is not None
                     else f"after epoch {self.start_epoch}")
            self.ctx.console.print(f"{self.stage}: resumed {where} from {self.ckpt_dir}", highlight=False,
                                   markup=False)
        before = state.get("teacher_outputs", self.teacher_outputs)
        if before != self.teacher_outputs and self.ctx.dist.is_main:
            self.ctx.console.print(f"{self.stage}: the teacher's outputs came from {before or 'nowhere'} before the "
                                   f"interruption and now from {self.teacher_outputs} (fp16 rounding differs: the "
                                   "resumed run is not bitwise the uninterrupted one)", highlight=False, markup=False)
        return progress

    # -- results ----------------------------------------------------------------------------------
    def _best_row(self) -> dict[str, Any] | None:
        """The evaluated epoch with the best selection accuracy (the earliest of equals); None before any."""
        key = f"{self.recipe.train.eval_split}_top1"
        evaluated = [row for row in self.history if key in row]
        return max(evaluated, key=lambda row: row[key], default=None)

    def _summary(self, seconds: float) -> RunSummary:
        split = self.recipe.train.eval_split
        best, last = self._best_row(), self.history[-1]
        names = list(self.method.networks)
        results = []
        for name in names + (["ensemble"] if len(names) > 1 else []):
            suffix = "" if name == names[0] else f"_{name}"
            net = self.method.networks[name] if name in self.method.networks else None
            results.append(NetworkResult(
                network=name,
                arch=getattr(net, "kdcli_arch", "") if net is not None else "+".join(names),
                best_epoch=int(best["epoch"]),
                best_top1=best[f"{split}_top1{suffix}"],
                last_top1=last[f"{split}_top1{suffix}"],
                best_top5=best.get(f"{split}_top5") if suffix == "" else None,
                last_top5=last.get(f"{split}_top5") if suffix == "" else None,
                test_top1_at_best=best.get(f"test_top1{suffix}") if split != "test" else None,
                test_top1_last=last.get(f"test_top1{suffix}") if split != "test" else None,
                checkpoint=str(self.ckpt_dir / f"{name}-best.safetensors") if net is not None else "",
            ))
        rates = [row["images_per_s"] for row in self.history]
        return RunSummary(self.stage, results, seconds, sum(rates) / len(rates), self.dir, self.teacher_outputs,
                          self.teacher_top1)
