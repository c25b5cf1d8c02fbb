"""Tests for kdcli.models: the CIFAR zoo against the published state_dict layout, forward math against
independent functional computations, the timm registration, and the feature-tap API (stage maps through
timm's forward_intermediates)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdcli.data.registry import DATASETS
from kdcli.errors import UserError
from kdcli.models import ZOO, Taps, create_model, describe_models, feature_shapes, forward_taps
from kdcli.models.wrn import PreActBlock

# A gzipped copy of shared/reference/cifar_zoo_state_dicts.json (the standard CIFAR KD zoo's state_dict layout),
# kept in the repository so the layout tests run on any clean checkout.
REFERENCE = Path(__file__).resolve().parent / "data" / "cifar_zoo_state_dicts.json.gz"
ZOO_ORDER = (
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
    "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50",
)
CLASSIFIER_KEYS = {
    "fc": ("fc.weight", "fc.bias"), "classifier": ("classifier.weight", "classifier.bias"),
    "classifier.0": ("classifier.0.weight", "classifier.0.bias"), "linear": ("linear.weight", "linear.bias"),
}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(gzip.decompress(REFERENCE.read_bytes()))


def state_layout(model: nn.Module) -> list[list]:
    """[key, shape, dtype] per state_dict entry, in the reference JSON's format."""
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval-mode outputs depend on them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)


