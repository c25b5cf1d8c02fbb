"""AFD: online adversarial feature-map distillation (Chung, Park, Kim, Kwak, ICML 2020).

K >= 2 networks train together from scratch; there is no pre-trained teacher. Network k learns from
its peer p(k) (the other network when K = 2; network k-1, and network 1 from network K, in the cyclic
scheme for K >= 3) at two levels:

* logit level (SGD, the recipe's ``optim`` and ``schedule``)::

      L_logit^k = w_ce * CE(y, σ(z_k)) + w_kl * T² · KL(σ(z_p(k)/T) ‖ σ(z_k/T))     (peer detached)

* feature-map level (Adam, ``adam_*`` params). f_k = T_k(G_k(x)) is network k's last feature map
  (before pooling) passed through its transfer layer T_k (identity unless channel counts or grids
  differ). Network k's own discriminator D_k outputs the probability that a map is its peer's::

      L_D^k = mean (1 - D_k(sg f_p(k)))² + mean D_k(sg f_k)²     peer's map = real, own map = fake
      L_G^k = w_feature * mean (1 - D_k(f_k))²                    network k tries to look like its peer

Per mini-batch (the paper's Algorithm 1): one SGD step on Σ_k L_logit^k; a fresh forward of every G_k and T_k; one
Adam step on Σ_k L_G^k over the feature extractors and transfer layers (discriminators frozen); one Adam
step on Σ_k L_D^k over the discriminators (maps detached). ``update_order: discriminator_first``
swaps the last two.

Ablations: ``adversarial: false`` keeps the logit level only (DML with temperature T);
``feature_loss: l1`` / ``l2`` replaces the discriminators by direct alignment
``mean |f_k - sg f_p(k)|`` (or squared) with the same Adam step; ``logit_peers: all`` averages the KL
over every other network instead of the cyclic peer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli import losses
from kdcli.errors import UserError
from kdcli.methods import register
from kdcli.methods.base import (
    Batch,
    Method,
    MethodContext,
    MethodParams,
    Outputs,
    ParamGroup,
    Step,
    StepInfo,
    StepOutput,
    main_output,
    step_output,
)
from kdcli.models import Features, Taps
from kdcli.recipes import OptimConfig, ScheduleConfig

LOGITS = Taps(logits=True)
MAPS = Taps(logits=False, feature_map=True)


@dataclass
class AFDParams(MethodParams):
    """AFD's hyper-parameters; defaults and their sources: ``docs/methods/afd.md``."""

    networks: list[str] = field(default_factory=list)  # archs of net1..netK; empty: two copies of student.arch
    temperature: float = 3.0
    adversarial: bool = True  # false (with feature_loss: adversarial): logit level only, i.e. DML
    feature_loss: Literal["adversarial", "l1", "l2"] = "adversarial"  # l1/l2: direct alignment, no discriminators
    logit_peers: Literal["cyclic", "all"] = "cyclic"  # KL to the cyclic peer, or averaged over all others
    update_order: Literal["generator_first", "discriminator_first"] = "generator_first"
    adam_lr: float = 2e-5
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_weight_decay: float = 0.1  # coupled L2, as in the reference hyper-parameters
    adam_milestones: list[int] = field(default_factory=lambda: [75, 150])
    adam_gamma: float = 0.1
    discriminator: Literal["conv", "patch"] = "conv"
    disc_width: float = 1.0  # hidden channels of D = round(disc_width * C)
    disc_slope: float = 0.2  # LeakyReLU negative slope
    transfer_channels: int = 0  # common channel count C* of the transferred maps; 0: the largest network's

    def __post_init__(self) -> None:
        checks = [
            (len(self.networks) != 1, "networks", "lists one network; AFD trains K >= 2 together "
             "(leave it empty for two copies of student.arch)"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.adam_lr > 0, "adam_lr", "must be > 0"),
            (self.adam_weight_decay >= 0, "adam_weight_decay", "must be >= 0"),
            (len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
             "must be two numbers in [0, 1), e.g. [0.9, 0.999]"),
            (all(m >= 0 for m in self.adam_milestones), "adam_milestones", "must be >= 0"),
            (self.disc_width > 0, "disc_width", "must be > 0"),
            (self.disc_slope >= 0, "disc_slope", "must be >= 0"),
            (self.transfer_channels >= 0, "transfer_channels", "must be >= 0 (0: the largest network's channels)"),
        ]
        for ok, key, problem in checks:
            if not ok:
                raise UserError(f"method.params.{key} {problem}")

    @property
    def feature_mode(self) -> Literal["adversarial", "l1", "l2"] | None:
        """The feature-map loss in use; None for the logit-only (DML) ablation."""
        if self.feature_loss != "adversarial":
            return self.feature_loss
        return "adversarial" if self.adversarial else None


