"""Shared fixtures: tiny recipes on the built-in dataset that train in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = """
name: tiny
data: {{dataset: synthetic, num_classes: 20, train_size: 320, test_size: 80, val_fraction: 0.25, data_seed: 3}}
teacher: {{arch: resnet8}}
student: {{arch: resnet8}}
method: {{name: {method}}}
optim: {{name: sgd, lr: 0.05}}
schedule: {{name: multistep, milestones: [1]}}
train: {{epochs: {epochs}, batch_size: 32, eval_batch_size: 64, eval_split: val, baseline: {baseline}}}
"""


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


def _write_tiny(path: Path, method: str = "kd", epochs: int = 2, baseline: bool = False) -> Path:
    path.write_text(TINY.format(method=method, epochs=epochs, baseline=str(baseline).lower()))
    return path


@pytest.fixture(scope="session")
def write_tiny_recipe():
    """`write_tiny_recipe(path, method=, epochs=, baseline=)` writes the tiny recipe to `path`.

    A fixture rather than an import: tests/ is not a package, so `from tests.conftest import ...`
    only works when the repository root happens to be on sys.path.
    """
    return _write_tiny


@pytest.fixture
def tiny_recipe(tmp_path: Path):
    """Write a tiny recipe and return its path; keyword args fill method/epochs/baseline."""

    def make(method: str = "kd", epochs: int = 2, baseline: bool = False, name: str = "tiny.yaml") -> Path:
        return _write_tiny(tmp_path / name, method, epochs, baseline)

    return make


@pytest.fixture
def interrupted(monkeypatch):
    """``interrupted(run, epoch=1)``: call ``run()`` with training killed (KeyboardInterrupt) as ``epoch`` starts."""
    from kdcli.engine.trainer import Trainer

    def run_killed(run, epoch: int = 1) -> None:
        real_epoch = Trainer._train_epoch

        def killed(self, current: int):
            if current == epoch:
                raise KeyboardInterrupt
            return real_epoch(self, current)

        monkeypatch.setattr(Trainer, "_train_epoch", killed)
        try:
            with pytest.raises(KeyboardInterrupt):
                run()
        finally:
            monkeypatch.setattr(Trainer, "_train_epoch", real_epoch)

    return run_killed
