"""KD with an auxiliary variable (Peng, Fang, Zhang, Lu, ICML 2024), reconstructed from the paper
(``docs/methods/kdav.md``).

The student's predictive distribution is rebuilt through instance membership ``a`` over a memory
``M`` of teacher instances (this batch's own teacher entries plus a FIFO queue of earlier ones):

    p_S(y | x) = Σ_m π_m(y) · q_S(a=m | x)                         (law of total probability, eq. 1)
    q_S(a=m | x) = softmax_m(κ μ_mᵀ e(x))                          (Bayes rule, vMF likelihood, eq. 2)
    π_m = softmax(t_m / β)   or   onehot(y_m)                      (label of an instance, eq. 3)

with μ_m = n(h^T_m) the stored unit teacher embeddings and e(x) = n(g(h^S(x))) the student's
pre-logits through a training-only projector g. The objective is

    L = w_ce·CE(s, y) + w_av·mean_i KL(softmax(t_i/τ) ‖ p_S(·|x_i)) [+ w_kd·α²·KL_KD] [+ w_rel·L_rel].

Only the student is a network of the method: the projector and the queue are its submodules, so they
are trained and saved with the training state (``--resume`` continues exactly) but never exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli import losses
from kdcli.errors import UserError
from kdcli.methods import register
from kdcli.methods.base import Batch, Method, MethodContext, MethodParams, Outputs, StepInfo, gather_from_ranks
from kdcli.models import Features, Taps

LABEL_FLOOR = 1e-12
"""π_m(y) is floored at this value (reconstructed: the paper gives none): a class that no member carries keeps a finite
log-probability, so KL(p_T ‖ p_S) stays finite in one-hot mode."""


# -- the math, as pure functions ------------------------------------------------------------------
def _full_precision(x: Tensor) -> Tensor:
    """Half-precision inputs (from autocast) go to float32; float64 stays float64 (gradient checks)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def membership_scores(embeddings: Tensor, memory: Tensor, kappa: float) -> Tensor:
    """vMF membership scores ℓ_im = κ μ_mᵀ e_i for unit rows e (B, d) and μ (N, d); shape (B, N).

    log q_S(a=m | x_i) = ℓ_im − logsumexp_m' ℓ_im' (eq. 2; the vMF normaliser C_d(κ) and the uniform
    prior cancel).
    """
    with torch.autocast(embeddings.device.type, enabled=False):
        return kappa * _full_precision(embeddings) @ _full_precision(memory).T


def instance_label_log_probs(logits: Tensor, labels: Tensor, beta: float,
                             mode: Literal["teacher_soft", "onehot"]) -> Tensor:
    """log π_m(y) for the N members, shape (N, C), floored at log(LABEL_FLOOR).

    teacher_soft: π_m = softmax(t_m / β) (the default reading); onehot: π_m = onehot(y_m).
    """
    with torch.autocast(logits.device.type, enabled=False):
        logits = _full_precision(logits)
        if mode == "teacher_soft":
            log_pi = F.log_softmax(logits / beta, dim=1)
        else:
            hit = F.one_hot(labels, logits.shape[1]).bool()
            log_pi = torch.zeros_like(logits).masked_fill(~hit, -math.inf)
        return log_pi.clamp_min(math.log(LABEL_FLOOR))


def av_log_predictive(scores: Tensor, log_pi: Tensor) -> Tensor:
    """log p_S(y | x_i) = logsumexp_m(log q_im + log π_m(y)), shape (B, C) (eq. 1 in log space).

    The summand is a product q_im · π_m(y), so the (B, N, C) logsumexp factorises into a matmul:
    with a_i = max_m log q_im and c_y = max_m log π_m(y) (constants for autograd),

        log p_S(y | x_i) = a_i + c_y + log Σ_m exp(log q_im − a_i) · exp(log π_m(y) − c_y).

    Every factor is ≤ 1 (no overflow) and the term at argmax_m q_im is ≥ LABEL_FLOOR (no underflow to
    0), while memory stays O(B·N + N·C) instead of O(B·N·C).
    """
    with torch.autocast(scores.device.type, enabled=False):
        log_q = F.log_softmax(_full_precision(scores), dim=1)
        log_pi = _full_precision(log_pi).to(log_q.dtype)
        row_shift = log_q.detach().amax(dim=1, keepdim=True)
        col_shift = log_pi.detach().amax(dim=0, keepdim=True)
        mixture = (log_q - row_shift).exp() @ (log_pi - col_shift).exp()
        return row_shift + col_shift + mixture.log()


