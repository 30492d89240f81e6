"""End-to-end sweeps on CPU with Ray, Optuna, ASHA and MLflow: a smoke sweep (killed sweeps: tests/reliability/).

Tiny on purpose (2 cores in CI): resnet8 students on 300 real Fashion-MNIST images for 3 epochs, a random-init
resnet8 teacher, the offline tiny CLIP, caches built once by the driver.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
from mlflow.entities import ViewType

try:
    from tests.test_tune_space import make_assets
except ImportError:  # tests/ itself on sys.path
    from test_tune_space import make_assets

REPO = Path(__file__).resolve().parents[1]
ENV = {"RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
       "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def nan_teacher(path: Path) -> Path:
    """A teacher checkpoint whose weights are NaN (a corrupted file): its logits make the KD loss NaN."""
    import torch

    from richkd.models import create_model, save_model_checkpoint

    if not path.is_file():
        model = create_model("resnet8", 10)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        save_model_checkpoint(model, path, arch="resnet8", num_classes=10)
    return path


def smoke_spec(assets: Path, work: Path) -> dict:
    good, bad = str(assets / "teacher.pth"), str(nan_teacher(assets / "nan_teacher.pth"))
    return {
        "name": "smoke_e2e",
        "config": {
            "device": "cpu",
            "data": {"dataset": "fashion_mnist", "root": str(assets / "fmnist"), "val_fraction": 0.25,
                     "batch_size": 64, "augment": "none"},
            "student": {"arch": "resnet8"},
            "teacher": {"arch": "resnet8", "checkpoint": good},
            "clip": {"model": "richkd-tiny", "pretrained": str(assets / "tiny_clip.pt"), "prompt_set": "simple"},
            "loss": {"method": "richkd", "nce_k": 64},
            "teaching": {"mode": "cached", "cache_dir": str(work / "cache")},
            "optim": {"lr": 0.05, "schedule": "cosine", "milestones": []},
            "train": {"epochs": 3},
        },
        "space": {
            "optim.lr": {"sampler": "loguniform", "low": 1e-5, "high": 0.2},
            "loss.fusion_alpha": {"sampler": "uniform", "low": 0.3, "high": 1.0},
            "loss.feat_weight": {"sampler": "choice", "values": [0.0, 0.5]},
            "loss.feat_lambda": {"sampler": "uniform", "low": 0.0, "high": 1.0,
                                 "when": {"loss.feat_weight": {"gt": 0}}},
            "teacher.checkpoint": {"sampler": "choice", "values": [good, bad]},
        },
        "points_to_evaluate": [
            # evaluated in this order (max_concurrent 1): a good config reaches max_t; a learning rate too small
            # to learn is then stopped by ASHA at the first rung; a corrupted teacher ends on a NaN loss
            {"optim.lr": 0.05, "loss.fusion_alpha": 0.7, "loss.feat_weight": 0.5, "loss.feat_lambda": 0.7,
             "teacher.checkpoint": good},
            {"optim.lr": 1e-5, "loss.fusion_alpha": 0.7, "loss.feat_weight": 0.0, "teacher.checkpoint": good},
            {"optim.lr": 0.05, "loss.fusion_alpha": 0.7, "loss.feat_weight": 0.0, "teacher.checkpoint": bad},
        ],
        "tune": {"metric": "val_loss", "mode": "min", "num_samples": 3, "max_concurrent": 1,
                 "search": {"algorithm": "optuna", "seed": 0, "n_startup_trials": 2},
                 "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                 "resources": {"cpu": 2}, "max_failures": 1, "storage_path": str(work / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{work}/runs/mlflow.db", "experiment": "smoke_e2e"},
    }


def ensure_smoke_sweep(base: Path) -> dict:
    """Run the smoke sweep once per test session (test_export.py reuses it); returns what the tests need."""
    marker = base / "smoke_e2e" / "done.json"
    assets = make_assets(base / "tune_assets")
    work = base / "smoke_e2e"
    if marker.is_file():
        return json.loads(marker.read_text())
    from richkd.tune.runner import run_sweep
    from richkd.tune.spec import spec_from_mapping

    for key, value in ENV.items():
        if key != "PYTHONPATH":
            os.environ.setdefault(key, value)
    spec = spec_from_mapping(smoke_spec(assets, work))
    started = time.perf_counter()
    outcome = run_sweep(spec, num_cpus=2, verbose=0)
    info = {"work": str(work), "experiment_path": outcome.experiment_path, "name": spec.name,
            "storage": spec.tune.storage_path, "tracking_uri": spec.mlflow.tracking_uri,
            "parent_run_id": outcome.parent_run_id, "counts": outcome.counts, "num_trials": outcome.num_trials,
            "wall_s": time.perf_counter() - started, "raw": smoke_spec(assets, work)}
    marker.write_text(json.dumps(info))
    return info


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return ensure_smoke_sweep(tmp_path_factory.getbasetemp())


def trial_results(experiment_path: str) -> dict:
    out = {}
    for f in sorted(Path(experiment_path).glob("trial_*/result.json")):
        out[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


@pytest.mark.slow
def test_smoke_sweep_asha_stops_trials_and_mlflow_has_parent_and_children(smoke):
    from richkd.tune.mlflow_client import OUTCOME_TAG, PARENT_TAG, TRIAL_TAG, client_for

    assert smoke["num_trials"] == 3
    counts = smoke["counts"]
    assert counts.get("stopped_early", 0) >= 1, counts          # ASHA stopped the lr=1e-5 trial at rung 1
    assert counts.get("nonfinite_loss", 0) >= 1, counts         # the corrupted teacher ended its trial
    assert counts.get("completed", 0) >= 1, counts
    results = trial_results(smoke["experiment_path"])
    assert len(results) == 3
    for rows in results.values():                                # one report per epoch: iteration == epoch
        assert [r["training_iteration"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(r["epoch"] == r["training_iteration"] for r in rows)
    stopped = [rows for rows in results.values() if len(rows) < 3 and rows[-1]["nonfinite_loss"] == 0]
    assert stopped and all(rows[-1]["training_iteration"] in (1, 2) for rows in stopped)
    nan_rows = [rows for rows in results.values() if rows[-1]["nonfinite_loss"] == 1]
    assert nan_rows and math.isnan(nan_rows[0][-1]["val_loss"]) and "non-finite" in nan_rows[0][-1]["stop_reason"]

    client = client_for(smoke["tracking_uri"])
    parent = client.get_run(smoke["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["richkd.kind"] == "sweep"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and "
                                                f"tags.`richkd.kind` = 'trial'",   # finalize adds other kinds
                                  run_view_type=ViewType.ALL)
    assert len(children) == 3 and len({c.data.tags[TRIAL_TAG] for c in children}) == 3
    assert {c.data.tags[TRIAL_TAG] for c in children} == {k.replace("trial_", "") for k in results}
    for child in children:
        assert child.info.status in ("FINISHED", "FAILED") and child.info.lifecycle_stage == "active"
        assert child.data.params["loss.method"] == "richkd" and len(child.data.params) > 40
        assert "epochs_run" in child.data.metrics
    outcomes = sorted(c.data.tags[OUTCOME_TAG] for c in children)
    assert "stopped_early" in outcomes and "nonfinite_loss" in outcomes
    done = [c for c in children if c.data.tags[OUTCOME_TAG] == "completed"][0]
    history = client.get_metric_history(done.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert done.data.metrics["best_val_loss"] == min(m.value for m in history)
    print(f"\nsmoke sweep: {smoke['num_trials']} trials in {smoke['wall_s']:.1f}s; {smoke['counts']}")
    for name, rows in results.items():
        first = rows[0]
        print(f"  {name}: {len(rows)} epochs, first report {first['time_this_iter_s']:.1f}s after the trial "
              f"started (the epoch itself {first.get('epoch_time_s', float('nan')):.1f}s)")


@pytest.mark.slow
def test_optuna_study_records_pruned_and_failed_trials(smoke):
    """The searcher checkpoint holds the Optuna study: ASHA-stopped -> PRUNED, NaN -> FAIL, survivors COMPLETE."""
    import pickle

    from optuna.trial import TrialState

    states = None
    for f in Path(smoke["experiment_path"]).glob("searcher-state-*.pkl"):
        saved = pickle.loads(f.read_bytes())
        searcher = saved["searcher"] if isinstance(saved, dict) and "searcher" in saved else saved
        study = _find_study(searcher)
        states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states is not None
    assert TrialState.PRUNED in states and TrialState.FAIL in states and TrialState.COMPLETE in states


def _find_study(obj, depth: int = 0):
    import optuna

    if isinstance(obj, optuna.Study):
        return obj
    if depth > 4:
        return None
    items = obj.values() if isinstance(obj, dict) else getattr(obj, "__dict__", {}).values()
    for value in items:
        found = _find_study(value, depth + 1)
        if found is not None:
            return found
    return None


# Killed trial workers and drivers (SIGKILL, then --resume): tests/reliability/test_sweep_kills.py
