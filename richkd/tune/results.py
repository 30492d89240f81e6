"""A sweep read back from its folder: its record (`richkd_sweep.json`, written once when it starts: the resolved spec,
MLflow ids, caches and code version, docs/architecture.md "Sweep storage"), its trials ranked, and the choices made
from them. Every command after a sweep reads it through here, so they agree; Ray's offline ExperimentAnalysis reads
Tune's files, no Ray runtime is needed. Selection (docs/method.md, "What a sweep should search"): only trials that
reached max_t compete, ranked by the metric's LAST value on the validation split, never the test split."""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from richkd.cache.signature import cache_signature
from richkd.config import Config
from richkd.pareto import finite, front_rows, objective_values
from richkd.tracking import TRIAL_TAG, child_runs, client_for
from richkd.tune.errors import SpecError
from richkd.tune.params import TrialPlan
from richkd.tune.paths import (DEFAULT_STORAGE, absolute_storage, has_scheme, join_storage, read_text, sweep_ref,
                               write_text)
from richkd.tune.spec import SweepSpec

SWEEP_RECORD = "richkd_sweep.json"
RECORD_FIELDS = ("created", "tracking_uri", "experiment_id", "parent_run_id", "caches", "richkd_version", "git_commit")
OUTCOME_ORDER = ("completed", "stopped_early", "unfinished", "nonfinite_loss", "error")
# Tune's bookkeeping keys are not model metrics; everything else numeric in a report is.
_TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore",
              "iterations_since_restore", "done", "should_checkpoint", "checkpoint_dir_name"}


class ExportError(ValueError):
    """The sweep cannot be used as asked (e.g. no trial reached max_t); the message says what to do."""


# ----- the record ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepRecord:
    spec: SweepSpec
    created: float = field(default_factory=time.time)
    tracking_uri: Optional[str] = None          # None when the sweep runs without MLflow
    experiment_id: Optional[str] = None
    parent_run_id: Optional[str] = None
    caches: tuple = ()                          # ({"signature": ..., "dir": ..., "entries": [folder names]}, ...)
    richkd_version: Optional[str] = None
    git_commit: Optional[str] = None
    path: str = ""                              # the experiment folder/URI it was read from (not saved)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def has_mlflow_run(self) -> bool:
        return bool(self.tracking_uri and self.parent_run_id)

    def cache_entries(self, cfg: Config) -> list[str]:   # what the sweep built for configs of cfg's signature
        signature = cache_signature(cfg)
        return next((list(c.get("entries") or []) for c in self.caches if c.get("signature") == signature), [])

    def to_json(self) -> str:
        saved = {f.name: getattr(self, f.name) for f in fields(self) if f.name in RECORD_FIELDS}
        return json.dumps({"name": self.spec.name, "source": self.spec.source, "spec": self.spec.to_dict(), **saved},
                          indent=1, default=str)


def write_sweep_record(record: SweepRecord) -> None:
    write_text(join_storage(record.spec.experiment_path, SWEEP_RECORD), record.to_json())


def sweep_record_exists(experiment_path: str) -> bool:
    return read_text(join_storage(experiment_path, SWEEP_RECORD)) is not None


def read_sweep_record(sweep: str, storage: Optional[str] = None, check: bool = False) -> SweepRecord:
    """The record of a sweep name (under `storage`, default tune_runs) or experiment folder/URI; `check` re-runs
    the spec's file and data checks on this machine."""
    if has_scheme(sweep) or (os.path.isdir(sweep) and sweep_record_exists(sweep)):
        path = absolute_storage(sweep)
    else:
        path = join_storage(absolute_storage(storage or DEFAULT_STORAGE), sweep)
    text = read_text(join_storage(path, SWEEP_RECORD))
    if text is None:
        raise SpecError(f"no sweep named {sweep!r} at {path} (no {SWEEP_RECORD}); pass the sweep's name as shown by "
                        f"`richkd sweep`, its folder, or --storage for a non-default storage path")
    try:
        data = json.loads(text)
        spec_data = data["spec"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"{join_storage(path, SWEEP_RECORD)} is not a readable sweep record ({exc}); it is written "
                        "by `richkd sweep` when a sweep starts") from None
    spec = SweepSpec.from_dict(spec_data, source=data.get("source"), check=check)
    return SweepRecord(spec=spec, path=path, **{**{k: data.get(k) for k in RECORD_FIELDS},
                                                "created": data.get("created") or 0.0,
                                                "caches": tuple(data.get("caches") or ())})


