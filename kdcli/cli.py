"""The kdcli command line: parse, call the engine, print. No training logic lives here."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdcli.errors import DiskFull, RunInterrupted, RunStopped, UserError

if TYPE_CHECKING:  # pandas and torch load on first use: `kdcli --help` and `kdcli list recipes` start fast
    import pandas as pd

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
SetOpt = typer.Option(None, "--set", help="Override a recipe key: --set train.epochs=10 (repeatable); "
                                             "--set method=ttm switches the method, with its defaults.")
OutOpt = typer.Option(None, "--out", "-o", help="Output directory (default runs/<recipe>-<command>-<time>).")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
SeedOpt = typer.Option(0, "--seed", help="Random seed (recorded in results.csv).")
DryOpt = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit.")
SmokeOpt = typer.Option(False, "--smoke", help="A few steps on generated data with the recipe's real models.")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run in --out.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace the earlier result in a non-empty --out (written "
                            "beside it and swapped in at the end, so a failure leaves the old one whole).")


class _Options:
    debug = False  # --debug: let every error show its traceback


def friendly(command: Callable) -> Callable:
    """Bad input becomes one line on stderr and exit code 2, a stopped run (non-finite loss, full disk) one line
    and exit code 3, an unexpected error one line and exit code 1 (``--debug`` shows the traceback of any)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (UserError, RunStopped) as err:
            if _Options.debug:
                raise
            _error(f"{err}; free some space (or choose another --out) and run the command again"
                   if isinstance(err, DiskFull) else str(err))
            raise typer.Exit(2 if isinstance(err, UserError) else 3) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            if _Options.debug:
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _error(f"internal error ({type(err).__name__}{': ' + reason if reason else ''}); run the same command "
                   "again with kdcli --debug ... for the traceback, and report it")
            raise typer.Exit(1) from None

    return wrapper


def _error(text: str) -> None:
    # The message is plain text: paths and hints such as `kdcli[plot]` must not be read as markup.
    err_console.print(f"[red]error:[/] {escape(text)}", soft_wrap=True, highlight=False)


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import version

    import torch

    import kdcli

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        devices = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}"
    else:
        devices = f"no CUDA device; CPU with {torch.get_num_threads()} threads"
    _say(f"kdcli {kdcli.__version__}, torch {torch.__version__}, timm {version('timm')}, {devices}")
    raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print kdcli, torch, timm and the device summary, and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show the full traceback of any error.")) -> None:
    """Knowledge distillation for image classification: train teachers, distil students, evaluate, measure
    teacher label violations, export."""
    _Options.debug = debug


def _say(text: str) -> None:
    """Print a plain line (paths may contain brackets, which rich would read as markup)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    app()


# -- training commands ----------------------------------------------------------------------------
def _load(recipe: str, overrides: Optional[List[str]], smoke: bool):
    from kdcli.engine.pipeline import resolve_recipe, smoke_recipe

    resolved = resolve_recipe(recipe, overrides or [])
    return smoke_recipe(resolved) if smoke else resolved


def _context(recipe, out: Optional[Path], device: str, seeds: list[int], seeds_given: bool, smoke: bool,
             resume: bool, overwrite: bool, command: str):
    """The run's context after checking --out (and, with --resume, that it is the same run); records the run."""
    from kdcli.engine.distributed import barrier, from_rank_zero, init_distributed, local_device
    from kdcli.engine.outputs import Output, claim
    from kdcli.engine.pipeline import SMOKE_STEPS, resolve_device
    from kdcli.engine.runs import Resumption, RunRecord, check_resume
    from kdcli.engine.trainer import RunContext

    requested = resolve_device(device)
    dist = init_distributed(requested)
    output = from_rank_zero(claim(out, command, recipe.name, overwrite=overwrite, resume=resume, smoke=smoke))
    if resume and not output.final.is_dir():
        raise UserError(f"--resume: {out} does not exist; pass the --out directory of the interrupted run")
    plan = (check_resume(output.final, recipe, command, seeds if seeds_given else None) if resume
            else Resumption(seeds, finished=False, grows=False))
    if plan.replaces:  # an interrupted --overwrite: it still replaces its target
        output = Output(Path(plan.replaces), command, staging=output.final)
    barrier()  # every rank has checked --out before rank 0 writes into it
    if dist.is_main and (plan.grows or not resume):
        replaces = str(output.final.resolve()) if output.staging is not None else None
        RunRecord(command, plan.seeds, smoke, replaces).write(output.dir, recipe)
    # Only rank 0 prints: the other ranks run the same loop and would repeat every line.
    ctx = RunContext(output.dir, local_device(requested, dist), plan.seeds[0],
                     console if dist.is_main else Console(quiet=True), max_steps=SMOKE_STEPS if smoke else None,
                     resume=resume, dist=dist)
    return ctx, plan, output


