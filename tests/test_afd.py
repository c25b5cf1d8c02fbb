"""AFD: shapes of the feature-map modules, optimiser ownership, cyclic wiring, ablations, a smoke run."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.engine import pipeline
from kdcli.engine.checkpoint import load_model
from kdcli.engine.pipeline import resolve_recipe
from kdcli.engine.step import Engine, method_engine
from kdcli.engine.trainer import RunContext, Trainer
from kdcli.errors import UserError
from kdcli.methods import get_method
from kdcli.methods.afd import LOGITS, MAPS, Discriminator, discriminator_total
from kdcli.methods.base import Batch, StepInfo, parse_params
from kdcli.models import create_model, forward_taps
from kdcli.recipes import MethodConfig, OptimConfig, Recipe, TrainConfig

CLASSES = 10


def make_afd(archs: list[str], seed: int = 0, image_size: int = 16, precision: str = "fp32", **params) -> Engine:
    """An AFD method over fresh networks ``archs`` and its engine (16x16 images keep tests fast)."""
    torch.manual_seed(seed)
    cfg = MethodConfig(name="afd", params={"networks": archs, **params})
    recipe = Recipe(optim=OptimConfig(lr=0.05), train=TrainConfig(precision=precision))
    cls = get_method("afd")
    networks = {name: create_model(arch, num_classes=CLASSES)
                for name, arch in cls.networks_for(parse_params(cls, cfg.params), archs[0]).items()}
    engine = method_engine(cfg, networks, None, CLASSES, image_size, recipe, epochs=4)
    engine.method.train()
    return engine


def feature_maps(method, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """f_k = T_k(G_k(x)) of every network, as the feature pass computes them."""
    return method.transferred_maps({name: forward_taps(net, images, MAPS) for name, net in method.networks.items()})


def make_batch(size: int = 4, seed: int = 1, image_size: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(size, 3, image_size, image_size, generator=g), torch.randint(0, CLASSES, (size,), generator=g),
                 torch.arange(size))


def step_info() -> StepInfo:
    return StepInfo(epoch=0, epochs=4, step=0, generator=torch.Generator())


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module, params_only: bool = True) -> set[str]:
    """Names of the entries of ``module`` that differ from ``before``."""
    names = dict(module.named_parameters()) if params_only else module.state_dict()
    return {k for k, v in names.items() if not torch.equal(before[k], v.detach())}


# -- construction ---------------------------------------------------------------------------------
def test_transfer_and_discriminator_shapes_for_mismatched_widths() -> None:
    method = make_afd(["resnet8", "wrn_16_2"], image_size=32).method  # 64x8x8 and 128x8x8 maps: C* = 128
    conv = method.transfers["net1"][0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (64, 128, (1, 1))
    assert isinstance(method.transfers["net2"], nn.Identity)
    maps = feature_maps(method, make_batch(image_size=32).images)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"net1": (4, 128, 8, 8), "net2": (4, 128, 8, 8)}
    assert (maps["net1"] >= 0).all()  # the transfer ends with a ReLU, like the networks' own maps
    for disc in method.discriminators.values():
        out = disc(maps["net2"])
        assert out.shape == (4, 1) and ((out > 0) & (out < 1)).all()


def test_transfer_pools_to_the_common_grid_and_fixed_width() -> None:
    method = make_afd(["resnet8", "vgg8"], image_size=32, transfer_channels=96).method  # 64x8x8 and 512x4x4 maps
    maps = feature_maps(method, make_batch(2, image_size=32).images)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"net1": (2, 96, 4, 4), "net2": (2, 96, 4, 4)}
    assert isinstance(method.transfers["net1"][0], nn.AdaptiveAvgPool2d)


def test_patch_discriminator_averages_over_its_spatial_outputs() -> None:
    disc = Discriminator(32, 8, 8, kind="patch", width_factor=0.5, slope=0.01)
    assert disc.layers[0].out_channels == 16 and disc.layers[2].negative_slope == 0.01
    assert disc(torch.randn(3, 32, 8, 8)).shape == (3, 9)  # 8 -> 7 (k2) -> 3 (k2 s2)
    with pytest.raises(UserError, match="at least 3x3"):
        Discriminator(32, 2, 2, kind="patch")


def test_default_networks_are_two_copies_of_the_student() -> None:
    recipe = resolve_recipe("quickstart", ["method.name=afd"])
    cls = get_method("afd")
    assert cls.networks_for(parse_params(cls, recipe.method.params), "resnet8") == {"net1": "resnet8", "net2": "resnet8"}
    with pytest.raises(UserError, match="K >= 2"):
        resolve_recipe("quickstart", ["method.name=afd", "method.params.networks=[resnet8]"])


def test_afd_recipes_load_with_the_spec_settings() -> None:
    main = resolve_recipe("cifar100-afd-resnet32-resnet32")
    assert (main.train.epochs, main.train.batch_size, main.optim.lr, main.schedule.milestones) == (300, 128, 0.1, [150, 225])
    assert main.method.params["adam_lr"] == 2e-5 and main.method.params["adam_milestones"] == [75, 150]
    cls = get_method("afd")
    networks = {name: cls.networks_for(parse_params(cls, resolve_recipe(name).method.params), None) for name in
                ("cifar100-afd-resnet20-wrn_40_2", "cifar100-afd-3x-resnet32-cyclic", "quickstart-afd")}
    assert networks == {
        "cifar100-afd-resnet20-wrn_40_2": {"net1": "resnet20", "net2": "wrn_40_2"},
        "cifar100-afd-3x-resnet32-cyclic": {"net1": "resnet32", "net2": "resnet32", "net3": "resnet32"},
        "quickstart-afd": {"net1": "resnet8", "net2": "resnet20"},
    }


# -- optimisers -----------------------------------------------------------------------------------
def test_each_optimiser_owns_exactly_its_parameters() -> None:
    engine = make_afd(["resnet8", "resnet8"], transfer_channels=32)
    method = engine.method
    ids = {key: {id(p) for g in opt.param_groups for p in g["params"]} for key, opt in engine.optimizers.items()}
    heads = {id(p) for net in method.networks.values() for p in net.get_classifier().parameters()}
    network = {id(p) for p in method.networks.parameters()}
    assert ids["logit"] == network
    assert ids["generator"] == (network - heads) | {id(p) for p in method.transfers.parameters()}
    assert ids["discriminator"] == {id(p) for p in method.discriminators.parameters()}
    adam = engine.optimizers["generator"]
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 2e-5 and adam.defaults["weight_decay"] == 0.1
    assert isinstance(engine.optimizers["logit"], torch.optim.SGD)


def test_each_update_moves_only_what_its_optimiser_owns() -> None:
    engine = make_afd(["resnet8", "resnet8"], transfer_channels=32)  # both networks get a transfer layer
    method, batch, info = engine.method, make_batch(), step_info()
    nets, trans, discs = method.networks, method.transfers, method.discriminators
    heads = {f"{name}.{k}" for name, net in nets.items() for k, _ in net.get_classifier().named_parameters(prefix="fc")}
    before = {m: snapshot(m) for m in (nets, trans, discs)}

    _, terms = engine.forward(LOGITS, method.logit_pass, batch, info)
    engine.update(method.weighted_total(terms, info), "logit")
    assert changed(before[nets], nets) == set(dict(nets.named_parameters()))
    assert not changed(before[trans], trans) and not changed(before[discs], discs, params_only=False)

    before = {m: snapshot(m) for m in (nets, trans, discs)}
    method.feature_step(batch, engine)  # the generator and the discriminator Adam steps
    assert changed(before[nets], nets) == set(dict(nets.named_parameters())) - heads
    assert changed(before[trans], trans) == set(dict(trans.named_parameters()))
    assert changed(before[discs], discs) == set(dict(discs.named_parameters()))
    assert all(p.requires_grad for p in discs.parameters())  # D is frozen only while L_G is computed


def test_one_backward_gives_each_adam_group_exactly_its_own_gradients() -> None:
    """The feature step back-propagates w·ΣL_G + ΣL_D once: the generator group must get the gradient of L_G
    alone (D frozen) and the discriminators that of L_D alone (maps detached), as two separate steps would."""
    method = make_afd(["resnet8", "resnet8"], transfer_channels=32).method
    maps = feature_maps(method, make_batch().images)
    g_total = sum(method.frozen_generator_terms(maps).values())
    d_total = discriminator_total(method.discriminator_terms(maps))
    generator, discriminator = method.generator_parameters(), list(method.discriminators.parameters())
    alone_g = torch.autograd.grad(g_total, generator, retain_graph=True)
    alone_d = torch.autograd.grad(d_total, discriminator, retain_graph=True)
    joint = torch.autograd.grad(g_total + d_total, generator + discriminator)
    assert all(torch.equal(a, b) for a, b in zip(alone_g + alone_d, joint))
    assert all(p.grad is None for p in discriminator)  # L_G never reached D


def test_discriminator_and_generator_losses_are_least_squares() -> None:
    method = make_afd(["resnet8", "resnet8"]).method
    maps = feature_maps(method, make_batch().images)
    d_terms, g_terms = method.discriminator_terms(maps), method.generator_terms(maps)
    d1 = method.discriminators["net1"]
    real, fake = d1(maps["net2"].detach()), d1(maps["net1"].detach())  # net1's peer is net2
    assert d_terms["d1/loss"].item() == pytest.approx(((1 - real) ** 2).mean().item() + (fake ** 2).mean().item(), rel=1e-6)
    assert (d_terms["d1/real"].item(), d_terms["d1/fake"].item()) == pytest.approx((real.mean().item(), fake.mean().item()))
    assert g_terms["net1/g_adv"].item() == pytest.approx(((1 - d1(maps["net1"])) ** 2).mean().item(), rel=1e-6)


def test_saved_state_resumes_every_optimiser_and_discriminator_exactly() -> None:
    """What the trainer saves for --resume (method + every optimiser and scheduler) continues bit for bit."""
    original = make_afd(["resnet8", "resnet8"], adam_lr=1e-3)
    original.train_step(make_batch(seed=1), step_info())
    original.end_epoch()
    state = copy.deepcopy({"method": original.method.state_dict(),
                           "optimizers": {k: o.state_dict() for k, o in original.optimizers.items()},
                           "schedulers": {k: s.state_dict() for k, s in original.schedulers.items()}})
    resumed = make_afd(["resnet8", "resnet8"], seed=7, adam_lr=1e-3)
    resumed.method.load_state_dict(state["method"])
    for key in ("optimizers", "schedulers"):
        parts = getattr(resumed, key)
        assert set(parts) == {"logit", "generator", "discriminator"}
        for name, part in parts.items():
            part.load_state_dict(state[key][name])
    logs = [m.train_step(make_batch(seed=2), step_info()).logs for m in (original, resumed)]
    assert {k: v.item() for k, v in logs[0].items()} == {k: v.item() for k, v in logs[1].items()}
    for (name, a), b in zip(original.method.state_dict().items(), resumed.method.state_dict().values()):
        assert torch.equal(a, b), name


# -- wiring and ablations -------------------------------------------------------------------------
def test_cyclic_wiring_for_three_networks() -> None:
    method = make_afd(["resnet8"] * 3).method
    assert method.peer_of == {"net1": "net3", "net2": "net1", "net3": "net2"}
    assert list(method.discriminators) == ["net1", "net2", "net3"]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in method.discriminators}
    for name, disc in method.discriminators.items():
        disc.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(args[0]))
    maps = {name: torch.full((2, 64, 4, 4), float(k)) for k, name in enumerate(method.networks, 1)}
    method.discriminator_terms(maps)
    # D_k sees network k-1's map as real (first call) and its own as fake: net1 <- net3 <- net2 <- net1
    assert {name: [x[0, 0, 0, 0].item() for x in xs] for name, xs in seen.items()} == \
        {"net1": [3.0, 1.0], "net2": [1.0, 2.0], "net3": [2.0, 3.0]}

    logits = {name: torch.randn(4, CLASSES) for name in method.networks}
    terms = method.logit_terms(logits, torch.tensor([0, 1, 2, 3]))
    assert terms["net1/kl"].item() == pytest.approx(independent_kd(logits["net1"], logits["net3"]), rel=1e-5)
    assert terms["net2/kl"].item() == pytest.approx(independent_kd(logits["net2"], logits["net1"]), rel=1e-5)


def independent_kd(student: torch.Tensor, peer: torch.Tensor, temperature: float = 3.0) -> float:
    """T² · KL(σ(peer/T) ‖ σ(student/T)), batch mean, with torch's own kl_div."""
    return temperature ** 2 * F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(peer / temperature, 1),
                                       reduction="batchmean").item()


