"""MLflow tracking of a sweep from the Tune driver: one parent run, one child run per trial, resumable.

Why our own callback (docs/architecture.md, "Tracking"): Ray's MLflowLoggerCallback makes flat runs, sends one
request per metric, and keeps its trial -> run map only in memory, so `Tuner.restore` opens duplicate runs.
Here the driver (the only MLflow writer, so SQLite does not lock) creates the parent run before `fit`, a child
per trial tagged `mlflow.parentRunId`, logs the full flat config as params, per-epoch metrics with one
`log_batch` per report and `best_*` / `final_*` summaries at trial end (MLflow ranks by a metric's latest
value). `get_state` / `set_state` carry the trial -> run map through Tune's experiment checkpoints, and runs
are also found by their `richkd.trial_id` + `richkd.config_hash` tags, so a restored sweep continues the same
child runs; runs of trials the restored sweep never heard of are closed and deleted, none stay RUNNING.
Writes go through a bounded, retrying outbox (mlflow_outbox.py): a stopped tracking server never stops training.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

from ray.tune import Callback

from richkd.tune.mlflow_client import (FINAL_WAIT_ENV, FINAL_WAIT_S, HASH_TAG, KIND_TAG, NODE_TAG, OUTCOME_TAG,
                                       PARENT_TAG, SWEEP_TAG, TRIAL_TAG, child_runs, client_for, config_hash,
                                       log_metrics, log_params, numeric_metrics, set_tags)
from richkd.tune.mlflow_outbox import Outbox
from richkd.tune.params import TrialPlan
from richkd.tune.results import sweep_summary, trial_outcome
from richkd.tune.trainable import NODE_KEY

log = logging.getLogger(__name__)


# ----- the callback -----------------------------------------------------------------------------------

class MlflowSweepCallback(Callback):
    """Driver-side Tune callback (see module doc). Picklable: the MLflow client is rebuilt on demand.

    Hooks never talk to MLflow directly: they queue writes (plain tuples) in a `mlflow_outbox.Outbox` and flush
    it, so a stopped tracking server neither crashes nor stalls the sweep; the queue is part of `get_state`,
    so even writes still pending when the driver is killed are sent by `--resume`.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, plan: TrialPlan,
                 sweep_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.plan = plan
        self.sweep_name = sweep_name
        self._runs: dict[str, str] = {}          # trial_id -> run_id
        self._logged_step: dict[str, int] = {}    # trial_id -> last training_iteration queued for logging
        self._server_step: dict[str, int] = {}    # trial_id -> last step the store held when its run was reopened
        self._params_pending: set[str] = set()    # trial ids whose run exists but whose params are not logged yet
        self._ended: set[str] = set()             # trial ids whose run got its summary
        self._node: dict[str, str] = {}           # trial_id -> Ray node id last tagged on its run
        self._total: Optional[int] = None
        self._client = None
        self.outbox = Outbox(tracking_uri)

    # -- pickling / Tune state --
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def get_state(self) -> Optional[dict]:
        return {"runs": dict(self._runs), "logged_step": dict(self._logged_step), "ended": sorted(self._ended),
                "parent_run_id": self.parent_run_id, "outbox": self.outbox.export()}

    def set_state(self, state: dict) -> None:
        self._runs.update(state.get("runs", {}))
        self._logged_step.update(state.get("logged_step", {}))
        self._ended.update(state.get("ended", []))
        self.outbox.restore(state.get("outbox", {}))

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    # -- Tune hooks: queue, then flush --
    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        self._total = total_num_samples or num_samples
        self._send(("reopen_parent",))

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended.discard(trial.trial_id)
        self._send(self._open_op(trial))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        step = int(result.get("training_iteration", 0))
        if step <= self._logged_step.get(trial.trial_id, 0):
            return  # an epoch re-run after a restore from an older checkpoint: keep the first record
        metrics = numeric_metrics(result)
        if "time_this_iter_s" in result:
            metrics["tune_iter_time_s"] = float(result["time_this_iter_s"])
        if trial.trial_id not in self._runs and not self._queued_open(trial.trial_id):
            self.outbox.put(self._open_op(trial))
        self._logged_step[trial.trial_id] = step
        node = result.get(NODE_KEY)
        nodes = self.__dict__.setdefault("_node", {})          # callbacks pickled by an older version lack it
        if node and nodes.get(trial.trial_id) != node:
            nodes[trial.trial_id] = node
            self.outbox.put(("tags", trial.trial_id, {NODE_TAG: node}))
        self._send(("metrics", trial.trial_id, step, metrics, int(time.time() * 1000)))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, error=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        finished = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        self.outbox.put(("cleanup", [t.trial_id for t in trials]))
        for t in trials:
            if t.trial_id not in self._ended and t.status not in ("TERMINATED", "ERROR"):
                # unfinished trial of an interrupted sweep: not RUNNING any more; `--resume` reopens it
                self.outbox.put(("interrupted", t.trial_id))
        complete = self._total is not None and len(finished) >= self._total and len(finished) == len(trials)
        self.outbox.put(("end_parent", sweep_summary(trials, self.plan), "FINISHED" if complete else "KILLED"))
        wait_s = float(os.environ.get(FINAL_WAIT_ENV, FINAL_WAIT_S))
        if not self.outbox.drain(self._apply, self._reachable, wait_s):
            trials_left = sorted({op[1] for op in self.outbox.ops if op[0] in ("open", "metrics", "close")})
            log.error("MLflow at %s stayed unreachable for %.0f s after the sweep ended: %d writes were not logged "
                      "(%s). Every metric is in Tune's results (trial_*/result.json in the experiment folder; "
                      "`richkd export` reads them); the MLflow runs of this sweep are incomplete.",
                      self.tracking_uri, wait_s, len(self.outbox),
                      f"trials {', '.join(trials_left)}" if trials_left else "sweep summary")
        elif self.outbox.dropped:
            log.error("MLflow outbox overflowed during an outage: %d per-epoch metric records were not logged (they "
                      "are in Tune's trial_*/result.json)", self.outbox.dropped)

    # -- queueing --
    def _send(self, op: tuple) -> None:
        self.outbox.put(op)
        self.outbox.flush(self._apply, self._reachable)

    def _queued_open(self, trial_id: str) -> bool:
        return any(op[0] == "open" and op[1] == trial_id for op in self.outbox.ops)

    def _open_op(self, trial) -> tuple:
        return ("open", trial.trial_id, dict(trial.config), str(trial))

    def _close(self, trial, error: bool) -> None:
        if trial.trial_id in self._ended:
            return
        result = {k: v for k, v in (trial.last_result or {}).items()
                  if isinstance(v, (int, float, str)) and not k.startswith("config/")}
        if trial.trial_id not in self._runs and not self._queued_open(trial.trial_id):
            self.outbox.put(self._open_op(trial))
        self._ended.add(trial.trial_id)
        self._send(("close", trial.trial_id, error, result, _error_text(trial) if error else ""))

    def _reachable(self) -> bool:
        """A cheap read the store answers whenever it is up (the probe that tells "down" from "bad write")."""
        self.client.get_experiment(self.experiment_id)
        return True

    # -- applying one queued write (may raise; the outbox retries or skips it) --
    def _apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "reopen_parent":
            if self.client.get_run(self.parent_run_id).info.status != "RUNNING":  # a resumed sweep
                self.client.update_run(self.parent_run_id, status="RUNNING")
        elif kind == "open":
            self._apply_open(*op[1:])
        elif kind == "metrics":
            _, trial_id, step, metrics, stamp = op
            if step > self._server_step.get(trial_id, 0):
                log_metrics(self.client, self._runs[trial_id], metrics, step=step, timestamp_ms=stamp)
        elif kind == "close":
            self._apply_close(*op[1:])
        elif kind == "tags":
            set_tags(self.client, self._runs[op[1]], op[2])
        elif kind == "interrupted":
            if op[1] in self._runs:
                set_tags(self.client, self._runs[op[1]], {OUTCOME_TAG: "interrupted"})
                self.client.set_terminated(self._runs[op[1]], status="KILLED")
        elif kind == "cleanup":
            self._cleanup_orphans(op[1])
        elif kind == "end_parent":
            if op[1]:
                log_metrics(self.client, self.parent_run_id, op[1])
            self.client.set_terminated(self.parent_run_id, status=op[2])
        else:  # pragma: no cover - a queue written by another version
            log.warning("unknown MLflow outbox entry %r skipped", kind)

    def _apply_open(self, trial_id: str, config: dict, name: str) -> None:
        flat = self.plan.trial_config(config).to_flat_dict()
        digest = config_hash(flat)
        run_id = self._runs.get(trial_id)
        if run_id is None:
            run_id = self._find_existing(trial_id, digest)
        if run_id is not None:
            self._runs[trial_id] = run_id
            run = self.client.get_run(run_id)
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "epoch")
            if history:
                self._server_step[trial_id] = max(self._server_step.get(trial_id, 0), max(m.step for m in history))
        else:
            sampled = self.plan.active_sampled(config)
            tags = {PARENT_TAG: self.parent_run_id, KIND_TAG: "trial", SWEEP_TAG: self.sweep_name,
                    TRIAL_TAG: trial_id, HASH_TAG: digest, "richkd.sampled": json.dumps(sampled, default=str)}
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
            self._runs[trial_id] = run_id       # recorded first: a retry after a failed params write reuses it
            self._params_pending.add(trial_id)
        if trial_id in self._params_pending:
            log_params(self.client, run_id, flat)
            self._params_pending.discard(trial_id)

    def _find_existing(self, trial_id: str, digest: str) -> Optional[str]:
        """A child run of this trial created after the last experiment snapshot (state lags the database)."""
        filt = (f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}' "
                f"and tags.`{HASH_TAG}` = '{digest}'")
        runs = self.client.search_runs([self.experiment_id], filter_string=filt, max_results=5)
        return runs[0].info.run_id if runs else None

    def _apply_close(self, trial_id: str, error: bool, result: dict, error_text: str) -> None:
        run_id = self._runs[trial_id]
        # on_trial_complete runs before Tune flips the status to TERMINATED
        outcome = trial_outcome("ERROR" if error else "TERMINATED", result, self.plan.max_t)
        summary = self._summary(run_id, result)
        if summary:
            log_metrics(self.client, run_id, summary, step=int(result.get("training_iteration", 0) or 0))
        tags = {OUTCOME_TAG: outcome}
        if result.get("stop_reason"):
            tags["richkd.stop_reason"] = result["stop_reason"]
        if error:
            tags["richkd.error"] = error_text
        set_tags(self.client, run_id, tags)
        status = "FAILED" if outcome in ("error", "nonfinite_loss") else "FINISHED"
        self.client.set_terminated(run_id, status=status)

    def _summary(self, run_id: str, result: dict) -> dict:
        """best_<metric> over the logged history (per objective), final_<key> for the last report, epochs_run."""
        out: dict = {}
        # getattr: a plan pickled into the experiment state before objectives existed has no such field
        for metric, mode in (getattr(self.plan, "objectives", ()) or ((self.plan.metric, self.plan.mode),)):
            values = [m.value for m in self.client.get_metric_history(run_id, metric) if math.isfinite(m.value)]
            if values:
                out[f"best_{metric}"] = max(values) if mode == "max" else min(values)
        for key, value in numeric_metrics(result).items():
            if not key.startswith(("best_", "final_")):
                out[f"final_{key}"] = value
        out["epochs_run"] = float(result.get("training_iteration", 0) or 0)
        return out

    def _cleanup_orphans(self, trial_ids: list) -> None:
        """Close and delete child runs that belong to no trial of this sweep (created after the last snapshot
        of a killed driver, for a trial the restored sweep never saw); keeps the run count = trial count.

        A trial's run is the one in the callback state, else (state set aside after a cut-short snapshot, see
        richkd.tune.resume) its earliest run tagged with the trial id; any other run is an orphan.
        """
        keep = {t: self._runs[t] for t in trial_ids if t in self._runs}
        runs = child_runs(self.client, self.experiment_id, self.parent_run_id, kind="trial")
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id in trial_ids and keep.setdefault(trial_id, run.info.run_id) == run.info.run_id:
                continue
            set_tags(self.client, run.info.run_id, {OUTCOME_TAG: "orphaned"})
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")
            self.client.delete_run(run.info.run_id)
            log.info("deleted MLflow run %s of a trial lost with the killed driver", run.info.run_id)


def _error_text(trial) -> str:
    """The last line of the trial's error trace (the exception message), or a generic note."""
    try:
        text = trial.get_error() or ""
    except Exception:  # the error file may be unreadable; the status still says ERROR
        text = ""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "trial failed (see the trial's error.txt)"