def _resume_command(out: Path) -> str:
    """The command line that started this process, with ``--resume --out OUT`` (and without ``--overwrite``: an
    interrupted overwrite continues in its staging folder, which still replaces the old result when done)."""
    import shlex

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--out", "-o"):
            skip = True
        elif arg not in ("--resume", "--overwrite") and not arg.startswith("--out="):
            args.append(arg)
    return shlex.join(["kdcli", *args, "--resume", "--out", str(out)])


def _forget_failed_start(out: Path, remove_dir: bool) -> None:
    """A run that failed before any stage began leaves nothing behind (so the same command works once fixed)."""
    import shutil

    from kdcli.engine.runs import RECIPE_FILE, RUN_FILE
    from kdcli.engine.tracking import TRACKER_DIRS

    if not out.is_dir() or any(path.is_dir() and path.name not in TRACKER_DIRS for path in out.iterdir()):
        return  # a stage started: its files are the user's to inspect or resume
    for name in (RECIPE_FILE, RUN_FILE):
        (out / name).unlink(missing_ok=True)
    for name in TRACKER_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    if remove_dir and not any(out.iterdir()):
        out.rmdir()


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


def _train(command: str, recipe: str, overrides, out, device, seed, dry_run, smoke, resume, overwrite, seeds=None,
           teacher_per_seed: bool = False) -> None:
    """Run the recipe once per seed (each in its own sub-directory when there are several)."""
    from kdcli.engine import pipeline
    from kdcli.engine.io import write_csv
    from kdcli.engine.tracking import Tracker, check_trackers

    resolved = _load(recipe, overrides, smoke)
    seed_list = _parse_seeds(seed, seeds)
    if dry_run:
        from kdcli.engine.runs import recipe_yaml

        console.print(recipe_yaml(resolved), highlight=False, markup=False)
        return
    pipeline.preflight(command, resolved, smoke)
    check_trackers(resolved.log)
    ctx, plan, output = _context(resolved, out, device, seed_list, seeds is not None, smoke, resume, overwrite, command)
    if plan.finished:
        if ctx.dist.is_main:
            output.commit()  # a finished --overwrite run killed before it was swapped in
        _say(f"{output.final} is a finished run (its results.csv is there); nothing to do. To train longer, resume "
             "with a larger --set train.epochs=N")
        return
    try:
        ctx.tracker = Tracker(resolved.log, resolved, ctx.out_dir, enabled=ctx.dist.is_main)
        with ctx.signals:  # held over every stage: a signal between two stages stops before the next one
            frame = pipeline.run_seeds(command, resolved, ctx, smoke, plan.seeds, share_teacher=not teacher_per_seed)
        ctx.tracker.results(frame)
    except RunInterrupted as stop:  # SIGINT/SIGTERM during training: a recovery point was written
        _error(f"{stop}. Continue with: {_resume_command(ctx.out_dir)}")
        raise typer.Exit(stop.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C twice, or before training began
        _error(f"interrupted; the last saved step is kept. Continue with: {_resume_command(ctx.out_dir)}")
        raise typer.Exit(130) from None
    except DiskFull as full:
        if _Options.debug:
            raise
        _error(f"{full}; free some space, then continue with: {_resume_command(ctx.out_dir)}")
        raise typer.Exit(3) from None
    except BaseException:
        if not resume:
            _forget_failed_start(ctx.out_dir, remove_dir=output.created or output.staging is not None)
        raise
    finally:
        if ctx.tracker is not None:
            ctx.tracker.close()
    if ctx.dist.is_main:
        write_csv(ctx.out_dir / "results.csv", frame)
        output.commit()
        _print_results(frame, f"{resolved.name}{' (smoke)' if smoke else ''}")
        _say(f"results: {output.final / 'results.csv'}")


def _print_results(frame: pd.DataFrame, title: str) -> None:
    split = frame["eval_split"].iloc[0]
    with_test = split != "test"  # model selection on val: show the test accuracy of the selected epoch too
    seeded = "best_top1_std" in frame
    columns = ["stage", "network", "arch", f"best {split} top1", "best epoch", f"last {split} top1"]
    columns += ["test top1 at best"] if with_test else []
    table = Table(title=title)
    for column in columns + ["time", "img/s"] + (["seed"] if seeded else []):
        table.add_column(column, justify="left" if column in ("stage", "network", "arch", "seed") else "right")
    for row in frame.itertuples():
        mean = seeded and row.seed == "mean"
        cells = [row.stage, row.network, row.arch, _accuracy(row, "best_top1", mean),
                 "" if mean else str(row.best_epoch), _accuracy(row, "last_top1", mean),
                 *([_accuracy(row, "test_top1_at_best", mean)] if with_test else []),
                 f"{row.stage_seconds:.0f}s", f"{row.images_per_s:.0f}"]
        table.add_row(*cells, *([str(row.seed)] if seeded else []))
    console.print(table)


def _accuracy(row, metric: str, with_std: bool) -> str:
    import pandas as pd

    value = getattr(row, metric)
    return "" if pd.isna(value) else f"{value:.2f}" + (f" ± {getattr(row, metric + '_std'):.2f}" if with_std else "")


@app.command("train-teacher")
@friendly
def train_teacher(recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
                  device: str = DeviceOpt, seed: int = SeedOpt, dry_run: bool = DryOpt, smoke: bool = SmokeOpt,
                  resume: bool = ResumeOpt, overwrite: bool = OverwriteOpt) -> None:
    """Train the recipe's teacher network from scratch with cross-entropy."""
    _train("train-teacher", recipe, set_, out, device, seed, dry_run, smoke, resume, overwrite)


@app.command()
@friendly
def distill(recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
            device: str = DeviceOpt, seed: int = SeedOpt, dry_run: bool = DryOpt, smoke: bool = SmokeOpt,
            resume: bool = ResumeOpt, overwrite: bool = OverwriteOpt,
            seeds: Optional[str] = typer.Option(None, "--seeds",
                                                help="Run once per seed, e.g. 0,1,2; adds mean ± std rows."),
            teacher_per_seed: bool = typer.Option(
                False, "--teacher-per-seed", help="With --seeds and no teacher checkpoint: train a teacher per seed "
                "(default: one teacher, trained with the first seed, shared by all).")) -> None:
    """Distil the recipe's student from its teacher (training the teacher first if no checkpoint is given)."""
    _train("distill", recipe, set_, out, device, seed, dry_run, smoke, resume, overwrite, seeds, teacher_per_seed)


@app.command("cache-teacher")
@friendly
def cache_teacher(recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt,
                  out: Optional[Path] = typer.Option(
                      None, "--out", "-o", help="Cache folder (default: the shared folder under ~/.cache/kdcli that "
                      "distill finds by itself; $KDCLI_CACHE moves it)."),
                  features: bool = typer.Option(False, "--features", help="Also cache pre-logit features (KDAV)."),
                  batch_size: int = typer.Option(1024, "--batch-size", help="Views per teacher forward."),
                  overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild a cache in --out from scratch "
                                                 "(without it, a cache in --out is finished, never replaced)."),
                  device: str = DeviceOpt) -> None:
    """Compute the teacher's outputs on every augmentation view of every training image, once (resumable)."""
    from kdcli.engine import pipeline
    from kdcli.engine.outputs import claim, writing
    from kdcli.engine.runs import RunRecord

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    resolved = _load(recipe, set_, False)
    target = pipeline.resolve_device(device)
    if out is None:  # the shared cache folder, named by the teacher's fingerprint
        report = pipeline.cache_teacher(resolved, None, features, target, batch_size, console)
        where = report.folder
    else:  # a cache in --out is continued (a killed build recomputes only its missing shards): its own --resume
        output = claim(out, "cache-teacher", resolved.name, overwrite=overwrite,
                       resume=not overwrite and (out / "manifest.json").is_file(), marker="manifest.json")
        with writing(output) as folder:
            report = pipeline.cache_teacher(resolved, folder, features, target, batch_size, console)
            RunRecord("cache-teacher", [0], False).write(folder)
        where = output.final
    manifest = report.manifest
    size = sum(p.stat().st_size for p in where.glob("shard-*.safetensors")) / 2**20
    rate = report.computed_views / max(report.seconds, 1e-9)
    _say(f"teacher cache: {manifest.images} images x {manifest.views} views, {' + '.join(manifest.outputs)} "
         f"(fp16, {size:.1f} MiB) in {where}")
    _say(f"computed {report.computed_views} teacher forwards in {report.seconds:.1f}s ({rate:.0f}/s)"
         if report.computed_views else "already complete: nothing computed")
    hint = ("distill finds it by itself (teacher.cache: auto)" if out is None
            else f"use it with --set teacher.cache={where}")
    _say(hint)