# ----- the trials ---------------------------------------------------------------------------------------

@dataclass
class TrialRow:
    trial_id: str
    trial_name: str
    status: str                 # Tune's status: TERMINATED / ERROR / PENDING / RUNNING / PAUSED
    outcome: str                # completed (reached max_t) / stopped_early (ASHA) / nonfinite_loss / error / unfinished
    epochs: int                 # last training_iteration
    value: Optional[float]      # the sweep metric's LAST value (what selection uses)
    best_value: Optional[float] # the sweep metric's best value over epochs (reported, not used to select)
    metrics: dict               # last report's numeric metrics
    sampled: dict               # active space values
    config: Config              # the trial's full config
    path: str = ""
    checkpoint: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    rank: Optional[int] = None
    node_id: Optional[str] = None   # the Ray node of its last report
    node_ip: Optional[str] = None   # that node's IP (a resumed embedded sweep has a new node id, the same IP)
    failures: int = 0               # times it failed (Tune's num_failures, the final failure of an error included)
    history: list = field(default_factory=list)   # every report (epoch order): learning curves, tables, report
    extra: dict = field(default_factory=dict)

    @property
    def restarts(self) -> int:
        """Times Tune restarted it after a failure (an errored trial's last failure was not followed by one)."""
        return max(0, self.failures - (self.outcome == "error"))


def finite_value(v) -> Optional[float]:
    return float(v) if finite(v) else None


def shown_config(values: dict) -> str:
    """`key=value, ...` for a console line, floats to 4 significant digits (a trial's or finalist's sampled values)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def numeric_metrics(result: dict, drop=_TUNE_KEYS) -> dict:
    """A Tune report's numbers as floats: not the config, not flags, by default not Tune's bookkeeping."""
    return {k: float(v) for k, v in result.items() if k not in drop and not k.startswith("config/")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def collect_trials(experiment_path: str, spec: SweepSpec) -> list[TrialRow]:   # with histories, ranked
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path, default_metric=spec.tune.metric, default_mode=spec.tune.mode)
    plan, frames, rows = spec.plan(), analysis.trial_dataframes, []
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
        df = frames.get(trial.trial_id)
        history = [] if df is None else [numeric_metrics(r, drop=()) for r in df.to_dict("records")]
        series = [v for v in (h.get(spec.tune.metric) for h in history) if finite(v)]
        best = (max(series) if spec.tune.mode == "max" else min(series)) if series else None
        rows.append(TrialRow(
            trial_id=trial.trial_id, trial_name=str(trial), status=trial.status,
            outcome=trial_outcome(trial.status, last, spec.max_t),
            epochs=int(last.get("training_iteration", 0) or 0), value=finite_value(last.get(spec.tune.metric)),
            best_value=best, metrics=numeric_metrics(last), sampled=plan.active_sampled(trial.config),
            config=plan.trial_config(trial.config), path=str(trial.path or ""),
            checkpoint=trial.checkpoint.path if trial.checkpoint else None, node_id=last.get("node_id") or None,
            node_ip=last.get("node_ip") or None, failures=trial.num_failures, history=history,
            extra={"stop_reason": last["stop_reason"]} if last.get("stop_reason") else {}))
    return rank_trials(rows, spec)


def rank_trials(rows: list[TrialRow], spec: SweepSpec) -> list[TrialRow]:
    """Completed trials (reached max_t) first, best LAST value first; then the others by outcome and value."""
    sign = -1.0 if spec.tune.mode == "max" else 1.0

    def key(r: TrialRow):
        return (OUTCOME_ORDER.index(r.outcome) if r.outcome in OUTCOME_ORDER else len(OUTCOME_ORDER),
                r.value is None, sign * (r.value if r.value is not None else 0.0), -r.epochs, r.trial_id)

    ranked = sorted(rows, key=key)
    for i, r in enumerate(ranked, start=1):
        r.rank = i
    return ranked


def survivors(rows: list[TrialRow]) -> list[TrialRow]:   # reached max_t with a finite metric, in rank order
    return [r for r in rows if r.outcome == "completed" and r.value is not None]


def trial_outcome(status: str, result: Optional[dict], max_t: int) -> str:
    result = result or {}
    if status == "ERROR":
        return "error"
    if result.get("nonfinite_loss", 0) >= 1:
        return "nonfinite_loss"
    if status != "TERMINATED":
        return "unfinished"
    return "completed" if int(result.get("training_iteration", 0) or 0) >= max_t else "stopped_early"


def sweep_summary(trials: list, plan: TrialPlan) -> dict:
    """n_trials_<outcome> and best_<metric> (among completed trials): the parent run's metrics."""
    outcomes = [trial_outcome(t.status, t.last_result, plan.max_t) for t in trials]
    done = [v for t, o in zip(trials, outcomes) if o == "completed"
            and (v := finite_value((t.last_result or {}).get(plan.metric))) is not None]
    return {**{f"n_trials_{k}": float(outcomes.count(k)) for k in OUTCOME_ORDER},
            **({f"best_{plan.metric}": (max if plan.mode == "max" else min)(done)} if done else {})}


