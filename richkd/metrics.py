"""Classification metrics: reliability bins (and the expected calibration error they add up to), and a streaming
meter with the confidence categories. The confidence categories are the paper's Fig. 1 (docs/method.md#the-method)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

# the four Fig. 1 categories: name -> (confident, correct)
CATEGORIES = {"confident_correct": (True, True), "uncertain_correct": (False, True),
              "confidently_wrong": (True, False), "uncertain_wrong": (False, False)}


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> dict:
    """Equal-width confidence bins (lo, hi] on [0, 1] of max-probabilities (N,) and correctness (N,): per-bin
    `count`, mean `confidence` and `accuracy` (None when empty), the `edges`, and the `ece` they add up to."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = confidence.detach().double().flatten().cpu()
    if conf.numel() == 0:
        raise ValueError("reliability_bins: no samples")
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    bins = torch.bucketize(conf, edges[1:-1], right=False)      # bin b holds (b/n_bins, (b+1)/n_bins]
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, bins, conf)
    acc_sum = torch.zeros_like(count).index_add_(0, bins, correct.detach().double().flatten().cpu())
    # sum_b |B_b|/n * |acc_b - conf_b| = sum_b |acc_sum_b - conf_sum_b| / n  (empty bins contribute 0)
    return {"n_bins": n_bins, "edges": edges.tolist(), "count": [int(c) for c in count.tolist()],
            "confidence": [s / c if c else None for s, c in zip(conf_sum.tolist(), count.tolist())],
            "accuracy": [s / c if c else None for s, c in zip(acc_sum.tolist(), count.tolist())],
            "ece": float((acc_sum - conf_sum).abs().sum() / conf.numel())}


class ClassificationMeter:
    """Streams evaluation batches; `compute()` gives top1/top5 (%, top-5 clipped to the class count), mean
    cross-entropy `loss`, `ece` (a fraction) and `n`, plus the four categories as `<name>_pct` when
    `confidence_threshold` is given. `update` stays on the logits' device without synchronising and keeps only
    each sample's max probability and correctness (O(n) memory, not O(n * C))."""

    def __init__(self, n_bins: int = 15, confidence_threshold: Optional[float] = None) -> None:
        self.n_bins = n_bins
        self.confidence_threshold = confidence_threshold
        self.reset()

    def reset(self) -> None:
        self._sums: list[torch.Tensor] = []         # (top-1 hits, top-5 hits, summed cross-entropy) per batch
        self._confidence: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []
        self.n = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: logits (B, C) and target (B,)."""
        logits = logits.detach().float()
        target = target.to(logits.device)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(target.view(-1, 1))
        self._sums.append(torch.stack([hit[:, 0].sum().float(), hit.sum().float(),
                                       F.cross_entropy(logits, target, reduction="sum")]))
        confidence, pred = logits.softmax(dim=1).max(dim=1)
        self._confidence.append(confidence)
        self._correct.append(pred.eq(target))
        self.n += logits.shape[0]

    def bins(self) -> dict:
        """The reliability bins of every sample added (a reliability diagram's data)."""
        return reliability_bins(torch.cat(self._confidence), torch.cat(self._correct), self.n_bins)

    def compute(self) -> Dict[str, float]:
        if self.n == 0:
            raise ValueError("ClassificationMeter.compute(): no batches were added (empty evaluation split?)")
        n = self.n
        top1, top5, loss = torch.stack(self._sums).double().sum(0).tolist()
        confidence, correct = torch.cat(self._confidence), torch.cat(self._correct)
        out = {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n,
               "ece": reliability_bins(confidence, correct, self.n_bins)["ece"], "n": n}
        if self.confidence_threshold is not None:
            confident = confidence >= self.confidence_threshold
            out.update({f"{name}_pct": 100.0 * int(((confident == c) & (correct == k)).sum()) / n
                        for name, (c, k) in CATEGORIES.items()})
        return out
