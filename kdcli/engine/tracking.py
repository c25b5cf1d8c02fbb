"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, each through its own library, off by default.

The recipe's ``log`` section turns them on (``log.tensorboard: true``, ``log.wandb: {project: p, mode: offline}``,
``log.mlflow: {tracking_uri: file:///path/mlruns}``). One :class:`Tracker` per run fans out to the enabled ones:

* the resolved recipe as the run's configuration (hyper-parameters) when the run starts;
* every ``log.every_steps`` training steps, each loss term and the learning rate, as
  ``<stage>/train_step/<name>`` against the stage's step (``seed-<s>/<stage>/...`` in a ``--seeds`` run);
* every epoch, its history row (accuracies in percent, mean loss terms, seconds, images/s), as
  ``<stage>/epoch/<name>`` against the epoch (MLflow writes the slashes as dots);
* at the end, the results table (TensorBoard: a Markdown text; W&B: a table; MLflow: ``results.csv``).

Only rank 0 logs under torchrun. A tracker asked for but not installed stops the run before it starts, with
the extra to install.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pandas as pd

from kdcli.errors import UserError
from kdcli.recipes import LogConfig, Recipe

TRACKER_DIRS = ("tensorboard", "wandb")  # what the trackers write inside a run directory
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def _require(name: str):
    module, extra = EXTRAS[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"log.{name} needs the {module} package, which is not installed; "
                        f"pip install 'kdcli[{extra}]' (or set log.{name} off)") from None


def check_trackers(cfg: LogConfig) -> None:
    """Fail before anything runs when a requested tracker's library is missing."""
    for name in _enabled(cfg):
        _require(name)


def _enabled(cfg: LogConfig) -> list[str]:
    return [name for name, on in (("tensorboard", cfg.tensorboard), ("wandb", cfg.wandb is not None),
                                  ("mlflow", cfg.mlflow is not None)) if on]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}`` (lists and None as text)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class Tracker:
    """The enabled trackers of one run (none: every call does nothing)."""

    def __init__(self, cfg: LogConfig, recipe: Recipe, out_dir: Path, enabled: bool = True) -> None:
        self.every = cfg.every_steps
        self.backends: list[Any] = []
        if not enabled:
            return
        config = recipe.to_dict()
        for name in _enabled(cfg):
            backend = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}[name]
            try:
                self.backends.append(backend(cfg, recipe.name, config, out_dir))
            except UserError:
                self.close()
                raise
            except Exception as error:  # noqa: BLE001 - the library refused its settings: say which, in one line
                self.close()
                detail = " ".join(str(error).split())[:300]
                raise UserError(f"log.{name} could not start ({type(error).__name__}: {detail}); fix log.{name} in "
                                "the recipe") from None

    def due(self, step: int) -> bool:
        """Whether training step ``step`` (0-based) is one to log."""
        return bool(self.backends) and (step + 1) % self.every == 0

    def step(self, stage: str, step: int, values: dict[str, float]) -> None:
        if self.due(step):
            for backend in self.backends:
                backend.scalars({f"{stage}/train_step/{k}": v for k, v in values.items()}, step, f"{stage}/train_step")

    def epoch(self, stage: str, row: dict[str, Any]) -> None:
        values = {f"{stage}/epoch/{k}": float(v) for k, v in row.items() if k != "epoch" and _number(v)}
        for backend in self.backends:
            backend.scalars(values, int(row["epoch"]), f"{stage}/epoch")

    def results(self, frame: pd.DataFrame) -> None:
        for backend in self.backends:
            backend.table(frame)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


class _TensorBoard:
    def __init__(self, cfg: LogConfig, name: str, config: dict, out_dir: Path) -> None:
        _require("tensorboard")
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.writer.add_text("recipe", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def scalars(self, values: dict[str, float], step: int, _axis: str) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def table(self, frame: pd.DataFrame) -> None:
        self.writer.add_text("results", frame.to_csv(index=False).replace("\n", "  \n"), 0)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg: LogConfig, name: str, config: dict, out_dir: Path) -> None:
        wandb = _require("wandb")
        settings = dict(cfg.wandb or {})
        self.run = wandb.init(project=settings.pop("project", "kdcli"), name=settings.pop("name", name),
                              mode=settings.pop("mode", "online"), dir=str(out_dir), config=config, **settings)
        self.wandb = wandb
        self.axes: set[str] = set()

    def scalars(self, values: dict[str, float], step: int, axis: str) -> None:
        if axis not in self.axes:  # each stage's series against its own step or epoch counter
            self.run.define_metric(axis)
            self.run.define_metric(f"{axis}/*", step_metric=axis)
            self.axes.add(axis)
        self.run.log({**values, axis: step})

    def table(self, frame: pd.DataFrame) -> None:
        self.run.log({"results": self.wandb.Table(dataframe=frame.astype(str))})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, cfg: LogConfig, name: str, config: dict, out_dir: Path) -> None:
        mlflow = _require("mlflow")
        settings = dict(cfg.mlflow or {})
        if "tracking_uri" in settings:
            mlflow.set_tracking_uri(settings["tracking_uri"])
        mlflow.set_experiment(settings.get("experiment", "kdcli"))
        self.mlflow, self.out_dir = mlflow, out_dir
        self.run = mlflow.start_run(run_name=settings.get("run_name", name))
        mlflow.log_params({key: str(value)[:500] for key, value in flatten(config).items()})

    def scalars(self, values: dict[str, float], step: int, _axis: str) -> None:
        self.mlflow.log_metrics({key.replace("/", "."): value for key, value in values.items()}, step=step)

    def table(self, frame: pd.DataFrame) -> None:
        self.mlflow.log_text(frame.to_csv(index=False), "results.csv")

    def close(self) -> None:
        self.mlflow.end_run()
