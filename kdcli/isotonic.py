"""Isotonic data augmentation (IDA, Cui & Yan, IJCAI 2021): the label order of mixed samples.

A mixed sample with hard label ``h = lam * e(y_i) + (1 - lam) * e(y_j)`` has a *primary* label ``a``
(larger hard weight) and, unless ``h`` is one-hot, a *secondary* label ``b`` (see
:func:`kdcli.augment.label_roles`). Its soft labels ``p`` should respect the **IDA order**

* chain (``b`` exists):  ``p_a >= p_b >= p_o`` for every other label ``o``;
* star (``b == -1``):    ``p_a >= p_o`` for every other label ``o``.

This module provides, for ``(B, C)`` batches on any device and without Python loops over samples or
classes:

* :func:`project` -- the exact L2 isotonic regression onto the IDA order (KD-i's corrected target);
* :func:`order_penalty` -- the linear-time KD-p penalty on a distribution (KD-p's extra loss term);
* :func:`violation_stats` -- order-violation statistics (Kendall tau-a over known-order pairs,
  discordant pairs, has-violation, top-2 hit, penalty) with a batch summary;

and :func:`project_loop`, a per-sample Python reference implementation of the same projection used as
an independent check by the benchmark (:mod:`kdcli.bench`) and the tests.

Roles are passed as ``primary`` ``(B,)`` and ``secondary`` ``(B,)`` integer tensors; ``secondary == -1``
(or equal to ``primary``) selects the star order for that row. The method is described on the docs page
``docs/methods/ida.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def project(values: Tensor, primary: Tensor, secondary: Tensor) -> Tensor:
    """Exact L2 isotonic regression of each row onto the IDA order (IR, Algorithm 1 "Adapted IRT").

    Solves, independently for every row ``p`` of ``values`` with roles ``a = primary``, ``b = secondary``::

        minimise_y  sum_k (y_k - p_k)^2
        subject to  y_a >= y_b >= y_o  for all other o      (chain, b >= 0)
                    y_a >= y_o         for all o != a       (star, b == -1 or b == a)

    The constraints form a rooted tree (``a`` -> ``b`` -> the others, or a star at ``a``), and the
    tree version of pool-adjacent-violators (IRT-BIN) reduces to: sort the other labels in descending
    order ``v_1 >= v_2 >= ...``; the block of ``b`` absorbs ``v_1, v_2, ...`` while the next value is
    above the block mean; if the block mean then exceeds ``p_a``, ``a`` joins and the (now lower) block
    keeps absorbing the next values above its mean. Because the values are sorted, the absorption tests
    pass on a prefix and then fail for good, so each phase is a count of passed tests computed for all
    rows at once from one sort and one cumulative sum (``cs_j = v_1 + ... + v_j``):

    * phase 1 (block of ``b``, or of ``a`` in the star case, base value ``s0``, base size 1):
      ``k1`` = length of the leading run of ``j`` with ``v_j > (s0 + cs_{j-1}) / j``,
      level ``m1 = (s0 + cs_k1) / (k1 + 1)``;
    * phase 2 (chain rows with ``m1 > p_a``; base ``p_a + p_b``, size 2): ``k2 >= k1`` is the leading run
      of ``v_j > (p_a + p_b + cs_{j-1}) / (j + 1)`` (the first ``k1`` count as passed), level
      ``m2 = (p_a + p_b + cs_k2) / (k2 + 2)``;
    * the pooled labels get the level; every other entry is copied from the input unchanged.

    Labels below a per-row floor (for example ``min(p_a, p_b)``; a tighter one is used, see
    ``_absorption_floor``) can never be absorbed, so they are masked to ``-inf`` before the sort; this
    changes nothing in the result. On the CPU only the candidates are sorted (``topk`` to the largest
    candidate count), which makes the sort and every scan after it much cheaper when few labels violate.

    Properties: the optimum is unique; the row sum is preserved and entries stay within the row's
    ``[min, max]`` (probability vectors stay probability vectors); the map is idempotent; a row with no
    violation is returned bitwise unchanged; ties in the input are harmless (the absorption test is
    strict, and tied values end at the same level either way). The first label left out of a block is
    tested against the very value the block receives (``v <= level`` bitwise), so the output has no
    reversed pair in floating point either.

    Complexity: ``O(B C log C)`` time for the batched sort plus ``O(B C)`` for the scans, ``O(B C)``
    memory; a few dozen tensor operations, no Python loop, and on accelerators no host-device
    synchronisation (the CPU reads one candidate count to size the ``topk``).

    Args:
        values: ``(B, C)`` float32 or float64 tensor (probabilities or logits: the solver does not care);
            other floating dtypes are solved in float32 and cast back. Entries must be finite.
        primary: ``(B,)`` integer tensor, the label with the largest hard weight.
        secondary: ``(B,)`` integer tensor, the second label or ``-1``.

    Returns:
        ``(B, C)`` tensor of the dtype of ``values``.
    """
    a_index, b_index, has_b = _roles(values, primary, secondary)
    work = values if values.dtype in (torch.float32, torch.float64) else values.float()
    p_a = work.gather(1, a_index[:, None]).squeeze(1)
    p_b = work.gather(1, b_index[:, None]).squeeze(1)  # star rows: b_index == a_index, so p_b == p_a

    # The others alone (the original labels at -inf); of these, only the ones that can be absorbed are
    # sorted, the rest become -inf too, which never passes an absorption test (see _absorption_floor).
    others = work.scatter(1, a_index[:, None], float("-inf")).scatter_(1, b_index[:, None], float("-inf"))
    floor = _absorption_floor(others.amax(dim=1), p_a, p_b)
    others = others.masked_fill_(others < floor[:, None], float("-inf"))
    values_sorted, order = _sorted_candidates(others)
    # prefix[:, j] = cs_j (B, K + 1); the -inf tail makes later sums -inf, which no test or level reads.
    prefix = F.pad(values_sorted.cumsum(dim=1), (1, 0))
    slot = torch.arange(prefix.shape[1], device=work.device)

    k1, k2, level1, level2 = _pool(values_sorted, prefix, slot, p_a, p_b)
    pool_a = has_b & (level1 > p_a)
    absorbed = torch.where(pool_a, k2, k1)
    level = torch.where(pool_a, level2, level1)[:, None]

    # Write back: absorbed others and b get the level, a too when pooled (always in star rows, where
    # b_index == a_index); every other entry, the unsorted -inf ones included, keeps its input value.
    absorbed_slot = slot[None, :-1] < absorbed[:, None]
    out = work.scatter(1, order, torch.where(absorbed_slot, level, work.gather(1, order)))
    out.scatter_(1, b_index[:, None], level)
    out.scatter_(1, a_index[:, None], torch.where((pool_a | ~has_b)[:, None], level, p_a[:, None]))
    return out.to(values.dtype)


def _sorted_candidates(others: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of ``others`` in descending order, ``(values, indices)``, cut after the last finite entry.

    Every row keeps at least one trailing ``-inf`` (a's own slot at least), so the absorption scan always
    finds a failed test. On the CPU the width is cut to the largest candidate count plus one with
    ``topk``, which is much cheaper than a full sort when few labels violate; on other devices the cut
    would need a host synchronisation, so they sort the full rows.
    """
    if others.device.type != "cpu":
        return others.sort(dim=1, descending=True)
    width = int((others > float("-inf")).sum(dim=1).max()) + 1
    return others.topk(min(width, others.shape[1]), dim=1)


