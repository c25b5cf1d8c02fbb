"""Experiment trackers, each read back with its own library (TensorBoard's event reader, W&B's offline run file,
MLflow's client on a local file store), and the one-line answer when a tracker's package is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.engine import tracking


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B offline run file. Its layout (W&B's datastore): a 7-byte header (":W&B", a
    2-byte magic, a version byte), then LevelDB's log format: 32 KiB blocks of chunks, each with a 4-byte
    checksum, a 2-byte little-endian length and a type (1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, position, records, pending = path.read_bytes(), 7, [], b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # the block's tail is padding
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_each_tracker_holds_what_the_run_logged(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = tmp_path / "mlruns"
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "distill", "--recipe", "quickstart", "--smoke", "--out", str(out), "--set", "log.tensorboard=true",
        "--set", "log.wandb={project: kdcli-test, mode: offline}", "--set", f"log.mlflow={{tracking_uri: {store.as_uri()}}}",
        "--set", "log.every_steps=1"])
    assert result.exit_code == 0, result.output
    history = pd.read_csv(out / "kd" / "history.csv")
    top1, loss = history.test_top1.iloc[0], history.loss.iloc[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").iterdir())))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("kd/epoch/test_top1")] == [(1, pytest.approx(top1))]
    assert [e.step for e in events.Scalars("kd/train_step/loss")] == [0, 1]  # --smoke: 2 steps, every step logged
    assert events.Scalars("kd/epoch/loss")[0].value == pytest.approx(loss)
    assert {"recipe", "results"} <= set(events.Tags()["tensors"]) | {t.split("/")[0] for t in events.Tags()["tensors"]}

    records = _wandb_records(next((out / "wandb").glob("offline-run-*/run-*.wandb")))
    logged = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
              for r in records if r.WhichOneof("record_type") == "history"]
    epochs = [row for row in logged if "kd/epoch/test_top1" in row]
    assert len(epochs) == 1 and epochs[0]["kd/epoch/test_top1"] == pytest.approx(top1) and epochs[0]["kd/epoch"] == 1
    tables = [row for row in logged if "results/nrows" in row]  # the results table: one row per stage
    assert len(tables) == 1 and tables[0]["results/nrows"] == len(pd.read_csv(out / "results.csv"))
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for item in r.run.config.update}  # the recipe, given to wandb.init
    assert config["method"]["name"] == "kd" and config["name"] == "quickstart"

    import mlflow

    mlflow.set_tracking_uri(store.as_uri())
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("kdcli").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "kd.epoch.test_top1")] == \
        [(1, pytest.approx(top1))]
    assert run.data.params["method.name"] == "kd" and run.data.params["optim.lr"] == "0.05"
    assert "results.csv" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_a_missing_tracker_package_is_a_one_line_install_hint(tmp_path: Path, monkeypatch) -> None:
    real = tracking.importlib.import_module

    def without_wandb(name, *args):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real(name, *args)

    monkeypatch.setattr(tracking.importlib, "import_module", without_wandb)
    result = CliRunner().invoke(app, ["distill", "--recipe", "quickstart", "--smoke", "--out", str(tmp_path / "r"),
                                      "--set", "log.wandb={mode: offline}"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "pip install 'kdcli[wandb]'" in lines[0]
    assert not (tmp_path / "r").exists()


def test_each_seed_of_a_seeds_run_is_its_own_series(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["distill", "--recipe", "quickstart", "--smoke", "--seeds", "0,1", "--out", str(out),
                                      "--set", "log.tensorboard=true", "--set", "train.baseline=false"])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(next((out / "tensorboard").iterdir())))
    events.Reload()
    for seed in (0, 1):
        top1 = pd.read_csv(out / f"seed-{seed}" / "kd" / "history.csv").test_top1.iloc[0]
        assert [e.value for e in events.Scalars(f"seed-{seed}/kd/epoch/test_top1")] == [pytest.approx(top1)]
    assert "teacher/epoch/test_top1" in events.Tags()["scalars"]  # the shared teacher: trained once