def test_all_peers_logit_variant_averages_the_kl() -> None:
    method = make_afd(["resnet8"] * 3, logit_peers="all").method
    logits = {name: torch.randn(4, CLASSES) for name in method.networks}
    terms = method.logit_terms(logits, torch.tensor([0, 1, 2, 3]))
    expected = (independent_kd(logits["net1"], logits["net2"]) + independent_kd(logits["net1"], logits["net3"])) / 2
    assert terms["net1/kl"].item() == pytest.approx(expected, rel=1e-5)
    assert method.peer_of["net1"] == "net3"  # the feature-map level stays cyclic


def test_without_the_adversarial_part_a_step_is_one_dml_sgd_step() -> None:
    engine = make_afd(["resnet8", "resnet8"], adversarial=False)
    method = engine.method
    assert set(engine.optimizers) == {"logit"} and not method.discriminators and not method.transfers
    reference = copy.deepcopy(method.networks)
    batch = make_batch()
    out = engine.train_step(batch, step_info())
    assert not any("/g_adv" in k or k.startswith("d") for k in out.logs)

    z = {name: net(batch.images) for name, net in reference.items()}
    loss = sum(F.cross_entropy(z[a], batch.labels) + 9.0 * F.kl_div(
        F.log_softmax(z[a] / 3, 1), F.softmax(z[b].detach() / 3, 1), reduction="batchmean")
        for a, b in (("net1", "net2"), ("net2", "net1")))
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss.backward()
    sgd.step()
    assert out.logs["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), q in zip(method.networks.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize("kind, power", [("l1", 1), ("l2", 2)])
def test_direct_alignment_replaces_the_discriminators(kind: str, power: int) -> None:
    engine = make_afd(["resnet8", "resnet8"], feature_loss=kind)
    method = engine.method
    assert set(engine.optimizers) == {"logit", "generator"} and not method.discriminators
    maps = feature_maps(method, make_batch().images)
    terms = method.alignment_terms(maps)
    expected = (maps["net1"] - maps["net2"]).abs().pow(power).mean().item()
    assert terms[f"net1/feat_{kind}"].item() == pytest.approx(expected, rel=1e-6)
    terms[f"net1/feat_{kind}"].backward()  # the peer's map is a constant target
    assert all(p.grad is None for p in method.networks["net2"].parameters())
    assert any(p.grad is not None for p in method.networks["net1"].parameters())


def test_feature_mode_of_the_switches() -> None:
    params = get_method("afd").Params
    assert params().feature_mode == "adversarial"
    assert params(adversarial=False).feature_mode is None
    assert params(adversarial=False, feature_loss="l1").feature_mode == "l1"


def test_bf16_step_is_finite_and_logs_every_network() -> None:
    engine = make_afd(["resnet8", "resnet8"], precision="bf16")
    out = engine.train_step(make_batch(), step_info())
    expected = {f"net{k}/{t}" for k in (1, 2) for t in ("ce", "kl", "g_adv")} | \
        {f"d{k}/{t}" for k in (1, 2) for t in ("loss", "real", "fake")} | {"loss"}
    assert set(out.logs) == expected
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.logs.values())


