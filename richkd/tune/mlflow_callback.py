"""A sweep in MLflow: its experiment, its parent run, and a child run per trial written from the Tune driver. Why our
own callback, not Ray's MLflowLoggerCallback (flat runs, a request per metric, duplicate runs after `Tuner.restore`):
docs/architecture.md, "Data flow", 10. Hooks only queue writes (richkd.tracking.RunWriter); the queue and the
trial -> run map travel in Tune's experiment state, so a restored sweep continues its runs."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from typing import Optional

import yaml
from ray.tune import Callback

from richkd.provenance import code_version
from richkd.tracking import (HASH_TAG, KIND_TAG, NODE_TAG, OUTCOME_TAG, PARENT_TAG, SWEEP_TAG, TRIAL_TAG, RunWriter,
                             child_runs, client_for, ensure_experiment)
from richkd.tune.errors import SpecError
from richkd.tune.params import TrialPlan
from richkd.tune.results import numeric_metrics, sweep_summary, trial_outcome
from richkd.tune.spec import SweepSpec
from richkd.tune.trainable import NODE_KEY

log = logging.getLogger(__name__)

PARENT = "parent"    # the parent run's key among the writer's runs (the others are trial ids)


def config_hash(flat: dict) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sweep_callback(spec: SweepSpec) -> "MlflowSweepCallback":
    """The sweep's experiment and parent run (code version, settings, space and spec); the callback logging under it."""
    uri, t = spec.mlflow.tracking_uri, spec.tune
    experiment_id = ensure_experiment(client_for(uri), spec.mlflow.experiment, spec.mlflow.artifact_location, t.metric)
    cb = MlflowSweepCallback(uri, experiment_id, spec.plan(), spec.name)
    version = code_version()
    cb.put("run", PARENT, experiment_id, spec.name, {
        KIND_TAG: "sweep", SWEEP_TAG: spec.name, "richkd.space_hash": spec.space_hash(),
        "richkd.git_commit": version["git_commit"], "richkd.version": version["richkd_version"],
        "richkd.experiment_path": spec.experiment_path,
        "mlflow.note.content": spec.description or f"RichKD sweep {spec.name}"})
    cb.put("params", PARENT, {
        "tune.metric": t.metric, "tune.mode": t.mode, "tune.num_samples": t.num_samples,
        **({"tune.objectives": json.dumps(t.metrics), "tune.modes": json.dumps(t.modes)} if t.multi_objective else {}),
        "tune.search": t.search.algorithm, "tune.search_seed": t.search.seed,
        "tune.scheduler": t.scheduler.type, "tune.grace_period": t.scheduler.grace_period,
        "tune.reduction_factor": t.scheduler.reduction_factor, "tune.max_t": spec.max_t,
        "tune.max_concurrent": t.max_concurrent, "tune.resources": f"cpu={t.cpu},gpu={t.gpu}",
        **{f"space.{k}": json.dumps(v, default=str) for k, v in spec.describe_space().items()}})
    cb.put("text", PARENT, yaml.safe_dump(spec.to_dict(), sort_keys=False), "spec.yaml")
    cb.put("text", PARENT, json.dumps(spec.describe_space(), indent=2), "search_space.json")
    cb.put("text", PARENT, spec.base_config.to_yaml(), "base_config.yaml")
    if not cb.drain() or cb.parent_run_id is None:
        raise SpecError(f"mlflow.tracking_uri: {uri} did not take the sweep's parent run; check the tracking server, "
                        "or set mlflow.enabled: false")
    return cb


