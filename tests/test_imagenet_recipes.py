"""The ImageNet, CIFAR-10 and probe recipes: the papers' protocols, --smoke for each, and the ImageNet recipe run
end to end on a generated JPEG tree (and on WebDataset shards)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from imagefiles import write_jpeg_tree, write_shards
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.engine.pipeline import resolve_recipe
from kdcli.recipes import list_recipes

IMAGENET = [name for name in list_recipes() if name.startswith("imagenet-")]
R34, R50 = "torchvision:resnet34.IMAGENET1K_V1", "torchvision:resnet50.IMAGENET1K_V1"

# recipe -> (teacher weights, student, method, weights, params, reported top-1). Sources: the TTM paper's Table 5
# (KD, WTTM) and Table 10 (WTTM gamma/beta); mdistiller's configs/imagenet/*/{kd,dkd}.yaml (KD T 1 with 0.5/0.5;
# DKD beta 0.5 / 2, T 1, warm-up 1); the IDA paper's Table 2 via the spec; KDAV's Table 4 via the spec.
EXPECTED = {
    "imagenet-resnet34-resnet18-kd": (R34, "resnet18", "kd", {"ce": 0.5, "kd": 0.5}, {"temperature": 1.0}, 70.66),
    "imagenet-resnet34-resnet18-wttm": (R34, "resnet18", "wttm", {"ce": 1.0, "wttm": 1.6}, {"gamma": 0.8}, 72.19),
    "imagenet-resnet34-resnet18-ttm": (R34, "resnet18", "ttm", {"ce": 1.0, "ttm": 1.6}, {"gamma": 0.8}, None),
    "imagenet-resnet34-resnet18-dkd": (R34, "resnet18", "dkd", {"ce": 1.0, "dkd": 1.0},
                                       {"alpha": 1.0, "beta": 0.5, "temperature": 1.0, "warmup_epochs": 1}, 71.70),
    "imagenet-resnet34-resnet18-kdav": (R34, "resnet18", "kdav", {"ce": 1.0, "av": 1.0},
                                        {"tau": 1.0, "beta": 1.0, "kappa": 1 / 0.07, "queue_size": 16384,
                                         "label_mode": "teacher_soft"}, 73.04),
    "imagenet-resnet34-resnet18-kd-aug": (R34, "resnet18", "kd-aug", {"ce": 0.05, "kd": 0.95},
                                          {"tau": 4.5, "mix": "cutmix", "mix_alpha": 1.0}, 68.79),
    "imagenet-resnet34-resnet18-ida": (R34, "resnet18", "ida", {"ce": 0.05, "kd": 0.95, "ida": 3.0},
                                       {"tau": 4.5, "mix": "cutmix", "mix_alpha": 1.0}, 69.71),
    "imagenet-resnet34-resnet18-ida-p": (R34, "resnet18", "ida-p", {"ce": 0.05, "kd": 0.95, "penalty": 2.0},
                                         {"tau": 4.5, "mix": "cutmix", "mix_alpha": 1.0}, None),
    "imagenet-resnet50-mobilenetv1-kd": (R50, "mobilenetv1_100", "kd", {"ce": 0.5, "kd": 0.5},
                                         {"temperature": 1.0}, 70.50),
    "imagenet-resnet50-mobilenetv1-wttm": (R50, "mobilenetv1_100", "wttm", {"ce": 1.0, "wttm": 3.5}, {"gamma": 0.7},
                                           73.09),
    "imagenet-resnet50-mobilenetv1-ttm": (R50, "mobilenetv1_100", "ttm", {"ce": 1.0, "ttm": 3.5}, {"gamma": 0.7},
                                          None),
    "imagenet-resnet50-mobilenetv1-dkd": (R50, "mobilenetv1_100", "dkd", {"ce": 1.0, "dkd": 1.0},
                                          {"alpha": 1.0, "beta": 2.0, "temperature": 1.0, "warmup_epochs": 1}, 72.05),
}


def test_every_imagenet_recipe_is_listed_here():
    assert sorted(IMAGENET) == sorted([*EXPECTED, "imagenet-afd-resnet18-resnet34"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_imagenet_recipes_carry_the_papers_protocol(name):
    recipe = resolve_recipe(name)
    pretrained, student, method, weights, params, reported = EXPECTED[name]
    assert (recipe.data.dataset, recipe.data.image_size, recipe.data.crop_fraction) == ("imagenet", 224, 0.875)
    assert (recipe.train.epochs, recipe.train.batch_size, recipe.optim.lr, recipe.optim.weight_decay) == \
        (100, 256, 0.1, 1e-4)
    assert (recipe.schedule.milestones, recipe.schedule.gamma, recipe.optim.momentum) == ([30, 60, 90], 0.1, 0.9)
    assert (recipe.teacher.pretrained, recipe.teacher.arch) == (pretrained, pretrained.split(":")[1].split(".")[0])
    assert (recipe.student.arch, recipe.method.name, recipe.method.weights) == (student, method, weights)
    assert recipe.method.params == pytest.approx(params) if "mix" not in params else recipe.method.params == params
    assert recipe.paper_top1 == reported and (reported is None or recipe.paper_source)


def test_afd_imagenet_recipe_is_the_online_resnet18_resnet34_pair():
    recipe = resolve_recipe("imagenet-afd-resnet18-resnet34")
    assert recipe.teacher is None and recipe.method.params["networks"] == ["resnet18", "resnet34"]
    assert (recipe.train.epochs, recipe.schedule.milestones, recipe.method.params["adam_milestones"]) == \
        (90, [30, 60], [22, 45])
    assert recipe.paper_top1 == 70.39


@pytest.mark.parametrize("name", ["cifar10-teacher-resnet56", "cifar10-resnet56-resnet20-kd",
                                  "cifar10-resnet56-resnet20-wttm", "cifar10-resnet56-resnet20-kdav"])
def test_cifar10_recipes_are_the_cifar100_protocol_on_cifar10(name):
    recipe, reference = resolve_recipe(name), resolve_recipe("cifar100-resnet")
    assert recipe.data.dataset == "cifar10" and recipe.teacher.arch == "resnet56" and recipe.teacher.checkpoint is None
    assert (recipe.optim, recipe.schedule, recipe.train) == (reference.optim, reference.schedule, reference.train)


def test_every_imagenet_recipe_passes_smoke(tmp_path):
    """Two steps of each ImageNet recipe at 224 px with its real networks (random teachers: no weights here)."""
    for name in IMAGENET:
        result = CliRunner().invoke(app, ["distill", "--recipe", name, "--smoke", "--out", str(tmp_path / name)])
        assert result.exit_code == 0, f"{name}: {result.output[-2000:]}"
        frame = pd.read_csv(tmp_path / name / "results.csv")
        recipe = resolve_recipe(name)
        networks = recipe.method.params.get("networks") or [recipe.student.arch]
        assert set(networks) <= set(frame.arch), name  # afd adds its ensemble row
        assert (frame.best_top1 >= 0).all() and (frame.best_top1 <= 100).all()


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet-like")
    write_jpeg_tree(root, 4, {"train": 12, "val": 4}, size=(80, 64))
    return root


def _tiny(root: Path) -> list[str]:
    return ["--set", f"data.root={root}", "--set", "data.image_size=64", "--set", "train.epochs=2",
            "--set", "train.batch_size=16", "--set", "train.eval_batch_size=16", "--set", "data.num_workers=1",
            "--set", "train.precision=fp32"]


def test_imagenet_recipe_end_to_end_on_a_jpeg_tree(tmp_path, jpeg_tree):
    """train-teacher -> distill -> evaluate with the ImageNet KD recipe on a 4-class JPEG tree at 64 px: the
    teacher trained here stands in for torchvision's weights (teacher.checkpoint with teacher.pretrained: the
    named network, the file's weights and class count)."""
    recipe = "imagenet-resnet34-resnet18-kd"
    runner = CliRunner()
    teacher = runner.invoke(app, ["train-teacher", "--recipe", recipe, *_tiny(jpeg_tree), "--out", str(tmp_path / "t")])
    assert teacher.exit_code == 0, teacher.output
    trained = pd.read_csv(tmp_path / "t" / "results.csv").iloc[0]
    assert trained.arch == "resnet34" and trained.best_top1 >= 50  # 4 colour classes: chance is 25
    checkpoint = tmp_path / "t" / "teacher" / "checkpoints" / "teacher-best.safetensors"
    distill = runner.invoke(app, ["distill", "--recipe", recipe, *_tiny(jpeg_tree), "--set",
                                  f"teacher.checkpoint={checkpoint}", "--out", str(tmp_path / "d")])
    assert distill.exit_code == 0, distill.output
    row = pd.read_csv(tmp_path / "d" / "results.csv").iloc[0]
    assert (row.stage, row.arch) == ("kd", "resnet18")
    student = tmp_path / "d" / "kd" / "checkpoints" / "student-best.safetensors"
    evaluation = runner.invoke(app, ["evaluate", str(student), "--teacher", str(checkpoint), "--out",
                                     str(tmp_path / "e")])
    assert evaluation.exit_code == 0, evaluation.output
    evaluated = pd.read_csv(tmp_path / "e" / "evaluation.csv").iloc[0]
    assert evaluated.samples == 16 and evaluated.top1 == pytest.approx(row.best_top1)


