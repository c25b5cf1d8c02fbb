"""Typed recipes: YAML files validated into dataclasses, with ``--set key.path=value`` overrides.

A recipe is data, not code. Every key is checked on load: an unknown key, a wrong type or a bad value
raises :class:`~kdcli.errors.UserError` with one line naming the key and the file. The ``method`` section
is checked against the method registry by the engine (:func:`kdcli.engine.pipeline.resolve_recipe`), so
this module depends on no other part of kdcli. A recipe may start
from another one with ``base: <name>``; its keys are merged over the base's, recursively.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdcli.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads ``5e-4`` and ``1E3`` as strings, because its floats need a dot; every ML user
    writes them, and YAML 1.2 reads them as floats. This loader adds the 1.2 spellings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """Parse YAML as recipes are read: safe types only, with YAML 1.2 float spellings (``5e-4``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


@dataclass
class DataConfig:
    """The recipe's ``data`` section: dataset, splits and augmentation (:func:`kdcli.data.build_data` takes it).

    ``root`` is the torchvision root for CIFAR and STL-10; for ``imagefolder`` a folder with ``train/`` and
    ``val/`` (or ``test/``) class folders (Tiny-ImageNet's ``val/`` is read through its annotations file), for
    ``webdataset`` one with ``train/*.tar`` and ``val/*.tar`` shards (and an optional ``classes.txt``);
    ``imagenet`` and ``tiny-imagenet`` are either.
    ``val_fraction`` carves a stratified, ``data_seed``-seeded validation split out of train; test is never
    touched. ``crop_padding`` is the zero padding of the random crop for in-memory datasets (0 disables the
    crop); for decoded datasets (``imagefolder``, ``webdataset``) any value > 0 enables RandomResizedCrop
    instead, and evaluation resizes the shorter side to ``image_size / crop_fraction`` and centre-crops.
    ``num_classes``/``train_size``/``test_size`` apply to ``synthetic`` only; ``image_size`` to decoded
    datasets and STL-10 (resized from 96 px; CIFAR and synthetic are 32x32); ``num_workers`` (a count, or
    ``auto``: from the CPUs and the ranks per node) to decoded datasets.
    """

    dataset: Literal["synthetic", "cifar10", "cifar100", "stl10", "imagefolder", "webdataset", "imagenet",
                     "tiny-imagenet"] = "synthetic"
    root: str = "~/.cache/kdcli/data"
    download: bool = False
    val_fraction: float = 0.0
    image_size: int = 32
    crop_padding: int = 4
    hflip: bool = True
    num_classes: int = 20
    train_size: int = 10000
    test_size: int = 2000
    data_seed: int = 0
    num_workers: int | Literal["auto"] = "auto"
    crop_fraction: float = 0.875


Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """A network by zoo or timm name, optionally initialised from a checkpoint."""

    arch: str = "resnet8"
    checkpoint: str | None = None


@dataclass
class TeacherConfig(ModelConfig):
    """The frozen teacher and how it runs: ``precision`` (``auto``: bf16 where the device computes it natively),
    ``fold_bn`` (BatchNorm folded into the preceding convolutions: the same function, fewer kernels),
    ``compile`` (``torch.compile``) and ``cache``: ``auto`` replays outputs written by ``kdcli cache-teacher``
    when a matching cache exists in the default cache folder, ``off`` never does, a path names one cache.
    ``pretrained`` names published weights, ``torchvision:resnet34.IMAGENET1K_V1`` or ``timm:resnet34.a1_in1k``
    (see :mod:`kdcli.engine.pretrained`); with a ``checkpoint`` too, the name gives the network and the
    normalisation, the file the weights."""

    precision: Precision = "auto"
    fold_bn: bool = True
    compile: bool = False
    cache: str = "auto"
    pretrained: str | None = None


@dataclass
class MethodConfig:
    """The distillation method, the weights of its named loss terms and its own hyper-parameters.

    The total loss is ``sum_i weights[i] * term_i``; ``params`` is validated by the method itself.
    """

    name: str = "ce"
    weights: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """The optimiser: SGD (momentum, nesterov), Adam (coupled L2 weight decay) or AdamW (decoupled); betas for
    the Adam family. ``scale_lr``: under torchrun, multiply every learning rate by the number of ranks (the
    global batch is ranks x ``train.batch_size``; the linear scaling rule)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scale_lr: bool = False


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per epoch."""

    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class TrainConfig:
    """The training loop. ``precision`` of the networks being trained: fp32 by default (a bf16 student lost
    1.06 ± 0.57 top-1 points over 3 seeds on the quickstart, see the README's Performance section); ``auto``
    is bf16 autocast on CUDA GPUs and CPUs with native bf16, fp32 elsewhere; ``fp16`` adds a gradient scaler.
    ``channels_last`` stores images and weights NHWC (faster convolutions on CPUs and tensor cores);
    ``compile`` runs the networks through ``torch.compile``. ``save_every_steps`` and ``save_every_minutes``
    write a recovery checkpoint in the middle of an epoch (0: never), from which ``--resume`` continues
    exactly; the end of every epoch is saved anyway."""

    epochs: int = 240
    batch_size: int = 64
    eval_batch_size: int = 256
    eval_every: int = 1
    eval_split: Literal["val", "test"] = "test"
    precision: Precision = "fp32"
    channels_last: bool = True
    compile: bool = False
    baseline: bool = False
    save_every_steps: int = 0
    save_every_minutes: float = 10.0


@dataclass
class LogConfig:
    """Experiment trackers (all off by default; see :mod:`kdcli.engine.tracking`): ``tensorboard: true`` writes
    event files to ``<run>/tensorboard``; ``wandb`` takes ``wandb.init`` arguments (``project``, ``mode: offline``,
    ...); ``mlflow`` takes ``tracking_uri``, ``experiment``, ``run_name``. ``every_steps``: how often the per-step
    loss terms and learning rate are logged."""

    tensorboard: bool = False
    wandb: dict[str, Any] | None = None
    mlflow: dict[str, Any] | None = None
    every_steps: int = 50


# Keys that change how a run is carried out but not one number it computes: left out of the config hash, and
# free to differ when a run is resumed.
OPERATIONAL = ("train.save_every_steps", "train.save_every_minutes", "data.num_workers", "log.tensorboard",
               "log.wandb", "log.mlflow", "log.every_steps")


@dataclass
class Recipe:
    """A complete, resolved experiment description."""

    name: str = "unnamed"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    student: ModelConfig | None = None
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    paper_top1: float | None = None
    paper_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Short, stable hash of the resolved recipe (provenance column in results.csv): of :func:`comparable`, so
        neither the keys that cannot change a result nor keys a newer kdcli adds at their defaults change it."""
        text = json.dumps(comparable(self.to_dict()), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def comparable(tree: dict[str, Any]) -> dict[str, Any]:
    """A recipe tree as runs are hashed and compared: without its :data:`OPERATIONAL` keys and without the keys at
    their default value (so a recipe written before a key existed compares equal to one that spells it out)."""
    defaults = Recipe().to_dict() | {"teacher": dataclasses.asdict(TeacherConfig()),
                                     "student": dataclasses.asdict(ModelConfig())}
    for key in OPERATIONAL:
        section, name = key.split(".")
        defaults[section].pop(name)
    kept = {}
    for section, value in tree.items():
        default = defaults.get(section)
        if isinstance(value, dict) and isinstance(default, dict):
            value = {k: v for k, v in value.items() if k in default and v != default[k] or k not in default
                     and f"{section}.{k}" not in OPERATIONAL}
        if value != default:
            kept[section] = value
    return kept


def recipes_dir() -> Path:
    """The shipped recipes: ``recipes/`` in a source checkout, ``kdcli/_recipes`` in a wheel."""
    for candidate in (PACKAGE_DIR / "_recipes", PACKAGE_DIR.parent / "recipes"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise UserError("no recipes directory found; reinstall kdcli (pip install -e .)")


GRID_FILE = "_grid.yaml"


def list_recipes() -> list[str]:
    """Every shipped recipe: the YAML files (not the ``_`` bases) and the names the grid table resolves."""
    files = {p.stem for p in recipes_dir().glob("*.yaml") if not p.stem.startswith("_")}
    return sorted(files | set(_grid()))


def find_recipe(name_or_path: str) -> Path:
    """Resolve a recipe name (``quickstart``) or a YAML path; a name of the grid table gives the table's path."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist; "
                            "give a path to a YAML file or a name from `kdcli list recipes`")
        return path
    shipped = recipes_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    if name_or_path in _grid():
        return recipes_dir() / GRID_FILE
    import difflib

    close = difflib.get_close_matches(name_or_path, list_recipes(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown recipe '{name_or_path}'{hint}; see `kdcli list recipes` or pass a YAML path")


def recipe_source(name_or_path: str) -> str:
    """Where a recipe comes from, for messages: its file, or its name in the grid table."""
    path = find_recipe(name_or_path)
    return f"{name_or_path} ({path})" if path.name == GRID_FILE else str(path)


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load, merge with its ``base`` chain, apply ``key.path=value`` overrides and validate."""
    path = find_recipe(name_or_path)
    if path.name == GRID_FILE:
        if name_or_path not in _grid():
            raise UserError(f"{path} is the table of the grid recipes, not a recipe; pass one of its names, e.g. "
                            f"{next(iter(_grid()), 'cifar100-resnet32x4-resnet8x4-crd')}")
        raw = _expand(copy.deepcopy(_grid()[name_or_path]), path, seen=())
    else:
        raw = _load_with_bases(path, seen=())
        raw.setdefault("name", path.stem)
    for override in overrides or []:
        _apply_override(raw, override)
    source = recipe_source(name_or_path) + (" with --set overrides" if overrides else "")
    recipe = build_dataclass(Recipe, raw, "", source)
    _validate(recipe, source)
    return recipe


def _load_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path in seen:
        raise UserError(f"recipe {path}: 'base' chain loops back to itself; remove the cycle")
    return _expand(_read_mapping(path), path, seen)


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe {path}{where}: not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path}: top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def _expand(raw: dict[str, Any], path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """``raw`` merged over its ``base`` chain (the base's name, description and paper fields are not inherited)."""
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _load_with_bases(find_recipe(str(base)), seen + (path,))
    for key in ("name", "description", "paper_top1", "paper_source"):
        parent.pop(key, None)
    return _merge(parent, raw)


@functools.cache
def _grid_table(directory: Path) -> dict[str, dict[str, Any]]:
    """The recipes of ``_grid.yaml``: per method and pair ``cifar100-<teacher>-<student>-<method>``, the pair's
    base with the method's section, its per-pair overrides and the pair's settings of the feature terms it
    uses, plus the reported accuracy where the table has one (see the comments in the table)."""
    table_path = directory / GRID_FILE
    if not table_path.is_file():
        return {}
    table = _read_mapping(table_path)
    _check_table(table, table_path)
    recipes = {}
    for method, entry in table["methods"].items():
        for index, pair in enumerate(table["pairs"]):
            section = _deep_merge(entry["method"], entry.get("per_pair", {}).get(pair, {}))
            uses = {section["name"], *section.get("weights", {})}
            for term, settings in table.get("term_params", {}).get(pair, {}).items():
                if term in uses:
                    params = section.setdefault("params", {})
                    params[term] = _deep_merge(settings, params.get(term, {}))
            raw = {"base": f"_cifar100-{pair}", "name": f"cifar100-{pair}-{method}",
                   "description": f"{entry['description']} ({pair.replace('-', ' -> ')}, RepDistiller protocol)",
                   "method": section}
            reported = entry.get("paper_top1", [None] * len(table["pairs"]))[index]
            if reported is not None:
                raw.update(paper_top1=reported, paper_source=entry["paper_source"])
            recipes[raw["name"]] = raw
    return recipes


def _check_table(table: dict[str, Any], path: Path) -> None:
    """Every pair named in the table is one of its pairs, and every accuracy list has one entry per pair."""
    pairs = table["pairs"]
    unknown = [pair for pair in table.get("term_params", {}) if pair not in pairs]
    for method, entry in table["methods"].items():
        unknown += [pair for pair in entry.get("per_pair", {}) if pair not in pairs]
        if len(entry.get("paper_top1", pairs)) != len(pairs):
            raise UserError(f"{path}: methods.{method}.paper_top1 needs one entry per pair ({len(pairs)}); fix the table")
    if unknown:
        raise UserError(f"{path}: pair '{unknown[0]}' is not in its pairs list; fix the table")


def _grid() -> dict[str, dict[str, Any]]:
    return _grid_table(recipes_dir())


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursively for every mapping (a grid override adds single weights)."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else copy.deepcopy(value)
    return merged


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "weights":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set '{override}': expected key.path=value, e.g. --set train.epochs=10")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set '{override}': '{part}' is a value, not a section")
        node = child
    try:
        value = read_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if parts == ["method"] and isinstance(value, str):
        # `--set method=ttm` switches the method: a fresh section with that method's defaults, since the
        # old method's weights and params mean nothing to the new one (method.name=ttm keeps them).
        value = {"name": value}
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: Any, prefix: str, source: str) -> Any:
    """Construct dataclass ``cls`` from ``raw``, checking every key and type (also used for ``method.params``)."""
    if not isinstance(raw, dict):
        raise UserError(f"recipe {source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"recipe {source}: unknown key '{prefix}{unknown[0]}'; allowed: {', '.join(sorted(names))}")
    values = {name: _coerce(hints[name], raw[name], f"{prefix}{name}", source) for name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, key, source)
        for option in options:  # e.g. int | Literal["auto"]
            try:
                return _coerce(option, value, key, source)
            except UserError:
                continue
        allowed = " or ".join(f"one of {', '.join(map(str, typing.get_args(o)))}" if typing.get_origin(o) is Literal
                              else o.__name__ for o in options)
        raise UserError(f"recipe {source}: '{key}' must be {allowed}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"recipe {source}: '{key}' must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"recipe {source}: '{key}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"recipe {source}: '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    return _scalar(hint, value, key, source)


def _scalar(hint: Any, value: Any, key: str, source: str) -> Any:
    if hint is Any:
        return value
    if hint is str and isinstance(value, bool):
        # YAML 1.1 reads a bare `off`/`no`/`false` as False (and `on`/`yes`/`true` as True): give back the word.
        return "on" if value else "off"
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise UserError(f"recipe {source}: '{key}' must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def _validate(recipe: Recipe, source: str) -> None:
    """Value checks that types alone cannot express."""
    checks = [
        (recipe.train.epochs >= 1, "train.epochs", "must be >= 1"),
        (recipe.train.batch_size >= 1, "train.batch_size", "must be >= 1"),
        (recipe.train.eval_every >= 1, "train.eval_every", "must be >= 1"),
        (recipe.train.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1"),
        (recipe.train.save_every_steps >= 0, "train.save_every_steps", "must be >= 0 (0: only at epoch ends)"),
        (recipe.train.save_every_minutes >= 0, "train.save_every_minutes", "must be >= 0 (0: never by time)"),
        (recipe.log.every_steps >= 1, "log.every_steps", "must be >= 1"),
        (recipe.optim.lr > 0, "optim.lr", "must be > 0"),
        (recipe.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
        (len(recipe.optim.betas) == 2 and all(0 <= b < 1 for b in recipe.optim.betas), "optim.betas",
         "must be two numbers in [0, 1), e.g. [0.9, 0.999]"),
        (0.0 <= recipe.data.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)"),
        (recipe.data.num_classes >= 2, "data.num_classes", "must be >= 2"),
        (recipe.train.eval_split == "test" or recipe.data.val_fraction > 0, "train.eval_split",
         "is 'val' but data.val_fraction is 0; set data.val_fraction (e.g. 0.1)"),
        (all(m >= 0 for m in recipe.schedule.milestones), "schedule.milestones", "must be >= 0"),
    ]
    for ok, key, problem in checks:
        if not ok:
            raise UserError(f"recipe {source}: '{key}' {problem}")