# -- pipeline -------------------------------------------------------------------------------------
def test_baselines_start_from_the_weights_of_their_network(tmp_path, monkeypatch) -> None:
    recipe = resolve_recipe("quickstart", ["method.name=afd"])
    data = pipeline.prepare_data(recipe, smoke=True)
    ctx = RunContext(tmp_path, torch.device("cpu"), seed=0, console=Console(quiet=True))
    monkeypatch.setattr(Trainer, "fit", lambda self: {n: snapshot(net) for n, net in self.method.networks.items()})
    networks = {"net1": "resnet8", "net2": "resnet8"}
    together = pipeline.run_stage("afd", "afd", networks, None, recipe, data, ctx)
    alone = pipeline.run_stage("baseline-net2", "ce", networks, None, recipe, data, ctx, only="net2")
    assert list(alone) == ["net2"]
    assert all(torch.equal(alone["net2"][k], v) for k, v in together["net2"].items())
    assert not torch.equal(together["net1"]["conv1.weight"], together["net2"]["conv1.weight"])


def test_smoke_run_reports_each_network_the_ensemble_and_the_baselines(tmp_path) -> None:
    out = tmp_path / "o"
    args = ["distill", "--recipe", "quickstart", "--set", "method.name=afd", "--smoke", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = pd.read_csv(out / "results.csv")
    assert list(zip(results["stage"], results["network"], results["arch"])) == [
        ("baseline-net1", "net1", "resnet8"), ("baseline-net2", "net2", "resnet8"),
        ("afd", "net1", "resnet8"), ("afd", "net2", "resnet8"), ("afd", "ensemble", "net1+net2")]
    history = pd.read_csv(out / "afd/history.csv")
    assert {"net1/ce", "net2/kl", "net2/g_adv", "d1/loss", "d2/real", "d2/fake", "test_top1_net2",
            "test_top1_ensemble"} <= set(history)
    net1, net2 = (load_model(out / f"afd/checkpoints/{n}-best.safetensors") for n in ("net1", "net2"))  # each alone
    assert type(net2) is type(create_model("resnet8", num_classes=20)) and net2.num_classes == 20
    assert not torch.equal(net1.conv1.weight, net2.conv1.weight)
