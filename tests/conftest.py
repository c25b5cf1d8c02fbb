"""Shared fixtures: tiny recipes on the built-in dataset that train in seconds on 2 CPU cores."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory) -> None:
    """kdcli's cache folder (teacher outputs, listings) inside the test's tmp dir, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDCLI_CACHE", str(tmp_path_factory.mktemp("kdcli-cache")))
        yield


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

        def killed(self, progress):
            if progress.epoch == epoch:
                raise KeyboardInterrupt
            return real_epoch(self, progress)

        monkeypatch.setattr(Trainer, "_train_epoch", killed)
        try:
            with pytest.raises(KeyboardInterrupt):
                run()
        finally:
            monkeypatch.setattr(Trainer, "_train_epoch", real_epoch)

    return run_killed


# -- CIFAR files in the original format (Python 2 pickles), written from random pixels -----------------
class _Python2Pickler(pickle._Pickler):
    """Writes ``str`` and ``bytes`` as Python 2 strings (BINSTRING), as in the original CIFAR pickles.

    Read back with ``encoding="bytes"`` they are bytes (keys like ``b"data"``), with ``encoding="latin1"``
    (what torchvision uses) they are ``str``; numpy's array state is such a string too.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, value: str | bytes) -> None:
        data = value.encode("latin1") if isinstance(value, str) else value
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(value)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def _write_py2_pickle(path: Path, obj: object) -> None:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def _cifar_batch(n: int, label_key: str, num_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    batch = {"batch_label": f"batch {seed}", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             label_key: rng.integers(0, num_classes, n).tolist(),
             "filenames": [f"img_{seed}_{i}.png" for i in range(n)]}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [label // 5 for label in batch[label_key]]
    return batch


def _write_cifar100(root: Path, n_train: int = 12, n_test: int = 5) -> dict[str, dict]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    files = {"train": _cifar_batch(n_train, "fine_labels", 100, 1), "test": _cifar_batch(n_test, "fine_labels", 100, 2),
             "meta": {"fine_label_names": [f"fine{i}" for i in range(100)],
                      "coarse_label_names": [f"coarse{i}" for i in range(20)]}}
    for name, content in files.items():
        _write_py2_pickle(folder / name, content)
    return files


@pytest.fixture(scope="session")
def cifar_files() -> SimpleNamespace:
    """Writers of CIFAR files in the real format: ``batch(n, label_key, classes, seed)``, ``pickle(path, obj)``,
    ``cifar100(root, n_train=12, n_test=5)`` (returns the written contents)."""
    return SimpleNamespace(batch=_cifar_batch, pickle=_write_py2_pickle, cifar100=_write_cifar100)
