"""Engine: bit-exact resume, atomic writes, checkpoints, schedules, metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from kdcli.engine import pipeline
from kdcli.engine.checkpoint import load_model, read_state_dict
from kdcli.engine.io import atomic_write, write_json
from kdcli.engine.metrics import agreement_metrics, classification_metrics, ensemble_logits, expected_calibration_error
from kdcli.engine.optim import build_scheduler
from kdcli.engine.pipeline import resolve_recipe
from kdcli.engine.trainer import RunContext
from kdcli.errors import UserError
from kdcli.recipes import ScheduleConfig


def _ctx(out: Path, resume: bool = False) -> RunContext:
    return RunContext(out, torch.device("cpu"), seed=5, console=Console(quiet=True), resume=resume)


def test_resume_after_a_kill_is_bit_exact(tiny_recipe, tmp_path, interrupted) -> None:
    recipe = resolve_recipe(str(tiny_recipe(method="ce", epochs=3)))
    straight = pipeline.train_teacher(recipe, _ctx(tmp_path / "a"), smoke=False)[0]

    interrupted(lambda: pipeline.train_teacher(recipe, _ctx(tmp_path / "b"), smoke=False))
    resumed = pipeline.train_teacher(recipe, _ctx(tmp_path / "b", resume=True), smoke=False)[0]

    a = load_file(tmp_path / "a/teacher/checkpoints/teacher-last.safetensors")
    b = load_file(tmp_path / "b/teacher/checkpoints/teacher-last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (pd.read_csv(tmp_path / f"{d}/teacher/history.csv") for d in "ab")
    cols = [c for c in ha.columns if c not in ("seconds", "images_per_s")]
    pd.testing.assert_frame_equal(ha[cols], hb[cols])
    assert straight.results[0].best_top1 == resumed.results[0].best_top1
    assert len(hb) == 3 and list(hb["lr"]) == pytest.approx([0.05, 0.005, 0.005])


def test_training_learns_and_writes_history(tiny_recipe, tmp_path) -> None:
    recipe = resolve_recipe(str(tiny_recipe(method="ce", epochs=2)))
    summary = pipeline.train_teacher(recipe, _ctx(tmp_path), smoke=False)[0]
    history = pd.read_csv(tmp_path / "teacher/history.csv")
    assert {"epoch", "lr", "ce", "loss", "train_top1", "val_top1", "test_top1", "seconds", "images_per_s"} <= set(history)
    assert history["loss"].iloc[-1] < math.log(20)  # below chance-level cross-entropy
    result = summary.results[0]
    assert result.best_top1 == history["val_top1"].max()
    assert result.test_top1_at_best == history.loc[history["val_top1"].idxmax(), "test_top1"]
    best = load_model(result.checkpoint)
    assert best.kdcli_meta["arch"] == "resnet8" and best.kdcli_meta["num_classes"] == 20
    assert not best.training


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path) -> None:
    target = tmp_path / "x.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write('{"v": 2, "half')
            raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith('{\n  "v": 1')
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind


def test_a_write_that_runs_out_of_space_keeps_the_old_file_and_stops_the_run(tmp_path) -> None:
    """The portable half of the disk-full check (test_bad_input.py fills a real tmpfs when run as root)."""
    import errno

    from kdcli.engine.io import atomic_save
    from kdcli.errors import RunStopped

    target = tmp_path / "state.pt"
    write_json(target, {"v": 1})

    def full(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunStopped) as stopped:
        atomic_save(target, full)
    assert f"no space left on the device (or quota exceeded) while writing into {tmp_path}:" in str(stopped.value)
    assert "the previous state.pt is intact" in str(stopped.value)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"] and '"v": 1' in target.read_text()


def test_load_model_reads_repdistiller_formats_safely(tmp_path) -> None:
    from kdcli.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet8", num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.save({"model": net.state_dict(), "epoch": 240, "accuracy": 0.7}, tmp_path / "wrapped.pth")
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "ddp.pth")
    for name in ("wrapped.pth", "ddp.pth"):
        loaded = load_model(tmp_path / name, arch="resnet8")
        assert torch.equal(loaded(x), net(x))
    with pytest.raises(UserError, match="pass --arch"):
        load_model(tmp_path / "wrapped.pth")
    with pytest.raises(UserError, match="does not match architecture 'resnet20'"):
        load_model(tmp_path / "wrapped.pth", arch="resnet20")

    class Evil:
        def __reduce__(self):
            return (print, ("arbitrary code ran",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pth")


@pytest.mark.parametrize("name, expected", [
    ("multistep", [1, 1, 0.1, 0.1, 0.01, 0.01]),
    ("cosine", [1, 0.9330127, 0.75, 0.5, 0.25, 0.0669873]),
    ("constant", [1] * 6),
])
def test_schedules(name: str, expected: list[float]) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(name=name, milestones=[2, 4], gamma=0.1), epochs=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected, abs=1e-6)


def test_warmup_is_linear() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(name="constant", warmup_epochs=4), epochs=6)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_metrics_against_hand_computation() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [2.0, 1.9, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    m = classification_metrics(logits, labels)
    assert m["top1"] == 50.0 and m["top5"] == 100.0
    probs = logits.double().softmax(1)
    nll = -probs[torch.arange(4), labels].log().mean().item()
    assert m["nll"] == pytest.approx(nll, rel=1e-12)
    # one bin: ECE = |accuracy - mean confidence|
    conf = probs.max(1).values.mean().item()
    assert expected_calibration_error(logits, labels, bins=1) == pytest.approx(100 * abs(0.5 - conf), rel=1e-9)
    agree = agreement_metrics(logits, logits)
    assert agree["agreement"] == 100.0 and abs(agree["kl_teacher_student"]) < 1e-12
    mixed = ensemble_logits([logits, logits.flip(1)]).softmax(1)
    assert torch.allclose(mixed, (logits.softmax(1) + logits.flip(1).softmax(1)) / 2, atol=1e-6)


def test_eval_every_evaluates_every_nth_and_the_last_epoch(tiny_recipe, tmp_path) -> None:
    recipe = resolve_recipe(str(tiny_recipe(method="ce", epochs=3)), ["train.eval_every=2"])
    ctx = RunContext(tmp_path, torch.device("cpu"), 0, Console(quiet=True))
    summaries = pipeline.train_teacher(recipe, ctx, smoke=False)
    history = pd.read_csv(tmp_path / "teacher/history.csv")
    assert history["val_top1"].isna().tolist() == [True, False, False]  # epochs 2 (every 2nd) and 3 (the last)
    assert summaries[0].results[0].best_epoch in (2, 3)


def test_scale_lr_multiplies_every_learning_rate_by_the_ranks() -> None:
    """The linear scaling rule: each rank takes train.batch_size samples, so the global batch is world times it."""
    from kdcli.engine.optim import build_optimizers
    from kdcli.methods.base import ParamGroup
    from kdcli.recipes import OptimConfig

    weight = torch.nn.Parameter(torch.zeros(2))
    groups = [ParamGroup("main", [weight]), ParamGroup("adam", [torch.nn.Parameter(torch.zeros(2))],
                                                       OptimConfig(name="adam", lr=1e-3))]
    schedule = ScheduleConfig(name="constant")
    scaled, _ = build_optimizers(groups, OptimConfig(lr=0.1, scale_lr=True), schedule, 10, world=4)
    plain, _ = build_optimizers(groups, OptimConfig(lr=0.1), schedule, 10, world=4)
    assert scaled["main"].param_groups[0]["lr"] == pytest.approx(0.4)
    assert scaled["adam"].param_groups[0]["lr"] == pytest.approx(4e-3)
    assert plain["main"].param_groups[0]["lr"] == 0.1 and plain["adam"].param_groups[0]["lr"] == 1e-3


def test_a_run_recorded_before_new_recipe_keys_existed_still_resumes(tiny_recipe, tmp_path) -> None:
    """A key a newer kdcli adds at its default neither blocks --resume nor changes the config hash."""
    import yaml

    from kdcli.engine.runs import RECIPE_FILE, RunRecord, check_resume

    recipe = resolve_recipe(str(tiny_recipe(method="ce", epochs=1)))
    RunRecord("train-teacher", [0], False).write(tmp_path, recipe)
    old = yaml.safe_load((tmp_path / RECIPE_FILE).read_text())
    del old["optim"]["scale_lr"], old["teacher"]["pretrained"], old["train"]["save_every_steps"]
    (tmp_path / RECIPE_FILE).write_text(yaml.safe_dump(old))
    assert check_resume(tmp_path, recipe, "train-teacher", None).seeds == [0]
    changed = resolve_recipe(str(tiny_recipe(method="ce", epochs=1)), ["optim.scale_lr=true"])
    with pytest.raises(UserError, match="at 'optim.scale_lr'"):
        check_resume(tmp_path, changed, "train-teacher", None)
    assert changed.config_hash() != recipe.config_hash()
    assert resolve_recipe(str(tiny_recipe(method="ce", epochs=1)), ["optim.scale_lr=false"]).config_hash() == \
        recipe.config_hash()
