"""Tests of kdcli.augment: mixup / CutMix with provenance and IDA label roles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcli.augment import MixedBatch, cutmix, label_roles, mix, mixup
from kdcli.errors import UserError


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def provenance_images(batch: int, size: int) -> torch.Tensor:
    """Image i is the constant i + 1, so every mixed pixel tells which sample it came from."""
    return (torch.arange(batch, dtype=torch.float32) + 1).view(-1, 1, 1, 1).expand(batch, 3, size, size).clone()


# --------------------------------------------------------------------------------------------------
# mixup
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_blends_with_recorded_partner_and_lam(per_sample: bool) -> None:
    images = torch.randn(64, 3, 4, 4, generator=generator(1))
    labels = torch.randint(0, 10, (64,), generator=generator(2))
    out = mixup(images, labels, alpha=1.0, generator=generator(3), per_sample=per_sample)
    assert sorted(out.partner.tolist()) == list(range(64))
    assert torch.equal(out.labels_a, labels) and torch.equal(out.labels_b, labels[out.partner])
    assert out.lam.dtype == torch.float32 and out.lam.shape == (64,)
    assert ((out.lam >= 0) & (out.lam <= 1)).all()
    assert (out.lam.unique().numel() == 1) != per_sample
    lam = out.lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(out.images, lam * images + (1 - lam) * images[out.partner])


def test_beta_concentration_shapes_lam() -> None:
    labels = torch.zeros(4000, dtype=torch.long)
    images = torch.zeros(4000, 1)
    uniform = mixup(images, labels, alpha=1.0, generator=generator(), per_sample=True).lam
    u_shaped = mixup(images, labels, alpha=0.2, generator=generator(), per_sample=True).lam
    assert abs(uniform.mean().item() - 0.5) < 0.02 and abs(u_shaped.mean().item() - 0.5) < 0.03
    inner = ((uniform > 0.1) & (uniform < 0.9)).float().mean().item()
    inner_u = ((u_shaped > 0.1) & (u_shaped < 0.9)).float().mean().item()
    assert abs(inner - 0.8) < 0.03  # Beta(1, 1) is uniform
    assert inner_u < 0.45  # Beta(0.2, 0.2) piles up near 0 and 1 (exact value ~0.35)


# --------------------------------------------------------------------------------------------------
# CutMix
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_lam_is_the_kept_pixel_fraction_after_clipping(per_sample: bool) -> None:
    batch, size = 256, 8
    images = provenance_images(batch, size)
    out = cutmix(images, torch.arange(batch), alpha=1.0, generator=generator(5), per_sample=per_sample)
    pasted = out.images[:, 0] == (out.partner + 1).view(-1, 1, 1).float()  # (B, H, W)
    kept = out.images[:, 0] == (torch.arange(batch) + 1).view(-1, 1, 1).float()
    assert torch.equal(pasted | kept, torch.ones_like(pasted))  # every pixel from one of the two
    moved = out.partner != torch.arange(batch)
    area = pasted[moved].sum((1, 2)).double()
    assert torch.equal(out.lam[moved], (1 - area / size**2).float())
    # the pasted region is one axis-aligned rectangle: the product of its row and column spans
    rows, cols = pasted.any(2), pasted.any(1)
    assert torch.equal(pasted[moved], (rows[:, :, None] & cols[:, None, :])[moved])
    if per_sample:
        assert out.lam.unique().numel() > 10
        assert (out.lam == 1).any()  # tiny boxes round to empty ...
        assert (out.secondary[out.lam == 1] == -1).all()  # ... and leave a one-hot label
        assert (out.lam < 0.5).any() and (out.lam > 0.5).any()
    else:
        assert out.lam.unique().numel() == 1
        assert torch.equal(pasted[moved], pasted[moved][:1].expand_as(pasted[moved]))  # one shared box


def test_cutmix_boxes_get_clipped_at_the_border() -> None:
    batch, size = 512, 8
    out = cutmix(provenance_images(batch, size), torch.arange(batch), alpha=1.0, generator=generator(8),
                 per_sample=True)
    pasted = out.images[:, 0] == (out.partner + 1).view(-1, 1, 1).float()
    touches_border = pasted[:, 0, :].any(1) | pasted[:, -1, :].any(1) | pasted[:, :, 0].any(1) | pasted[:, :, -1].any(1)
    moved = out.partner != torch.arange(batch)
    assert (touches_border & moved).float().mean() > 0.3
    # an unclipped box has even sides (2 * half); clipped ones are what make odd sides possible
    heights = pasted.any(2).sum(1)
    assert (heights[moved] % 2 == 1).any()


def test_cutmix_box_follows_the_reference_rule() -> None:
    """Replay the documented draws: partner permutation, a Beta seed, then the box centres; the box is
    ``[c - int(S * sqrt(1 - lam0)) // 2, c + int(S * sqrt(1 - lam0)) // 2)`` clipped to the image."""
    batch, height, width = 64, 12, 20
    gen = generator(21)
    state = gen.get_state()
    out = cutmix(provenance_images(batch, 1).expand(batch, 3, height, width), torch.arange(batch), alpha=0.7,
                 generator=gen, per_sample=True)
    gen.set_state(state)
    partner = torch.randperm(batch, generator=gen)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    lam0 = np.random.default_rng(seed).beta(0.7, 0.7, size=batch)
    centre_row = torch.randint(0, height, (batch,), generator=gen)
    centre_col = torch.randint(0, width, (batch,), generator=gen)
    assert torch.equal(out.partner, partner)
    for i in range(batch):
        half_h, half_w = int(height * np.sqrt(1 - lam0[i])) // 2, int(width * np.sqrt(1 - lam0[i])) // 2
        r0, r1 = np.clip([centre_row[i] - half_h, centre_row[i] + half_h], 0, height)
        c0, c1 = np.clip([centre_col[i] - half_w, centre_col[i] + half_w], 0, width)
        assert out.lam[i].item() == pytest.approx(1 - (r1 - r0) * (c1 - c0) / (height * width), abs=1e-7)
        if partner[i] != i:
            expected = torch.zeros(height, width, dtype=torch.bool)
            expected[r0:r1, c0:c1] = True
            assert torch.equal(out.images[i, 0] == partner[i] + 1, expected)


def test_cutmix_rejects_non_image_batches() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        cutmix(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), alpha=1.0, generator=generator())


