"""What `train-teacher` and `distill` do: build data and networks, run the stages, tabulate results.

A distill run writes, under its output directory::

    recipe.yaml            the resolved recipe
    run.json               the command, seeds, --smoke, and what an --overwrite replaces when it finishes
    teacher/               only when the recipe gives no teacher checkpoint: the teacher is trained first
    baseline/              with train.baseline: the student trained alone (method ce)
    <method>/              the distilled student(s)
    results.csv            one row per stage and network, with provenance

With ``--seeds 0,1,2`` each seed gets ``seed-<s>/`` with the layout above, except that a teacher to
be trained is trained once, with the first seed, in ``teacher/`` beside them and shared (see
:func:`run_seeds`). Each stage directory holds ``history.csv`` and ``checkpoints/``. ``--resume`` skips finished stages and
continues an interrupted one from its last saved step (:mod:`kdcli.engine.recovery`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from kdcli.data import DataBundle, TensorSplit, build_data, make_loader, smoke_data
from kdcli.data.registry import DATASETS
from kdcli.devices import resolve_precision
from kdcli.engine.cache import CachedTeacher, Manifest, build, default_dir, fingerprint, open_cache
from kdcli.engine.checkpoint import load_model
from kdcli.engine.io import write_csv
from kdcli.engine.metrics import classification_metrics, predict
from kdcli.engine.outputs import RUNS_DIR
from kdcli.engine.runs import read_record
from kdcli.engine.step import build_method, prepare_teacher, teacher_normalisation
from kdcli.engine.trainer import RunContext, RunSummary, Trainer
from kdcli.errors import UserError
from kdcli.methods import get_method, validate_method_config
from kdcli.methods.base import Method, parse_params
from kdcli.recipes import Recipe, load_recipe, recipe_source

SMOKE_STEPS = 2
SMOKE_BATCH = 16
SMOKE_MARK = "SMOKE RUN (a few steps on generated data, random teacher if none is found): "


def resolve_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe (with ``--set`` overrides) and check its ``method`` section against the method registry."""
    recipe = load_recipe(name_or_path, overrides)
    validate_method_config(recipe.method, recipe_source(name_or_path) + (" with --set overrides" if overrides else ""))
    return recipe


def dataset_classes(recipe: Recipe) -> int:
    """The class count of the recipe's dataset: the registry's, or the recipe's own for synthetic data."""
    return DATASETS[recipe.data.dataset].num_classes or recipe.data.num_classes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def smoke_recipe(recipe: Recipe) -> Recipe:
    """The same recipe shrunk to a few steps: one epoch, small batches, evaluated on the smoke test split; its
    description says it is a smoke run (so does its recipe.yaml)."""
    train = dataclasses.replace(recipe.train, epochs=1, batch_size=min(recipe.train.batch_size, SMOKE_BATCH),
                                eval_batch_size=min(recipe.train.eval_batch_size, 2 * SMOKE_BATCH), eval_split="test")
    return dataclasses.replace(recipe, train=train, description=f"{SMOKE_MARK}{recipe.description}")


TEACHER_CHECKPOINT = Path("teacher") / "checkpoints" / "teacher-best.safetensors"  # inside a run's --out


def newest_trained_teacher(recipe_name: str) -> Path | None:
    """The best teacher checkpoint of the newest default-``--out`` run of this recipe, if any.

    Only ``train-teacher`` and ``distill`` runs of exactly this recipe count (``quickstart-ida-...`` is not
    a ``quickstart`` run), never a ``--smoke`` run (its teacher saw generated data for two steps); the most
    recently written checkpoint wins (an interrupted run's best so far too).
    """
    found = [path for command in ("train-teacher", "distill")
             for path in RUNS_DIR.glob(f"{recipe_name}-{command}-*/{TEACHER_CHECKPOINT}")
             if not _smoke_run(path.parents[2])]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def _smoke_run(run: Path) -> bool:
    try:
        record = read_record(run)
    except UserError:  # an unreadable record: not a run to trust either
        return True
    return record is not None and record.smoke


def prepare_data(recipe: Recipe, smoke: bool) -> DataBundle:
    """The recipe's dataset, or for --smoke generated data with its real class count and image size."""
    cfg = recipe.data
    if smoke:
        num_classes = dataset_classes(recipe)
        if cfg.dataset == "imagefolder":
            num_classes = _folder_classes(cfg.root) or cfg.num_classes
        return smoke_data(num_classes, cfg.image_size, seed=cfg.data_seed)
    return build_data(cfg)


