"""Read a finished (or interrupted) sweep back from its storage: one row per trial, ranked; no Ray runtime needed."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from richkd.config import Config
from richkd.tune.mlflow_client import numeric_metrics
from richkd.tune.params import TrialPlan
from richkd.tune.spec import SweepSpec

OUTCOME_ORDER = ("completed", "stopped_early", "unfinished", "nonfinite_loss", "error")


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


def _finite(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def collect_trials(experiment_path: str, spec: SweepSpec) -> list[TrialRow]:
    """All trials of the experiment with their last results, via Ray's offline ExperimentAnalysis."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path, default_metric=spec.tune.metric, default_mode=spec.tune.mode)
    plan = spec.plan()
    dataframes = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
        df = dataframes.get(trial.trial_id)
        history = [] if df is None else [{k: float(v) for k, v in r.items() if not k.startswith("config/")
                                          and isinstance(v, (int, float)) and not isinstance(v, bool)}
                                         for r in df.to_dict("records")]
        best = None
        if df is not None and spec.tune.metric in getattr(df, "columns", []):
            series = [v for v in df[spec.tune.metric].tolist() if _finite(v) is not None]
            if series:
                best = max(series) if spec.tune.mode == "max" else min(series)
        checkpoint = None
        try:
            ckpt = trial.checkpoint
            checkpoint = ckpt.path if ckpt is not None else None
        except Exception:  # stub trials without a checkpoint manager
            checkpoint = None
        rows.append(TrialRow(
            trial_id=trial.trial_id, trial_name=str(trial), status=trial.status,
            outcome=trial_outcome(trial.status, last, spec.max_t),
            epochs=int(last.get("training_iteration", 0) or 0), value=_finite(last.get(spec.tune.metric)),
            best_value=_finite(best), metrics=numeric_metrics(last), sampled=plan.active_sampled(trial.config),
            config=plan.trial_config(trial.config), path=str(getattr(trial, "path", "") or ""),
            checkpoint=checkpoint, node_id=last.get("node_id") or None, node_ip=last.get("node_ip") or None,
            failures=int(getattr(trial, "num_failures", 0) or 0), history=history,
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


def survivors(rows: list[TrialRow]) -> list[TrialRow]:
    """Trials that reached max_t (ASHA survivors) with a finite metric, in rank order."""
    return [r for r in rows if r.outcome == "completed" and r.value is not None]


def attach_mlflow_run_ids(rows: list[TrialRow], tracking_uri: Optional[str], experiment_id: Optional[str],
                          parent_run_id: Optional[str]) -> None:
    if not (tracking_uri and experiment_id and parent_run_id):
        return
    from richkd.tune.mlflow_client import TRIAL_TAG, child_runs, client_for

    client = client_for(tracking_uri)
    by_trial = {run.data.tags.get(TRIAL_TAG): run.info.run_id
                for run in child_runs(client, experiment_id, parent_run_id, kind="trial")}
    for r in rows:
        r.mlflow_run_id = by_trial.get(r.trial_id)


def trial_outcome(status: str, result: dict, max_t: int) -> str:
    if status == "ERROR":
        return "error"
    if (result or {}).get("nonfinite_loss", 0) >= 1:
        return "nonfinite_loss"
    if status != "TERMINATED":
        return "unfinished"
    return "completed" if int((result or {}).get("training_iteration", 0) or 0) >= max_t else "stopped_early"


def sweep_summary(trials: list, plan: TrialPlan) -> dict:
    counts = {"completed": 0, "stopped_early": 0, "nonfinite_loss": 0, "error": 0, "unfinished": 0}
    best = None
    for t in trials:
        outcome = trial_outcome(t.status, t.last_result or {}, plan.max_t)
        counts[outcome] += 1
        value = (t.last_result or {}).get(plan.metric)
        if outcome == "completed" and isinstance(value, (int, float)) and math.isfinite(value):
            if best is None or (value > best if plan.mode == "max" else value < best):
                best = value
    out = {f"n_trials_{k}": float(v) for k, v in counts.items()}
    if best is not None:
        out[f"best_{plan.metric}"] = float(best)
    return out
