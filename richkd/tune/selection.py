"""Reading a sweep back and choosing from it: the trials ranked, the best one, the Pareto front.

Selection (docs/method.md, "What a sweep should search"): only trials that reached max_t (ASHA survivors)
compete, ranked by the metric's LAST value on the validation split (never the test split, never the best
epoch: picking each trial's best epoch is optimistic). Export, finalize and the report all choose through
here, so they agree. No Ray runtime is needed: the experiment folder is read offline.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from richkd.tune.outcome import sweep_ref
from richkd.tune.sweep_record import SweepRecord, read_sweep_record


class ExportError(ValueError):
    """The sweep cannot be exported as asked (e.g. no trial reached max_t); the message says what to do."""


def output_dir(experiment_path: str, sweep_name: str) -> Path:
    """Export files live beside the experiment when it is a local folder, else in ./tune_runs/<sweep>/."""
    if "://" in experiment_path:
        return Path("tune_runs").resolve() / sweep_name
    return Path(experiment_path)


def load_sweep(sweep: str, storage: Optional[str] = None, tracking_uri: Optional[str] = None):
    """(spec, experiment path, sweep record, ranked rows with MLflow run ids) of a sweep name or folder."""
    from richkd.tune.results import attach_mlflow_run_ids, collect_trials

    record = read_sweep_record(sweep, storage).with_tracking_uri(tracking_uri)
    spec, path = record.spec, record.path
    try:
        rows = collect_trials(path, spec)
    except ValueError as exc:  # no experiment_state file yet
        raise ExportError(f"sweep {spec.name!r} at {path} has no trial results yet ({exc})") from None
    attach_mlflow_run_ids(rows, record.tracking_uri, record.experiment_id, record.parent_run_id)
    return spec, path, record, rows


def missing_trials(rows: list, spec) -> tuple[int, int]:
    """(trials that have not finished, trials a finished sweep has): tune.num_samples, times the values of each
    grid entry (Tune repeats the grid num_samples times). A sweep that a time budget ended is not missing any."""
    total = spec.tune.num_samples * math.prod(len(p.values) for p in spec.params if p.sampler == "grid")
    unfinished = sum(1 for r in rows if r.outcome == "unfinished")
    if spec.tune.time_budget_s and not unfinished:
        return 0, total
    return unfinished + max(0, total - len(rows)), total


def best_trial(rows: list, spec) -> object:
    from richkd.tune.results import survivors

    alive = survivors(rows)
    if not alive:
        outcomes = {}
        for r in rows:
            outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
        seen = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) or "no trials"
        raise ExportError(f"no trial of sweep {spec.name!r} reached max_t = {spec.max_t} epochs with a finite "
                          f"{spec.tune.metric} ({seen}); resume it (`richkd sweep --resume "
                          f"{sweep_ref(spec.name, spec.experiment_path)}`) or run a larger sweep")
    return alive[0]


def cache_keys_for(cfg, record: SweepRecord) -> list[str]:
    """The cache entries the runner built for this config's cache signature (recorded in richkd_sweep.json)."""
    from richkd.cache.signature import cache_signature

    return record.cache_entries(cache_signature(cfg))


def compute_front(rows: list, spec, objectives: list) -> list:
    """Front members among trials that reached max_t; a clear error when none reported every objective."""
    from richkd.pareto import front_rows, objective_values
    from richkd.tune.results import survivors

    metrics = [m for m, _ in objectives]
    front = front_rows(rows, metrics, [d for _, d in objectives])
    if not front:
        done = [r for r in survivors(rows)]
        missing = sorted({m for r in done for m in metrics if objective_values(r, [m]) is None})
        hint = (f"; the trials did not report {', '.join(missing)} (set config robustness.enabled: true in the "
                "spec for val_corrupt_* metrics)" if missing else "")
        raise ExportError(f"no trial of sweep {spec.name!r} reached max_t = {spec.max_t} with finite "
                          f"{', '.join(metrics)}{hint}")
    return front
