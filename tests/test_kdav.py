"""KDAV (KD with auxiliary variable): the spec's limiting cases, eq. (6), the queue, and the method end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdcli.engine.pipeline import resolve_recipe
from kdcli.engine.step import Engine, method_engine
from kdcli.methods.base import Batch, StepInfo
from kdcli.methods.kdav import (
    LABEL_FLOOR,
    InstanceQueue,
    av_log_predictive,
    av_loss,
    instance_label_log_probs,
    membership_kl,
    membership_scores,
)
from kdcli.models import create_model
from kdcli.recipes import MethodConfig, Recipe, TeacherConfig


def _unit(n: int, d: int, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, dtype=dtype), dim=1)


# -- the math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kappa", [14.3, 1e4])
@pytest.mark.parametrize("mode", ["teacher_soft", "onehot"])
def test_predictive_equals_naive_logsumexp_over_b_n_c(kappa: float, mode: str) -> None:
    torch.manual_seed(0)
    B, N, C, d = 6, 40, 10, 8
    scores = membership_scores(_unit(B, d, torch.float64), _unit(N, d, torch.float64), kappa)
    log_pi = instance_label_log_probs(5 * torch.randn(N, C, dtype=torch.float64), torch.randint(0, C, (N,)), 2.0, mode)
    naive = torch.logsumexp(scores.log_softmax(1)[:, :, None] + log_pi[None], dim=1)
    assert torch.allclose(av_log_predictive(scores, log_pi), naive, rtol=0, atol=1e-10)
    single = av_log_predictive(scores.float(), log_pi.float())  # float32 stays finite even at kappa = 1e4
    assert torch.isfinite(single).all() and torch.allclose(single.double(), naive, atol=1e-3)


def test_onehot_labels_are_floored_indicators() -> None:
    log_pi = instance_label_log_probs(torch.randn(3, 4), torch.tensor([2, 0, 2]), 4.0, "onehot")
    expected = torch.full((3, 4), math.log(LABEL_FLOOR))
    expected[[0, 1, 2], [2, 0, 2]] = 0.0
    assert torch.equal(log_pi, expected)


def test_loss_is_zero_in_the_feature_matching_limit_only_when_beta_equals_tau() -> None:
    torch.manual_seed(1)
    B, L, C, d = 8, 56, 20, 16
    memory = _unit(B + L, d, torch.float64)  # rows 0..B-1 are the batch's own teacher entries
    teacher_logits = 6 * torch.randn(B + L, C, dtype=torch.float64)
    student = memory[:B].clone()  # e_i = mu_i

    def loss(kappa: float, beta: float, tau: float = 4.0, dtype=torch.float64) -> float:
        log_pi = instance_label_log_probs(teacher_logits.to(dtype), teacher_logits.argmax(1), beta, "teacher_soft")
        scores = membership_scores(student.to(dtype), memory.to(dtype), kappa)
        return av_loss(scores, log_pi, teacher_logits[:B].to(dtype), tau).item()

    assert abs(loss(1e4, beta=4.0)) < 1e-12 and abs(loss(1e4, beta=4.0, dtype=torch.float32)) < 1e-6
    assert loss(1e4, beta=1.0) > 0.1  # temperatures disagree: the limit is KL(p_T || softmax(t/beta)) > 0
    losses_by_kappa = [loss(kappa, beta=4.0) for kappa in (1.0, 5.0, 20.0, 40.0)]
    assert all(a > b > 0 for a, b in zip(losses_by_kappa, losses_by_kappa[1:]))  # decreases towards 0


def test_gradient_wrt_membership_scores_is_eq6() -> None:
    torch.manual_seed(2)
    B, N, C = 5, 12, 7
    scores = (3 * torch.randn(B, N, dtype=torch.float64)).requires_grad_()
    log_pi = F.log_softmax(2 * torch.randn(N, C, dtype=torch.float64), dim=1)
    teacher = 3 * torch.randn(B, C, dtype=torch.float64)
    av_loss(scores, log_pi, teacher, tau=2.0).backward()
    # closed form: dL/dl_im = q_im (1 - r_im) / B,  r_im = sum_y pT(y|x_i) pi_m(y) / pS(y|x_i)
    q = scores.detach().softmax(1)
    p_student = q @ log_pi.exp()
    p_teacher = (teacher / 2.0).softmax(1)
    r = (p_teacher / p_student) @ log_pi.exp().T
    assert torch.allclose(scores.grad, q * (1 - r) / B, rtol=0, atol=1e-12)


def test_onehot_mode_with_a_sharp_target_is_nca() -> None:
    torch.manual_seed(3)
    B, N, C = 6, 30, 4
    labels = torch.randint(0, C, (N,))
    scores = 4 * torch.randn(B, N, dtype=torch.float64)
    sharp_teacher = 60.0 * F.one_hot(labels[:B], C).double()  # p_T = onehot(y_i) up to e^-60
    log_pi = instance_label_log_probs(torch.zeros(N, C), labels, 4.0, "onehot").double()
    same_class = labels[None, :] == labels[:B, None]
    nca = -torch.logsumexp(scores.log_softmax(1).masked_fill(~same_class, -math.inf), dim=1).mean()
    # the label floor adds at most LABEL_FLOOR / p_S(y_i) to the NCA loss
    assert av_loss(scores, log_pi, sharp_teacher, tau=1.0).item() == pytest.approx(nca.item(), abs=1e-6)


def test_membership_kl_is_zero_only_for_equal_posteriors() -> None:
    scores = torch.randn(4, 9)
    assert membership_kl(scores, scores).abs().item() < 1e-6
    assert membership_kl(scores, scores + 5.0).abs().item() < 1e-6  # softmax is shift-invariant
    assert membership_kl(scores, scores.flip(1)).item() > 0.1


# -- the queue -----------------------------------------------------------------------------------
def _rows(first: int, n: int, d: int = 2, C: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.arange(first, first + n)
    return ids[:, None].float().expand(n, d), ids[:, None].float().expand(n, C), ids


def test_queue_warms_up_and_wraps_around_fifo() -> None:
    queue = InstanceQueue(length=5, dim=2, num_classes=3)
    assert queue.members().embeddings.shape == (0, 2)  # empty before the first step
    queue.enqueue(*_rows(0, 3))
    assert queue.members().labels.tolist() == [0, 1, 2] and int(queue.pointer) == 3
    queue.enqueue(*_rows(3, 3))  # wraps: item 5 overwrites the oldest row
    members = queue.members()
    assert members.labels.tolist() == [5, 1, 2, 3, 4] and (int(queue.pointer), int(queue.count)) == (1, 5)
    assert members.embeddings[:, 0].tolist() == [5, 1, 2, 3, 4] and members.logits[:, 2].tolist() == [5, 1, 2, 3, 4]
    queue.enqueue(*_rows(6, 7))  # a batch longer than the queue keeps its newest 5 rows
    assert sorted(queue.members().labels.tolist()) == [8, 9, 10, 11, 12] and int(queue.count) == 5


# -- the method ----------------------------------------------------------------------------------
def _method(teacher_arch: str, student_arch: str, classes: int = 10, fold_bn: bool = True, **params) -> Engine:
    """A KDAV method (``.method``) and its engine; the teacher is the engine's ``teacher_seam.network``."""
    weights = params.pop("weights", {})
    method_cfg = MethodConfig(name="kdav", weights=weights, params=params)
    teacher = create_model(teacher_arch, num_classes=classes).eval().requires_grad_(False)
    recipe = Recipe(teacher=TeacherConfig(teacher_arch, fold_bn=fold_bn))
    return method_engine(method_cfg, {"student": create_model(student_arch, num_classes=classes)}, teacher, classes,
                         recipe=recipe)