def av_loss(scores: Tensor, log_pi: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """L_AV = mean_i KL(softmax(t_i/τ) ‖ p_S(·|x_i)) with p_S from :func:`av_log_predictive` (eq. 4).

    No τ² factor: the student-side scores are not divided by τ. Its gradient with respect to the
    scores is ∂L_AV/∂ℓ_im = q_im (1 − r_im) / B with r_im = Σ_y p_T(y|x_i) π_m(y) / p_S(y|x_i) (eq. 6).
    """
    log_pred = av_log_predictive(scores, log_pi)
    with torch.autocast(scores.device.type, enabled=False):
        log_target = F.log_softmax(_full_precision(teacher_logits.detach()).to(log_pred.dtype) / tau, dim=1)
        return losses.kl_div(log_pred, log_target).mean()


def membership_kl(teacher_scores: Tensor, student_scores: Tensor) -> Tensor:
    """Relational term of the ELBO view: mean_i KL(p_T(a | x_i) ‖ q_S(a | x_i)) over the members.

    p_T(a=m | x_i) = softmax_m(κ_t μ_mᵀ μ_i) is the teacher's own membership posterior (a constant).
    """
    with torch.autocast(student_scores.device.type, enabled=False):
        log_q = F.log_softmax(_full_precision(student_scores), dim=1)
        log_p = F.log_softmax(_full_precision(teacher_scores.detach()).to(log_q.dtype), dim=1)
        return losses.kl_div(log_q, log_p).mean()


# -- the memory of teacher instances --------------------------------------------------------------
class Members(NamedTuple):
    """N teacher instances: unit embeddings (N, d_T), logits (N, C), labels (N,)."""

    embeddings: Tensor
    logits: Tensor
    labels: Tensor


class InstanceQueue(nn.Module):
    """FIFO memory of L teacher instances held in buffers (saved in ``state_dict``, never exported).

    Only the ``count`` filled rows are members: the first step sees an empty queue (warm-up).
    """

    def __init__(self, length: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(length, dim))
        self.register_buffer("logits", torch.zeros(length, num_classes))
        self.register_buffer("labels", torch.zeros(length, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def length(self) -> int:
        return self.embeddings.shape[0]

    def members(self) -> Members:
        filled = int(self.count)  # rows are written in order until the queue is full
        return Members(self.embeddings[:filled], self.logits[:filled], self.labels[:filled])

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Write a batch after the newest row, overwriting the oldest rows once full."""
        keep = min(embeddings.shape[0], self.length)  # a batch longer than the queue keeps its newest rows
        rows = (self.pointer + torch.arange(keep, device=self.pointer.device)) % self.length
        self.embeddings[rows] = embeddings[-keep:].to(self.embeddings.dtype)
        self.logits[rows] = logits[-keep:].to(self.logits.dtype)
        self.labels[rows] = labels[-keep:]
        self.pointer.copy_((self.pointer + keep) % self.length)
        self.count.copy_((self.count + keep).clamp(max=self.length))


# -- the method -----------------------------------------------------------------------------------
@dataclass
class KDAVParams(MethodParams):
    """Spec defaults (section 5); the switches select the alternatives of section 9."""

    tau: float = 4.0  # temperature of the teacher target p_T(y|x)
    beta: float = 4.0  # temperature of the members' soft labels π_m (β = τ makes 0 loss reachable)
    alpha: float = 4.0  # temperature of the optional plain KD term (weight `kd`, off by default)
    kappa: float = 1 / 0.07  # vMF concentration of the membership posterior
    kappa_t: float = 1 / 0.07  # concentration of the teacher's membership posterior (term `rel`, off)
    queue_size: int = 16384  # L, stored teacher instances
    label_mode: Literal["teacher_soft", "onehot"] = "teacher_soft"  # π_m: teacher soft labels or one-hot
    projector: Literal["linear", "mlp"] = "linear"  # g: d_S -> d_T linear, or linear-ReLU-linear
    include_batch: bool = True  # the batch's own teacher entries are members

    def __post_init__(self) -> None:
        """Checked when the recipe is loaded: queue length, temperatures and concentrations must be > 0."""
        defaults = {f.name: f.default for f in fields(self)}
        for key in ("queue_size", "tau", "beta", "alpha", "kappa", "kappa_t"):
            if not getattr(self, key) > 0:
                raise UserError(f"'method.params.{key}' of kdav must be > 0, got {getattr(self, key)}; "
                                f"the default is {defaults[key]:g}")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True), nn.Linear(out_dim, out_dim))


@register
class KDAV(Method):
    """Student distribution through instance membership over a queue of teacher embeddings."""

    name = "kdav"
    summary = ("KDAV: w_ce*CE + w_av*KL(p_T^tau || p_S), p_S(y|x) = sum_m softmax(t_m/beta)(y) * vMF membership "
               "q_S(m|x) over the batch + a queue of L teacher embeddings; optional kd (alpha), rel (kappa_t) terms")
    Params = KDAVParams
    default_weights = {"ce": 1.0, "av": 1.0}
    optional_terms = ("kd", "rel")
    taps = Taps(logits=True, pre_logits=True)
    teacher_taps = Taps(logits=True, pre_logits=True)
    params: KDAVParams

    def __init__(self, networks: dict[str, nn.Module], params: KDAVParams, weights: dict[str, float],
                 ctx: MethodContext) -> None:
        super().__init__(networks, params, weights, ctx)
        (student_dim,), (teacher_dim,) = ctx.shapes["student"].pre_logits, ctx.shapes["teacher"].pre_logits
        self.projector = build_projector(params.projector, student_dim, teacher_dim)
        self.queue = InstanceQueue(params.queue_size, teacher_dim, ctx.num_classes)

    def loss_terms(self, batch: Batch, outputs: Outputs, teacher: Features | None, info: StepInfo) -> dict[str, Tensor]:
        p = self.params
        anchors = F.normalize(teacher.pre_logits.float(), dim=1)
        teacher_logits = teacher.logits.float()
        student = outputs["student"]
        embedding = F.normalize(self.projector(student.pre_logits).float(), dim=1)
        members = self._members(anchors, teacher_logits, batch.labels)
        scores = membership_scores(embedding, members.embeddings, p.kappa)
        log_pi = instance_label_log_probs(members.logits, members.labels, p.beta, p.label_mode)
        no_members = scores.shape[1] == 0  # first step with include_batch=False: zero loss, still in the graph
        terms = {"ce": F.cross_entropy(student.logits, batch.labels),
                 "av": scores.sum() if no_members else av_loss(scores, log_pi, teacher_logits, p.tau)}
        if self.term_weight("kd", info):
            terms["kd"] = losses.kd(student.logits, teacher.logits, p.alpha)
        if self.term_weight("rel", info) and not no_members:
            terms["rel"] = membership_kl(membership_scores(anchors, members.embeddings, p.kappa_t), scores)
        # enqueue after the loss (MoCo order): ``members`` is a copy, so autograd's saved tensors stay intact
        self.queue.enqueue(gather_from_ranks(anchors), gather_from_ranks(teacher_logits),
                           gather_from_ranks(batch.labels))
        return terms

    def _members(self, anchors: Tensor, teacher_logits: Tensor, labels: Tensor) -> Members:
        """The batch's own teacher entries (unless switched off) followed by the filled queue rows."""
        sources = [Members(anchors, teacher_logits, labels)] if self.params.include_batch else []
        sources.append(self.queue.members())
        return Members(*(torch.cat(column) for column in zip(*sources)))
