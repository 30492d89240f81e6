"""Validation-split corruption metrics reported by the trainer at evaluation time (sweep objectives).

Light at import (torch loads inside the function), so the sweep spec loader can read the metric names.
Only the validation split is used: these metrics select models, and the test split never does.
"""
from __future__ import annotations

from richkd.metric_names import PER_CORRUPTION_PREFIX, ROBUSTNESS_METRICS, VAL_CORRUPT_ECE, VAL_CORRUPT_TOP1

__all__ = ["PER_CORRUPTION_PREFIX", "ROBUSTNESS_METRICS", "VAL_CORRUPT_ECE", "VAL_CORRUPT_TOP1",
           "val_robustness_metrics"]


def val_robustness_metrics(model, dataset, mean, std, device, rcfg, batch_size: int = 256) -> dict:
    """{val_corrupt_top1, val_corrupt_ece, val_corrupt_top1_<name>...} of `model` on the validation `dataset`.

    rcfg: richkd.config.RobustnessEvalConfig. Reuses richkd.robustness.engine.robustness_metrics, so the
    images, subset and noise are the ones `richkd evaluate` would use for the same seed, and the value is
    identical at every epoch and in every trial for the same weights. The model's train/eval mode is restored.
    """
    from richkd.robustness.engine import robustness_metrics

    out = robustness_metrics(model, dataset, mean, std, device, corruptions=list(rcfg.corruptions),
                             severities=list(rcfg.severities), seed=rcfg.seed, max_samples=rcfg.max_samples,
                             batch_size=batch_size)
    metrics = {VAL_CORRUPT_TOP1: out["corruption_top1"], VAL_CORRUPT_ECE: out["corruption_ece"]}
    for name in rcfg.corruptions:
        metrics[PER_CORRUPTION_PREFIX + name] = out[f"corruption_top1/{name}"]
    return metrics
