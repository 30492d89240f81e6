"""MLflow tracking of a sweep from the Tune driver: one parent run, one child run per trial, resumable.

Why our own callback (DESIGN.md §6, ecosystem.md §1.9): Ray's MLflowLoggerCallback makes flat runs, sends one
request per metric, and keeps its trial -> run map only in memory, so `Tuner.restore` opens duplicate runs.
Here the driver (the only MLflow writer, so SQLite does not lock) creates the parent run before `fit`, a child
per trial tagged `mlflow.parentRunId`, logs the full flat config as params, per-epoch metrics with one
`log_batch` per report and `best_*` / `final_*` summaries at trial end (MLflow ranks by a metric's latest
value). `get_state` / `set_state` carry the trial -> run map through Tune's experiment checkpoints, and runs
are also found by their `richkd.trial_id` + `richkd.config_hash` tags, so a restored sweep continues the same
child runs; runs of trials the restored sweep never heard of are closed and deleted, none stay RUNNING.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

from ray.tune import Callback

from richkd.tune.space import SweepSpec, TrialPlan

log = logging.getLogger(__name__)

KIND_TAG = "richkd.kind"             # sweep | trial | finalist
SWEEP_TAG = "richkd.sweep"
TRIAL_TAG = "richkd.trial_id"
HASH_TAG = "richkd.config_hash"
OUTCOME_TAG = "richkd.outcome"       # completed | stopped_early | nonfinite_loss | error | interrupted
PARENT_TAG = "mlflow.parentRunId"
# Tune's bookkeeping keys are not model metrics; everything else numeric in a report is logged.
_TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore",
              "iterations_since_restore", "done", "should_checkpoint", "checkpoint_dir_name"}


# ----- helpers shared with export / finalize ------------------------------------------------------------

def client_for(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client, name: str, artifact_location: Optional[str] = None) -> str:
    """Create the experiment on the driver once (parallel creation races, mlflow#4123); return its id."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created meanwhile by another driver
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(start: Optional[Path] = None) -> str:
    """The source tree's commit (with `+dirty` when it has local changes), or "unknown" outside git."""
    where = start or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_version() -> dict:
    import richkd

    return {"richkd_version": richkd.__version__, "git_commit": git_commit()}


def config_hash(flat: dict) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    entries = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
    for chunk in _chunks(entries, 100):
        client.log_batch(run_id, params=chunk, synchronous=True)


def log_metrics(client, run_id: str, metrics: dict, step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entries = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()]
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk, synchronous=True)