def test_zoo_names_in_benchmark_order_and_registered_in_timm() -> None:
    assert ZOO == ZOO_ORDER
    assert set(timm.list_models(module="cifar_zoo")) == set(ZOO)
    cfg = timm.models.get_pretrained_cfg("resnet8x4")
    assert cfg.input_size == (3, 32, 32) and cfg.mean == DATASETS["cifar100"].mean and cfg.classifier == "fc"
    assert not set(timm.list_pretrained()) & set(ZOO)  # no zoo model claims hub weights


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_matches_published_layout_and_feature_api(name: str, reference: dict) -> None:
    ref = reference[name]
    model = timm.create_model(name, num_classes=100).eval()
    assert state_layout(model) == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]

    pooled_dim = ref["feature_shapes"][-1][0]
    last_map_hw = [s for s in ref["feature_shapes"] if len(s) == 3][-1][1:]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    every = Taps(logits=True, pre_logits=True, feature_map=True)
    with torch.no_grad():
        logits = model(x)
        feats = forward_taps(model, x, every)
        via_head = model.get_classifier()(model.forward_head(feats.feature_map, pre_logits=True))
    assert logits.shape == (2, 100) and torch.isfinite(logits).all()
    assert torch.equal(feats.logits, logits) and torch.equal(via_head, logits)
    assert list(feats.feature_map.shape) == [2, pooled_dim, *last_map_hw]
    assert feats.feature_map.min() >= 0  # every zoo network applies a ReLU before its global pool
    torch.testing.assert_close(feats.pre_logits, feats.feature_map.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    assert feature_shapes(model, 32, every)[1:3] == ((pooled_dim,), (pooled_dim, *last_map_hw))
    assert pooled_dim == model.num_features == model.feature_channels
    assert model.pretrained_cfg["architecture"] == name and model.pretrained_cfg["num_classes"] == 100


@pytest.mark.parametrize("name", ZOO)
def test_stage_maps_match_the_published_feature_list(name: str, reference: dict) -> None:
    """Stage i's map has the shape of RepDistiller's ``feat[i]`` (the reference lists the stem first, except
    for VGG whose first block is its stem); the last stage is the map that gets pooled, so where the original
    puts a 1x1 head conv after the last group (MobileNetV2, ShuffleV2) it has ``num_features`` channels."""
    model = timm.create_model(name, num_classes=100).eval()
    maps = [tuple(shape) for shape in reference[name]["feature_shapes"] if len(shape) == 3]
    maps = maps if name.startswith("vgg") else maps[1:]
    expected = maps[:-1] + [(model.num_features, *maps[-1][1:])]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        final, stages = model.forward_intermediates(x)
        features = model.forward_features(x)
        only_first = model.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert [tuple(m.shape[1:]) for m in stages] == expected
    assert [(info["num_chs"], 32 // info["reduction"]) for info in model.feature_info] == [(c, h) for c, h, _ in expected]
    assert torch.equal(stages[-1], features) and torch.equal(final, features)
    assert len(only_first) == 1 and torch.equal(only_first[0], stages[0])
    tapped = forward_taps(model, x, Taps(stages=(0, -1)))
    assert torch.equal(tapped.logits, model(x)) and torch.equal(tapped.stages[1], features)


def test_prune_intermediate_layers_keeps_the_stages_asked_for() -> None:
    model = timm.create_model("resnet8x4", num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        second = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        assert model.prune_intermediate_layers(indices=[1]) == [1]
        assert isinstance(model.layer3, nn.Identity) and len(model.feature_info) == 2
        assert torch.equal(model.forward_features(x), second)
        torch.testing.assert_close(model(x), second.mean(dim=(2, 3)))  # head pruned: pooled features
    assert model.num_features == 128


@pytest.mark.parametrize("name", ZOO)
def test_num_classes_changes_only_the_classifier(name: str, reference: dict) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = create_model(name, num_classes=10)
    classifier_keys = CLASSIFIER_KEYS[model.classifier_path]
    expected = [[k, [10, *shape[1:]] if k in classifier_keys else shape, dtype]
                for k, shape, dtype in reference[name]["state_dict"]]
    assert state_layout(model) == expected
    assert model.num_classes == 10 and model.get_classifier().out_features == 10


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50"])
def test_repdistiller_checkpoint_loads_strictly_with_identical_outputs(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_model(name, num_classes=100)
    randomise_batchnorm(source, seed=2)
    torch.save({"model": source.state_dict(), "epoch": 240}, tmp_path / "ckpt_epoch_240.pth")
    torch.manual_seed(3)
    target = create_model(name, num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = target(x)
        target.load_state_dict(torch.load(tmp_path / "ckpt_epoch_240.pth", weights_only=True)["model"], strict=True)
        after, expected = target(x), source.eval()(x)
    assert not torch.allclose(before, expected)
    assert torch.equal(after, expected)


def test_resnet8_forward_equals_functional_computation() -> None:
    """Eval-mode resnet8 recomputed from its state_dict with torch.nn.functional only."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=100).eval()
    randomise_batchnorm(model, seed=4)
    sd = model.state_dict()

    def bn(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"])

    x = torch.randn(2, 3, 32, 32)
    h = F.relu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"))
    for layer, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2)):
        p = layer + ".0."
        out = F.relu(bn(F.conv2d(h, sd[p + "conv1.weight"], stride=stride, padding=1), p + "bn1"))
        out = bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), p + "bn2")
        shortcut = bn(F.conv2d(h, sd[p + "downsample.0.weight"], stride=stride), p + "downsample.1") \
            if stride == 2 else h
        h = F.relu(out + shortcut)
    expected = F.linear(F.avg_pool2d(h, 8).flatten(1), sd["fc.weight"], sd["fc.bias"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_wrn_projection_block_shortcut_reads_the_activated_input() -> None:
    """WRN quirk: with a width change, the 1x1 shortcut sees relu(bn1(x)), and nothing follows the sum."""
    torch.manual_seed(0)
    block = PreActBlock(16, 32, stride=2).eval()
    randomise_batchnorm(block, seed=5)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        a = F.relu(block.bn1(x))
        expected = block.convShortcut(a) + block.conv2(F.relu(block.bn2(block.conv1(a))))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
        assert block(x).min() < 0  # no ReLU after the addition


def test_vgg_pools_after_block3_only_for_64px_inputs() -> None:
    model = create_model("vgg8", num_classes=100).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 4, 4)
        assert model.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 512, 6, 6)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_channels_last_and_bf16_autocast(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=100)
    randomise_batchnorm(model, seed=6)  # eval-mode logits of order 0.1-1 rather than a fresh net's ~0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference_logits = model.eval()(x)
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x), reference_logits, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_logits = model(x)
    assert bf16_logits.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; 17 blocks of rounding stay well under 2 % in norm
    assert (bf16_logits.float() - reference_logits).norm() < 0.02 * reference_logits.norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(x).float().logsumexp(dim=1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_reset_classifier_on_a_nested_head() -> None:
    model = create_model("MobileNetV2", num_classes=100).eval()
    model.reset_classifier(7)
    x = torch.randn(2, 3, 32, 32)
    assert model.state_dict()["classifier.0.weight"].shape == (7, 1280) and model.num_classes == 7
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        assert torch.equal(model(x), model.forward_head(model.forward_features(x), pre_logits=True))
    with pytest.raises(UserError, match="avg"):
        model.reset_classifier(10, global_pool="max")


def test_timm_cnn_through_create_model_and_features() -> None:
    model = create_model("resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    every = Taps(logits=True, pre_logits=True, feature_map=True, stages=(1, -1))
    with torch.no_grad():
        feats = forward_taps(model, x, every)
        logits = model(x)
    assert feats.logits.shape == (2, 10) and feats.pre_logits.shape == (2, 512)
    assert feats.feature_map.shape == (2, 512, 1, 1) and torch.equal(feats.stages[-1], feats.feature_map)
    assert torch.equal(feats.logits, logits)
    model.train()
    shapes = feature_shapes(model, 32, every)
    # timm's resnet18 lists its stem first: index 1 is layer1, 64 channels at stride 4 (8x8 for 32x32 inputs)
    assert shapes.pre_logits == (512,) and shapes.stages == ((64, 8, 8), (512, 1, 1))
    assert model.training  # training flag restored


def test_timm_vit_feature_map_is_tokens() -> None:
    model = create_model("vit_tiny_patch16_224", num_classes=10, img_size=32).eval()
    every = Taps(logits=True, pre_logits=True, feature_map=True)
    with torch.no_grad():
        feats = forward_taps(model, torch.randn(2, 3, 32, 32), every)
    assert feats.feature_map.shape == (2, 1 + 4, 192)  # class token + (32/16)^2 patches
    assert feats.logits.shape == (2, 10) and feature_shapes(model, 32, every).pre_logits == (192,)
    assert not model.training


@pytest.mark.parametrize("typo, suggestion", [("resnet8X4", "resnet8x4"), ("resnt20", "resnet20"),
                                              ("mobilenetv2", "MobileNetV2"), ("wrn_16_3", "wrn_16_2")])
def test_unknown_name_is_user_error_with_suggestion(typo: str, suggestion: str) -> None:
    with pytest.raises(UserError, match="kdcli list models") as err:
        create_model(typo, num_classes=10)
    assert suggestion in str(err.value) and "\n" not in str(err.value)


def test_pretrained_weights_and_extra_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="kdcli.load_model"):
        timm.create_model("resnet8", pretrained=True)
    with pytest.raises(UserError, match="drop_rate"):
        create_model("resnet8", num_classes=10, drop_rate=0.1)


def test_describe_models_rows(reference: dict) -> None:
    rows = describe_models()
    assert [r["name"] for r in rows] == list(ZOO)
    for row in rows:
        assert row["params"] == reference[row["name"]]["num_params"]
        assert row["feature_dim"] == reference[row["name"]]["feature_shapes"][-1][0]
        assert row["family"]