class Discriminator(nn.Module):
    """D_k: a (B, C, H, W) feature map -> (B, P) probabilities that it is the peer's map ("real").

    ``conv`` (the default, reconstructed): Conv3x3/s2 -> BN -> LeakyReLU -> Conv(⌈H/2⌉ x ⌈W/2⌉) -> sigmoid, P = 1.
    ``patch`` (the reference reimplementation's): Conv2x2 -> BN -> LeakyReLU -> Conv2x2/s2 -> sigmoid,
    a PatchGAN with P = ⌊(H-1)/2⌋ · ⌊(W-1)/2⌋ outputs; losses average over them.
    """

    def __init__(self, channels: int, height: int, width: int, kind: str = "conv", width_factor: float = 1.0,
                 slope: float = 0.2) -> None:
        super().__init__()
        hidden = max(1, round(channels * width_factor))
        if kind == "conv":
            first, last = nn.Conv2d(channels, hidden, 3, 2, 1, bias=False), \
                nn.Conv2d(hidden, 1, (math.ceil(height / 2), math.ceil(width / 2)))
        else:
            if min(height, width) < 3:
                raise UserError(f"method.params.discriminator 'patch' needs feature maps of at least 3x3, "
                                f"got {height}x{width}; use 'conv'")
            first, last = nn.Conv2d(channels, hidden, 2, 1, bias=False), nn.Conv2d(hidden, 1, 2, 2)
        self.layers = nn.Sequential(first, nn.BatchNorm2d(hidden), nn.LeakyReLU(slope), last)

    def forward(self, feature_map: Tensor) -> Tensor:
        # the sigmoid and everything after it run in float32, also under bf16 autocast
        return torch.sigmoid(self.layers(feature_map).flatten(1).float())


def transfer_layer(in_channels: int, out_channels: int, in_size: tuple[int, int],
                   out_size: tuple[int, int]) -> nn.Module:
    """T_k: average-pool to the common grid if needed, then 1x1 conv + BN + ReLU if channels differ."""
    layers: list[nn.Module] = []
    if in_size != out_size:
        layers.append(nn.AdaptiveAvgPool2d(out_size))
    if in_channels != out_channels:
        layers += [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]
    return nn.Sequential(*layers) if layers else nn.Identity()


def squared_error(probabilities: Tensor, target: float) -> Tensor:
    """Least-squares GAN loss: mean over samples and outputs of (D(f) - target)²."""
    return (probabilities - target).pow(2).mean()


