"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020), NCE form, as RepDistiller runs it.

Student and teacher pooled features go through their own linear head to 128-d and are L2-normalised, e_S and
e_T (both heads train; neither is exported). Two memory banks of N = |training set| rows keep a momentum
average of every sample's e_S and e_T. For each sample the positive is its own row and the K negatives
are rows of other classes; with scores P = exp(⟨m, e⟩ / T) / Z (Z fixed on the first batch as mean(P)·N):

    L_crd = NCE(student anchor vs teacher memory) + NCE(teacher anchor vs student memory)

(:func:`kdcli.losses.contrastive_nce`)
after which each bank's rows of the batch become normalize(μ·m + (1 − μ)·e). The banks, Z and the heads are
method state, so ``--resume`` continues exactly; under torchrun every rank writes every rank's samples into
its banks. Defaults (RepDistiller): 128-d, K = 16384, T = 0.07, μ = 0.5, weight 0.8.

Differences from RepDistiller, on purpose: negatives are drawn with replacement from the other classes
(RepDistiller draws without replacement), from the method's seeded generator on the CPU (one host sync a
step for the labels); the scores of a batch are one matrix product against a copy of the whole bank, then
gathered (the same numbers in another summation order; the copy keeps the bank free for its update, and
costs N x 256 floats a step, 51 MB on CIFAR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli import losses
from kdcli.errors import UserError
from kdcli.methods.base import Batch, FeatureTerm, MethodParams, StepInfo, gather_from_ranks, register_term
from kdcli.methods.logit import standalone
from kdcli.models import Features


@dataclass
class CRDParams(MethodParams):
    """feat_dim: embedding size; nce_k: negatives per sample; nce_t: temperature; nce_m: memory momentum."""

    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5

    def __post_init__(self) -> None:
        if self.feat_dim < 1 or self.nce_k < 1 or not self.nce_t > 0 or not 0 <= self.nce_m < 1:
            raise UserError("method.params.crd: feat_dim and nce_k must be >= 1, nce_t > 0 and nce_m in [0, 1)")


class Embed(nn.Sequential):
    """A linear head to the embedding space, then L2 normalisation (CRD's ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(nn.Linear(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(super().forward(x.flatten(1)), dim=1)


class OtherClassSampler:
    """Uniform draws among the training samples of other classes than each label (with replacement)."""

    def __init__(self, labels: Tensor) -> None:
        self.order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels)
        self.counts, self.starts = counts, torch.cumsum(counts, 0) - counts
        self.total = len(labels)

    def __call__(self, labels: Tensor, k: int, generator: torch.Generator) -> Tensor:
        """(B, k) positions of other-class samples, from a CPU ``generator``."""
        labels = labels.cpu()
        others = (self.total - self.counts[labels]).unsqueeze(1)
        draw = (torch.rand(len(labels), k, generator=generator, dtype=torch.float64) * others).long()
        draw = draw + (draw >= self.starts[labels].unsqueeze(1)) * self.counts[labels].unsqueeze(1)
        return self.order[draw]


@register_term
class CRDTerm(FeatureTerm):
    """Tian et al. 2020: contrast each sample's student and teacher embeddings against memories of other samples."""

    name = "crd"
    summary = "contrastive representation distillation (NCE, momentum memory of 16384 negatives)"
    Params = CRDParams
    default_weight = 0.8
    reads = "pre_logits"

    def __init__(self, params: CRDParams, ctx, student, teacher) -> None:
        super().__init__(params, ctx, student, teacher)
        if ctx.train_labels is None:
            raise UserError("crd needs the training set's labels (its negatives are samples of other classes)")
        self.sampler = OtherClassSampler(ctx.train_labels.cpu())
        self.embed_student = Embed(student.pre_logits[0], params.feat_dim)
        self.embed_teacher = Embed(teacher.pre_logits[0], params.feat_dim)
        bound = 1.0 / math.sqrt(params.feat_dim / 3)  # RepDistiller's initialisation, from a fixed stream
        memory = torch.rand(2, self.sampler.total, params.feat_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("memory", memory * 2 * bound - bound)  # [0]: student embeddings, [1]: teacher's
        self.register_buffer("log_z", torch.full((2,), math.nan))  # fixed on the first batch
        self._z_fixed = False  # a cache of "log_z is set", which the buffer itself records for --resume

    def forward(self, student: Features, teacher: Features, batch: Batch, info: StepInfo) -> Tensor:
        params = self.params
        e_s, e_t = self.embed_student(student.pre_logits), self.embed_teacher(teacher.pre_logits.detach())
        negatives = self.sampler(batch.labels, params.nce_k, info.generator).to(batch.indices.device)
        rows = torch.cat([batch.indices[:, None], negatives], dim=1)  # column 0: the sample's own row
        memory = self.memory.clone()  # what the scores' gradients need, untouched by the update below
        dots = torch.stack([torch.gather(e_s @ memory[1].T, 1, rows),  # student anchor, teacher memory
                            torch.gather(e_t @ memory[0].T, 1, rows)]) / params.nce_t
        if not self._z_fixed:  # a host sync until Z is known (the first batch, or the first after a resume)
            self._z_fixed = not torch.isnan(self.log_z).any().item()
        if not self._z_fixed:
            # log Z = log(mean P · N), over every rank's batch, so all ranks share one Z
            mean = torch.logsumexp(dots.detach().flatten(1), dim=1) - math.log(dots[0].numel())
            means = gather_from_ranks(mean[None])
            self.log_z.copy_(means.logsumexp(0) - math.log(len(means)) + math.log(self.sampler.total))
            self._z_fixed = True
        loss = sum(losses.contrastive_nce(dots[i] - self.log_z[i], self.sampler.total) for i in range(2))
        self._remember(e_s.detach(), e_t.detach(), batch.indices)
        return loss

    @torch.no_grad()
    def _remember(self, e_s: Tensor, e_t: Tensor, indices: Tensor) -> None:
        """Momentum update of both banks at the batch's rows (every rank's batch under torchrun)."""
        indices = gather_from_ranks(indices)
        for bank, embedding in ((0, gather_from_ranks(e_s)), (1, gather_from_ranks(e_t))):
            mixed = self.memory[bank, indices] * self.params.nce_m + embedding * (1 - self.params.nce_m)
            self.memory[bank, indices] = F.normalize(mixed, dim=1)


CRD = standalone(CRDTerm)