# ----- reading a sweep, choosing from it --------------------------------------------------------------------

def load_sweep(sweep: str, storage: Optional[str] = None, tracking_uri: Optional[str] = None):
    """(spec, experiment path, sweep record, ranked rows with their MLflow run ids) of a sweep name or folder."""
    record = read_sweep_record(sweep, storage)
    if tracking_uri:   # another address of the same MLflow store (e.g. a server instead of SQLite)
        record = replace(record, tracking_uri=tracking_uri)
    spec, path = record.spec, record.path
    try:
        rows = collect_trials(path, spec)
    except ValueError as exc:  # no experiment_state file yet
        raise ExportError(f"sweep {spec.name!r} at {path} has no trial results yet ({exc})") from None
    if record.has_mlflow_run and record.experiment_id:
        runs = child_runs(client_for(record.tracking_uri), record.experiment_id, record.parent_run_id)
        by_trial = {run.data.tags.get(TRIAL_TAG): run.info.run_id for run in runs}
        for r in rows:
            r.mlflow_run_id = by_trial.get(r.trial_id)
    return spec, path, record, rows


def output_dir(experiment_path: str, sweep_name: str) -> Path:
    """Export, finalize and report files: beside a local experiment folder, else in ./tune_runs/<sweep>/."""
    return Path("tune_runs").resolve() / sweep_name if "://" in experiment_path else Path(experiment_path)


def missing_trials(rows: list, spec: SweepSpec) -> tuple[int, int]:
    """(trials that have not finished, trials a finished sweep has): tune.num_samples, times the values of each
    grid entry (Tune repeats the grid num_samples times). A sweep that a time budget ended is not missing any."""
    total = spec.tune.num_samples * math.prod(len(p.values) for p in spec.params if p.sampler == "grid")
    unfinished = sum(1 for r in rows if r.outcome == "unfinished")
    if spec.tune.time_budget_s and not unfinished:
        return 0, total
    return unfinished + max(0, total - len(rows)), total


def best_trial(rows: list, spec: SweepSpec) -> TrialRow:
    alive = survivors(rows)
    if not alive:
        seen = ", ".join(f"{n} {k}" for k, n in sorted(Counter(r.outcome for r in rows).items())) or "no trials"
        raise ExportError(f"no trial of sweep {spec.name!r} reached max_t = {spec.max_t} epochs with a finite "
                          f"{spec.tune.metric} ({seen}); resume it (`richkd sweep --resume "
                          f"{sweep_ref(spec.name, spec.experiment_path)}`) or run a larger sweep")
    return alive[0]


def compute_front(rows: list, spec: SweepSpec, objectives: list) -> list:
    """Front members among trials that reached max_t; a clear error when none reported every objective."""
    metrics = [m for m, _ in objectives]
    front = front_rows(rows, metrics, [d for _, d in objectives])
    if not front:
        missing = sorted({m for r in survivors(rows) for m in metrics if objective_values(r, [m]) is None})
        hint = (f"; the trials did not report {', '.join(missing)} (set config robustness.enabled: true in the "
                "spec for val_corrupt_* metrics)" if missing else "")
        raise ExportError(f"no trial of sweep {spec.name!r} reached max_t = {spec.max_t} with finite "
                          f"{', '.join(metrics)}{hint}")
    return front