# --------------------------------------------------------------------------------------------------
# Roles, targets, losses
# --------------------------------------------------------------------------------------------------

def test_label_roles_rules() -> None:
    labels_a = torch.tensor([3, 3, 3, 3, 3, 5])
    labels_b = torch.tensor([7, 7, 7, 7, 7, 5])
    lam = torch.tensor([0.7, 0.3, 0.5, 0.0, 1.0, 0.6])
    primary, secondary = label_roles(labels_a, labels_b, lam)
    assert primary.tolist() == [3, 7, 3, 7, 3, 5]  # larger weight; the 0.5 tie goes to labels_a
    assert secondary.tolist() == [7, 3, 7, -1, -1, -1]  # lam in {0, 1} and same class: one-hot


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_batch_roles_follow_lam(kind: str) -> None:
    labels = torch.randint(0, 5, (128,), generator=generator(4))
    out = mix(kind, torch.randn(128, 3, 8, 8, generator=generator(6)), labels, alpha=1.0,
              generator=generator(7), per_sample=True)
    expected_primary = torch.where(out.lam >= 0.5, out.labels_a, out.labels_b)
    assert torch.equal(out.primary, expected_primary)
    same = out.labels_a == out.labels_b
    assert same.any() and (out.secondary[same] == -1).all()
    distinct = ~same & (out.lam > 0) & (out.lam < 1)
    assert torch.equal(out.secondary[distinct], torch.where(out.lam >= 0.5, out.labels_b, out.labels_a)[distinct])


