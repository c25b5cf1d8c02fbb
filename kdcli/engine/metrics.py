"""Evaluation metrics on collected logits: top-1/top-5, NLL, ECE and teacher-student agreement."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.devices import autocast
from kdcli.losses import kl_div


@torch.no_grad()
def predict(model: nn.Module, loader, precision: str = "fp32") -> tuple[Tensor, Tensor, Tensor]:
    """Run ``model`` over an evaluation loader; returns float32 logits, labels and dataset indices (CPU)."""
    model.eval()
    outputs, labels, indices = [], [], []
    for images, target, index, _ in loader:
        with autocast(images.device, precision):
            logits = model(images)
        outputs.append(logits.float().cpu())
        labels.append(target.cpu())
        indices.append(index.cpu())
    return torch.cat(outputs), torch.cat(labels), torch.cat(indices)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Percentage of samples whose label is among the ``k`` highest logits, exact to 4 decimals (counted in
    integers: no float32 noise such as 74.33333396911621)."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return round(100.0 * int(hits.sum()) / max(hits.numel(), 1), 4)


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins, in percent."""
    confidence, prediction = F.softmax(logits.double(), dim=1).max(dim=1)
    correct = (prediction == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    bucket = torch.bucketize(confidence, edges[1:-1], right=True)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(bins):
        inside = bucket == b
        if inside.any():
            ece += inside.double().mean() * (correct[inside].mean() - confidence[inside].mean()).abs()
    return 100.0 * ece.item()


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "nll": F.cross_entropy(logits.double(), labels).item(),
        "ece": expected_calibration_error(logits, labels),
    }


def agreement_metrics(student: Tensor, teacher: Tensor) -> dict[str, float]:
    """Top-1 agreement (%) and mean KL(teacher || student) at T=1 (nats)."""
    log_s = F.log_softmax(student.double(), dim=1)
    log_t = F.log_softmax(teacher.double(), dim=1)
    kl = kl_div(log_s, log_t, log_target=True).mean()
    agree = (student.argmax(1) == teacher.argmax(1)).double().mean()
    return {"agreement": 100.0 * agree.item(), "kl_teacher_student": kl.item()}


def ensemble_logits(logits: list[Tensor]) -> Tensor:
    """Log of the averaged softmax probabilities (so argmax/NLL apply to the ensemble)."""
    stacked = torch.stack([F.log_softmax(x.float(), dim=1) for x in logits])
    return torch.logsumexp(stacked, dim=0) - torch.log(torch.tensor(float(len(logits))))