def _folder_classes(root: str) -> int:
    train = Path(root).expanduser() / "train"
    return sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else 0


def build_network(arch: str, num_classes: int, channels_last: bool = False) -> nn.Module:
    from kdcli.models import create_model

    network = create_model(arch, num_classes=num_classes)
    network.kdcli_arch = arch
    return network.to(memory_format=torch.channels_last) if channels_last else network


def load_teacher(path: str, arch: str, num_classes: int, smoke: bool, console) -> nn.Module:
    """A frozen teacher from a checkpoint (kdcli or RepDistiller format)."""
    if smoke and not Path(path).expanduser().is_file():
        console.print(f"[yellow]smoke: teacher checkpoint {escape(str(path))} not found, using a random {escape(arch)}[/]")
        teacher = build_network(arch, num_classes)
    else:
        teacher = load_model(path, arch=arch, num_classes=num_classes)
        teacher.kdcli_arch = arch
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def load_named_teacher(cfg, num_classes: int, smoke: bool, console, checkpoint: str | None = None) -> nn.Module:
    """The frozen teacher ``teacher.pretrained`` names (weights from the cache, or ``checkpoint``); in a smoke run
    without the weights at hand, a random network of that architecture."""
    from kdcli.engine.pretrained import load_pretrained

    try:
        teacher = load_pretrained(cfg.pretrained, num_classes, checkpoint)
    except UserError:
        if not smoke:
            raise
        console.print(f"[yellow]smoke: the weights of {escape(cfg.pretrained)} are not at hand, using a random "
                      f"{escape(cfg.arch)}[/]")
        teacher = build_network(cfg.arch, num_classes)
    return teacher.eval().requires_grad_(False)


def as_teacher_sees(split, teacher: nn.Module):
    """``split`` normalised as the teacher's weights were trained (its ``kdcli_meta``), when that is known."""
    meta = getattr(teacher, "kdcli_meta", None) or {}
    if "mean" not in meta or "std" not in meta:
        return split
    return dataclasses.replace(split, mean=tuple(meta["mean"]), std=tuple(meta["std"]))


def teacher_accuracy(teacher: nn.Module, data: DataBundle, recipe: Recipe, ctx: RunContext) -> float:
    """The loaded teacher's top-1 (%) on the recipe's evaluation split: the check that the right weights came in."""
    split = data.val if recipe.train.eval_split == "val" else data.test
    loader = make_loader(as_teacher_sees(split, teacher), recipe.train.eval_batch_size, train=False,
                         device=ctx.device, seed=ctx.seed)
    logits, labels, _ = predict(teacher, loader)
    top1 = classification_metrics(logits, labels)["top1"]
    if ctx.dist.is_main:
        ctx.console.print(f"teacher {getattr(teacher, 'kdcli_arch', '')}: top-1 {top1:.2f}% on the "
                          f"{recipe.train.eval_split} split", highlight=False, markup=False)
    return top1


def run_stage(stage: str, method_name: str, networks: dict[str, str], teacher: nn.Module | None,
              recipe: Recipe, data: DataBundle, ctx: RunContext, only: str | None = None) -> RunSummary:
    """Train ``networks`` (name -> arch) with one method inside ``out_dir/stage``.

    ``only`` trains just that one of ``networks`` (the baseline of a multi-network method): all are still
    built in order, so it starts from the weights it gets in the method's stage, and two baselines of
    the same architecture are different runs.
    """
    torch.manual_seed(ctx.seed)  # identical initial weights for the same seed, whatever ran before
    built = {name: build_network(arch, data.num_classes, recipe.train.channels_last).to(ctx.device)
             for name, arch in networks.items()}
    if only is not None:
        built = {only: built[only]}
    stage_recipe = recipe if method_name == recipe.method.name else dataclasses.replace(
        recipe, method=dataclasses.replace(recipe.method, name=method_name, weights={}, params={}))
    method = build_method(stage_recipe.method, built, teacher, data.num_classes, data.image_size, ctx.device,
                          ctx.dist.world, data.train.labels)
    stage_ctx = dataclasses.replace(ctx, out_dir=ctx.out_dir / stage)
    cache = teacher_cache(stage_recipe, teacher, data, ctx, method) if teacher is not None else None
    loaded_top1 = teacher_accuracy(teacher, data, recipe, ctx) if teacher is not None else None  # after the checks
    return Trainer(method, teacher, data, stage_recipe, stage_ctx, stage, cache, loaded_top1).fit()


