"""Feature methods as feature terms: their parts exist only in training, they combine with any logit method by
weight, their state resumes exactly, and their settings are checked."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from kdcli.engine import pipeline
from kdcli.engine.pipeline import build_network, resolve_recipe
from kdcli.engine.step import Engine, build_method, method_engine
from kdcli.engine.trainer import RunContext
from kdcli.errors import RunInterrupted, UserError
from kdcli.methods import get_method
from kdcli.methods.base import Batch, StepInfo
from kdcli.methods.crd import OtherClassSampler
from kdcli.methods.fitnet import hint_regressor
from kdcli.models import create_model
from kdcli.recipes import MethodConfig

FEATURE_METHODS = ("fitnet", "at", "sp", "pkt", "rkd", "crd", "itrd", "reviewkd")


def _engine(name: str, **weights: float) -> Engine:
    torch.manual_seed(0)
    networks = {"student": build_network("resnet8", 10)}
    teacher = build_network("resnet14", 10).eval().requires_grad_(False)
    return method_engine(MethodConfig(name=name, weights=weights), networks, teacher, 10,
                         train_labels=torch.arange(40) % 10)


def _method(name: str, **weights: float):
    return _engine(name, **weights).method


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_each_feature_method_trains_the_student_and_its_parts_stay_out_of_the_student(name: str) -> None:
    engine = _engine(name)
    method = engine.method
    assert method.weights == {"ce": 1.0, name: get_method(name).default_weights[name]}
    extra = [key for key in method.state_dict() if not key.startswith("networks.")]
    assert all(key.startswith(f"feature_terms.{name}.") for key in extra)
    assert bool(extra) == (name in ("fitnet", "crd", "itrd", "reviewkd"))  # regressor, heads and banks, embedding, ABFs
    plain = create_model("resnet8", num_classes=10).state_dict()
    assert method.networks["student"].state_dict().keys() == plain.keys()  # exported: a plain zoo student
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 10, torch.arange(8))
    before = {k: v.clone() for k, v in method.state_dict().items()}
    out = engine.train_step(batch, StepInfo(0, 1, 0, torch.Generator().manual_seed(0)))
    assert set(out.logs) == {"ce", name, "loss"} and all(torch.isfinite(v) for v in out.logs.values())
    assert out.logs[name] > 0
    changed = {k for k, v in method.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("networks.student.") for k in changed)
    assert any(k.startswith(f"feature_terms.{name}.") for k in changed) or name in ("at", "sp", "pkt", "rkd")


def test_feature_terms_combine_with_any_logit_method_by_weight() -> None:
    method = _method("wttm", crd=0.8, itrd=1.0)
    assert set(method.feature_terms) == {"crd", "itrd"}
    assert method.taps.logits and method.taps.pre_logits and method.teacher_taps.pre_logits
    ida = _method("ida", crd=0.8)
    assert "crd" in ida.feature_terms and ida.weights["ida"] == 3.0
    with pytest.raises(UserError, match="needs a teacher"):
        from kdcli.methods import validate_method_config

        validate_method_config(MethodConfig(name="ce", weights={"crd": 0.8}), "test")


def test_term_settings_are_validated_under_their_own_section() -> None:
    with pytest.raises(UserError, match="unknown key 'method.params.crd.nce_q'"):
        resolve_recipe("quickstart", ["method=crd", "method.params.crd.nce_q=3"])
    with pytest.raises(UserError, match="nce_t > 0"):
        resolve_recipe("quickstart", ["method=crd", "method.params.crd.nce_t=0"])
    recipe = resolve_recipe("quickstart", ["method=fitnet", "method.params.fitnet.student_stage=7"])
    with pytest.raises(UserError, match="student has 3 stages"):
        _method_from(recipe)


def _method_from(recipe):
    cls = get_method(recipe.method.name)
    assert cls is not None
    networks = {"student": build_network(recipe.student.arch, 10)}
    return build_method(recipe.method, networks, build_network(recipe.teacher.arch, 10), 10, 32, torch.device("cpu"),
                        train_labels=torch.arange(40) % 10)


def test_fitnet_regressor_follows_repdistillers_convreg() -> None:
    assert isinstance(hint_regressor((16, 32, 32), (32, 16, 16))[0], torch.nn.Conv2d)  # twice the size: stride 2
    assert isinstance(hint_regressor((16, 8, 8), (32, 16, 16))[0], torch.nn.ConvTranspose2d)  # half: upsample
    assert hint_regressor((16, 10, 10), (32, 8, 8))[0].kernel_size == (3, 3)  # larger: the kernel absorbs it
    with pytest.raises(UserError, match="cannot be regressed"):
        hint_regressor((16, 4, 4), (32, 16, 16))
    for s, t in (((16, 32, 32), (32, 16, 16)), ((16, 8, 8), (32, 16, 16)), ((16, 10, 10), (32, 8, 8))):
        assert hint_regressor(s, t)(torch.zeros(2, *s)).shape == (2, *t)


def test_crd_negatives_are_other_classes_drawn_from_the_methods_stream() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2])
    sampler = OtherClassSampler(labels)
    drawn = sampler(torch.tensor([2, 0]), 500, torch.Generator().manual_seed(0))
    assert (labels[drawn[0]] != 2).all() and (labels[drawn[1]] != 0).all()
    assert set(drawn[0].tolist()) == {0, 1, 3, 4} and set(drawn[1].tolist()) == {1, 2, 4, 5, 6, 7}  # all reachable
    again = sampler(torch.tensor([2, 0]), 500, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


def test_crd_memory_and_heads_resume_bit_exactly_mid_epoch(tiny_recipe, tmp_path: Path, monkeypatch) -> None:
    recipe = resolve_recipe(str(tiny_recipe(method="crd", epochs=2)), ["method.params.crd.nce_k=64"])
    teacher = tmp_path / "t/teacher/checkpoints/teacher-best.safetensors"
    pipeline.train_teacher(resolve_recipe(str(tiny_recipe(method="ce", epochs=1))), _ctx(tmp_path / "t"), smoke=False)
    recipe.teacher.checkpoint = str(teacher)
    pipeline.distill(recipe, _ctx(tmp_path / "a"), smoke=False)
    real, taken = Engine.train_step, []

    def sigterm_at_step_10(self, batch, info):
        taken.append(info.step)
        if len(taken) == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, info)

    monkeypatch.setattr(Engine, "train_step", sigterm_at_step_10)
    with pytest.raises(RunInterrupted):
        pipeline.distill(recipe, _ctx(tmp_path / "b"), smoke=False)
    monkeypatch.undo()
    pipeline.distill(recipe, _ctx(tmp_path / "b", resume=True), smoke=False)
    a, b = (load_file(tmp_path / d / "crd/checkpoints/student-last.safetensors") for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    states = [torch.load(tmp_path / d / "crd/checkpoints/train_state.pt", weights_only=True)["method"] for d in "ab"]
    assert torch.equal(states[0]["feature_terms.crd.memory"], states[1]["feature_terms.crd.memory"])
    assert torch.equal(states[0]["feature_terms.crd.log_z"], states[1]["feature_terms.crd.log_z"])


def _ctx(out: Path, resume: bool = False) -> RunContext:
    return RunContext(out, torch.device("cpu"), seed=5, console=Console(quiet=True), resume=resume)


@pytest.mark.parametrize("student, teacher, levels", [("resnet8x4", "resnet32x4", 4), ("vgg8", "vgg13", 5),
                                                      ("MobileNetV2", "vgg13", 5), ("ShuffleV1", "resnet32x4", 4)])
def test_reviewkd_reviews_the_authors_number_of_levels(student: str, teacher: str, levels: int) -> None:
    """dvlab-research/ReviewKD's build_review_kd: 3 stage maps + the pooled feature for the CIFAR ResNets and
    ShuffleNets, 4 + the pooled feature for VGG and MobileNetV2 students."""
    torch.manual_seed(0)
    engine = method_engine(MethodConfig(name="reviewkd"), {"student": build_network(student, 100)},
                           build_network(teacher, 100).eval(), 100)
    abfs = engine.method.feature_terms["reviewkd"].abfs
    assert len(abfs) == levels and abfs[0].att_conv is None and all(a.att_conv is not None for a in abfs[1:])


def test_feature_terms_run_in_float32_under_a_bf16_student() -> None:
    from kdcli.recipes import Recipe, TrainConfig

    torch.manual_seed(0)
    cfg = MethodConfig(name="pkt")
    recipe = Recipe(method=cfg, train=TrainConfig(precision="bf16"))
    engine = method_engine(cfg, {"student": build_network("resnet8", 10)}, build_network("resnet14", 10).eval(), 10,
                           recipe=recipe)
    batch = Batch(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10,
                  torch.arange(8))
    _, terms = engine.step_terms(batch, StepInfo(0, 1, 0, torch.Generator().manual_seed(0)))
    assert terms["pkt"].dtype == torch.float32 and torch.isfinite(terms["pkt"])


def test_crd_term_matches_repdistillers_crdloss_step_for_step() -> None:
    """One forward/backward of RepDistiller's CRDLoss (crd/criterion.py + crd/memory.py, commit b84f547, run on
    CPU in float64 with its parameters and memories set as below and these contrast indices): loss, both Z,
    the gradient into the student feature, the heads' gradients and both memories after the update."""
    from kdcli.methods.base import MethodContext
    from kdcli.methods.crd import CRDParams, CRDTerm
    from kdcli.models import Features, FeatureShapes

    f64, n, k = torch.float64, 20, 6
    ctx = MethodContext(10, 32, torch.device("cpu"), 1, {}, torch.arange(n) % 4)
    term = CRDTerm(CRDParams(feat_dim=3, nce_k=k), ctx, FeatureShapes(pre_logits=(5,)),
                   FeatureShapes(pre_logits=(7,))).double()
    for parameter in term.parameters():  # embed_student weight, bias, embed_teacher weight, bias: RepDistiller's order
        parameter.data = torch.linspace(-0.6, 0.6, parameter.numel(), dtype=f64).reshape(parameter.shape)
    grid = torch.linspace(-1, 1, n * 3, dtype=f64).reshape(n, 3)
    term.memory[0] = torch.nn.functional.normalize(grid.sin() + 0.3, dim=1)  # memory_v1: student embeddings
    term.memory[1] = torch.nn.functional.normalize(grid.cos() - 0.2, dim=1)  # memory_v2: teacher embeddings
    contrast = torch.tensor([[0, 1, 2, 3, 4, 6, 7], [5, 6, 7, 8, 9, 11, 12], [10, 11, 12, 13, 14, 16, 17],
                             [15, 16, 17, 18, 19, 1, 2]])

    class Fixed:  # RepDistiller's dataset hands these indices in; here they replace the method's draw
        total = n

        def __call__(self, labels, count, generator):
            return contrast[:, 1:]

    term.sampler = Fixed()
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 5, generator=g, dtype=f64, requires_grad=True)
    teacher = torch.randn(4, 7, generator=g, dtype=f64)
    indices = contrast[:, 0]
    loss = term(Features(pre_logits=student), Features(pre_logits=teacher), Batch(torch.zeros(4, 3, 2, 2), indices % 4,
                                                                                   indices), StepInfo(0, 1, 0, g))
    loss.backward()
    assert loss.item() == pytest.approx(28.473759866939236, rel=1e-12)
    assert term.log_z.exp().tolist() == pytest.approx([46.940565460378856, 1833384.5859152721], rel=1e-12)
    assert student.grad[0].tolist() == pytest.approx([-1.0869659975240424, -1.143487949234046, -1.2000099009440495,
                                                      -1.256531852654053, -1.3130538043640565], rel=1e-12)
    assert term.embed_student[0].weight.grad.norm().item() == pytest.approx(9.031463446906749, rel=1e-12)
    assert term.embed_teacher[0].weight.grad.norm().item() == pytest.approx(27.122722632177307, rel=1e-12)
    assert term.memory[0].sum().item() == pytest.approx(9.219075193850262, rel=1e-12)
    assert term.memory[1, 5].tolist() == pytest.approx([0.33058840381760424, 0.5492579239040168, 0.7674809706370432],
                                                      rel=1e-12)