def _batch(n: int = 4, classes: int = 10, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g), torch.arange(n))


def _info() -> StepInfo:
    return StepInfo(epoch=0, epochs=1, step=0, generator=torch.Generator())


def test_first_steps_use_the_batch_then_the_queue() -> None:
    torch.manual_seed(4)
    engine = _method("resnet8", "resnet8", queue_size=6)
    method = engine.method
    batch = _batch(4)
    t = torch.zeros(4, 10)
    assert method._members(torch.zeros(4, 64), t, batch.labels).embeddings.shape[0] == 4  # warm-up: batch only
    out = engine.train_step(batch, _info())
    assert math.isfinite(out.logs["loss"].item()) and out.logs["av"].item() > 0
    assert int(method.queue.count) == 4
    assert method._members(torch.zeros(4, 64), t, batch.labels).embeddings.shape[0] == 8
    engine.train_step(_batch(4, seed=1), _info())
    assert (int(method.queue.count), int(method.queue.pointer)) == (6, 2)


def test_without_batch_members_the_first_step_has_no_av_loss() -> None:
    torch.manual_seed(5)
    engine = _method("resnet8", "resnet8", include_batch=False)
    first = engine.train_step(_batch(4), _info())
    assert first.logs["av"].item() == 0.0 and first.logs["loss"].item() == pytest.approx(first.logs["ce"].item())
    assert engine.train_step(_batch(4, seed=1), _info()).logs["av"].item() > 0