def train_teacher(recipe: Recipe, ctx: RunContext, smoke: bool) -> list[RunSummary]:
    if recipe.teacher is None:
        raise UserError(f"recipe '{recipe.name}' has no 'teacher' section; add teacher.arch to train one")
    data = prepare_data(recipe, smoke)
    return [run_stage("teacher", "ce", {"teacher": recipe.teacher.arch}, None, recipe, data, ctx)]


def preflight(command: str, recipe: Recipe, smoke: bool) -> None:
    """Check what can be checked before anything is written or trained: every architecture name and the
    teacher checkpoint's existence (a typo in the student should not cost a teacher's training first)."""
    from kdcli.models import check_model_name

    if recipe.teacher is None and recipe.student is None and not recipe.method.params.get("networks"):
        raise UserError(f"recipe '{recipe.name}' names no network to train (a probe recipe?); give one with teacher "
                        f"and student sections, or use it with: kdcli probe CHECKPOINT --recipe {recipe.name}")
    archs = [recipe.teacher.arch] if recipe.teacher is not None else []
    needs_teacher = False
    if command == "distill":
        cls = get_method(recipe.method.name)
        student = recipe.student.arch if recipe.student is not None else None
        archs += list(cls.networks_for(parse_params(cls, recipe.method.params), student).values())
        needs_teacher = cls.teacher_taps is not None
    for arch in archs:
        check_model_name(arch)
    checkpoint = recipe.teacher.checkpoint if recipe.teacher is not None and needs_teacher else None
    if recipe.teacher is not None and recipe.teacher.pretrained is not None:
        from kdcli.engine.pretrained import parse_pretrained

        model = parse_pretrained(recipe.teacher.pretrained).model
        if recipe.teacher.arch != model:
            raise UserError(f"teacher.arch '{recipe.teacher.arch}' is not the network teacher.pretrained names "
                            f"('{model}'); set teacher.arch={model}")
    if checkpoint is not None and not smoke and not Path(checkpoint).expanduser().is_file():
        raise UserError(f"teacher.checkpoint {checkpoint} does not exist; fix the path, or --set teacher.checkpoint=null "
                        "to train the teacher first")


def run_seeds(command: str, recipe: Recipe, ctx: RunContext, smoke: bool, seeds: list[int],
              share_teacher: bool = True) -> pd.DataFrame:
    """Run ``command`` once per seed, each in ``out/seed-<s>`` when there are several; the results table.

    With several seeds, a ``distill`` whose recipe has no teacher checkpoint trains the teacher once, with
    the first seed, in ``out/teacher``, and every seed distils from it (``share_teacher=False``: a
    teacher per seed). Several seeds add mean ± std rows (:func:`with_seed_summary`).
    """
    if len(seeds) == 1:
        started = time.perf_counter()
        summaries = (train_teacher if command == "train-teacher" else distill)(recipe, ctx, smoke)
        return write_results(summaries, recipe, ctx, time.perf_counter() - started).results
    frames, teacher = [], None
    if command == "distill" and share_teacher and _trains_teacher(recipe):
        started, first = time.perf_counter(), dataclasses.replace(ctx, seed=seeds[0])
        summaries = train_teacher(recipe, first, smoke)
        frames.append(results_frame(summaries, recipe, first, time.perf_counter() - started))
        teacher = str(ctx.out_dir / TEACHER_CHECKPOINT)
    for seed in seeds:
        seed_ctx = dataclasses.replace(ctx, seed=seed, out_dir=ctx.out_dir / f"seed-{seed}", label=f"seed-{seed}/")
        started = time.perf_counter()
        summaries = (train_teacher(recipe, seed_ctx, smoke) if command == "train-teacher"
                     else distill(recipe, seed_ctx, smoke, teacher))
        frame = write_results(summaries, recipe, seed_ctx, time.perf_counter() - started).results
        frames.append(frame.assign(checkpoint=[f"seed-{seed}/{path}" if path else "" for path in frame["checkpoint"]]))
    return with_seed_summary(pd.concat(frames, ignore_index=True))


def _trains_teacher(recipe: Recipe) -> bool:
    needs = get_method(recipe.method.name).teacher_taps is not None
    return needs and recipe.teacher is not None and recipe.teacher.checkpoint is None and recipe.teacher.pretrained is None