# -- evaluate / export ----------------------------------------------------------------------------
@app.command()
@friendly
def evaluate(checkpoints: List[Path] = typer.Argument(..., help="One or more checkpoints (.safetensors or .pth)."),
             recipe: Optional[str] = typer.Option(
                 None, "--recipe", "-r", help="Recipe whose dataset to evaluate on (default: the recipe.yaml of the "
                 "run the first checkpoint belongs to, else the recipe its sidecar names)."),
             set_: Optional[List[str]] = SetOpt, split: str = typer.Option("test", help="test, val or train."),
             arch: Optional[str] = typer.Option(None, help="Architecture for .pth files without a sidecar."),
             teacher: Optional[Path] = typer.Option(None, help="Teacher checkpoint: adds agreement and KL."),
             teacher_arch: Optional[str] = typer.Option(None, help="Teacher architecture for a .pth teacher."),
             save_logits: Optional[Path] = typer.Option(None, help="Write per-sample logits (safetensors)."),
             out: Optional[Path] = typer.Option(
                 None, "--out", "-o", help="Directory for evaluation.csv (default runs/<recipe>-evaluate-<time>)."),
             overwrite: bool = OverwriteOpt, device: str = DeviceOpt, seed: int = SeedOpt,
             smoke: bool = SmokeOpt) -> None:
    """Top-1, top-5, NLL and ECE of checkpoints on a dataset split (and agreement with a teacher)."""
    from kdcli.engine.evaluation import evaluate_checkpoints, recipe_of
    from kdcli.engine.outputs import claim, writing
    from kdcli.engine.pipeline import resolve_device
    from kdcli.engine.runs import RunRecord

    if split not in ("test", "val", "train"):
        raise UserError(f"--split '{split}' is not a split; use test, val or train")
    resolved = _load(recipe or recipe_of(checkpoints[0]), set_, smoke)
    _refuse_existing_file(save_logits, overwrite, "--save-logits")
    output = claim(out, "evaluate", resolved.name, overwrite=overwrite, smoke=smoke)
    with writing(output) as folder:
        frame, _ = evaluate_checkpoints(checkpoints, resolved, split, resolve_device(device), folder, arch=arch,
                                        teacher=teacher, teacher_arch=teacher_arch, save_logits=save_logits,
                                        smoke=smoke, seed=seed, console=console)
        RunRecord("evaluate", [seed], smoke).write(folder, resolved)
    _print_frame(frame, f"evaluate {resolved.name} ({split})")
    _say(f"results: {output.final / 'evaluation.csv'}")


