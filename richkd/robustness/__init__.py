"""Robustness evaluation: common corruptions (CIFAR-C style), mCE, distribution shift and calibration.

Submodules: corruptions (seeded on-the-fly corruptions, the registry of their names), cifar_c (released .npy
folders), scores (CE / mCE), engine (evaluation loops and the sweep's robustness objectives), report
(reliability diagram, table, MLflow), evaluate (what `richkd evaluate` runs; its argparse is richkd.cli.evaluate).
"""