def distill(recipe: Recipe, ctx: RunContext, smoke: bool, teacher_checkpoint: str | None = None) -> list[RunSummary]:
    """Teacher (trained first if neither the recipe nor ``teacher_checkpoint`` gives a checkpoint), optional
    baseline, then the method. The loaded teacher's accuracy (measured as the method's stage starts) is recorded
    with the baselines too."""
    method_cls = get_method(recipe.method.name)
    data = prepare_data(recipe, smoke)
    teacher, summaries = _teacher(recipe, method_cls, data, ctx, smoke, teacher_checkpoint)
    trained = len(summaries)
    student_arch = recipe.student.arch if recipe.student is not None else None
    networks = method_cls.networks_for(parse_params(method_cls, recipe.method.params), student_arch)
    if recipe.train.baseline:
        for name in networks:
            stage = "baseline" if len(networks) == 1 else f"baseline-{name}"
            summaries.append(run_stage(stage, "ce", networks, None, recipe, data, ctx, only=name))
    summaries.append(run_stage(recipe.method.name, recipe.method.name, networks, teacher, recipe, data, ctx))
    for summary in summaries[trained:]:
        summary.teacher_top1 = summaries[-1].teacher_top1
    return summaries


def _teacher(recipe: Recipe, method_cls: type[Method], data: DataBundle, ctx: RunContext, smoke: bool,
             teacher_checkpoint: str | None) -> tuple[nn.Module | None, list[RunSummary]]:
    """The frozen teacher on the device (None for a method without one), and the stage that trained it, if any."""
    if method_cls.teacher_taps is None:
        return None, []
    if recipe.teacher is None:
        raise UserError(f"method '{recipe.method.name}' needs a teacher; "
                        "add teacher.arch (and teacher.checkpoint) to the recipe")
    path, summaries = teacher_checkpoint or recipe.teacher.checkpoint, []
    if recipe.teacher.pretrained is not None and teacher_checkpoint is None:
        teacher = load_named_teacher(recipe.teacher, data.num_classes, smoke, ctx.console, path)
    else:
        if path is None:
            summaries = train_teacher(recipe, ctx, smoke)
            path = str(ctx.out_dir / TEACHER_CHECKPOINT)
        teacher = load_teacher(path, recipe.teacher.arch, data.num_classes, smoke, ctx.console)
    return teacher.to(ctx.device), summaries


def teacher_cache(recipe: Recipe, teacher: nn.Module, data: DataBundle, ctx: RunContext,
                  method: Method) -> CachedTeacher | None:
    """The teacher-output cache of ``teacher.cache`` (see :mod:`kdcli.engine.cache`) if it serves ``method``;
    says on the console which teacher outputs the run uses when a cache exists."""
    setting = recipe.teacher.cache
    if setting == "off" or method.teacher_taps is None or ctx.max_steps is not None:  # --smoke: generated data
        return None
    if teacher_normalisation(teacher, data.mean, data.std) is not None:
        return None  # a cache holds outputs on the data's normalisation, which this teacher does not see
    if not isinstance(data.train, TensorSplit):
        if setting != "auto":
            raise UserError(f"teacher.cache={setting}: teacher caches serve in-memory datasets (cifar10, cifar100, "
                            "synthetic), whose augmentation has finitely many views; set teacher.cache=off")
        return None
    print_ = _fingerprint(recipe, teacher, data.train, ctx.device)
    mixes = "" if method.shows_loader_views() else f"method '{method.name}' shows the teacher mixed images"
    cache, note = open_cache(setting, print_, method.teacher_taps, data.train.origins(), ctx.device, mixes)
    if note and ctx.dist.is_main:
        ctx.console.print(note, highlight=False, markup=False)
    return cache


def _fingerprint(recipe: Recipe, teacher: nn.Module, split: TensorSplit, device: torch.device) -> dict[str, object]:
    """The cache fingerprint of the recipe's teacher on ``split``, at the precision it runs in on ``device``."""
    precision = resolve_precision(recipe.teacher.precision, device)
    return fingerprint(teacher, recipe.teacher.arch, split, recipe.data.dataset, precision)


@dataclass
class CacheReport:
    folder: Path
    manifest: Manifest
    seconds: float
    computed_views: int  # teacher forwards run by this call (0 when the cache was already complete)