def test_method_reaches_zero_av_when_the_student_is_the_teacher() -> None:
    """The wiring of the limit: own teacher entries are members and features come from pre-logits."""
    torch.manual_seed(6)
    engine = _method("resnet8", "resnet8", kappa=1e4, kappa_t=1e4, weights={"kd": 1.0, "rel": 1.0}, fold_bn=False)
    method = engine.method
    method.networks["student"].load_state_dict(engine.teacher_seam.network.state_dict())
    with torch.no_grad():  # identity projector: e = n(h_S) = n(h_T) = mu
        method.projector.weight.copy_(torch.eye(64))
        method.projector.bias.zero_()
    method.eval()  # same BN statistics on both sides
    _, terms = engine.step_terms(_batch(6), _info())
    assert terms["av"].abs().item() < 1e-5 and terms["kd"].abs().item() < 1e-5 and terms["rel"].abs().item() < 1e-5


@pytest.mark.parametrize("teacher, student, d_s, d_t", [("ResNet50", "ShuffleV1", 960, 2048),
                                                         ("vgg13", "MobileNetV2", 1280, 512)])
def test_projector_maps_student_to_teacher_width(teacher: str, student: str, d_s: int, d_t: int) -> None:
    engine = _method(teacher, student, classes=100, queue_size=8)
    method = engine.method
    assert (method.projector.in_features, method.projector.out_features) == (d_s, d_t)
    assert method.queue.embeddings.shape == (8, d_t) and method.queue.logits.shape == (8, 100)


def test_a_timm_student_trains_through_its_pre_logits() -> None:
    torch.manual_seed(7)
    engine = _method("resnet8x4", "resnet10t", queue_size=8, label_mode="onehot", projector="mlp")
    method = engine.method
    assert (method.projector[0].in_features, method.projector[-1].out_features) == (512, 256)
    for seed in range(3):  # the third step sees a full queue, then wraps it
        out = engine.train_step(_batch(4, seed=seed), _info())
        assert math.isfinite(out.logs["loss"].item()) and out.logs["av"].item() > 0
    assert method.projector[0].weight.grad.abs().sum() > 0


def test_state_dict_holds_queue_and_projector() -> None:
    engine = _method("resnet8", "resnet8", queue_size=16)
    method = engine.method
    engine.train_step(_batch(4), _info())
    state = method.state_dict()
    assert {"queue.embeddings", "queue.logits", "queue.labels", "queue.pointer", "queue.count",
            "projector.weight", "projector.bias"} <= set(state)
    clone = _method("resnet8", "resnet8", queue_size=16).method
    clone.load_state_dict(state)
    assert torch.equal(clone.queue.embeddings, method.queue.embeddings) and int(clone.queue.count) == 4


