"""The MLflow side of a sweep, without Ray: clients, experiments, batched writes, the sweep's run tags.

Used by the Tune callback (richkd.tune.mlflow_callback), the results reader, export, finalize and report.
Only the driver writes to MLflow (docs/architecture.md, "Tracking"), so a SQLite store never locks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from richkd.provenance import code_version
from richkd.tracking import check_server, ensure_experiment

__all__ = ["ensure_experiment"]   # re-exported: the sweep's MLflow helpers in one place

if TYPE_CHECKING:
    from richkd.tune.spec import SweepSpec

KIND_TAG = "richkd.kind"             # sweep | trial | finalist
SWEEP_TAG = "richkd.sweep"
TRIAL_TAG = "richkd.trial_id"
HASH_TAG = "richkd.config_hash"
OUTCOME_TAG = "richkd.outcome"       # completed | stopped_early | nonfinite_loss | error | interrupted
PARENT_TAG = "mlflow.parentRunId"
NODE_TAG = "richkd.node_id"          # the Ray node a trial ran on (its last one, if it moved)
# Tune's bookkeeping keys are not model metrics; everything else numeric in a report is logged.
# How long the end of a sweep keeps retrying writes a stopped tracking server could not take (then: one error).
FINAL_WAIT_ENV = "RICHKD_MLFLOW_FINAL_WAIT_S"
FINAL_WAIT_S = 30.0
# MLflow's HTTP client retries a dead server 7 times with doubling back-off (minutes per call) by default; the
# sweep buffers and retries writes itself, so each request may fail fast. Explicit user settings win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore",
              "iterations_since_restore", "done", "should_checkpoint", "checkpoint_dir_name"}



# ----- clients and batched writes ---------------------------------------------------------------------

def client_for(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if tracking_uri.startswith(("http://", "https://")):
        for key, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(key, value)
        quiet_http_retries()
    return MlflowClient(tracking_uri=tracking_uri)


class _FirstRetryOnly(logging.Filter):
    """Lets urllib3's first "Retrying ..." warning through, then drops the rest: during a tracking-server outage
    the outbox retries every write and says so itself, so the console is not flooded with one line per try."""

    def __init__(self) -> None:
        super().__init__("richkd-first-retry-only")
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Retrying"):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def quiet_http_retries() -> None:
    """Install _FirstRetryOnly on urllib3's pool logger once per process."""
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _FirstRetryOnly) for f in logger.filters):
        logger.addFilter(_FirstRetryOnly())


def check_tracking_server(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking URI must name a server that answers now: one SpecError (exit code 2) before Ray,
    caches or trials start, instead of a traceback half-way (richkd.tracking.check_server)."""
    from richkd.tune.errors import SpecError

    check_server(tracking_uri, "mlflow.tracking_uri", timeout_s, error=SpecError, fix="set mlflow.enabled: false")


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


def log_metrics(client, run_id: str, metrics: dict, step: int = 0, timestamp_ms: Optional[int] = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
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


def create_parent_run(spec: "SweepSpec", client, experiment_id: str) -> str:
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
        **({"tune.objectives": json.dumps(t.metrics), "tune.modes": json.dumps(t.modes)} if t.multi_objective else {}),
        "tune.search": t.search.algorithm, "tune.search_seed": t.search.seed,
        "tune.scheduler": t.scheduler.type, "tune.grace_period": t.scheduler.grace_period,
        "tune.reduction_factor": t.scheduler.reduction_factor, "tune.max_t": spec.max_t,
        "tune.max_concurrent": t.max_concurrent, "tune.resources": f"cpu={t.cpu},gpu={t.gpu}",
        **{f"space.{k}": json.dumps(v, default=str) for k, v in spec.describe_space().items()},
    })
    import yaml

    client.log_text(run_id, yaml.safe_dump(spec.to_dict(), sort_keys=False), "spec.yaml")
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
