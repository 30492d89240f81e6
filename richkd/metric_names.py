"""Every metric a trial reports that a sweep can optimise, with the direction that is better.

One registry, read by the sweep spec (objective names and modes), the Pareto export and the report figures.
Light at import: the sweep spec loader reads it before anything heavy is imported.
"""
from __future__ import annotations

VAL_CORRUPT_TOP1 = "val_corrupt_top1"     # mean top-1 (%) over the configured corruption x severity grid
VAL_CORRUPT_ECE = "val_corrupt_ece"       # mean ECE over the same grid
PER_CORRUPTION_PREFIX = "val_corrupt_top1_"  # + corruption name: its mean top-1 over the severities

# metric -> better direction; every key here needs `robustness.enabled` in the trial config
ROBUSTNESS_METRICS = {VAL_CORRUPT_TOP1: "max", VAL_CORRUPT_ECE: "min"}

# Metrics the trainer reports every epoch (richkd.trainer.Run.train); a sweep objective must be one of them.
KNOWN_METRICS = {"val_top1": "max", "val_top5": "max", "best_val_top1": "max", "val_loss": "min",
                 "val_ece": "min", "train_loss": "min", **ROBUSTNESS_METRICS}


def direction(metric: str, default: str = "max") -> str:
    """'max' or 'min' for a known metric (per-corruption accuracies are maximised), else `default`."""
    return "max" if metric.startswith(PER_CORRUPTION_PREFIX) else KNOWN_METRICS.get(metric, default)


def per_corruption(metric: str) -> str:
    """The corruption a `val_corrupt_top1_<corruption>` metric names, else ''."""
    return metric[len(PER_CORRUPTION_PREFIX):] if metric.startswith(PER_CORRUPTION_PREFIX) else ""


def is_reported(metric: str) -> bool:
    """Is `metric` reported every epoch: a KNOWN_METRICS name or a per-corruption accuracy (whose corruption must
    also be in the run's robustness.corruptions; the sweep spec checks that against its base config)."""
    return metric in KNOWN_METRICS or bool(per_corruption(metric))


def needs_robustness(metric: str) -> bool:
    """Is `metric` computed only with robustness.enabled (the robustness metrics and the per-corruption ones)?"""
    return metric in ROBUSTNESS_METRICS or bool(per_corruption(metric))