# -- end to end ----------------------------------------------------------------------------------
def test_every_kdav_recipe_loads_with_the_protocol() -> None:
    from kdcli.recipes import list_recipes

    pairs = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet110-resnet20", "resnet110-resnet32",
             "resnet32x4-resnet8x4", "vgg13-vgg8", "vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8",
             "resnet32x4-ShuffleV1", "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1"]
    names = [n for n in list_recipes() if n.startswith("cifar100-") and n.endswith("-kdav")]
    assert sorted(names) == sorted(f"cifar100-{pair}-kdav" for pair in pairs)
    for name in names:
        recipe = resolve_recipe(name)
        assert recipe.method.name == "kdav"
        assert recipe.name == f"cifar100-{recipe.teacher.arch}-{recipe.student.arch}-kdav"
        small = recipe.student.arch in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
        assert recipe.optim.lr == (0.01 if small else 0.05) and recipe.train.epochs == 240
        assert recipe.teacher.checkpoint == f"save/models/{recipe.teacher.arch}_vanilla/ckpt_epoch_240.pth"
    assert resolve_recipe("quickstart-kdav").method.name == "kdav"


def test_resume_restores_queue_and_projector_exactly(tiny_recipe, tmp_path, interrupted) -> None:
    from kdcli.engine import pipeline
    from kdcli.engine.trainer import RunContext

    overrides = ["method.params.queue_size=40", "train.batch_size=16"]
    recipe = resolve_recipe(str(tiny_recipe(method="kdav", epochs=2)), overrides)

    def ctx(out: Path, resume: bool = False) -> RunContext:
        return RunContext(out, torch.device("cpu"), seed=5, console=Console(quiet=True), resume=resume, max_steps=3)

    teacher = pipeline.build_network("resnet8", 20).eval().requires_grad_(False)
    data = pipeline.prepare_data(recipe, smoke=False)
    pipeline.run_stage("kdav", "kdav", {"student": "resnet8"}, teacher, recipe, data, ctx(tmp_path / "a"))
    interrupted(lambda: pipeline.run_stage("kdav", "kdav", {"student": "resnet8"}, teacher, recipe, data,
                                           ctx(tmp_path / "b")))
    pipeline.run_stage("kdav", "kdav", {"student": "resnet8"}, teacher, recipe, data, ctx(tmp_path / "b", resume=True))

    a, b = (load_file(tmp_path / d / "kdav/checkpoints/student-last.safetensors") for d in "ab")
    assert set(a) == set(create_model("resnet8", num_classes=20).state_dict())  # the plain student, no projector
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (pd.read_csv(tmp_path / d / "kdav/history.csv") for d in "ab")
    assert ha["av"].tolist() == hb["av"].tolist() and ha["loss"].tolist() == hb["loss"].tolist()
    state = torch.load(tmp_path / "b/kdav/checkpoints/train_state.pt", weights_only=True)["method"]
    assert (int(state["queue.count"]), int(state["queue.pointer"])) == (40, 96 % 40)  # 2 epochs x 3 steps x 16 rows


def test_cli_smoke_run_and_methods_listing(tmp_path) -> None:
    from kdcli.cli import app
    from kdcli.methods import describe_methods

    runner = CliRunner()
    result = runner.invoke(app, ["distill", "--recipe", "cifar100-resnet32x4-resnet8x4-kdav", "--smoke",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    results = pd.read_csv(tmp_path / "o/results.csv")
    assert results["stage"].tolist() == ["kdav"] and results["arch"].tolist() == ["resnet8x4"]
    saved = load_file(tmp_path / "o/kdav/checkpoints/student-last.safetensors")
    assert set(saved) == set(create_model("resnet8x4", num_classes=100).state_dict())
    (row,) = [row for row in describe_methods() if row["method"] == "kdav"]
    assert "kappa=14.28" in row["params"] and "queue_size=16384" in row["params"]
    assert row["loss terms (default weight)"] == "ce=1, av=1"


@pytest.mark.parametrize("key", ["queue_size", "kappa", "tau"])
def test_non_positive_params_fail_when_the_recipe_loads(key: str) -> None:
    from kdcli.errors import UserError

    with pytest.raises(UserError, match=f"'method.params.{key}' of kdav must be > 0, got 0"):
        resolve_recipe("quickstart-kdav", [f"method.params.{key}=0"])
