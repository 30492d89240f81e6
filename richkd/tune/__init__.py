"""The sweep layer: search-space specs, sweeps on Ray Tune, and what is done with a sweep. The rule: an operation
that reads or writes a sweep lives here, and every `richkd` command calls one of the names below (richkd/cli/sweep.py,
search.py, report.py); the HTML report draws a sweep read with `load_sweep` and is an application above this layer
(richkd.report). Importing `richkd.tune` is light: each name loads its module, and with it Ray, Optuna or MLflow, on
first use. `describe_*`: what each command prints."""
from __future__ import annotations

from richkd.registry import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "spec": ("load_spec", "load_specs"),                            # a spec file read and checked (or one per arm)
    "runner": ("run_sweep", "resume_sweep", "build_table"),         # a sweep on Ray Tune; a learning-curve table
    "arms": ("run_arms", "finalize_arms", "read_group", "group_for", "describe_comparison",
             "write_group_page"),                                   # a fair comparison's sweeps, finalists and page
    "results": ("load_sweep", "read_sweep_record", "sweep_record_exists"),   # a sweep read back, trials ranked
    "export": ("export_sweep", "describe_export"),                  # best_config.yaml, leaderboard, Pareto front
    "finalize": ("finalize_sweep", "describe_finalize"),            # the top configs re-trained over seeds, tested
    "table": ("table_from_sweep", "read_table"),                    # measuring the search (docs/search.md)
    "replay": ("replay_many", "describe_replays"),
    "warm_start": ("load_warm_start",),
    "outcome": ("describe_outcome",),
    "paths": ("sweep_ref",),
    "session": ("stop_signals",),                                   # Ctrl-C and SIGTERM during any of them
})
