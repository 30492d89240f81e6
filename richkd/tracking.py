"""MLflow as this project writes it: every run goes through one writer (`RunWriter`) whose batched MlflowClient writes
wait in a bounded, retrying `Outbox`, so a tracking server that is down delays the logging but never stops the work.
Experiments are tagged as model training, with the objective as primary metric, and `experiment_url` opens their runs
table sorted by it: the MLflow 3 UI would otherwise open its GenAI overview (docs/architecture.md, "Data flow")."""
from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlparse
from urllib.request import urlopen

from richkd.metric_names import direction
from richkd.outbox import Outbox

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"    # read by the MLflow 3 UI's run charts
# The stores MLflow 3 opens (schemes, before any "+driver"); its ./mlruns file store it refuses
STORE_SCHEMES = ("sqlite", "http", "https", "databricks", "postgresql", "mysql", "mssql")
KIND_TAG = "richkd.kind"             # sweep | trial | finalist | finalist_seed | comparison | evaluate
SWEEP_TAG = "richkd.sweep"
TRIAL_TAG = "richkd.trial_id"
HASH_TAG = "richkd.config_hash"
OUTCOME_TAG = "richkd.outcome"       # completed | stopped_early | nonfinite_loss | error | interrupted | orphaned
NODE_TAG = "richkd.node_id"          # the Ray node a run trained on
PARENT_TAG = "mlflow.parentRunId"
# MLflow's HTTP client retries a dead server 7 times with doubling back-off (minutes per call) by default; the
# Outbox retries itself, so each request may fail fast. Explicit user settings win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# How long the end of a command keeps retrying writes a stopped tracking server could not take (then: one error).
FINAL_WAIT_ENV = "RICHKD_MLFLOW_FINAL_WAIT_S"
FINAL_WAIT_S = 30.0
MODEL_TYPE = "richkd-student"
UI_PORT = 5000                       # where `richkd ui` serves a store by default


# ----- clients, experiments, links --------------------------------------------------------------------

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


_RETRIES = itertools.count()


def _first_retry_only(record: logging.LogRecord) -> bool:   # during an outage the Outbox says so itself
    return not str(record.msg).startswith("Retrying") or next(_RETRIES) == 0


def quiet_http_retries() -> None:   # urllib3's first "Retrying ..." warning only; added once, however often called
    logging.getLogger("urllib3.connectionpool").addFilter(_first_retry_only)


def default_artifact_location(tracking_uri: str, given: Optional[str] = None) -> Optional[str]:
    """Artifacts beside a SQLite store (else MLflow writes ./mlruns wherever the command runs); a folder -> file://."""
    if given is None and tracking_uri.startswith("sqlite:///"):
        return Path(os.path.dirname(os.path.abspath(tracking_uri[len("sqlite:///"):])), "mlartifacts").as_uri()
    if isinstance(given, str) and "://" not in given:
        return Path(os.path.abspath(os.path.expanduser(given))).as_uri()
    return given


def ensure_experiment(client, name: str, artifact_location: Optional[str] = None,
                      primary_metric: Optional[str] = None) -> str:
    """Create the experiment once (parallel creation races, mlflow#4123) or restore it, tagged; its id."""
    wanted = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, **({PRIMARY_METRIC_TAG: primary_metric} if primary_metric else {})}
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=wanted)
        except Exception:  # created meanwhile by another driver
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    for key, value in wanted.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def local_ui(port: int = UI_PORT) -> str:
    return f"http://127.0.0.1:{port}"


def experiment_url(ui: str, experiment_id: str, metric: Optional[str] = None, mode: str = "max",
                   sweep: Optional[str] = None) -> str:
    """The MLflow UI page of an experiment's runs table, best `metric` first, narrowed to one `sweep`'s runs."""
    query = ["workflowType=machine_learning"]
    if sweep:
        query.append("searchFilter=" + quote(f"tags.`{SWEEP_TAG}` = '{sweep}'", safe=""))
    if metric:
        query.append(f"orderByKey={quote(f'metrics.`{metric}`', safe='')}&orderByAsc={str(mode == 'min').lower()}")
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{'&'.join(query)}"


def experiment_links(tracking_uri: str, ui: str) -> list[tuple[str, str]]:
    """(name, experiment_url) of every experiment this project made in the store, by its primary metric."""
    found = client_for(tracking_uri).search_experiments(
        filter_string=f"tags.`{EXPERIMENT_KIND_TAG}` = '{EXPERIMENT_KIND}'")
    out = []
    for exp in sorted(found, key=lambda e: e.name):
        metric = exp.tags.get(PRIMARY_METRIC_TAG)
        out.append((exp.name, experiment_url(ui, exp.experiment_id, metric, direction(metric) if metric else "max")))
    return out