def _refuse_existing_file(path: Optional[Path], overwrite: bool, option: str) -> None:
    """The output policy for an option that names a file: an existing file is replaced only with --overwrite."""
    if path is None or not path.exists():
        return
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file path")
    if not overwrite:
        raise UserError(f"{option} {path} exists; pass --overwrite to replace it, or choose another path")


@app.command()
@friendly
def report(paths: List[Path] = typer.Argument(..., help="Run directories, --seeds parents, or folders holding runs "
                                              "(e.g. runs/)."),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory for report.csv/.md/.html and "
                                              "curves/ (default runs/<folder>-report-<time>)."),
           overwrite: bool = OverwriteOpt,
           group_by: str = typer.Option("recipe,stage,network", "--group-by", help="Columns whose values make a "
                                        "row, comma-separated: recipe, stage, network, arch (the config hash always "
                                        "splits rows)."),
           formats: str = typer.Option("md,csv,html", "--format", help="Files to write: md, csv, html."),
           plot: Optional[bool] = typer.Option(None, "--plot/--no-plot", help="Learning curves per run and stage as "
                                               "PNG (needs the plot extra; default: on for a single run when it is "
                                               "installed).")) -> None:
    """One table across runs and seeds: mean ± std, teacher, baseline, gain, paper; learning curves."""
    from kdcli import report as reporting
    from kdcli.engine.outputs import claim, writing
    from kdcli.engine.runs import RunRecord

    keys = [key.strip() for key in group_by.split(",") if key.strip()]
    wanted = [name.strip() for name in formats.split(",") if name.strip()]
    if not wanted or any(name not in reporting.FORMATS for name in wanted):
        raise UserError(f"--format '{formats}': choose from {', '.join(reporting.FORMATS)}, comma-separated")
    runs = reporting.find_runs(paths)
    table = reporting.build_report(runs, keys)
    import importlib.util

    from kdcli import figures

    # A single run gets its curves by default when matplotlib is there; --plot without it is a one-line error.
    draw = plot if plot is not None else len(runs) == 1 and importlib.util.find_spec("matplotlib") is not None
    if draw:
        figures.pyplot()  # fail before writing anything when matplotlib is missing
    output = claim(out, "report", paths[0].resolve().name if len(paths) == 1 else "runs", overwrite=overwrite)
    with writing(output) as folder:
        curves = _curves(runs, folder / "curves") if draw else []
        written = reporting.write_report(table, folder, wanted, curves, reporting.extra_tables(runs))
        RunRecord("report", [], False).write(folder)
    _print_frame(reporting.display_table(table), f"kdcli report: {len(runs)} run{'s' if len(runs) > 1 else ''}")
    final = output.final
    _say("written: " + ", ".join(str(final / path.relative_to(folder)) for path in written)
         + (f", {len(curves)} curves in {final / 'curves'}" if curves else ""))


