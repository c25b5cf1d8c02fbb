"""A run's output directory as a record: what started it, and the checks ``--resume`` makes against it.

Beside ``recipe.yaml`` (the resolved recipe) a run keeps ``run.json``: the command, the seeds, whether
it was a ``--smoke`` run and, for a result written with ``--overwrite``, the directory it replaces when it
finishes. Every command that writes a directory leaves a ``run.json`` in it (see :mod:`kdcli.engine.outputs`).

``--resume`` continues a run only with the recipe it was started with (only ``train.epochs`` may grow, and the
recovery-point cadence may change) and with its own seeds, so a resumed run is the run it claims to be.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from kdcli.data.registry import DATASETS
from kdcli.engine.io import atomic_write, write_json
from kdcli.errors import UserError
from kdcli.methods import resolved_method
from kdcli.recipes import Recipe, comparable, read_yaml

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
GROWABLE = ("train.epochs",)  # what a resumed run may change


@dataclass
class RunRecord:
    command: str
    seeds: list[int]
    smoke: bool
    replaces: str | None = None  # --overwrite: the directory this result takes the place of when it finishes

    def write(self, out: Path, recipe: Recipe | None = None) -> None:
        if recipe is not None:
            with atomic_write(out / RECIPE_FILE) as handle:
                handle.write(recipe_yaml(recipe))
        write_json(out / RUN_FILE, asdict(self))


SYNTHETIC_ONLY = ("num_classes", "train_size", "test_size")
DECODED_ONLY = ("num_workers", "crop_fraction")


def shown_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A recipe tree as ``recipe.yaml`` and ``--dry-run`` show it: every weight and hyper-parameter of the method
    spelled out with its default, and no data key that does not apply to the dataset (``num_classes`` of the
    synthetic data in a CIFAR recipe). Applying it twice changes nothing, so runs compare through it."""
    tree = copy.deepcopy(tree)
    data = tree.get("data") or {}
    info = DATASETS.get(data.get("dataset", "synthetic"))
    dropped = (SYNTHETIC_ONLY if data.get("dataset", "synthetic") != "synthetic" else ()) + \
        (DECODED_ONLY if info is not None and not info.decoded else ())
    for key in dropped:
        data.pop(key, None)
    if tree.get("method", {}).get("name"):
        tree["method"] = resolved_method(tree["method"])
    return tree


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(shown_tree(recipe.to_dict()), sort_keys=False)


@dataclass
class Resumption:
    seeds: list[int]
    finished: bool  # the run completed and the recipe asks for no more epochs
    grows: bool  # train.epochs grew, so the record is rewritten
    replaces: str | None = None  # an interrupted --overwrite: the directory it still takes the place of


def check_resume(out: Path, recipe: Recipe, command: str, seeds: list[int] | None) -> Resumption:
    """What ``--resume`` of ``out`` will do; :class:`UserError` if the run was started differently.

    ``seeds``: those given with ``--seeds`` (``None``: the run's own).
    """
    path = out / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"--resume: {out} has no {RECIPE_FILE}, so it is not a kdcli run directory; pass the --out "
                        "of the run to continue")
    own = read_yaml(path.read_text())
    key = first_difference(comparable(shown_tree(own)), comparable(shown_tree(recipe.to_dict())))
    if key is not None and key not in GROWABLE:
        raise UserError(f"--resume: the recipe differs from the one {out} was started with at '{key}' (run: "
                        f"{_lookup(own, key)!r}, now: {_lookup(recipe.to_dict(), key)!r}); resume with the same recipe "
                        "and --set options (only train.epochs may grow)")
    before = int(own["train"]["epochs"])
    if recipe.train.epochs < before:
        raise UserError(f"--resume: train.epochs={recipe.train.epochs} is fewer than the run's {before}; "
                        "train.epochs may only grow")
    record = read_record(out)
    if record is not None and record.command != command:
        raise UserError(f"--resume: {out} is a `kdcli {record.command}` run; resume it with kdcli {record.command}")
    run_seeds = record.seeds if record is not None else seeds or [0]
    if seeds is not None and record is not None and seeds != record.seeds:
        raise UserError(f"--resume: {out} was started with --seeds {','.join(map(str, record.seeds))}; resume it "
                        "with the same --seeds, or without --seeds")
    grows = recipe.train.epochs > before
    return Resumption(run_seeds, finished=(out / "results.csv").is_file() and not grows, grows=grows,
                      replaces=record.replaces if record is not None else None)


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key at which two nested mappings differ (``None``: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else prefix.rstrip(".")


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def read_record(out: Path) -> RunRecord | None:
    """The ``run.json`` of run directory ``out`` (None for a run written before it existed)."""
    path = out / RUN_FILE
    if not path.is_file():
        return None  # a run written before run.json existed
    try:
        return RunRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise UserError(f"{path} is unreadable ({error}); it is not a kdcli run record") from None