def check_server(tracking_uri: str, key: str, timeout_s: float = 5.0, error: type = ValueError, fix: str = "") -> None:
    """An http(s) tracking URI (the value of `key`) must answer now: one `error` before any work. Others: not probed."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    parsed = urlparse(tracking_uri)
    try:
        valid = bool(parsed.hostname) and parsed.port != 0
    except ValueError:   # a port that is not a number in 0..65535
        valid = False
    if not valid:
        raise error(f"{key}: {tracking_uri!r} is not a valid server URL; write it like http://HOST:5000")
    try:
        urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s).close()   # any non-2xx: an HTTPError
        return
    except HTTPError as exc:
        problem = f"HTTP {exc.code} {exc.reason}"
    except (URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise error(f"{key}: the MLflow server at {tracking_uri} does not answer ({problem}); start it (mlflow server "
                "--backend-store-uri sqlite:///PATH/mlflow.db --host HOST --port PORT), fix the URI"
                + (f", or {fix}" if fix else ""))


def child_runs(client, experiment_id: str, parent_run_id: str, kind: str = "trial") -> list:
    """Active child runs of one kind under a parent run, every page."""
    from mlflow.utils import get_results_from_paginated_fn

    filt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{KIND_TAG}` = '{kind}'"
    return get_results_from_paginated_fn(lambda n, token: client.search_runs(
        [experiment_id], filter_string=filt, max_results=n, page_token=token), 1000)


# ----- the writer ---------------------------------------------------------------------------------------

class RunWriter:
    """Writes to one MLflow store as plain ops in an Outbox: `put(kind, key, ...)` queues, `send` also flushes,
    `drain` waits for the end. Runs are named by keys of the caller's choosing (a trial id, "parent", ...), so
    nothing waits for the server. Each op kind is the method `_op_<kind>`; subclasses add their own."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.outbox = Outbox(tracking_uri)
        self.runs: dict[str, str] = {}        # key -> run id
        self.models: dict[str, str] = {}      # key -> logged model id
        self.versions: dict[str, str] = {}    # registered model name -> the version last created here
        self._client = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    def put(self, *op) -> None:
        self.outbox.put(op)

    def send(self, *op) -> None:
        self.outbox.put(op)
        self.outbox.flush(self.apply, self.reachable)

    def drain(self, wait_s: Optional[float] = None) -> bool:
        wait = float(os.environ.get(FINAL_WAIT_ENV, FINAL_WAIT_S)) if wait_s is None else wait_s
        return self.outbox.drain(self.apply, self.reachable, wait)

    def reachable(self) -> bool:   # a cheap read the store answers whenever it is up: tells "down" from "bad write"
        self.client.search_experiments(max_results=1)
        return True

    def apply(self, op: tuple) -> None:
        getattr(self, f"_op_{op[0]}")(*op[1:])

    # -- the ops --
    def _op_run(self, key: str, experiment_id: str, name: str, tags: dict, parent: Optional[str] = None) -> None:
        if key not in self.runs:   # nested under the run of key `parent`, when given
            tags = {**tags, PARENT_TAG: self.runs[parent]} if parent else tags
            self.runs[key] = self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    def _batches(self, key: str, kind: str, entries: list, size: int) -> None:
        for i in range(0, len(entries), size):
            self.client.log_batch(self.runs[key], **{kind: entries[i:i + size]}, synchronous=True)

    def _op_params(self, key: str, params: dict) -> None:
        from mlflow.entities import Param

        self._batches(key, "params", [Param(str(k), str(v)[:6000]) for k, v in params.items()], 100)

    def _op_metrics(self, key: str, metrics: dict, step: int = 0, stamp: Optional[int] = None) -> None:
        self._op_history(key, [(step, metrics)], stamp)   # one epoch's record: given up first when the Outbox is full

    _op_summary = _op_metrics   # the same write, never given up (end-of-run summaries)

    def _op_history(self, key: str, steps: list, stamp: Optional[int] = None) -> None:   # [(step, {name: value})]
        from mlflow.entities import Metric

        now = int(time.time() * 1000) if stamp is None else int(stamp)
        self._batches(key, "metrics", [Metric(str(k), float(v), now, int(s)) for s, m in steps for k, v in m.items()],
                      1000)

    def _op_tags(self, key: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._batches(key, "tags", [RunTag(str(k), str(v)[:8000]) for k, v in tags.items()], 100)

    def _op_artifact(self, key: str, path: str, folder: Optional[str] = None) -> None:
        self.client.log_artifact(self.runs[key], path, artifact_path=folder)

    def _op_text(self, key: str, text: str, file: str) -> None:
        self.client.log_text(self.runs[key], text, file)

    def _op_status(self, key: str, status: str) -> None:
        if self.client.get_run(self.runs[key]).info.status != status:
            self.client.update_run(self.runs[key], status=status)

    def _op_end(self, key: str, status: str = "FINISHED") -> None:
        if key in self.runs:   # a run whose creation was given up has nothing to end
            self.client.set_terminated(self.runs[key], status=status)

    def _op_model(self, key: str, folder: str, name: str, params: dict, tags: dict) -> None:
        """The files of `folder` as a logged model of run `key` (its Models tab), READY once uploaded."""
        from mlflow.entities import LoggedModelOutput

        if key in self.models:
            return
        experiment_id = self.client.get_run(self.runs[key]).info.experiment_id
        model = self.client.create_logged_model(experiment_id, name=name, source_run_id=self.runs[key],
                                                model_type=MODEL_TYPE, params={k: str(v) for k, v in params.items()},
                                                tags={k: str(v) for k, v in tags.items()})
        try:
            self.client.log_model_artifacts(model.model_id, folder)
        except Exception:
            self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(self.runs[key], [LoggedModelOutput(model.model_id, step=0)])
        self.models[key] = model.model_id

    def _op_register(self, key: str, name: str, description: str, tags: dict) -> None:
        """A new version of registered model `name` (created if missing) for run `key`'s logged model, sourced from
        its artifact location (a `models:/<id>` source would resolve through the process-global tracking URI)."""
        from mlflow.exceptions import MlflowException

        if key not in self.models:
            log.warning("no logged model of run %s to register as %s (its upload failed)", key, name)
            return
        try:
            self.client.create_registered_model(name, description=description or None)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        model_id = self.models[key]
        version = self.client.create_model_version(
            name, source=self.client.get_logged_model(model_id).artifact_location, run_id=self.runs[key],
            model_id=model_id, tags={"richkd.model_id": model_id, **{k: str(v) for k, v in tags.items()}})
        self.versions[name] = str(version.version)


# ----- one-call helpers (commands that log once) ----------------------------------------------------------

def log_run(tracking_uri: str, experiment: str, run_name: str, *, params: Optional[dict] = None,
            metrics: Optional[dict] = None, tags: Optional[dict] = None, artifacts: Sequence = (),
            texts: Optional[dict] = None, wait_s: Optional[float] = 0.0) -> str:
    """One finished run in `experiment` (artifacts beside a SQLite store) with params, metrics, tags, files and
    {file name: text}; its run id. Writes not taken within `wait_s` seconds (None: FINAL_WAIT_S): a RuntimeError."""
    writer = RunWriter(tracking_uri)
    experiment_id = ensure_experiment(writer.client, experiment, default_artifact_location(tracking_uri))
    writer.put("run", "run", experiment_id, run_name, dict(tags or {}))
    if params:
        writer.put("params", "run", {k: "" if v is None else v for k, v in params.items()})
    if metrics:
        writer.put("summary", "run", {k: v for k, v in metrics.items() if v is not None})
    for path in artifacts:
        writer.put("artifact", "run", str(path))
    for name, text in (texts or {}).items():
        writer.put("text", "run", text, name)
    writer.put("end", "run")
    if not writer.drain(wait_s):
        raise RuntimeError(f"MLflow at {tracking_uri} did not take run {run_name!r} ({len(writer.outbox)} writes "
                           "left); check the tracking server")
    return writer.runs["run"]


def attach(tracking_uri: str, run_id: str, files: Sequence = (), folder: Optional[str] = None,
           tags: Optional[dict] = None, metrics: Optional[dict] = None, wait_s: Optional[float] = None) -> bool:
    """Files (under artifact `folder`), tags and metrics added to an existing run; False when the store did not take
    them all within `wait_s` (default FINAL_WAIT_S)."""
    writer = RunWriter(tracking_uri)
    writer.runs["run"] = run_id
    for path in files:
        writer.put("artifact", "run", str(path), folder)
    if tags:
        writer.put("tags", "run", tags)
    if metrics:
        writer.put("summary", "run", metrics)
    return writer.drain(wait_s)