def _curves(runs, folder: Path) -> list[Path]:
    from kdcli import curves
    from kdcli.report import stage_histories

    drawn = []
    for run in runs:
        for stage, histories in stage_histories(run).items():
            title = f"{run.recipe.get('name', run.path.name)} - {stage} ({run.path.name})"
            drawn.append(curves.plot_stage(histories, title, folder / f"{run.path.name}-{stage}.png"))
    return drawn


@app.command()
@friendly
def probe(checkpoint: Path = typer.Argument(..., help="A trained network (.safetensors with its sidecar)."),
          recipe: str = typer.Option(..., "--recipe", "-r", help="Probe recipe: the dataset and the linear "
                                     "classifier's training (probe-stl10, probe-tiny-imagenet, or a YAML path)."),
          set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, overwrite: bool = OverwriteOpt,
          device: str = DeviceOpt, seed: int = SeedOpt, smoke: bool = SmokeOpt) -> None:
    """Transfer: a linear classifier on the frozen network's features on another dataset; top-1 to probe.csv."""
    from kdcli.engine.outputs import claim, writing
    from kdcli.engine.pipeline import resolve_device
    from kdcli.engine.probe import PROBE_FILE
    from kdcli.engine.probe import probe as run_probe
    from kdcli.engine.runs import RunRecord

    if not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist; check the path")
    resolved = _load(recipe, set_, smoke)
    output = claim(out, "probe", resolved.name, overwrite=overwrite, smoke=smoke)
    with writing(output) as folder:
        frame = run_probe(checkpoint, resolved, resolve_device(device), folder, seed=seed, smoke=smoke)
        RunRecord("probe", [seed], smoke).write(folder, resolved)
    shown = ["arch", "dataset", "image_size", "feature_dim", "train_samples", "test_samples", "epochs", "top1", "top5"]
    _print_frame(frame[shown], f"linear probe of {checkpoint.name} on {resolved.name}{' (smoke)' if smoke else ''}")
    _say(f"results: {output.final / PROBE_FILE}")


@app.command()
@friendly
def export(checkpoint: Path = typer.Argument(..., help="Checkpoint to export (.safetensors or .pth)."),
           out: Optional[Path] = typer.Option(
               None, "--out", "-o", help="Output directory (default runs/<checkpoint>-export-<time>)."),
           overwrite: bool = OverwriteOpt,
           arch: Optional[str] = typer.Option(None, help="Architecture for .pth files without a sidecar."),
           formats: str = typer.Option("auto", "--formats", help="Comma-separated: safetensors, torchscript, "
                                       "onnx; auto = all three when the onnx extra is installed, else the first two."),
           image_size: Optional[int] = typer.Option(None, help="Input size (default: from the sidecar, else 32)."),
           seed: int = SeedOpt) -> None:
    """Export a network; every export is loaded back and compared with the PyTorch model."""
    from kdcli.engine.export import export_checkpoint
    from kdcli.engine.outputs import claim, writing
    from kdcli.engine.runs import RunRecord

    output = claim(out, "export", checkpoint.stem, overwrite=overwrite)
    with writing(output) as folder:
        frame, _ = export_checkpoint(checkpoint, folder, [f.strip() for f in formats.split(",") if f.strip()],
                                     arch=arch, image_size=image_size, seed=seed)
        RunRecord("export", [seed], False).write(folder)
    frame["path"] = [str(output.final / path) for path in frame["path"]]
    _print_frame(frame, "export")
    _say(f"results: {output.final / 'export.csv'}")


@app.command("measure-violations")
@friendly
def measure_violations(
        recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt,
        checkpoint: Optional[Path] = typer.Option(
            None, "--checkpoint", "-c", help="Teacher checkpoint (.safetensors, or RepDistiller/mdistiller .pth); "
                                             "default: the recipe's teacher.checkpoint."),
        arch: Optional[str] = typer.Option(
            None, help="Teacher architecture (default: the checkpoint's sidecar, else the recipe's)."),
        augment: str = typer.Option("none,mixup,cutmix", help="Augmentations to measure, comma-separated."),
        samples: Optional[int] = typer.Option(
            None, "--samples", "-n", help="Samples: a seeded random subset (default, and at most: the whole split)."),
        split: str = typer.Option(
            "train", help="train (what the paper measures: the samples that get mixed in training), val or test."),
        alpha: float = typer.Option(
            1.0, help="Mixing weight lam ~ Beta(alpha, alpha); 1 (uniform) as in the IDA code."),
        tau: float = typer.Option(
            4.5, help="Soft-label temperature (KD-i's); only the penalty and the L1 change depend on it."),
        per_class: bool = typer.Option(
            False, "--per-class", help="Add a per-class breakdown (by primary label) and its CSV."),
        plot: Optional[Path] = typer.Option(
            None, "--plot", help="Draw the Kendall-tau distributions to this PNG, PDF or SVG (needs the plot extra)."),
        out: Optional[Path] = typer.Option(
            None, "--out", "-o", help="Directory for violations.csv and violations-per-class.csv (default "
            "runs/<recipe>-measure-violations-<time>)."),
        overwrite: bool = OverwriteOpt, device: str = DeviceOpt, seed: int = SeedOpt, smoke: bool = SmokeOpt) -> None:
    """How often a teacher's soft labels contradict mixed hard labels (IDA, Fig. 1), before and after the isotonic fix."""
    from kdcli import figures, violations
    from kdcli.engine.outputs import claim, writing

    kinds = violations.parse_augmentations(augment)
    if plot is not None:
        figures.pyplot()
        figures.check_path(plot)
    if split not in ("train", "val", "test"):
        raise UserError(f"--split '{split}' is not a split; use train, val or test")
    resolved = _load(recipe, set_, smoke)
    _refuse_existing_file(plot, overwrite, "--plot")
    output = claim(out, "measure-violations", resolved.name, overwrite=overwrite, smoke=smoke)
    with writing(output) as folder:
        _measure(resolved, kinds, checkpoint, arch, samples, split, alpha, tau, per_class, plot, folder, device, seed,
                 smoke)
    _say(f"results: {output.final / 'violations.csv'}")


