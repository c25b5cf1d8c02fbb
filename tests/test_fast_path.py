"""The fast path: BatchNorm folding, precision resolution, fp16 loss scaling, the teacher seam's preparation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdcli import devices
from kdcli.engine.step import method_engine
from kdcli.methods.base import Batch, StepInfo
from kdcli.models import Taps, create_model, describe_models, forward_taps
from kdcli.models.fold import fold_batchnorm
from kdcli.recipes import MethodConfig, Recipe, TeacherConfig, TrainConfig

ZOO = [row["name"] for row in describe_models()]


def _with_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters: folding identity statistics would prove little."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return net.eval()


@pytest.mark.parametrize("arch", ZOO)
def test_folding_keeps_every_output_of_every_zoo_model(arch: str) -> None:
    torch.manual_seed(0)
    net = _with_statistics(create_model(arch, num_classes=100))
    x = torch.randn(3, 3, 32, 32)
    folded, count = fold_batchnorm(net, x[:2])
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert left == norms - count
    taps = Taps(logits=True, pre_logits=True, stages=tuple(range(len(net.feature_info))))
    with torch.no_grad():
        want, got = forward_taps(net, x, taps), forward_taps(folded, x, taps)
    for a, b in zip([want.logits, want.pre_logits, *want.stages], [got.logits, got.pre_logits, *got.stages]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules()) or norms == 0  # the original is untouched


def test_every_batchnorm_after_a_conv_is_folded_where_nothing_else_reads_the_conv() -> None:
    # Post-activation ResNets and VGG: every BN follows its conv. WRN is pre-activation (BN before conv):
    # wrn_40_2 has 18 BNs on block inputs, not on conv outputs.
    counts = {arch: fold_batchnorm(_with_statistics(create_model(arch, num_classes=10)), torch.randn(2, 3, 32, 32))[1]
              for arch in ("resnet8", "vgg8", "wrn_40_2")}
    assert counts == {"resnet8": 9, "vgg8": 5, "wrn_40_2": 19}


def test_a_conv_output_read_twice_is_not_folded() -> None:
    """wrn_16_1's first block adds the stem conv's output to its residual branch *and* normalises it:
    folding that BN would change the residual, and the check on the example refuses the whole fold."""
    net = _with_statistics(create_model("wrn_16_1", num_classes=10))
    folded, count = fold_batchnorm(net, torch.randn(2, 3, 32, 32))
    assert count == 0 and folded is net


def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "_cpu_flags", lambda: frozenset({"avx512f", "avx512bw"}))
    assert devices.resolve_precision("auto", cpu) == "fp32"  # emulated bf16 measured 2x slower than fp32
    monkeypatch.setattr(devices, "_cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert devices.resolve_precision("auto", cpu) == "bf16"
    assert devices.resolve_precision("fp16", cpu) == "fp16" and devices.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="resolved"):
        devices.autocast(cpu, "auto")


def _engine(precision: str = "fp32", **teacher):
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=10)
    raw = _with_statistics(create_model("resnet8", num_classes=10), seed=1)
    recipe = Recipe(train=TrainConfig(precision=precision, channels_last=True),
                    teacher=TeacherConfig("resnet8", precision="fp32", **teacher))
    engine = method_engine(MethodConfig("kd", {"ce": 0.1, "kd": 0.9}), {"student": student}, raw, 10, recipe=recipe)
    return engine, copy.deepcopy(raw)


def _batch() -> Batch:
    gen = torch.Generator().manual_seed(3)
    return Batch(torch.randn(8, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last),
                 torch.randint(0, 10, (8,), generator=gen), torch.arange(8))


def test_the_teacher_seam_runs_a_folded_channels_last_teacher_with_the_same_outputs() -> None:
    engine, raw = _engine()
    seam = engine.teacher_seam
    assert seam.folded == 9 and seam.network.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert "9 BatchNorms folded" in seam.describe() and "channels-last" in seam.describe()
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(seam(batch).logits, raw(batch.images), rtol=1e-5, atol=1e-5)


def test_fp16_training_scales_the_loss_and_still_steps() -> None:
    engine, _ = _engine("fp16")
    assert engine.precision == "fp16" and engine.scaler.is_enabled()
    before = [p.detach().clone() for p in engine.method.parameters()]
    info = StepInfo(0, 1, 0, torch.Generator().manual_seed(0))
    out = engine.train_step(_batch(), info)
    assert torch.isfinite(out.logs["loss"]) and engine.scaler.get_scale() > 1  # scaled (2**16 at the start)
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.method.parameters()))
    fp32, _ = _engine("fp32")
    assert not fp32.scaler.is_enabled()