def _absorption_floor(top_other: Tensor, p_a: Tensor, p_b: Tensor) -> Tensor:
    """A value below which no other label can be absorbed into a block, per row.

    With ``v = top_other`` the largest other: a phase absorbs ``v`` first and afterwards only values
    above its (rising) mean, so everything ``b``'s block absorbs is ``>= (p_b + v) / 2``. When ``a``
    joins, the block mean is at least ``(p_a + p_b) / 2`` (nothing absorbed before) or
    ``(p_a + p_b + v) / 3`` (at least one absorbed, each with weight on the old mean ``> p_a``). In star
    rows ``p_b == p_a`` and the same formula gives ``p_a`` or more whenever ``v > p_a``, below the star's
    own bound ``(p_a + v) / 2``, so it holds there too. The floor is moved 1% of the way back to
    ``min(p_a, p_b)``, which is always a valid floor, as a margin against rounding in the computed means.
    """
    pair = p_a + p_b
    floor = torch.minimum(torch.minimum(p_b + top_other, pair) / 2, (pair + top_other) / 3)
    return torch.lerp(floor, torch.minimum(p_a, p_b), 0.01)


def _pool(values_sorted: Tensor, prefix: Tensor, slot: Tensor, p_a: Tensor,
          p_b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both pooling phases of :func:`project`: how many sorted others each block absorbs, and its level.

    Phase 1 starts from ``b`` alone (base ``p_b``, size 1), phase 2 from ``a`` and ``b`` plus the ``k1``
    others of phase 1 (base ``p_a + p_b``, size 2). ``means[i, :, j]`` is phase ``i``'s block mean after
    absorbing ``j`` others, and the ``j+1``-th other is absorbed if it exceeds it. The two phases share
    every tensor operation (a leading axis of 2) except the count, which phase 2 needs from phase 1.
    Each level is read from the same ``means`` that the tests used, so the first left-out value is
    ``<=`` its level bitwise. ``slot`` is ``arange(K + 1)``. Returns ``k1, k2, level1, level2``.
    """
    base = torch.stack([p_b, p_a + p_b])[:, :, None]  # (2, B, 1)
    sizes = torch.arange(1, 3, dtype=prefix.dtype, device=prefix.device)[:, None, None] + slot  # (2, 1, K + 1)
    means = (base + prefix) / sizes
    passes = values_sorted > means[..., :-1]  # (2, B, K)
    k1 = _first_failure(passes[0])
    k2 = _first_failure(passes[1] | (slot[:-1] < k1[:, None]))
    levels = means.gather(2, torch.stack([k1, k2])[:, :, None]).squeeze(2)
    return k1, k2, levels[0], levels[1]


def _first_failure(passes: Tensor) -> Tensor:
    """Index of the first ``False`` per row: the length of the leading run of passed tests.

    Every row has a failure: the last sorted slot is always ``-inf`` (``a`` is never an "other").
    """
    return passes.to(torch.uint8).argmin(dim=-1)


def project_loop(values: Tensor, primary: Tensor, secondary: Tensor) -> Tensor:
    """Reference implementation of :func:`project`: a Python loop over samples (for benchmarks and tests).

    Structured like the authors' released code: every row is handled on its own, as a tensor on the
    input's device. The other labels are sorted there (``argsort``), their sorted values are copied to
    the host, and the sequential adapted tree algorithm (Algorithm 1 of the IDA paper, the
    pool-adjacent-violators scheme of IRT-BIN on the IDA tree) scans them in Python float64: grow
    ``b``'s block with a running sum while the next value is above the block mean, pool ``a`` if the
    block mean exceeds ``p_a``, keep growing; the pooled entries are then written back on the device.
    It shares no code with :func:`project`. ``O(C log C)`` per row, sequential over rows, one host copy
    per row.
    """
    _roles(values, primary, secondary)  # the same validation as the batched functions
    out = values.clone()
    for row, a, b in zip(out, primary.tolist(), secondary.tolist()):
        _project_row_(row, a, -1 if b == a else b)
    return out


def _project_row_(row: Tensor, a: int, b: int) -> None:
    """Algorithm 1 on one row ``(C,)``, in place; ``b == -1`` is the star case."""
    originals = [a] if b < 0 else [b, a]
    masked = row.clone()
    masked[originals] = float("-inf")  # the originals sort last and are cut off
    order = masked.argsort(descending=True)[: row.numel() - len(originals)]
    sorted_others = row[order].tolist()
    p_a = row[a].item()
    if b < 0:
        count, total, size = _grow_block(sorted_others, 0, p_a, 1)
        block = [a]
    else:
        count, total, size = _grow_block(sorted_others, 0, row[b].item(), 1)
        block = [b]
        if total / size > p_a:
            count, total, size = _grow_block(sorted_others, count, total + p_a, size + 1)
            block = [b, a]
    row[block] = total / size
    row[order[:count]] = total / size


def _grow_block(sorted_others: list[float], count: int, total: float, size: int) -> tuple[int, float, int]:
    """Absorb the next-largest others while they exceed the block mean ``total / size``.

    ``count`` others are already in the block; returns the updated ``(count, total, size)``.
    """
    while count < len(sorted_others) and sorted_others[count] > total / size:
        total += sorted_others[count]
        size += 1
        count += 1
    return count, total, size


def order_penalty(probs: Tensor, primary: Tensor, secondary: Tensor, reduction: str = "mean") -> Tensor:
    """KD-p's linear-time order penalty (``docs/methods/ida-p.md``).

    With ``G = {a, b}`` (or ``{a}`` when ``secondary == -1``)::

        pen(q) = relu( max_{o not in G} q_o - min_{g in G} q_g ) + relu( q_b - q_a )   (2nd term only if b)

    ``pen(q) == 0`` exactly when ``q`` satisfies the IDA order. KD-p applies it to the student's
    ``softmax(z_S)`` at temperature 1 and averages over the batch. Two masked reductions and a gather:
    ``O(C)`` per row, no sort. Differentiable (subgradients reach the largest other and the smallest
    original label).

    Args:
        probs: ``(B, C)`` distribution (any floating dtype).
        primary, secondary: ``(B,)`` roles as in :func:`project`.
        reduction: ``"mean"`` (batch mean, a scalar) or ``"none"`` (per-sample ``(B,)``).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    a_index, b_index, has_b = _roles(probs, primary, secondary)
    is_original = _original_mask(probs, a_index, b_index)
    min_original = probs.masked_fill(~is_original, float("inf")).amin(dim=1)
    max_other = probs.masked_fill(is_original, float("-inf")).amax(dim=1)
    q_a = probs.gather(1, a_index[:, None]).squeeze(1)
    q_b = probs.gather(1, b_index[:, None]).squeeze(1)  # equals q_a in star rows, so the term is 0
    penalty = F.relu(max_other - min_original) + F.relu(q_b - q_a) * has_b
    return penalty.mean() if reduction == "mean" else penalty


@dataclass(frozen=True)
class ViolationStats:
    """Per-sample order-violation statistics of soft labels, each a ``(B,)`` tensor.

    Attributes:
        kendall_tau: Kendall tau-a over the known-order pairs, ``(concordant - discordant) / known_pairs``.
        discordant_pairs: number of known-order pairs whose soft order is reversed.
        known_pairs: number of known-order pairs (``C-1`` star, ``2C-3`` chain, ``2C-4`` at a ``lam=0.5`` tie).
        has_violation: ``discordant_pairs > 0``.
        top2_hit: an original label is among the two largest soft labels (ties: smaller index first).
        penalty: the KD-p penalty ``pen`` of the soft labels (:func:`order_penalty`); unlike the other
            statistics it depends on the temperature of the soft labels.
    """

    kendall_tau: Tensor
    discordant_pairs: Tensor
    known_pairs: Tensor
    has_violation: Tensor
    top2_hit: Tensor
    penalty: Tensor

    def summary(self) -> dict[str, float]:
        """Batch means: ``samples``, ``kendall_tau``, ``discordant_pairs``, ``violation_rate``,
        ``top2_ratio`` and ``penalty``."""
        return {
            "samples": float(self.kendall_tau.numel()),
            "kendall_tau": self.kendall_tau.double().mean().item(),
            "discordant_pairs": self.discordant_pairs.double().mean().item(),
            "violation_rate": self.has_violation.double().mean().item(),
            "top2_ratio": self.top2_hit.double().mean().item(),
            "penalty": self.penalty.double().mean().item(),
        }

    @classmethod
    def concat(cls, parts: list[ViolationStats]) -> ViolationStats:
        """Join the statistics of several batches (e.g. to summarise a whole dataset)."""
        return cls(**{f.name: torch.cat([getattr(part, f.name) for part in parts]) for f in fields(cls)})


def violation_stats(soft: Tensor, primary: Tensor, secondary: Tensor, lam: Tensor | None = None) -> ViolationStats:
    """Order-violation statistics of soft labels against the hard-label order (the IDA paper's Fig. 1).

    The known-order pairs of a sample are the label pairs with different hard weights: ``(a, o)`` for
    every other label ``o``; in the chain case also ``(b, o)`` and, unless the two original labels have
    equal weight (``lam == 0.5``), ``(a, b)``. Pairs of two other labels are ignored. A known pair
    ``(k, l)`` with ``h_k > h_l`` is concordant if ``p_k > p_l``, discordant if ``p_k < p_l``, and counts
    as neither if tied. ``O(C)`` per row, all rows at once.

    Args:
        soft: ``(B, C)`` soft labels (probabilities or logits; only the order matters except for ``penalty``).
        primary, secondary: ``(B,)`` roles as in :func:`project`.
        lam: optional ``(B,)`` weight of the un-permuted label (``MixedBatch.lam``); only its exact ties
            ``lam == 0.5`` matter (the ``(a, b)`` pair is then not known). ``None``: no ties.
    """
    a_index, b_index, has_b = _roles(soft, primary, secondary)
    is_original = _original_mask(soft, a_index, b_index)
    p_a = soft.gather(1, a_index[:, None])
    p_b = soft.gather(1, b_index[:, None])
    other = ~is_original
    concordant = ((p_a > soft) & other).sum(1) + ((p_b > soft) & other).sum(1) * has_b
    discordant = ((p_a < soft) & other).sum(1) + ((p_b < soft) & other).sum(1) * has_b
    ab_known = has_b if lam is None else has_b & (lam != 0.5)
    concordant = concordant + (ab_known & (p_a > p_b).squeeze(1))
    discordant = discordant + (ab_known & (p_a < p_b).squeeze(1))
    n_others = soft.shape[1] - 1 - has_b.long()
    known = n_others * (1 + has_b.long()) + ab_known.long()
    top2 = (_stable_rank(soft, p_a, a_index) < 2) | (has_b & (_stable_rank(soft, p_b, b_index) < 2))
    return ViolationStats(
        kendall_tau=(concordant - discordant).float() / known.clamp(min=1).float(),
        discordant_pairs=discordant,
        known_pairs=known,
        has_violation=discordant > 0,
        top2_hit=top2,
        penalty=order_penalty(soft, primary, secondary, reduction="none"),
    )


def _stable_rank(soft: Tensor, value: Tensor, index: Tensor) -> Tensor:
    """0-based rank of label ``index`` (value ``value``, shape ``(B, 1)``) in a descending stable sort."""
    before = torch.arange(soft.shape[1], device=soft.device)[None, :] < index[:, None]
    return (soft > value).sum(1) + ((soft == value) & before).sum(1)


class _Roles(NamedTuple):
    a_index: Tensor  # (B,) int64 primary label
    b_index: Tensor  # (B,) int64 secondary label where it exists, else the primary (keeps gathers in range)
    has_b: Tensor  # (B,) bool


def _roles(values: Tensor, primary: Tensor, secondary: Tensor) -> _Roles:
    """Validate shapes and derive the role tensors; ``secondary == primary`` counts as "no secondary"."""
    if values.dim() != 2:
        raise ValueError(f"expected a (B, C) tensor, got shape {tuple(values.shape)}")
    if primary.shape != (values.shape[0],) or secondary.shape != (values.shape[0],):
        raise ValueError(f"primary and secondary must have shape ({values.shape[0]},), "
                         f"got {tuple(primary.shape)} and {tuple(secondary.shape)}")
    primary, secondary = primary.long(), secondary.long()
    has_b = (secondary >= 0) & (secondary != primary)
    b_index = torch.where(has_b, secondary, primary)
    return _Roles(primary, b_index, has_b)


def _original_mask(values: Tensor, a_index: Tensor, b_index: Tensor) -> Tensor:
    """``(B, C)`` bool mask of each row's original labels."""
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    return mask.scatter_(1, a_index[:, None], True).scatter_(1, b_index[:, None], True)