def _measure(resolved, kinds, checkpoint, arch, samples, split, alpha, tau, per_class, plot, out, device, seed,
             smoke) -> None:
    from kdcli import violations
    from kdcli.engine.io import write_csv
    from kdcli.engine.pipeline import as_teacher_sees, prepare_data, resolve_device
    from kdcli.engine.runs import RunRecord

    path, arch = violations.teacher_source(resolved, checkpoint, arch, smoke)
    data = prepare_data(resolved, smoke)
    dataset = {"train": data.train, "val": data.val, "test": data.test}.get(split)
    if dataset is None:
        raise UserError(f"--split '{split}' is not available for recipe '{resolved.name}'; use train, test, "
                        "or val with --set data.val_fraction=0.1")
    teacher = violations.load_teacher(path, arch, data.num_classes, console, resolved, smoke)
    if path is not None or not smoke:
        _say(f"teacher: {path or violations.pretrained_name(resolved)} ({arch})")
    report = violations.measure_violations(
        teacher, as_teacher_sees(dataset, teacher), kinds, batch_size=resolved.train.eval_batch_size,
        device=resolve_device(device), tau=tau, alpha=alpha, samples=samples, seed=seed, class_names=data.class_names)
    provenance = {"recipe": resolved.name, "teacher": str(path or violations.pretrained_name(resolved) or ""),
                  "arch": arch, "split": split, "tau": tau, "alpha": alpha, "seed": seed}
    write_csv(out / "violations.csv", report.table.assign(**provenance))
    shown = {"augmentation": "augment", "samples": "samples", "kendall_tau": "kendall tau", "top2_ratio": "top-2",
             "violation_rate": "violating", "discordant_pairs": "discordant", "kendall_tau_projected": "tau fixed",
             "violation_rate_projected": "violating fixed", "discordant_pairs_projected": "discordant fixed",
             "l1_change": "L1 change", "seconds": "seconds"}
    _print_frame(report.table[list(shown)].rename(columns=shown),
                 f"label-order violations of {arch} soft labels ({split}{', smoke' if smoke else ''}); "
                 "fixed: after the isotonic projection")
    if per_class:
        write_csv(out / "violations-per-class.csv", report.per_class.assign(**provenance))
        wide = report.per_class.pivot(index="class_name", columns="augmentation", values=["kendall_tau", "violation_rate"])
        wide = wide[[(stat, kind) for kind in kinds for stat in ("kendall_tau", "violation_rate")]]
        wide.columns = [f"{kind} {'tau' if stat == 'kendall_tau' else 'violating'}" for stat, kind in wide.columns]
        _print_frame(wide.reset_index(), "per class (a mixed sample counts for its primary label)")
    if plot is not None:
        violations.plot_kendall(report, plot, f"label-order violations of {arch} soft labels ({resolved.name}, {split})")
        _say(f"plot: {plot}")
    RunRecord("measure-violations", [seed], smoke).write(out, resolved)


