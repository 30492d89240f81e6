"""Robustness evaluation: common corruptions (CIFAR-C style), mCE, distribution shift and calibration.

Submodules: corruptions (seeded on-the-fly corruptions), cifar_c (released .npy folders), scores (CE / mCE),
engine (evaluation loops, `robustness_metrics` for sweeps), report (reliability diagram, table, MLflow),
evaluate (what `richkd evaluate` runs; its argparse wiring is richkd.cli.evaluate). Names below load lazily,
so importing this package costs nothing until they are used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CORRUPTION_NAMES": "corruptions", "SEVERITIES": "corruptions", "SEVERITY_PARAMS": "corruptions",
    "CorruptionError": "corruptions", "corrupt": "corruptions", "parse_corruptions": "corruptions",
    "parse_severities": "corruptions",
    "CorruptionFolder": "cifar_c", "CorruptionFolderError": "cifar_c",
    "compare_to_reference": "scores", "corruption_errors": "scores", "relative_corruption_errors": "scores",
    "mean_ce": "scores", "load_reference": "scores", "ReferenceFileError": "scores",
    "EvalResult": "engine", "evaluate_model": "engine", "evaluate_folder": "engine",
    "robustness_metrics": "engine",
    "reliability_bins": "report", "save_reliability_diagram": "report",
    "EvaluateRequest": "evaluate", "evaluate_checkpoint": "evaluate", "class_mapping": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"richkd.robustness.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'richkd.robustness' has no attribute {name!r}")
