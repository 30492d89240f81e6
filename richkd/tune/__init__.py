"""The sweep layer: search-space specs, sweeps on Ray Tune, and what is done with a sweep. Its operations:

    load_spec, load_specs           read and check a spec file (one sweep; or one per arm of `arms:`)
    run_sweep, resume_sweep         run a spec's sweep on Ray Tune; continue an interrupted one
    run_arms, finalize_arms         the arms of a fair comparison: their sweeps; their bests re-trained, compared
    write_group_page                the arms' page over their reports (richkd report on a group)
    load_sweep, read_sweep_record   a sweep read back: spec, record, trials ranked as every command ranks them
    export_sweep                    best_config.yaml, leaderboard.csv, the Pareto front
    finalize_sweep                  the top configs re-trained over seeds and tested
    build_table, table_from_sweep, read_table, replay_many, load_warm_start    measuring the search (docs/search.md)
    stop_signals                    Ctrl-C and SIGTERM during any of them
    describe_*                      what each command prints

The rule: an operation that reads or writes a sweep lives here, and every `richkd` command calls one of these
names (richkd/cli/sweep.py, search.py, report.py); the HTML report draws a sweep read with `load_sweep` and is an
application above this layer (richkd.report). Importing `richkd.tune` is light: each name loads its module, and
with it Ray, Optuna or MLflow, on first use.
"""
from __future__ import annotations

import importlib

_HOMES = {
    "spec": ("load_spec", "load_specs"),
    "runner": ("run_sweep", "resume_sweep", "build_table"),
    "arms": ("run_arms", "finalize_arms", "read_group", "group_for", "describe_comparison", "write_group_page"),
    "results": ("load_sweep", "read_sweep_record", "sweep_record_exists"),
    "export": ("export_sweep", "describe_export"),
    "finalize": ("finalize_sweep", "describe_finalize"),
    "table": ("table_from_sweep", "read_table"),
    "replay": ("replay_many", "describe_replays"),
    "warm_start": ("load_warm_start",),
    "outcome": ("describe_outcome",),
    "paths": ("sweep_ref",),
    "session": ("stop_signals",),
}
_MODULE = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str):
    if name not in _MODULE:
        raise AttributeError(f"module 'richkd.tune' has no attribute {name!r}")
    return getattr(importlib.import_module(f"richkd.tune.{_MODULE[name]}"), name)
