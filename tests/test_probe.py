"""`kdcli probe`: features of a frozen network, a linear classifier on them, probe.csv."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch
from imagefiles import write_stl10, write_tiny_imagenet
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.data import DataConfig, build_data
from kdcli.engine.checkpoint import load_model, save_weights
from kdcli.engine.probe import extract_features, train_linear
from kdcli.models import create_model
from kdcli.recipes import load_recipe

CPU = torch.device("cpu")
STUDENT_MEAN, STUDENT_STD = (0.2, 0.3, 0.4), (0.5, 0.25, 0.125)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A resnet8 checkpoint (random weights, BatchNorm statistics made non-trivial) whose sidecar records a
    normalisation different from every dataset's."""
    torch.manual_seed(0)
    network = create_model("resnet8", num_classes=100)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    stem = tmp_path_factory.mktemp("student") / "student-best"
    return save_weights(network, stem, {"arch": "resnet8", "num_classes": 100, "mean": list(STUDENT_MEAN),
                                        "std": list(STUDENT_STD), "image_size": 32, "recipe": "cifar100-teacher"})


def test_features_are_the_pre_logits_of_images_normalised_as_the_network_was_trained(tmp_path, student):
    write_tiny_imagenet(tmp_path, classes=3, train=2, val=1)
    split = build_data(DataConfig("tiny-imagenet", root=str(tmp_path), image_size=32, crop_fraction=1.0,
                                  num_workers=0)).train
    network = load_model(student)
    features, labels = extract_features(network, dataclasses.replace(split, mean=STUDENT_MEAN, std=STUDENT_STD), 4,
                                        CPU)
    images = torch.stack([split.load(i, None).permute(2, 0, 1) for i in range(len(split))]).float() / 255
    normalised = (images - torch.tensor(STUDENT_MEAN).view(1, 3, 1, 1)) / torch.tensor(STUDENT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = network.forward_features(normalised).mean((2, 3))  # resnet8: global average pool, no projection
    assert features.shape == (6, 64) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(features, pooled, atol=1e-5)


def test_linear_classifier_separates_separable_features_and_is_seeded():
    """Four well-separated Gaussian clusters in 8 dimensions: the probe's classifier gets every test point right;
    the same seed gives the same weights bit for bit, another seed other weights."""
    gen = torch.Generator().manual_seed(1)
    centres = 4 * torch.eye(4, 8)
    labels = torch.arange(200) % 4
    features = centres[labels] + 0.3 * torch.randn(200, 8, generator=gen)
    recipe = load_recipe("probe-stl10", ["train.epochs=5", "train.batch_size=32"])
    head = train_linear((features[:160], labels[:160]), 4, recipe, seed=3)
    with torch.no_grad():
        assert torch.equal(head(features[160:]).argmax(1), labels[160:])
    again = train_linear((features[:160], labels[:160]), 4, recipe, seed=3)
    other = train_linear((features[:160], labels[:160]), 4, recipe, seed=4)
    assert torch.equal(head.weight, again.weight) and not torch.equal(head.weight, other.weight)


def test_probe_on_stl10_binaries_writes_probe_csv(tmp_path, student):
    written = write_stl10(tmp_path / "data", 40, 20)
    out = tmp_path / "probe"
    args = ["probe", str(student), "--recipe", "probe-stl10", "--set", f"data.root={tmp_path / 'data'}", "--set",
            "train.epochs=600", "--set", "train.batch_size=8", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    row = pd.read_csv(out / "probe.csv").iloc[0]
    assert (row.arch, row.dataset, row.image_size, row.feature_dim) == ("resnet8", "stl10", 32, 64)
    assert (row.train_samples, row.test_samples, row.classes, row.epochs) == (40, 20, 10, 600)
    assert row.trained_on == "cifar100-teacher" and row.probe_recipe == "probe-stl10"
    # Every image of a class is the same picture (its colour, tests/imagefiles.py), so the features of a
    # class are one point, and a linear classifier trained long enough gets right exactly the test images
    # whose class occurs in the train split.
    seen = set(written["train"][1].tolist())
    assert row.top1 == pytest.approx(100 * sum(label in seen for label in written["test"][1].tolist()) / 20)
    again = tmp_path / "again"
    assert CliRunner().invoke(app, args[:-1] + [str(again)]).exit_code == 0
    assert pd.read_csv(again / "probe.csv").top1[0] == row.top1  # bit-reproducible on the CPU
    refused = CliRunner().invoke(app, args)  # the output policy: a non-empty --out is refused
    assert refused.exit_code == 2 and "--overwrite" in refused.output


def test_probe_of_a_missing_checkpoint_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["probe", str(tmp_path / "none.safetensors"), "--recipe", "probe-stl10"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "does not exist" in result.output
