"""MLflow experiments as this project creates them, and the check that a tracking server answers; shared by
sweeps (richkd.tune) and `richkd evaluate`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import urlopen

# The MLflow 3 UI opens an experiment on its GenAI overview unless it is tagged as model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The stores MLflow 3 opens (schemes, before any "+driver"); its ./mlruns file store it refuses
STORE_SCHEMES = ("sqlite", "http", "https", "databricks", "postgresql", "mysql", "mssql")


def default_artifact_location(tracking_uri: str, given: Optional[str] = None) -> Optional[str]:
    """Artifacts beside a SQLite store (else MLflow writes ./mlruns wherever the driver runs); a local folder
    given by the user becomes a file:// URI."""
    if given is None and tracking_uri.startswith("sqlite:///"):
        given = os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]), "mlartifacts")
    if isinstance(given, str) and "://" not in given:
        return Path(os.path.abspath(os.path.expanduser(given))).as_uri()
    return given


def ensure_experiment(client, name: str, artifact_location: Optional[str] = None) -> str:
    """Create the experiment once (parallel creation races, mlflow#4123) or restore it; return its id.

    Tagged as model training (EXPERIMENT_KIND), so the MLflow 3 UI opens on its runs table, not the GenAI view.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created meanwhile by another driver
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def check_server(tracking_uri: str, key: str, timeout_s: float = 5.0, error: type = ValueError, fix: str = "") -> None:
    """An http(s) tracking URI (the value of `key`) must name a server that answers now: one `error` before any
    work, instead of a traceback after it. Other stores (SQLite, databases) are not probed."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    parsed = urlparse(tracking_uri)
    try:
        port_ok = parsed.port is None or 0 < parsed.port < 65536
    except ValueError:
        port_ok = False
    if not parsed.hostname or not port_ok:
        raise error(f"{key}: {tracking_uri!r} is not a valid server URL; write it like http://HOST:5000")
    try:
        with urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except HTTPError as exc:
        problem = f"HTTP {exc.code} {exc.reason}"
    except (URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise error(f"{key}: the MLflow server at {tracking_uri} does not answer ({problem}); start it (mlflow server "
                "--backend-store-uri sqlite:///PATH/mlflow.db --host HOST --port PORT), fix the URI"
                + (f", or {fix}" if fix else ""))