def set_tags(client, run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    entries = [RunTag(str(k), str(v)[:8000]) for k, v in tags.items()]
    for chunk in _chunks(entries, 100):
        client.log_batch(run_id, tags=chunk, synchronous=True)


def numeric_metrics(result: dict) -> dict:
    out = {}
    for key, value in result.items():
        if key in _TUNE_KEYS or key.startswith("config/") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def create_parent_run(spec: SweepSpec, client, experiment_id: str) -> str:
    """The sweep's parent run: spec, search space and code version as tags, params and artifacts."""
    version = code_version()
    tags = {KIND_TAG: "sweep", SWEEP_TAG: spec.name, "richkd.space_hash": spec.space_hash(),
            "richkd.git_commit": version["git_commit"], "richkd.version": version["richkd_version"],
            "richkd.experiment_path": spec.experiment_path, "mlflow.note.content": spec.description or
            f"RichKD sweep {spec.name}"}
    run = client.create_run(experiment_id, tags=tags, run_name=spec.name)
    run_id = run.info.run_id
    t = spec.tune
    log_params(client, run_id, {
        "tune.metric": t.metric, "tune.mode": t.mode, "tune.num_samples": t.num_samples,
        "tune.search": t.search.algorithm, "tune.search_seed": t.search.seed,
        "tune.scheduler": t.scheduler.type, "tune.grace_period": t.scheduler.grace_period,
        "tune.reduction_factor": t.scheduler.reduction_factor, "tune.max_t": spec.max_t,
        "tune.max_concurrent": t.max_concurrent, "tune.resources": f"cpu={t.cpu},gpu={t.gpu}",
        **{f"space.{k}": json.dumps(v, default=str) for k, v in spec.describe_space().items()},
    })
    import yaml

    client.log_text(run_id, yaml.safe_dump(spec.raw, sort_keys=False), "spec.yaml")
    client.log_dict(run_id, spec.describe_space(), "search_space.json")
    client.log_text(run_id, spec.base_config.to_yaml(), "base_config.yaml")
    return run_id


def child_runs(client, experiment_id: str, parent_run_id: str, kind: str = "trial") -> list:
    """Active child runs of a sweep of one kind (all pages)."""
    filt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{KIND_TAG}` = '{kind}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filt, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# ----- the callback -----------------------------------------------------------------------------------

class MlflowSweepCallback(Callback):
    """Driver-side Tune callback (see module doc). Picklable: the MLflow client is rebuilt on demand."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, plan: TrialPlan,
                 sweep_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.plan = plan
        self.sweep_name = sweep_name
        self._runs: dict[str, str] = {}          # trial_id -> run_id
        self._logged_step: dict[str, int] = {}    # trial_id -> last training_iteration logged
        self._ended: set[str] = set()             # trial ids whose run got its summary
        self._total: Optional[int] = None
        self._client = None

    # -- pickling / Tune state --
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def get_state(self) -> Optional[dict]:
        return {"runs": dict(self._runs), "logged_step": dict(self._logged_step), "ended": sorted(self._ended),
                "parent_run_id": self.parent_run_id}

    def set_state(self, state: dict) -> None:
        self._runs.update(state.get("runs", {}))
        self._logged_step.update(state.get("logged_step", {}))
        self._ended.update(state.get("ended", []))

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    # -- Tune hooks --
    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        self._total = total_num_samples or num_samples
        run = self.client.get_run(self.parent_run_id)
        if run.info.status != "RUNNING":  # a resumed sweep: reopen the parent
            self.client.update_run(self.parent_run_id, status="RUNNING")

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._open(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        run_id = self._runs.get(trial.trial_id) or self._open(trial)
        step = int(result.get("training_iteration", 0))
        if step <= self._logged_step.get(trial.trial_id, 0):
            return  # an epoch re-run after a restore from an older checkpoint: keep the first record
        metrics = numeric_metrics(result)
        if "time_this_iter_s" in result:
            metrics["tune_iter_time_s"] = float(result["time_this_iter_s"])
        log_metrics(self.client, run_id, metrics, step=step)
        self._logged_step[trial.trial_id] = step

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, error=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._cleanup_orphans(trials)
        finished = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        for t in trials:
            if t.trial_id in self._runs and t.trial_id not in self._ended and t.status not in ("TERMINATED", "ERROR"):
                # unfinished trial of an interrupted sweep: not RUNNING any more; `--resume` reopens it
                set_tags(self.client, self._runs[t.trial_id], {OUTCOME_TAG: "interrupted"})
                self.client.set_terminated(self._runs[t.trial_id], status="KILLED")
        complete = self._total is not None and len(finished) >= self._total and len(finished) == len(trials)
        summary = sweep_summary(trials, self.plan)
        if summary:
            log_metrics(self.client, self.parent_run_id, summary)
        self.client.set_terminated(self.parent_run_id, status="FINISHED" if complete else "KILLED")

    # -- internals --
    def _config_flat(self, trial) -> dict:
        return self.plan.trial_config(trial.config).to_flat_dict()

    def _open(self, trial) -> str:
        flat = self._config_flat(trial)
        digest = config_hash(flat)
        run_id = self._runs.get(trial.trial_id)
        if run_id is None:
            run_id = self._find_existing(trial.trial_id, digest)
        if run_id is not None:
            self._runs[trial.trial_id] = run_id
            run = self.client.get_run(run_id)
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self._ended.discard(trial.trial_id)
            history = self.client.get_metric_history(run_id, "epoch")
            if history:
                self._logged_step[trial.trial_id] = max(self._logged_step.get(trial.trial_id, 0),
                                                        max(m.step for m in history))
            return run_id
        sampled = self.plan.active_sampled(trial.config)
        tags = {PARENT_TAG: self.parent_run_id, KIND_TAG: "trial", SWEEP_TAG: self.sweep_name,
                TRIAL_TAG: trial.trial_id, HASH_TAG: digest, "richkd.sampled": json.dumps(sampled, default=str)}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=str(trial))
        run_id = run.info.run_id
        log_params(self.client, run_id, flat)
        self._runs[trial.trial_id] = run_id
        return run_id

    def _find_existing(self, trial_id: str, digest: str) -> Optional[str]:
        """A child run of this trial created after the last experiment snapshot (state lags the database)."""
        filt = (f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}' "
                f"and tags.`{HASH_TAG}` = '{digest}'")
        runs = self.client.search_runs([self.experiment_id], filter_string=filt, max_results=5)
        return runs[0].info.run_id if runs else None

    def _close(self, trial, error: bool) -> None:
        if trial.trial_id in self._ended:
            return
        run_id = self._runs.get(trial.trial_id) or self._open(trial)
        result = trial.last_result or {}
        # on_trial_complete runs before Tune flips the status to TERMINATED
        outcome = trial_outcome("ERROR" if error else "TERMINATED", result, self.plan.max_t)
        summary = self._summary(run_id, result)
        if summary:
            log_metrics(self.client, run_id, summary, step=int(result.get("training_iteration", 0) or 0))
        tags = {OUTCOME_TAG: outcome}
        if result.get("stop_reason"):
            tags["richkd.stop_reason"] = result["stop_reason"]
        if error:
            tags["richkd.error"] = _error_text(trial)
        set_tags(self.client, run_id, tags)
        status = "FAILED" if outcome in ("error", "nonfinite_loss") else "FINISHED"
        self.client.set_terminated(run_id, status=status)
        self._ended.add(trial.trial_id)

    def _summary(self, run_id: str, result: dict) -> dict:
        """best_<metric> over the logged history, final_<key> for the last report, epochs_run."""
        metric, mode = self.plan.metric, self.plan.mode
        out: dict = {}
        values = [m.value for m in self.client.get_metric_history(run_id, metric) if math.isfinite(m.value)]
        if values:
            out[f"best_{metric}"] = max(values) if mode == "max" else min(values)
        for key, value in numeric_metrics(result).items():
            if not key.startswith(("best_", "final_")):
                out[f"final_{key}"] = value
        out["epochs_run"] = float(result.get("training_iteration", 0) or 0)
        return out

    def _cleanup_orphans(self, trials: list) -> None:
        """Close and delete child runs that belong to no trial of this sweep (created after the last snapshot
        of a killed driver, for a trial the restored sweep never saw); keeps the run count = trial count."""
        known = {self._runs[t.trial_id] for t in trials if t.trial_id in self._runs}
        for run in child_runs(self.client, self.experiment_id, self.parent_run_id, kind="trial"):
            if run.info.run_id in known:
                continue
            set_tags(self.client, run.info.run_id, {OUTCOME_TAG: "orphaned"})
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")
            self.client.delete_run(run.info.run_id)
            log.info("deleted MLflow run %s of a trial lost with the killed driver", run.info.run_id)


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


def _error_text(trial) -> str:
    """The last line of the trial's error trace (the exception message), or a generic note."""
    try:
        text = trial.get_error() or ""
    except Exception:  # the error file may be unreadable; the status still says ERROR
        text = ""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "trial failed (see the trial's error.txt)"
