"""Reliability suite: faults (killed trials and drivers, a stopped MLflow server, full or read-only disks, damaged
files, NaN losses) and bad input (fuzzed specs and configs, unsafe YAML and pickles). Real Ray, MLflow and files."""
