"""finalize's pieces: finalist students as MLflow logged models (written through the outbox), the best one (by
validation, never by test) registered, and a failing training task reported as its own error. The whole command runs in tests/test_export.py
on the smoke sweep (trainings in Ray workers, students back on the driver, the registry)."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from richkd.tune.finalize import FinalistResult, FinalistRuns, best_index


@pytest.mark.parametrize("values, mode, expect", [
    ([1.0, 3.0, 2.0], "max", 1),
    ([1.0, 3.0, 2.0], "min", 0),
    ([math.nan, 0.5, 0.5], "max", 1),     # NaN never wins; the first of equal values does
    ([math.nan, math.inf], "min", None),
    ([], "max", None),
])
def test_best_index(values, mode, expect):
    assert best_index(values, mode) == expect


def student_folder(root: Path, tag: str) -> Path:
    root.mkdir(parents=True)
    for name in ("student.pt", "config.yaml", "result.json"):
        (root / name).write_text(f"{name} of {tag}")
    return root


def test_the_best_finalist_by_validation_is_registered_not_the_best_by_test(tmp_path):
    from richkd.tracking import client_for

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    experiment = client.create_experiment("fin", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment).info.run_id
    tracker = FinalistRuns(SimpleNamespace(tracking_uri=uri, experiment_id=experiment, parent_run_id=parent,
                                           name="unit"))
    # finalist 1 is better on test, finalist 2 on the sweep's metric (val_loss, min) on the validation split
    fins = [FinalistResult(rank=1, trial_id="a", sampled={}, seeds=[0, 1], test_top1=[90.0, 91.0],
                           val_top1=[80.0, 80.0], val_metric=[0.9, 0.7]),
            FinalistResult(rank=2, trial_id="b", sampled={}, seeds=[0, 1], test_top1=[85.0, 86.0],
                           val_top1=[70.0, 70.0], val_metric=[0.5, math.nan])]
    for fin in fins:
        tracker.start(fin.key, f"finalist-{fin.rank}", "parent", {})
        fin.folders = [student_folder(tmp_path / f"f{fin.rank}", fin.trial_id)]
        tracker.finish_finalist(fin)
    tracker.register_best(fins, ("val_loss", "min"))
    tracker.done(fins)
    assert tracker.registered == {"name": "richkd-unit", "version": "1", "rank": 2, "metric": "val_loss"}
    (version,) = client.search_model_versions("name='richkd-unit'")
    assert version.run_id == fins[1].run_id and version.tags["richkd.model_id"] == fins[1].model_id
    assert "validation" in version.tags["richkd.selected_by"]
    for fin in fins:                                  # each finalist run holds its own logged student
        run = client.get_run(fin.run_id)
        assert run.info.status == "FINISHED"
        assert [o.model_id for o in run.outputs.model_outputs] == [fin.model_id]
        model = client.get_logged_model(fin.model_id)
        assert model.source_run_id == fin.run_id and str(model.status) == "READY"
    assert client.get_run(parent).data.tags["richkd.registered_model"] == "richkd-unit/1"
    tracker.register_best(fins, ("val_loss", "min"))
    tracker.done(fins)
    assert tracker.registered["version"] == "2"                  # finalizing again adds a version


@pytest.mark.slow
def test_a_failing_training_task_raises_its_own_error_and_reports_the_job(tmp_path):
    from richkd.config import Config
    from richkd.models import CheckpointError
    from richkd.tune.finalize import SeedJob, run_seed_jobs

    from tests.factories import base_spec, make_assets, shared_ray

    assets = make_assets(tmp_path / "assets", clip=False)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    raw = base_spec(assets, tmp_path)["config"]
    cfg = Config.from_dict({**raw, "loss": {"method": "kd"}, "teaching": {"mode": "online"},
                            "teacher": {"arch": "resnet8", "checkpoint": str(broken)}})
    job = SeedJob(rank=1, trial_id="t1", seed=0, config=cfg)
    done, failed = [], []
    shared_ray()
    with pytest.raises(CheckpointError, match="broken.pth"):       # the trainer's error, not Ray's wrapper
        run_seed_jobs([job], cpu=1, gpu=0, on_done=lambda j, r: done.append(j),
                      on_failed=failed.append)
    assert done == [] and failed == [job]


def test_registration_by_val_top1_follows_validation_where_test_disagrees(tmp_path):
    """A `val_top1` (max) sweep: finalist 1 is best on test, finalist 2 on validation; the registered model is
    finalist 2 (the test split never chooses), and a finalist without a finite validation value never wins."""
    from richkd.tracking import client_for

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    experiment = client.create_experiment("fin", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment).info.run_id
    tracker = FinalistRuns(SimpleNamespace(tracking_uri=uri, experiment_id=experiment, parent_run_id=parent,
                                           name="top1"))
    fins = [FinalistResult(rank=1, trial_id="a", sampled={}, seeds=[0, 1], test_top1=[92.0, 93.0],
                           val_top1=[70.0, 71.0], val_metric=[70.0, 71.0]),
            FinalistResult(rank=2, trial_id="b", sampled={}, seeds=[0, 1], test_top1=[80.0, 81.0],
                           val_top1=[75.0, 76.0], val_metric=[75.0, 76.0]),
            FinalistResult(rank=3, trial_id="c", sampled={}, seeds=[0, 1], test_top1=[99.0, 99.0],
                           val_top1=[math.nan, math.nan], val_metric=[math.nan, math.nan])]
    for fin in fins:
        tracker.start(fin.key, f"finalist-{fin.rank}", "parent", {})
        fin.folders = [student_folder(tmp_path / f"f{fin.rank}", fin.trial_id)]
        tracker.finish_finalist(fin)
    tracker.register_best(fins, ("val_top1", "max"))
    tracker.done(fins)
    assert tracker.registered == {"name": "richkd-top1", "version": "1", "rank": 2, "metric": "val_top1"}
    (version,) = client.search_model_versions("name='richkd-top1'")
    assert version.run_id == fins[1].run_id