def test_hard_targets_and_mixed_cross_entropy() -> None:
    labels = torch.tensor([0, 1, 2, 2])
    batch = MixedBatch(images=torch.zeros(4, 1), labels_a=labels, labels_b=torch.tensor([1, 1, 0, 3]),
                       partner=torch.tensor([1, 0, 2, 3]), lam=torch.tensor([0.75, 0.4, 1.0, 0.5]),
                       primary=torch.tensor([0, 1, 2, 2]), secondary=torch.tensor([1, -1, -1, 3]))
    targets = batch.hard_targets(4)
    expected = torch.tensor([[0.75, 0.25, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.5, 0.5]])
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    logits = torch.randn(4, 4, generator=generator(9))
    manual = (batch.lam * F.cross_entropy(logits, batch.labels_a, reduction="none")
              + (1 - batch.lam) * F.cross_entropy(logits, batch.labels_b, reduction="none")).mean()
    torch.testing.assert_close(batch.mixed_ce(logits), manual)
    soft_ce = -(targets * F.log_softmax(logits, 1)).sum(1).mean()  # the same loss as a soft-target CE
    torch.testing.assert_close(batch.mixed_ce(logits), soft_ce)
    bf16 = batch.mixed_ce(logits.bfloat16())
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, batch.mixed_ce(logits.bfloat16().float()))


def test_random_batch_hard_targets_sum_to_one() -> None:
    labels = torch.randint(0, 10, (64,), generator=generator(1))
    for kind in ("mixup", "cutmix", "none"):
        out = mix(kind, torch.randn(64, 3, 8, 8), labels, alpha=0.4, generator=generator(2), per_sample=True)
        targets = out.hard_targets(10)
        torch.testing.assert_close(targets.sum(1), torch.ones(64))
        assert torch.equal(targets.argmax(1)[out.lam != 0.5], out.primary[out.lam != 0.5])


# --------------------------------------------------------------------------------------------------
# Dispatcher, determinism, errors
# --------------------------------------------------------------------------------------------------

def test_none_is_a_passthrough_that_consumes_no_randomness() -> None:
    images, labels = torch.randn(8, 3, 4, 4), torch.arange(8) % 3
    gen = generator(11)
    state = gen.get_state()
    out = mix("none", images, labels, alpha=1.0, generator=gen)
    assert out.images is images
    assert torch.equal(out.labels_b, labels) and torch.equal(out.partner, torch.arange(8))
    assert torch.equal(out.lam, torch.ones(8)) and torch.equal(out.primary, labels)
    assert torch.equal(out.secondary, torch.full((8,), -1))
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_results_are_a_function_of_the_generator_state(kind: str, per_sample: bool) -> None:
    images, labels = torch.randn(32, 3, 8, 8, generator=generator(1)), torch.arange(32) % 7
    gen = generator(12)
    state = gen.get_state()
    first = mix(kind, images, labels, alpha=1.0, generator=gen, per_sample=per_sample)
    second = mix(kind, images, labels, alpha=1.0, generator=gen, per_sample=per_sample)
    gen.set_state(state)  # resuming from a saved state replays the same batch
    replay = mix(kind, images, labels, alpha=1.0, generator=gen, per_sample=per_sample)
    for name in ("images", "partner", "lam", "primary", "secondary"):
        assert torch.equal(getattr(first, name), getattr(replay, name))
    assert not torch.equal(first.lam, second.lam)


def test_invalid_arguments() -> None:
    images, labels = torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserError, match="unknown augmentation mix 'mixupp'"):
        mix("mixupp", images, labels, alpha=1.0, generator=generator())
    for kind in ("mixup", "cutmix"):
        with pytest.raises(UserError, match="alpha must be > 0"):
            mix(kind, images, labels, alpha=0.0, generator=generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_cuda_batches_use_the_same_draws_as_cpu(kind: str) -> None:
    images, labels = torch.randn(32, 3, 8, 8, generator=generator(1)), torch.arange(32) % 7
    on_cpu = mix(kind, images, labels, alpha=1.0, generator=generator(3), per_sample=True)
    on_gpu = mix(kind, images.cuda(), labels.cuda(), alpha=1.0, generator=generator(3), per_sample=True)
    for name in ("partner", "lam", "primary", "secondary"):
        assert torch.equal(getattr(on_gpu, name).cpu(), getattr(on_cpu, name))
    torch.testing.assert_close(on_gpu.images.cpu(), on_cpu.images)