def cache_teacher(recipe: Recipe, out: Path | None, features: bool, device: torch.device, batch_size: int,
                  console) -> CacheReport:
    """Compute (or finish) the teacher-output cache of the recipe's teacher on its whole training split."""
    if recipe.teacher is None:
        raise UserError(f"recipe '{recipe.name}' has no 'teacher' section; add teacher.arch and teacher.checkpoint")
    if recipe.teacher.checkpoint is None:
        raise UserError(f"recipe '{recipe.name}' has no teacher.checkpoint to cache; train one with kdcli train-teacher "
                        f"--recipe {recipe.name} --out runs/t and pass --set teacher.checkpoint=runs/t/{TEACHER_CHECKPOINT}")
    data = build_data(dataclasses.replace(recipe.data, val_fraction=0.0))  # the cache covers every training image
    if not isinstance(data.train, TensorSplit):
        raise UserError(f"dataset '{recipe.data.dataset}': teacher caches serve in-memory datasets (cifar10, cifar100, "
                        "synthetic), whose augmentation has finitely many views")
    teacher = load_teacher(recipe.teacher.checkpoint, recipe.teacher.arch, data.num_classes, False, console).to(device)
    print_ = _fingerprint(recipe, teacher, data.train, device)
    folder = out or default_dir(print_, features)
    channels_last = recipe.train.channels_last
    network, _ = prepare_teacher(teacher, recipe.teacher, channels_last, data.image_size)
    started = time.perf_counter()
    with Progress(TextColumn("teacher cache"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("shards", total=None)
        manifest, computed = build(network, data.train, folder, print_, features=features, channels_last=channels_last,
                                   device=device, batch_size=batch_size,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    return CacheReport(folder, manifest, time.perf_counter() - started, computed)


def results_frame(summaries: list[RunSummary], recipe: Recipe, ctx: RunContext, wall_seconds: float) -> pd.DataFrame:
    """One row per stage and network, with the provenance needed to reproduce it. Checkpoint paths are relative
    to the run directory (``ctx.out_dir``, where results.csv is written), so a run can be moved or copied."""
    import timm

    import kdcli

    rows = []
    for summary in summaries:
        for result in summary.results:
            rows.append({
                "recipe": recipe.name, "config_hash": recipe.config_hash(), "stage": summary.stage,
                **dataclasses.asdict(result), "eval_split": recipe.train.eval_split,
                "epochs": recipe.train.epochs, "seed": ctx.seed, "stage_seconds": round(summary.seconds, 2),
                "images_per_s": round(summary.images_per_s, 1), "wall_seconds": round(wall_seconds, 2),
                "device": device_name(ctx.device), "precision": resolve_precision(recipe.train.precision, ctx.device),
                "checkpoint": os.path.relpath(result.checkpoint, ctx.out_dir) if result.checkpoint else "",
                "teacher_outputs": summary.teacher_outputs, "teacher_top1": summary.teacher_top1,
                "smoke": ctx.max_steps is not None,
                "kdcli": kdcli.__version__, "torch": torch.__version__,
                "timm": timm.__version__, "python": platform.python_version(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })
    return pd.DataFrame(rows)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def with_seed_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-seed rows plus one ``mean`` row per (stage, network) run with several seeds (a shared teacher has
    one row and no mean): best- and last-epoch accuracy ± std, and the mean time and images/s (the finish time
    is the last seed's)."""
    metrics = ["best_top1", "last_top1", "best_top5", "last_top5", "test_top1_at_best", "test_top1_last"]
    rows = []
    for _, group in frame.groupby(["stage", "network"], sort=False):
        if len(group) == 1:
            continue
        row = group.iloc[0].to_dict() | {"seed": "mean", "best_epoch": None, "checkpoint": "",
                                         "finished": group["finished"].max()}
        for column in ("stage_seconds", "images_per_s", "wall_seconds", "teacher_top1"):
            row[column] = pd.to_numeric(group[column], errors="coerce").mean()
        for column in metrics:
            values = pd.to_numeric(group[column], errors="coerce")
            row[column] = values.mean()
            row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else 0.0
        rows.append(row)
    return pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)


@dataclass
class Outcome:
    summaries: list[RunSummary]
    results: pd.DataFrame
    results_path: Path


def write_results(summaries: list[RunSummary], recipe: Recipe, ctx: RunContext, wall_seconds: float) -> Outcome:
    frame = results_frame(summaries, recipe, ctx, wall_seconds)
    path = ctx.out_dir / "results.csv"
    if ctx.dist.is_main:
        write_csv(path, frame)
    return Outcome(summaries, frame, path)

