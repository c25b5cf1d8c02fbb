"""The kdcli command line: parse, call the engine, print. No training logic lives here."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, List, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from kdcli.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation for image classification: train teachers, distil students, "
                       "evaluate, measure teacher label violations, export.")
list_app = typer.Typer(no_args_is_help=True, help="List recipes, models or methods.")
app.add_typer(list_app, name="list")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (images/s and speed-up ratios measured in one run).")
app.add_typer(bench_app, name="bench")
# Tables in pipes and CI logs should not be squeezed to 80 columns; a terminal keeps its own width.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

RecipeOpt = typer.Option(..., "--recipe", "-r", help="Recipe name (see `kdcli list recipes`) or YAML path.")
SetOpt = typer.Option(None, "--set", help="Override a recipe key: --set train.epochs=10 (repeatable).")
OutOpt = typer.Option(None, "--out", "-o", help="Output directory (default runs/<recipe>-<time>).")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
SeedOpt = typer.Option(0, "--seed", help="Random seed (recorded in results.csv).")
DryOpt = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit.")
SmokeOpt = typer.Option(False, "--smoke", help="A few steps on generated data with the recipe's real models.")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run in --out.")


def friendly(command: Callable) -> Callable:
    """Bad input becomes one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            err_console.print(f"[red]error:[/] {err}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def main() -> None:
    app()


# -- training commands ----------------------------------------------------------------------------
def _load(recipe: str, overrides: Optional[List[str]], smoke: bool):
    from kdcli.engine.pipeline import smoke_recipe
    from kdcli.recipes import load_recipe

    resolved = load_recipe(recipe, overrides or [])
    return smoke_recipe(resolved) if smoke else resolved


def _context(recipe, out: Optional[Path], device: str, seed: int, smoke: bool, resume: bool, command: str):
    from kdcli.engine.distributed import init_distributed, local_device
    from kdcli.engine.io import atomic_write
    from kdcli.engine.pipeline import SMOKE_STEPS, resolve_device
    from kdcli.engine.trainer import RunContext

    requested = resolve_device(device)
    dist = init_distributed(requested)
    out = out or Path("runs") / f"{recipe.name}-{command}-{datetime.now():%Y%m%d-%H%M%S}"
    if resume and not out.is_dir():
        raise UserError(f"--resume: {out} does not exist; pass the --out directory of the interrupted run")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; pass --resume to continue it or choose another --out")
    if dist.is_main:
        with atomic_write(out / "recipe.yaml") as handle:
            handle.write(recipe.to_yaml())
    return RunContext(out, local_device(requested, dist), seed, console,
                      max_steps=SMOKE_STEPS if smoke else None, resume=resume, dist=dist)


def _parse_seeds(seed: int, seeds: Optional[str]) -> list[int]:
    if seeds is None:
        return [seed]
    try:
        parsed = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds '{seeds}': expected comma-separated integers, e.g. --seeds 0,1,2") from None
    if not parsed or len(set(parsed)) != len(parsed):
        raise UserError(f"--seeds '{seeds}': give distinct integers, e.g. --seeds 0,1,2")
    return parsed


def _train(command: str, recipe: str, overrides, out, device, seed, dry_run, smoke, resume, seeds=None) -> None:
    """Run the recipe once per seed (each in its own sub-directory when there are several)."""
    from kdcli.engine import pipeline
    from kdcli.engine.io import write_csv

    resolved = _load(recipe, overrides, smoke)
    seed_list = _parse_seeds(seed, seeds)
    if dry_run:
        console.print(resolved.to_yaml(), highlight=False, markup=False)
        return
    ctx = _context(resolved, out, device, seed_list[0], smoke, resume, command)
    run = pipeline.train_teacher if command == "train-teacher" else pipeline.distill
    frames = []
    for s in seed_list:
        seed_ctx = ctx if len(seed_list) == 1 else dataclasses.replace(ctx, seed=s, out_dir=ctx.out_dir / f"seed-{s}")
        started = time.perf_counter()
        summaries = run(resolved, seed_ctx, smoke)
        frames.append(pipeline.write_results(summaries, resolved, seed_ctx, time.perf_counter() - started).results)
    frame = frames[0] if len(frames) == 1 else pipeline.with_seed_summary(pd.concat(frames, ignore_index=True))
    path = ctx.out_dir / "results.csv"
    if ctx.dist.is_main:
        write_csv(path, frame)
        _print_results(frame, f"{resolved.name}{' (smoke)' if smoke else ''}")
        console.print(f"results: {path}")


def _print_results(frame: pd.DataFrame, title: str) -> None:
    split = frame["eval_split"].iloc[0]
    table = Table(title=title)
    for column in ("stage", "network", "arch", f"best {split} top1", "best epoch", f"last {split} top1", "time", "img/s"):
        table.add_column(column, justify="right" if column[0] in "blti" else "left")
    if "best_top1_std" in frame:
        table.add_column("seed")
    for row in frame.itertuples():
        mean = "best_top1_std" in frame and row.seed == "mean"
        best = f"{row.best_top1:.2f}" + (f" ± {row.best_top1_std:.2f}" if mean else "")
        last = f"{row.last_top1:.2f}" + (f" ± {row.last_top1_std:.2f}" if mean else "")
        cells = [row.stage, row.network, row.arch, best, "" if mean else str(row.best_epoch), last,
                 f"{row.stage_seconds:.0f}s", f"{row.images_per_s:.0f}"]
        table.add_row(*cells, *([str(row.seed)] if "best_top1_std" in frame else []))
    console.print(table)


@app.command("train-teacher")
@friendly
def train_teacher(recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
                  device: str = DeviceOpt, seed: int = SeedOpt, dry_run: bool = DryOpt, smoke: bool = SmokeOpt,
                  resume: bool = ResumeOpt) -> None:
    """Train the recipe's teacher network from scratch with cross-entropy."""
    _train("train-teacher", recipe, set_, out, device, seed, dry_run, smoke, resume)


@app.command()
@friendly
def distill(recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
            device: str = DeviceOpt, seed: int = SeedOpt, dry_run: bool = DryOpt, smoke: bool = SmokeOpt,
            resume: bool = ResumeOpt,
            seeds: Optional[str] = typer.Option(None, "--seeds", help="Run once per seed, e.g. 0,1,2; adds mean ± std rows.")) -> None:
    """Distil the recipe's student from its teacher (training the teacher first if no checkpoint is given)."""
    _train("distill", recipe, set_, out, device, seed, dry_run, smoke, resume, seeds)


# -- evaluate / export ----------------------------------------------------------------------------
@app.command()
@friendly
def evaluate(checkpoints: List[Path] = typer.Argument(..., help="One or more checkpoints (.safetensors or .pth)."),
             recipe: str = typer.Option("quickstart", "--recipe", "-r", help="Recipe whose dataset to evaluate on."),
             set_: Optional[List[str]] = SetOpt, split: str = typer.Option("test", help="test, val or train."),
             arch: Optional[str] = typer.Option(None, help="Architecture for .pth files without a sidecar."),
             teacher: Optional[Path] = typer.Option(None, help="Teacher checkpoint: adds agreement and KL."),
             teacher_arch: Optional[str] = typer.Option(None, help="Teacher architecture for a .pth teacher."),
             save_logits: Optional[Path] = typer.Option(None, help="Write per-sample logits (safetensors)."),
             out: Optional[Path] = typer.Option(Path("."), "--out", "-o", help="Directory for evaluation.csv."),
             device: str = DeviceOpt, seed: int = SeedOpt, smoke: bool = SmokeOpt) -> None:
    """Top-1, top-5, NLL and ECE of checkpoints on a dataset split (and agreement with a teacher)."""
    from kdcli.engine.evaluation import evaluate_checkpoints
    from kdcli.engine.pipeline import resolve_device

    resolved = _load(recipe, set_, smoke)
    frame, path = evaluate_checkpoints(checkpoints, resolved, split, resolve_device(device), out, arch=arch,
                                       teacher=teacher, teacher_arch=teacher_arch, save_logits=save_logits,
                                       smoke=smoke, seed=seed, console=console)
    _print_frame(frame, f"evaluate ({split})")
    console.print(f"results: {path}")


@app.command()
@friendly
def export(checkpoint: Path = typer.Argument(..., help="Checkpoint to export (.safetensors or .pth)."),
           out: Path = typer.Option(Path("export"), "--out", "-o", help="Output directory."),
           arch: Optional[str] = typer.Option(None, help="Architecture for .pth files without a sidecar."),
           formats: str = typer.Option("auto", "--formats", help="Comma-separated: safetensors, torchscript, "
                                       "onnx; auto = all three when the onnx extra is installed, else the first two."),
           image_size: Optional[int] = typer.Option(None, help="Input size (default: from the sidecar, else 32)."),
           seed: int = SeedOpt) -> None:
    """Export a network; every export is loaded back and compared with the PyTorch model."""
    from kdcli.engine.export import export_checkpoint

    frame, path = export_checkpoint(checkpoint, out, [f.strip() for f in formats.split(",") if f.strip()],
                                    arch=arch, image_size=image_size, seed=seed)
    _print_frame(frame, "export")
    console.print(f"results: {path}")


@app.command("measure-violations")
@friendly
def measure_violations(recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """How often a teacher's soft labels contradict mixed hard labels (isotonic data augmentation)."""
    raise UserError("measure-violations is not available yet in this version of kdcli; it arrives with the "
                    "isotonic data augmentation release")


# -- list / bench ---------------------------------------------------------------------------------
def _print_frame(frame: pd.DataFrame, title: str) -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column))
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


@list_app.command("recipes")
@friendly
def list_recipes() -> None:
    """Shipped recipes, with the paper's reported accuracy where there is one."""
    from kdcli.recipes import list_recipes as names, load_recipe

    rows = []
    for name in names():
        r = load_recipe(name)
        rows.append({"recipe": name, "teacher": r.teacher.arch if r.teacher else "",
                     "student": r.student.arch if r.student else "", "method": r.method.name, "epochs": r.train.epochs,
                     "paper top1": "" if r.paper_top1 is None else f"{r.paper_top1:.2f}"})
    _print_frame(pd.DataFrame(rows), "recipes")


@list_app.command("models")
@friendly
def list_models() -> None:
    """The CIFAR KD zoo (any timm model name works too)."""
    from kdcli.models import describe_models

    _print_frame(pd.DataFrame(describe_models()), "models (plus every timm model name)")


@list_app.command("methods")
@friendly
def list_methods() -> None:
    """Training methods, their loss terms and hyper-parameters."""
    from kdcli.methods import describe_methods

    _print_frame(pd.DataFrame(describe_methods()), "methods")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
