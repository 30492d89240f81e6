"""Robustness evaluation: common corruptions (CIFAR-C style), mCE, distribution shift and calibration; the
submodules' layers are in docs/architecture.md."""