@bench_app.command("isotonic")
@friendly
def bench_isotonic(
        device: str = typer.Option("auto", help="auto (CPU, plus CUDA when present), cpu, cuda or cuda:N."),
        threads: int = typer.Option(1, help="CPU intra-op threads for all timings (0: torch's default). 1 by default: "
                                    "the loop is sequential anyway, and extra threads on a small or busy machine "
                                    "make the small batched kernels slower and the timings erratic."),
        batch: int = typer.Option(128, help="Rows per projection (B)."),
        classes: str = typer.Option("100,1000", help="Class counts C, comma-separated."),
        repeats: int = typer.Option(30, help="Timed calls per implementation (the median is reported)."),
        step: bool = typer.Option(True, "--step/--no-step", help="Also time one ida and one kd-aug training step "
                                  "(resnet32x4 -> resnet8x4, batch 64, C=100) against one projection."),
        step_repeats: int = typer.Option(3, help="Timed training steps per method."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write bench-isotonic.csv (and -step.csv) here."),
        overwrite: bool = OverwriteOpt, seed: int = SeedOpt) -> None:
    """Batched exact isotonic projection vs the per-sample loop (speed-up), and its share of an ida step."""
    import torch

    from kdcli.bench import bench_ida_step
    from kdcli.bench import bench_isotonic as run_bench
    from kdcli.engine.io import write_csv
    from kdcli.engine.outputs import claim, writing
    from kdcli.engine.pipeline import resolve_device
    from kdcli.engine.runs import RunRecord

    try:
        counts = [int(c) for c in classes.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 2 or min(batch, repeats, step_repeats) < 1 or threads < 0:
        raise UserError("bench isotonic: --classes needs integers >= 2 (e.g. 100,1000), --batch, --repeats and "
                        "--step-repeats must be >= 1, --threads >= 0")
    output = claim(out, "bench-isotonic", "isotonic", overwrite=overwrite) if out is not None else None
    step_device = resolve_device(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        frame = run_bench(None if device == "auto" else [str(step_device)], batch, tuple(counts), repeats, seed=seed)
        _print_frame(frame, f"isotonic projection: batched vs per-sample loop ({torch.get_num_threads()} CPU threads)")
        steps = bench_ida_step(step_device, repeats=step_repeats, seed=seed) if step else None
    finally:
        torch.set_num_threads(previous)
    if steps is not None:
        _print_frame(steps, "one training step vs one projection")
        row = steps.iloc[0]
        console.print(f"projection = {100 * row.projection_share:.3g}% of an ida step ({row.teacher} -> {row.student}, "
                      f"B={row.B}, C={row.C}, {row.device}); an ida step takes {row.ida_over_kd_aug:.3g}x a kd-aug step")
    if output is not None:
        with writing(output) as folder:
            write_csv(folder / "bench-isotonic.csv", frame)
            if steps is not None:
                write_csv(folder / "bench-isotonic-step.csv", steps)
            RunRecord("bench-isotonic", [seed], False).write(folder)
        _say(f"results: {output.final / 'bench-isotonic.csv'}")


@bench_app.command("step")
@friendly
def bench_step(
        recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt,
        variants: str = typer.Option("default,default+cache", help="kdcli configurations, comma-separated; each joins "
                                     "switches with +: fp32 (plain engine) or default (the recipe's fast path), plus "
                                     "bf16, fp16, channels_last, fold, compile, cache."),
        device: str = DeviceOpt,
        warmup: int = typer.Option(2, help="Untimed steps per configuration first."),
        repeats: int = typer.Option(5, help="Timed rounds; each configuration runs --steps steps per round."),
        steps: Optional[int] = typer.Option(None, help="Steps per timed block (default: 2 on the CPU, 20 on CUDA, "
                                            "more than the reference DataLoader prefetches)."),
        workers: int = typer.Option(-1, help="DataLoader workers of the reference loop (-1: 4 on CUDA, 0 on CPU)."),
        results_file: Optional[Path] = typer.Option(None, "--results-file", help="Also write the table to this CSV."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --results-file."),
        seed: int = SeedOpt) -> None:
    """A recipe's distillation step: kdcli's path vs a plain PyTorch loop, images/s and speed-up in one run."""
    from kdcli.bench.step import bench_step as run_bench
    from kdcli.bench.step import parse_variants
    from kdcli.engine.io import write_csv
    from kdcli.engine.pipeline import resolve_device

    names = parse_variants(variants)
    resolved = _load(recipe, set_, False)
    _refuse_existing_file(results_file, overwrite, "--results-file")
    target = resolve_device(device)
    steps = steps if steps is not None else (20 if target.type == "cuda" else 2)
    if min(warmup + 1, repeats, steps) < 1:
        raise UserError("bench step: --repeats and --steps must be >= 1 and --warmup >= 0")
    workers = workers if workers >= 0 else (4 if target.type == "cuda" else 0)
    frame = run_bench(resolved, names, target, warmup=warmup, repeats=repeats, steps=steps, workers=workers, seed=seed)
    shown = ["config", "precision", "channels_last", "samples_per_sec", "step_time", "step_time_min", "step_time_max",
             "speedup", "teacher_share", "peak_mem_mb", "projected_run_h"]
    _print_frame(frame[shown], f"{resolved.name}: {resolved.teacher.arch} -> {resolved.student.arch} "
                               f"{resolved.method.name}, batch {resolved.train.batch_size}, {target}")
    for row in frame.itertuples():
        if row.config != "reference":
            _say(f"{row.config}: {row.samples_per_sec:.0f} img/s = {row.speedup:.2f}x the reference loop "
                 f"({frame.samples_per_sec.iloc[0]:.0f} img/s); teacher {100 * row.teacher_share:.0f}% of a step; "
                 f"projected {resolved.train.epochs}-epoch run {row.projected_run_h:.2f} h")
    if target.type == "cpu":
        import resource

        _say(f"peak memory of the whole benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
             " MiB (the CPU keeps no per-configuration statistics)")
    if results_file is not None:
        write_csv(results_file, frame)
        _say(f"results: {results_file}")


@bench_app.command("data")
@friendly
def bench_data(
        recipe: str = RecipeOpt, set_: Optional[List[str]] = SetOpt, device: str = DeviceOpt,
        workers: Optional[int] = typer.Option(None, help="DataLoader workers of both loaders (default: the recipe's "
                                              "data.num_workers, resolved)."),
        batches: int = typer.Option(20, help="Batches per timed round."),
        warmup: int = typer.Option(5, help="Untimed batches per round first (at least 2 x workers + 1 are taken: "
                                    "the batches the workers prefetch are not the steady state)."),
        repeats: int = typer.Option(3, help="Timed rounds; the loaders take turns, one loader's workers at a time."),
        results_file: Optional[Path] = typer.Option(None, "--results-file", help="Also write the table to this CSV."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --results-file."),
        seed: int = SeedOpt) -> None:
    """A recipe's training loader alone: kdcli's vs torchvision's standard DataLoader on the same files, images/s."""
    from kdcli.bench.data import bench_data as run_bench
    from kdcli.data import build_data
    from kdcli.data.folder import resolve_workers
    from kdcli.engine.io import write_csv
    from kdcli.engine.pipeline import resolve_device

    resolved = _load(recipe, set_, False)
    _refuse_existing_file(results_file, overwrite, "--results-file")
    if min(batches, repeats) < 1 or warmup < 0 or (workers is not None and workers < 0):
        raise UserError("bench data: --batches and --repeats must be >= 1, --warmup and --workers >= 0")
    target = resolve_device(device)
    count = resolve_workers(resolved.data.num_workers) if workers is None else workers
    frame = run_bench(resolved, build_data(resolved.data), target, workers=count, batches=batches,
                      warmup=max(warmup, 2 * count + 1), repeats=repeats, seed=seed)
    _print_frame(frame.drop(columns=["dataset"]), f"{resolved.name}: {resolved.data.dataset} train loader, batch "
                 f"{resolved.train.batch_size}, {count} workers, {target}")
    reference, kdcli_row = frame.iloc[0], frame.iloc[1]
    _say(f"kdcli: {kdcli_row.images_per_sec:.0f} img/s = {kdcli_row.ratio:.2f}x {reference.loader}'s loader "
         f"({reference.images_per_sec:.0f} img/s)")
    if results_file is not None:
        write_csv(results_file, frame)
        _say(f"results: {results_file}")


# -- list / bench ---------------------------------------------------------------------------------
def _print_frame(frame: pd.DataFrame | list[dict], title: str) -> None:
    """A table of a DataFrame, or of a list of row dicts (no pandas needed)."""
    rows = frame if isinstance(frame, list) else frame.to_dict("records")
    columns = list(rows[0]) if isinstance(frame, list) else list(frame.columns)
    table = Table(title=title)
    for column in columns:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()])
    console.print(table)


@list_app.command("recipes")
@friendly
def list_recipes() -> None:
    """Shipped recipes, with the paper's reported accuracy where there is one."""
    from kdcli.recipes import list_recipes as names
    from kdcli.recipes import load_recipe

    rows = []
    for name in names():
        r = load_recipe(name)
        rows.append({"recipe": name, "teacher": r.teacher.arch if r.teacher else "",
                     "student": r.student.arch if r.student else "", "method": r.method.name, "epochs": r.train.epochs,
                     "paper top1": "" if r.paper_top1 is None else f"{r.paper_top1:.2f}"})
    _print_frame(rows, "recipes")


@list_app.command("models")
@friendly
def list_models() -> None:
    """The CIFAR KD zoo (any timm model name works too)."""
    from kdcli.catalog import listing

    def build():
        from kdcli.models import describe_models

        return describe_models()

    _print_frame(listing("models", build), "models (plus every timm model name)")


@list_app.command("methods")
@friendly
def list_methods() -> None:
    """Training methods, their loss terms and hyper-parameters."""
    from kdcli.catalog import listing

    def build():
        from kdcli.methods import describe_methods

        return describe_methods()

    _print_frame(listing("methods", build), "methods")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