def test_imagenet_recipe_trains_on_webdataset_shards(tmp_path):
    write_shards(tmp_path / "shards", 4, {"train": 12, "val": 4}, per_shard=10, size=(80, 64))
    result = CliRunner().invoke(app, ["train-teacher", "--recipe", "imagenet-resnet34-resnet18-kd",
                                      *_tiny(tmp_path / "shards"), "--set", "teacher.pretrained=null",
                                      "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    history = pd.read_csv(tmp_path / "t" / "teacher" / "history.csv")
    assert len(history) == 2 and history.test_top1.iloc[-1] >= 50


def test_a_run_on_jpeg_files_stopped_mid_epoch_resumes_bit_exactly(tmp_path, jpeg_tree, monkeypatch):
    """SIGTERM at the 5th step (the 2nd of epoch 2, 3 steps an epoch, one DataLoader worker): the recovery point
    and --resume give the same weights and history as the uninterrupted run (crops are seeded per sample, the
    resumed epoch skips the batches already done)."""
    import signal

    from test_recovery import _ctx, _signal_at, assert_same_run

    from kdcli.engine import pipeline
    from kdcli.errors import RunInterrupted

    overrides = [item for item in _tiny(jpeg_tree) if item != "--set"] + ["teacher.pretrained=null"]
    recipe = resolve_recipe("imagenet-resnet34-resnet18-kd", overrides)
    pipeline.train_teacher(recipe, _ctx(tmp_path / "a"), smoke=False)
    _signal_at(monkeypatch, 5, signal.SIGTERM)
    with pytest.raises(RunInterrupted):
        pipeline.train_teacher(recipe, _ctx(tmp_path / "b"), smoke=False)
    monkeypatch.undo()
    pipeline.train_teacher(recipe, _ctx(tmp_path / "b", resume=True), smoke=False)
    assert_same_run(tmp_path / "a" / "teacher", tmp_path / "b" / "teacher")
