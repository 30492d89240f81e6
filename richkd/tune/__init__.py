"""Hyperparameter sweeps on Ray Tune: search-space specs, the trial function, the runner and MLflow tracking.

This is the only package that imports ray. Importing `richkd.tune` itself is light: ray, optuna and mlflow
load inside the modules that need them (runner, search, trainable, mlflow_callback).
"""
