"""Mixture-based batch augmentation (mixup, CutMix) that keeps track of where every mixed sample came from.

Sample ``i`` of a batch is mixed with its partner ``j = partner[i]`` (a random permutation of the
batch, so ``j == i`` can happen) with weight ``lam[i]`` on ``x_i``:

* mixup (Zhang et al., 2018):  ``x~ = lam * x_i + (1 - lam) * x_j``;
* CutMix (Yun et al., 2019):   ``x~ = x_i`` with a box pasted from ``x_j``; ``lam`` is re-computed
  after clipping the box to the image as the fraction of ``x_i``'s pixels that remain.

The hard label is ``h = lam * e(y_i) + (1 - lam) * e(y_j)``. For isotonic data augmentation
(``docs/methods/ida.md``; see :mod:`kdcli.isotonic`) every mixed sample also gets its label *roles*:

* ``primary``: the original label with the larger hard weight (``y_i`` if ``lam >= 0.5``, else ``y_j``;
  an exact tie ``lam == 0.5`` goes to ``y_i``, the un-permuted sample);
* ``secondary``: the other original label, or ``-1`` when ``h`` is one-hot (same class, or
  ``lam`` in ``{0, 1}``).

``lam`` is drawn from ``Beta(alpha, alpha)``: once per batch (as the common implementations do) or once
per sample (``per_sample=True``). All randomness comes from the CPU ``torch.Generator`` passed in and
is drawn on the CPU, so a given generator state gives the same partners, ``lam`` and boxes on CPU and GPU,
and training resumes exactly when the generator state is restored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcli.errors import UserError

MIX_KINDS = ("none", "mixup", "cutmix")


@dataclass(frozen=True)
class MixedBatch:
    """A mixed batch and its provenance; every per-sample field has shape ``(B,)`` on the images' device.

    Attributes:
        images: the mixed images, same shape and dtype as the input.
        labels_a: ``y_i``, the labels of the un-permuted samples (the input labels).
        labels_b: ``y_j = labels[partner]``, the labels of the pasted / blended partners.
        partner: the partner index ``j`` of each sample (``labels_b == labels_a[partner]``).
        lam: float32 weight of ``labels_a``; for CutMix the kept-area fraction after box clipping.
        primary: the label with the larger hard weight (tie ``lam == 0.5`` -> ``labels_a``).
        secondary: the other label, or ``-1`` when the hard label is one-hot.
    """

    images: Tensor
    labels_a: Tensor
    labels_b: Tensor
    partner: Tensor
    lam: Tensor
    primary: Tensor
    secondary: Tensor

    def hard_targets(self, num_classes: int) -> Tensor:
        """The mixed one-hot targets ``h = lam * e(y_a) + (1 - lam) * e(y_b)``, shape ``(B, num_classes)``."""
        lam = self.lam[:, None]
        one_hot_a = F.one_hot(self.labels_a, num_classes).to(lam.dtype)
        one_hot_b = F.one_hot(self.labels_b, num_classes).to(lam.dtype)
        return lam * one_hot_a + (1.0 - lam) * one_hot_b

    def mixed_ce(self, logits: Tensor) -> Tensor:
        """Mixed cross-entropy ``mean_n [lam_n * CE(z_n, y_a,n) + (1 - lam_n) * CE(z_n, y_b,n)]``.

        Computed in float32 from ``log_softmax`` so that it is stable for bf16 logits.
        """
        log_probs = F.log_softmax(logits.float(), dim=1)
        ce_a = -log_probs.gather(1, self.labels_a[:, None]).squeeze(1)
        ce_b = -log_probs.gather(1, self.labels_b[:, None]).squeeze(1)
        return (self.lam * ce_a + (1.0 - self.lam) * ce_b).mean()


def label_roles(labels_a: Tensor, labels_b: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """IDA label roles ``(primary, secondary)`` of mixed samples (``docs/methods/ida.md``).

    ``primary`` is ``labels_a`` where ``lam >= 0.5`` (ties go to the un-permuted sample) and ``labels_b``
    otherwise; ``secondary`` is the other label, or ``-1`` where the classes coincide or ``lam`` is
    0 or 1 (the hard label is one-hot, so there is no second known rank).
    """
    a_first = lam >= 0.5
    primary = torch.where(a_first, labels_a, labels_b)
    secondary = torch.where(a_first, labels_b, labels_a)
    one_hot = (labels_a == labels_b) | (lam <= 0.0) | (lam >= 1.0)
    return primary, torch.where(one_hot, torch.full_like(secondary, -1), secondary)


def mixup(images: Tensor, labels: Tensor, alpha: float, generator: torch.Generator,
          per_sample: bool = False) -> MixedBatch:
    """mixup: ``x~_i = lam_i * x_i + (1 - lam_i) * x_partner(i)`` with ``lam ~ Beta(alpha, alpha)``.

    Args:
        images: floating tensor ``(B, ...)``.
        labels: class indices ``(B,)``.
        alpha: Beta concentration, ``> 0`` (1.0 gives a uniform ``lam``).
        generator: CPU generator supplying all randomness.
        per_sample: one ``lam`` per sample instead of one per batch.
    """
    batch = images.shape[0]
    partner = _draw_partner(batch, alpha, generator)
    lam = _beta(alpha, batch if per_sample else 1, generator).float().expand(batch).contiguous()
    partner, lam = partner.to(images.device), lam.to(images.device)
    weight = lam.to(images.dtype).view(-1, *([1] * (images.dim() - 1)))
    mixed = weight * images + (1.0 - weight) * images[partner]
    return _assemble(mixed, labels, partner, lam)


def cutmix(images: Tensor, labels: Tensor, alpha: float, generator: torch.Generator,
           per_sample: bool = False) -> MixedBatch:
    """CutMix: paste a box of ``x_partner(i)`` into ``x_i``; ``lam`` is the kept fraction of ``x_i``.

    The box follows the common implementation: ``lam0 ~ Beta(alpha, alpha)``, box side
    ``int(H * sqrt(1 - lam0))`` by ``int(W * sqrt(1 - lam0))`` centred at a uniform pixel, clipped to the
    image. The returned ``lam = 1 - clipped_box_area / (H * W)`` is exact. With ``per_sample=False`` one
    box (and one ``lam``) serves the whole batch; with ``per_sample=True`` each sample gets its own.

    Args:
        images: tensor ``(B, C, H, W)`` of any dtype.
        labels: class indices ``(B,)``.
        alpha: Beta concentration, ``> 0``.
        generator: CPU generator supplying all randomness.
        per_sample: one box per sample instead of one per batch.
    """
    if images.dim() != 4:
        raise ValueError(f"cutmix expects images of shape (B, C, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    partner = _draw_partner(batch, alpha, generator)
    lam0 = _beta(alpha, batch if per_sample else 1, generator)
    rows, cols = (t.expand(batch, 2) for t in _draw_boxes(lam0, height, width, generator))
    kept = height * width - (rows[:, 1] - rows[:, 0]) * (cols[:, 1] - cols[:, 0])
    lam = (kept.double() / (height * width)).float()  # one rounding: exact 0.5 ties stay exact
    partner, rows, cols, lam = (t.to(images.device) for t in (partner, rows, cols, lam))
    row_ids = torch.arange(height, device=images.device)[None, :, None]
    col_ids = torch.arange(width, device=images.device)[None, None, :]
    in_box = ((row_ids >= rows[:, 0, None, None]) & (row_ids < rows[:, 1, None, None])
              & (col_ids >= cols[:, 0, None, None]) & (col_ids < cols[:, 1, None, None]))
    mixed = torch.where(in_box[:, None], images[partner], images)
    return _assemble(mixed, labels, partner, lam)


def mix(kind: str, images: Tensor, labels: Tensor, alpha: float, generator: torch.Generator,
        per_sample: bool = False) -> MixedBatch:
    """Dispatch to :func:`mixup` or :func:`cutmix`; ``kind='none'`` returns the batch un-mixed.

    For ``'none'`` the images are returned as they are (same tensor), ``partner`` is the identity,
    ``lam`` is 1, ``primary`` is the label and ``secondary`` is ``-1``; no randomness is consumed.
    """
    if kind == "mixup":
        return mixup(images, labels, alpha, generator, per_sample)
    if kind == "cutmix":
        return cutmix(images, labels, alpha, generator, per_sample)
    if kind == "none":
        identity = torch.arange(images.shape[0], device=images.device)
        return _assemble(images, labels, identity,
                         torch.ones(images.shape[0], dtype=torch.float32, device=images.device))
    raise UserError(f"unknown augmentation mix {kind!r}; choose one of {', '.join(MIX_KINDS)}")


def _assemble(mixed: Tensor, labels: Tensor, partner: Tensor, lam: Tensor) -> MixedBatch:
    labels_b = labels[partner]
    primary, secondary = label_roles(labels, labels_b, lam)
    return MixedBatch(images=mixed, labels_a=labels, labels_b=labels_b, partner=partner, lam=lam,
                      primary=primary, secondary=secondary)


def _draw_partner(batch: int, alpha: float, generator: torch.Generator) -> Tensor:
    """Validate the mixing arguments and draw the partner permutation (CPU)."""
    if not alpha > 0:
        raise UserError(f"mixing alpha must be > 0 (Beta(alpha, alpha)), got {alpha}; 1.0 gives uniform lam")
    if generator.device.type != "cpu":
        raise ValueError("mixing needs a CPU torch.Generator so that results do not depend on the device")
    return torch.randperm(batch, generator=generator)


def _beta(alpha: float, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of ``Beta(alpha, alpha)`` in float64.

    torch's Beta sampler takes no generator, so a seed is drawn from ``generator`` and numpy's sampler
    (robust for small ``alpha``) does the rest: the draws are still a pure function of the generator state.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=count))


def _draw_boxes(lam0: Tensor, height: int, width: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Clipped CutMix boxes of target area ``(1 - lam0) * H * W``, one per ``lam0`` entry.

    Returns the row and the column ``[start, stop)`` pairs, each of shape ``(len(lam0), 2)``.
    """
    count = lam0.numel()
    centre_row = torch.randint(0, height, (count,), generator=generator)
    centre_col = torch.randint(0, width, (count,), generator=generator)
    side = torch.sqrt(1.0 - lam0)
    half_h = (height * side).long() // 2
    half_w = (width * side).long() // 2
    rows = torch.stack([centre_row - half_h, centre_row + half_h], dim=1).clamp(0, height)
    cols = torch.stack([centre_col - half_w, centre_col + half_w], dim=1).clamp(0, width)
    return rows, cols