@register
class AFD(Method):
    """K networks trained together: mutual KL on logits and a least-squares discriminator per network."""

    name = "afd"
    summary = ("online adversarial feature-map distillation (Chung et al. 2020): K networks, cyclic peers, "
               "SGD on CE + T^2*KL, Adam on LSGAN feature-map losses")
    Params = AFDParams
    default_weights = {"ce": 1.0, "kl": 1.0, "feature": 1.0}
    taps = Taps(logits=True, feature_map=True)  # logits in the logit pass, maps in the feature pass
    teacher_taps = None
    every_pass_uses_all_parameters = False  # the logit pass skips T_k and D_k, the feature pass the classifiers
    params: AFDParams

    @classmethod
    def networks_for(cls, params: AFDParams, student_arch: str | None) -> dict[str, str]:
        """net1..netK from ``method.params.networks``, or two copies of ``student.arch`` when it is empty."""
        archs = params.networks
        if not archs:
            if student_arch is None:
                raise UserError("method 'afd' needs method.params.networks (a list of >= 2 archs) or student.arch "
                                "(trained as two copies)")
            archs = [student_arch] * 2
        return {f"net{k}": arch for k, arch in enumerate(archs, 1)}

    def __init__(self, networks: dict[str, nn.Module], params: AFDParams, weights: dict[str, float],
                 ctx: MethodContext) -> None:
        super().__init__(networks, params, weights, ctx)
        names = list(self.networks)
        if len(names) < 2:
            raise UserError(f"method 'afd' trains K >= 2 networks, got {len(names)}")
        # cyclic wiring: network k learns from network k-1, network 1 from network K (K=2: each other)
        self.peer_of = {name: names[k - 1] for k, name in enumerate(names)}
        self.logit_peers = {name: [self.peer_of[name]] if params.logit_peers == "cyclic"
                            else [other for other in names if other != name] for name in names}
        self.feature_mode = params.feature_mode
        self.transfers = nn.ModuleDict()
        self.discriminators = nn.ModuleDict()
        if self.feature_mode is not None:
            self._build_feature_modules()

    def _feature_map_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of every network's ``forward_features``; a token or NHWC output is a user error."""
        shapes = {}
        for name, net in self.networks.items():
            shape = self.ctx.shapes[name].feature_map
            if len(shape) != 3 or getattr(net, "output_fmt", "NCHW") == "NHWC":
                arch = getattr(net, "kdcli_arch", type(net).__name__)
                raise UserError(f"AFD needs a (B, C, H, W) feature map, but '{arch}' returns {shape} per image "
                                f"({getattr(net, 'output_fmt', 'tokens')}); use a CNN architecture")
            shapes[name] = shape
        return shapes

    def _build_feature_modules(self) -> None:
        """Transfer layers to a common (C*, H*, W*) and, for the adversarial loss, one D per network."""
        p = self.params
        shapes = self._feature_map_shapes()
        channels = p.transfer_channels or max(c for c, _, _ in shapes.values())
        grid = (min(h for _, h, _ in shapes.values()), min(w for _, _, w in shapes.values()))
        for name, (c, h, w) in shapes.items():
            self.transfers[name] = transfer_layer(c, channels, (h, w), grid)
            if self.feature_mode == "adversarial":
                self.discriminators[name] = Discriminator(channels, *grid, p.discriminator, p.disc_width, p.disc_slope)

    # -- optimisers -------------------------------------------------------------------------------
    def generator_parameters(self) -> list[nn.Parameter]:
        """Every network parameter up to the feature map (all but the classifier), plus the T_k."""
        if self.feature_mode is None:
            return []
        params: list[nn.Parameter] = []
        for net in self.networks.values():
            head = {id(p) for p in net.get_classifier().parameters()}
            params += [p for p in net.parameters() if id(p) not in head]
        return params + list(self.transfers.parameters())

    def param_groups(self) -> list[ParamGroup]:
        """logit: the recipe's optimiser (SGD) over all network parameters; generator / discriminator: Adam."""
        p = self.params
        adam = OptimConfig(name="adam", lr=p.adam_lr, betas=list(p.adam_betas), weight_decay=p.adam_weight_decay)
        schedule = ScheduleConfig(name="multistep", milestones=list(p.adam_milestones), gamma=p.adam_gamma)
        return [ParamGroup("logit", list(self.networks.parameters())),
                ParamGroup("generator", self.generator_parameters(), adam, schedule),
                ParamGroup("discriminator", list(self.discriminators.parameters()), adam, schedule)]

    # -- losses -----------------------------------------------------------------------------------
    def logit_terms(self, logits: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """``<net>/ce`` = CE(y, z_k) and ``<net>/kl`` = mean over its logit peers j of T²·KL(σ(z_j/T) ‖ σ(z_k/T))."""
        terms: dict[str, Tensor] = {}
        for name, out in logits.items():
            peers = self.logit_peers[name]
            terms[f"{name}/ce"] = F.cross_entropy(out.float(), labels)
            terms[f"{name}/kl"] = sum(losses.kd(out, logits[j], self.params.temperature) for j in peers) / len(peers)
        return terms

    def alignment_terms(self, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """``<net>/feat_l1`` = mean |f_k - sg f_p(k)| (``feat_l2``: mean of the squares)."""
        power = 1 if self.feature_mode == "l1" else 2
        return {f"{name}/feat_{self.feature_mode}":
                (fmap.float() - maps[self.peer_of[name]].detach().float()).abs().pow(power).mean()
                for name, fmap in maps.items()}

    def generator_terms(self, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """``<net>/g_adv`` = mean (1 - D_k(f_k))²: network k's map should be judged its peer's."""
        return {f"{name}/g_adv": squared_error(self.discriminators[name](fmap), 1.0) for name, fmap in maps.items()}

    def discriminator_terms(self, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """``d<k>/loss`` = L_D^k on detached maps, with D_k's mean output on the real and fake maps."""
        terms: dict[str, Tensor] = {}
        for k, (name, disc) in enumerate(self.discriminators.items(), 1):
            real = disc(maps[self.peer_of[name]].detach())  # separate calls: BN never mixes real and fake
            fake = disc(maps[name].detach())
            terms[f"d{k}/loss"] = squared_error(real, 1.0) + squared_error(fake, 0.0)
            terms[f"d{k}/real"], terms[f"d{k}/fake"] = real.mean(), fake.mean()
        return terms

    # -- the step ---------------------------------------------------------------------------------
    def train_step(self, batch: Batch, step: Step, info: StepInfo) -> StepOutput:
        """The paper's order: logit SGD step, then the feature-map steps; ``loss`` is the networks' total."""
        logits, terms = step.forward(LOGITS, self.logit_pass, batch, info)
        total = self.weighted_total(terms, info)
        step.update(total, "logit")
        if self.feature_mode is not None:
            feature_terms, feature_total = self.feature_step(batch, step)
            terms = {**terms, **feature_terms}
            total = total + feature_total
        return step_output(logits, terms, total)

    def loss_terms(self, batch: Batch, outputs: Outputs, teacher: Features | None, info: StepInfo) -> dict[str, Tensor]:
        """The logit part of step 1: every network's ``<net>/ce`` and ``<net>/kl`` terms."""
        return self.logit_terms({name: out.logits for name, out in outputs.items()}, batch.labels)

    def term_weight(self, name: str, info: StepInfo) -> float:
        """``<net>/ce`` and ``<net>/kl`` take the recipe's ``ce`` and ``kl`` weights."""
        return super().term_weight(name.rsplit("/", 1)[-1], info)

    def feature_step(self, batch: Batch, step: Step) -> tuple[dict[str, Tensor], Tensor]:
        """Steps 2-3 on a fresh forward of every G_k and T_k; returns the logs and w_feature · Σ_k L_G^k."""
        weight = self.weights["feature"]
        if self.feature_mode != "adversarial":
            terms = step.forward(MAPS, self.alignment_pass, batch)
            total = weight * sum(terms.values())
            step.update(total, "generator")
            return terms, total
        if self.params.update_order == "discriminator_first":
            d_terms = step.forward(MAPS, self.discriminator_pass, batch)
            step.update(discriminator_total(d_terms), "discriminator")
            g_terms = step.forward(MAPS, self.generator_pass, batch)
            total = weight * sum(g_terms.values())
            step.update(total, "generator")
        else:
            g_terms, d_terms = step.forward(MAPS, self.adversarial_pass, batch)
            total = weight * sum(g_terms.values())
            step.update(total + discriminator_total(d_terms), "generator", "discriminator")
        return {**g_terms, **d_terms}, total

    # -- the passes (each runs inside step.forward) -------------------------------------------------
    def logit_pass(self, batch: Batch, outputs: Outputs, info: StepInfo) -> tuple[Tensor, dict[str, Tensor]]:
        return main_output(outputs).logits, self.loss_terms(batch, outputs, None, info)

    def transferred_maps(self, outputs: Outputs) -> dict[str, Tensor]:
        """f_k = T_k(G_k(x)) for every network: the last feature map, before pooling, transferred."""
        return {name: self.transfers[name](out.feature_map) for name, out in outputs.items()}

    def alignment_pass(self, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        return self.alignment_terms(self.transferred_maps(outputs))

    def generator_pass(self, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        return self.frozen_generator_terms(self.transferred_maps(outputs))

    def discriminator_pass(self, batch: Batch, outputs: Outputs) -> dict[str, Tensor]:
        return self.discriminator_terms(self.transferred_maps(outputs))

    def adversarial_pass(self, batch: Batch, outputs: Outputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """L_G^k (discriminators frozen) and L_D^k (maps detached) from one forward of the maps."""
        maps = self.transferred_maps(outputs)
        return self.frozen_generator_terms(maps), self.discriminator_terms(maps)

    def frozen_generator_terms(self, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`generator_terms` with every D frozen: no gradient of L_G reaches the discriminators."""
        self.discriminators.requires_grad_(False)
        try:
            return self.generator_terms(maps)
        finally:
            self.discriminators.requires_grad_(True)


def discriminator_total(terms: dict[str, Tensor]) -> Tensor:
    """Σ_k L_D^k (the ``d<k>/loss`` entries; ``d<k>/real`` and ``/fake`` are logs)."""
    return sum(value for key, value in terms.items() if key.endswith("/loss"))
