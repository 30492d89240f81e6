"""Classification metrics: top-k accuracy, expected calibration error, confidence categories.

The confidence categories are the paper's Fig. 1 (docs/method.md#the-method).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F

__all__ = ["topk_correct", "expected_calibration_error", "confidence_categories", "ClassificationMeter"]

CATEGORIES = ("confident_correct", "uncertain_correct", "confidently_wrong", "uncertain_wrong")


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Iterable[int] = (1, 5)) -> Dict[int, int]:
    """Number of samples whose target is among the top-k scores, per k: ``{k: count}``.

    Args:
        logits: (B, C) scores (logits or probabilities).
        target: (B,) class ids.
        ks: the k values; a k larger than C is clipped to C (then every sample counts as correct), so
            "top-5" stays defined on a 3-class problem. Keys are the k values as given.
    """
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"topk_correct: every k must be >= 1, got {ks}")
    if not ks or logits.shape[0] == 0:
        return {k: 0 for k in ks}
    num_classes = logits.shape[1]
    maxk = min(max(ks), num_classes)
    top = logits.topk(maxk, dim=1).indices                         # (B, maxk)
    hit = top.eq(target.view(-1, 1).to(top.device))               # (B, maxk), at most one True per row
    cum = hit.long().cumsum(dim=1)                                 # (B, maxk): hit within first j+1
    return {k: int(cum[:, min(k, num_classes) - 1].sum()) for k in ks}


def _ece_from_confidence(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> float:
    """ECE from max-probabilities (N,) and correctness (N,); equal-width bins (lo, hi] on [0, 1]."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    n = confidence.numel()
    if n == 0:
        raise ValueError("expected_calibration_error: no samples")
    conf = confidence.detach().double().flatten()
    acc = correct.detach().double().flatten()
    inner = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=conf.device)[1:-1]
    bins = torch.bucketize(conf, inner, right=False)              # bin b holds (b/n_bins, (b+1)/n_bins]
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, bins, conf)
    acc_sum = torch.zeros_like(count).index_add_(0, bins, acc)
    # sum_b |B_b|/n * |acc_b - conf_b| = sum_b |acc_sum_b - conf_sum_b| / n  (empty bins contribute 0)
    return float((acc_sum - conf_sum).abs().sum() / n)


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error in [0, 1] (a fraction, not a percentage).

    Args:
        probs: (N, C) class probabilities (softmax outputs).
        target: (N,) class ids.
        n_bins: number of equal-width confidence bins on [0, 1] (Guo et al. 2017 use 15).

    ``ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` where a sample's confidence is its max probability and
    bin b holds confidences in ``(b/n_bins, (b+1)/n_bins]``.
    """
    confidence, pred = probs.max(dim=1)
    return _ece_from_confidence(confidence, pred.eq(target.to(pred.device)), n_bins)


def confidence_categories(probs: torch.Tensor, target: torch.Tensor, threshold: float) -> Dict[str, int]:
    """Counts of the four Fig. 1 categories (docs/method.md#the-method): correct/wrong x confident/uncertain.

    A prediction (argmax) is confident when its max probability is ``>= threshold``.
    Returns ``{"confident_correct", "uncertain_correct", "confidently_wrong", "uncertain_wrong"}`` counts.
    """
    confidence, pred = probs.max(dim=1)
    correct = pred.eq(target.to(pred.device))
    confident = confidence >= threshold
    return _category_counts(confident, correct)


def _category_counts(confident: torch.Tensor, correct: torch.Tensor) -> Dict[str, int]:
    return {
        "confident_correct": int((confident & correct).sum()),
        "uncertain_correct": int((~confident & correct).sum()),
        "confidently_wrong": int((confident & ~correct).sum()),
        "uncertain_wrong": int((~confident & ~correct).sum()),
    }


class ClassificationMeter:
    """Streams evaluation batches and computes top-1/top-5 (%), mean cross-entropy, ECE and categories.

    ``update(logits, target)`` stays on the logits' device and does not synchronise; ``compute()`` returns
    ``{"top1", "top5", "loss", "ece", "n"}`` (top-k in 0..100, ``loss`` = mean CE, ``ece`` a fraction) and,
    when ``confidence_threshold`` is given, the four ``confidence_categories`` as percentages of n with a
    ``_pct`` suffix (e.g. ``confidently_wrong_pct``). Only the max probability and correctness are kept per
    sample, so memory is O(n), not O(n * C).
    """

    def __init__(self, n_bins: int = 15, confidence_threshold: Optional[float] = None) -> None:
        self.n_bins = n_bins
        self.confidence_threshold = confidence_threshold
        self.reset()

    def reset(self) -> None:
        self._top1: list[torch.Tensor] = []
        self._top5: list[torch.Tensor] = []
        self._loss: list[torch.Tensor] = []
        self._confidence: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []
        self._n = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: logits (B, C) and target (B,)."""
        logits = logits.detach().float()
        target = target.to(logits.device)
        num_classes = logits.shape[1]
        top = logits.topk(min(5, num_classes), dim=1).indices
        hit = top.eq(target.view(-1, 1))
        self._top1.append(hit[:, 0].sum())
        self._top5.append(hit.sum())
        self._loss.append(F.cross_entropy(logits, target, reduction="sum"))
        confidence, pred = logits.softmax(dim=1).max(dim=1)
        self._confidence.append(confidence)
        self._correct.append(pred.eq(target))
        self._n += logits.shape[0]

    def compute(self) -> Dict[str, float]:
        if self._n == 0:
            raise ValueError("ClassificationMeter.compute(): no batches were added (empty evaluation split?)")
        n = self._n
        confidence = torch.cat(self._confidence)
        correct = torch.cat(self._correct)
        out = {
            "top1": 100.0 * float(torch.stack(self._top1).sum()) / n,
            "top5": 100.0 * float(torch.stack(self._top5).sum()) / n,
            "loss": float(torch.stack(self._loss).sum()) / n,
            "ece": _ece_from_confidence(confidence, correct, self.n_bins),
            "n": n,
        }
        if self.confidence_threshold is not None:
            counts = _category_counts(confidence >= self.confidence_threshold, correct)
            out.update({f"{name}_pct": 100.0 * counts[name] / n for name in CATEGORIES})
        return out