class MlflowSweepCallback(RunWriter, Callback):   # picklable: the MLflow client is rebuilt on demand

    def __init__(self, tracking_uri: str, experiment_id: str, plan: TrialPlan, sweep_name: str) -> None:
        RunWriter.__init__(self, tracking_uri)
        self.experiment_id, self.plan, self.sweep_name = experiment_id, plan, sweep_name
        self._logged_step: dict[str, int] = {}    # trial_id -> last training_iteration queued for logging
        self._server_step: dict[str, int] = {}    # trial_id -> last step the store held when its run was reopened
        self._params_pending: set[str] = set()    # trial ids whose run exists but whose params are not logged yet
        self._ended: set[str] = set()             # trial ids whose run got its summary
        self._node: dict[str, str] = {}           # trial_id -> Ray node id last tagged on its run
        self._total: Optional[int] = None

    @property
    def parent_run_id(self) -> Optional[str]:
        return self.runs.get(PARENT)

    def get_state(self) -> dict:
        return {"runs": dict(self.runs), "logged_step": dict(self._logged_step), "ended": sorted(self._ended),
                "outbox": self.outbox.export()}

    def set_state(self, state: dict) -> None:
        self.runs.update(state.get("runs", {}))
        self._logged_step.update(state.get("logged_step", {}))
        self._ended.update(state.get("ended", []))
        self.outbox.restore(state.get("outbox", {}))

    # -- Tune hooks: queue, then flush --
    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        self._total = total_num_samples or num_samples
        self.send("status", PARENT, "RUNNING")        # a resumed sweep reopens its parent run

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended.discard(trial.trial_id)
        self.send("open", trial.trial_id, dict(trial.config), str(trial))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        step, key = int(result.get("training_iteration", 0)), trial.trial_id
        if step <= self._logged_step.get(key, 0):
            return  # an epoch re-run after a restore from an older checkpoint: keep the first record
        metrics = numeric_metrics(result)
        if "time_this_iter_s" in result:
            metrics["tune_iter_time_s"] = float(result["time_this_iter_s"])
        self._ensure_open(trial)
        self._logged_step[key] = step
        node = result.get(NODE_KEY)
        if node and self._node.get(key) != node:
            self._node[key] = node
            self.put("tags", key, {NODE_TAG: node})
        self.send("metrics", key, metrics, step, int(time.time() * 1000))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, error=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        finished = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        self.put("cleanup", [t.trial_id for t in trials])
        for t in trials:
            if t.trial_id not in self._ended and t.status not in ("TERMINATED", "ERROR"):
                self.put("interrupted", t.trial_id)    # an interrupted sweep's trial; `--resume` reopens it
        complete = self._total is not None and len(finished) >= self._total and len(finished) == len(trials)
        self.put("summary", PARENT, sweep_summary(trials, self.plan))
        self.put("end", PARENT, "FINISHED" if complete else "KILLED")
        if not self.drain():
            left = sorted({op[1] for op in self.outbox.ops if op[0] in ("open", "metrics", "close")} - {PARENT})
            log.error("MLflow at %s stayed unreachable after the sweep ended: %d writes were not logged (%s). Every "
                      "metric is in Tune's results (trial_*/result.json in the experiment folder; `richkd export` "
                      "reads them); the MLflow runs of this sweep are incomplete.", self.tracking_uri,
                      len(self.outbox), f"trials {', '.join(left)}" if left else "sweep summary")
        elif self.outbox.dropped:
            log.error("MLflow outbox overflowed during an outage: %d per-epoch metric records were not logged (they "
                      "are in Tune's trial_*/result.json)", self.outbox.dropped)

    def _ensure_open(self, trial) -> None:
        if trial.trial_id not in self.runs and not any(op[:2] == ("open", trial.trial_id) for op in self.outbox.ops):
            self.put("open", trial.trial_id, dict(trial.config), str(trial))

    def _close(self, trial, error: bool) -> None:
        if trial.trial_id in self._ended:
            return
        result = {k: v for k, v in (trial.last_result or {}).items()
                  if isinstance(v, (int, float, str)) and not k.startswith("config/")}
        self._ensure_open(trial)
        self._ended.add(trial.trial_id)
        text = ""
        if error:   # the last line of the trial's error trace (the exception message); the file may be unreadable
            with contextlib.suppress(Exception):
                text = str(trial.get_error() or "")
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            text = lines[-1] if lines else "trial failed (see the trial's error.txt)"
        self.send("close", trial.trial_id, error, result, text[:500])

    # -- the trial ops (richkd.tracking.RunWriter applies them; they may raise, the outbox retries or skips) --
    def _op_metrics(self, key: str, metrics: dict, step: int = 0, stamp: Optional[int] = None) -> None:
        if step > self._server_step.get(key, 0):   # not what a reopened run already holds
            super()._op_metrics(key, metrics, step, stamp)

    def _op_open(self, trial_id: str, config: dict, name: str) -> None:
        flat = self.plan.trial_config(config).to_flat_dict()
        digest = config_hash(flat)
        run_id = self.runs.get(trial_id)
        if run_id is None:   # a run of this trial created after the last experiment snapshot (state lags the database)
            found = self.client.search_runs([self.experiment_id], max_results=1, filter_string=(
                f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}' "
                f"and tags.`{HASH_TAG}` = '{digest}'"))
            run_id = found[0].info.run_id if found else None
        if run_id is not None:
            self.runs[trial_id] = run_id
            self._op_status(trial_id, "RUNNING")
            self._server_step[trial_id] = max([self._server_step.get(trial_id, 0),
                                               *(m.step for m in self.client.get_metric_history(run_id, "epoch"))])
        else:
            sampled = self.plan.active_sampled(config)
            self._op_run(trial_id, self.experiment_id, name, {
                KIND_TAG: "trial", SWEEP_TAG: self.sweep_name, TRIAL_TAG: trial_id, HASH_TAG: digest,
                "richkd.sampled": json.dumps(sampled, default=str)}, PARENT)
            self._params_pending.add(trial_id)    # recorded first: a retry after a failed params write reuses it
        if trial_id in self._params_pending:
            self._op_params(trial_id, flat)
            self._params_pending.discard(trial_id)

    def _op_close(self, trial_id: str, error: bool, result: dict, error_text: str) -> None:
        # on_trial_complete runs before Tune flips the status to TERMINATED
        outcome = trial_outcome("ERROR" if error else "TERMINATED", result, self.plan.max_t)
        self._op_summary(trial_id, self._summary(self.runs[trial_id], result),
                         int(result.get("training_iteration", 0) or 0))
        tags = {OUTCOME_TAG: outcome, **({"richkd.stop_reason": result["stop_reason"]}
                                         if result.get("stop_reason") else {})}
        if error:
            tags["richkd.error"] = error_text
        self._op_tags(trial_id, tags)
        self._op_end(trial_id, "FAILED" if outcome in ("error", "nonfinite_loss") else "FINISHED")

    def _summary(self, run_id: str, result: dict) -> dict:   # best_<objective> over the history, final_*, epochs_run
        out: dict = {}
        for metric, mode in self.plan.objectives or ((self.plan.metric, self.plan.mode),):
            values = [m.value for m in self.client.get_metric_history(run_id, metric) if math.isfinite(m.value)]
            if values:
                out[f"best_{metric}"] = max(values) if mode == "max" else min(values)
        out.update({f"final_{k}": v for k, v in numeric_metrics(result).items()
                    if not k.startswith(("best_", "final_"))})
        out["epochs_run"] = float(result.get("training_iteration", 0) or 0)
        return out

    def _op_interrupted(self, trial_id: str) -> None:
        if trial_id in self.runs:
            self._op_tags(trial_id, {OUTCOME_TAG: "interrupted"})
            self._op_end(trial_id, "KILLED")

    def _op_cleanup(self, trial_ids: list) -> None:
        """Close and delete child runs that belong to no trial of this sweep (created after the last snapshot of a
        killed driver, for a trial the restored sweep never saw), so that runs and trials stay one to one. A
        trial's run is the one in the state, else (state set aside after a cut-short snapshot, see
        richkd.tune.runner.set_aside_unreadable) its earliest run tagged with the trial id."""
        keep = {t: self.runs[t] for t in trial_ids if t in self.runs}
        runs = child_runs(self.client, self.experiment_id, self.parent_run_id, kind="trial")
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id in trial_ids and keep.setdefault(trial_id, run.info.run_id) == run.info.run_id:
                continue
            self.client.set_tag(run.info.run_id, OUTCOME_TAG, "orphaned")
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")
            self.client.delete_run(run.info.run_id)
            log.info("deleted MLflow run %s of a trial lost with the killed driver", run.info.run_id)
