"""Finalist students as MLflow models: a logged model per finalist run, the best one in the model registry.

Why these APIs: MLflow 3's logged models (`create_logged_model` + `log_model_artifacts`, linked to the run with
`log_outputs`) show under the run's and the experiment's Models tab, and a registered version points at the
logged model's artifacts. The artifacts are the run's own files, `student.pt` (mdistiller format, loaded with
`weights_only=True`: it can serve as `teacher.checkpoint` or be evaluated with `richkd evaluate`), the
`config.yaml` that reproduces it with `richkd train --config` and its `result.json`; no pickled Python objects.
Every call takes the tracking URI's client explicitly (nothing global), so finalize can run next to other
MLflow users in one process.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

MODEL_TYPE = "richkd-student"
MODEL_ID_TAG = "richkd.model_id"


def registered_name(sweep: str) -> str:
    """The registry name of a sweep's best student."""
    return f"richkd-{sweep}"


def log_student_model(client, experiment_id: str, run_id: str, folder: Path, *, name: str = "student",
                      params: Optional[dict] = None, tags: Optional[dict] = None) -> str:
    """Log folder's files as a logged model of run_id (READY once uploaded); returns its model id."""
    from mlflow.entities import LoggedModelOutput

    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type=MODEL_TYPE,
                                       params={k: str(v) for k, v in (params or {}).items()},
                                       tags={k: str(v) for k, v in (tags or {}).items()})
    try:
        client.log_model_artifacts(model.model_id, str(folder))
    except Exception:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


def register_model(client, name: str, model_id: str, run_id: str, *, description: str = "",
                   tags: Optional[dict] = None):
    """A new version of registered model `name` (created if missing) for a logged model; returns the version.

    The source is the logged model's artifact location (not `models:/<id>`, which a SQLite registry resolves
    through the process-global tracking URI); the model id is kept as a version tag as well."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description or None)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    model = client.get_logged_model(model_id)
    return client.create_model_version(name, source=model.artifact_location, run_id=run_id, model_id=model_id,
                                       tags={MODEL_ID_TAG: model_id, **{k: str(v) for k, v in (tags or {}).items()}})


def best_index(values: Sequence[float], mode: str) -> Optional[int]:
    """Index of the best finite value (max or min; the first on ties), or None when none is finite."""
    finite = [(v, i) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    sign = 1 if mode == "max" else -1
    return max(finite, key=lambda vi: (sign * vi[0], -vi[1]))[1]
