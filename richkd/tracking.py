"""MLflow experiments as this project creates them, shared by sweeps (richkd.tune) and `richkd evaluate`."""
from __future__ import annotations

from typing import Optional

# The MLflow 3 UI opens an experiment on its GenAI overview unless it is tagged as model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


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
