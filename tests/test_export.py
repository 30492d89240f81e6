"""Export of a finished sweep (best config round-trip, leaderboard, MLflow artifacts) and `richkd finalize`."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from richkd.config import Config

from tests.factories import ensure_smoke_sweep, shared_ray

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return ensure_smoke_sweep(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def exported(smoke):
    from richkd.tune.export import export_sweep

    return export_sweep(smoke["name"], storage=smoke["storage"])


def test_best_config_round_trips_to_the_trial_config(smoke, exported):
    from richkd.tune.results import read_sweep_record
    from richkd.tune.trainable import load_checkpoint_state

    best = exported.best
    assert best.outcome == "completed" and best.epochs == 3
    loaded = Config.from_yaml(exported.best_config)              # what `richkd train --config` reads
    spec = read_sweep_record(smoke["name"], smoke["storage"]).spec
    params = json.loads((Path(smoke["experiment_path"]) / f"trial_{best.trial_id}" / "params.json").read_text())
    # the exported config pins the threads the trial ran with (its resources.cpu: 2); the rest is the trial's
    assert loaded.train.threads == 2 and spec.tune.cpu == 2
    unpinned = loaded.with_overrides({"train.threads": None})
    assert unpinned == spec.trial_config(params)                 # Tune's sampled dict -> the same config
    state = load_checkpoint_state(best.checkpoint)               # ...and what the trial actually trained
    assert unpinned == Config.from_dict(state["config"])
    assert state["epoch"] == 3
    from richkd.cli import load_config

    assert load_config(str(exported.best_config), []) == loaded  # the CLI path


def test_retraining_the_exported_config_reproduces_the_trial(smoke, exported):
    """`richkd train --config best_config.yaml` is the same run: same seed, data order, threads and metrics,
    whatever thread count the process had before (CPU results depend on it: the config pins the trial's)."""
    from richkd.trainer import run_training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                     # not the trial's 2: the config must set it
    try:
        result = run_training(Config.from_yaml(exported.best_config))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert result.epochs_run == 3
    assert result.metrics["val_top1"] == pytest.approx(exported.best.metrics["val_top1"], abs=1e-6)
    assert result.metrics["val_loss"] == pytest.approx(exported.best.value, rel=1e-4)


def test_best_is_the_survivor_with_the_best_last_value(smoke, exported):
    rows = exported.rows
    assert len(rows) == smoke["num_trials"]
    survivors = [r for r in rows if r.outcome == "completed"]
    assert exported.best is min(survivors, key=lambda r: r.value)   # val_loss: mode min, LAST value
    assert all(r.outcome != "completed" for r in rows if r.epochs < 3)


def test_best_trial_json_and_header_carry_the_metadata(smoke, exported):
    from richkd.tracking import TRIAL_TAG, client_for

    info = json.loads(exported.best_trial.read_text())
    assert info["trial_id"] == exported.best.trial_id
    assert info["selection"] == {"metric": "val_loss", "mode": "min", "scope": "last", "split": "val",
                                 "among": "trials that reached max_t = 3 epochs"}
    assert math.isclose(info["value"], exported.best.value)
    assert info["cache_keys"] and all(k.startswith(("teacher-", "clip-")) for k in info["cache_keys"])
    for key in info["cache_keys"]:
        assert (Path(smoke["work"]) / "cache" / key / "manifest.json").is_file()
    assert info["code_version"]["git_commit"] and info["code_version"]["richkd_version"]
    client = client_for(smoke["tracking_uri"])
    run = client.get_run(info["mlflow"]["run_id"])
    assert run.data.tags[TRIAL_TAG] == exported.best.trial_id
    header = [ln for ln in exported.best_config.read_text().splitlines() if ln.startswith("#")]
    assert any(info["mlflow"]["run_id"] in ln for ln in header) and any("cache entries" in ln for ln in header)


def test_leaderboard_lists_every_trial_with_params_metrics_and_status(smoke, exported):
    with open(exported.leaderboard) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == smoke["num_trials"]
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["trial_id"] == exported.best.trial_id and rows[0]["outcome"] == "completed"
    assert {r["outcome"] for r in rows} >= {"completed", "stopped_early", "nonfinite_loss"}
    for key in ("optim.lr", "loss.fusion_alpha", "loss.feat_weight", "teacher.checkpoint", "mlflow_run_id",
                "final_val_top1", "status"):
        assert key in rows[0]
    nan_row = [r for r in rows if r["outcome"] == "nonfinite_loss"][0]
    assert nan_row["stop_reason"] == "non-finite loss"
    lf = [r for r in rows if float(r["loss.feat_weight"]) == 0.0]
    assert lf and all(r["loss.feat_lambda"] == "" for r in lf)   # inactive conditional keys stay empty


def test_export_files_are_attached_to_the_parent_run(smoke, exported):
    from richkd.tracking import client_for

    client = client_for(smoke["tracking_uri"])
    names = {Path(a.path).name for a in client.list_artifacts(smoke["parent_run_id"], "export")}
    assert {"best_config.yaml", "best_trial.json", "leaderboard.csv"} <= names
    assert client.get_run(smoke["parent_run_id"]).data.tags["richkd.best_trial_id"] == exported.best.trial_id


def test_export_cli(smoke, capsys):
    from richkd.cli import main

    assert main(["export", smoke["name"], "--storage", smoke["storage"]]) == 0
    assert "best trial" in capsys.readouterr().out
    assert main(["export", "no_such_sweep", "--storage", smoke["storage"]]) == 2
    assert "no sweep named 'no_such_sweep'" in capsys.readouterr().err


def test_no_survivor_is_a_clear_error(smoke):
    from richkd.tune.export import ExportError, best_trial, load_sweep

    spec, _, _, rows = load_sweep(smoke["name"], smoke["storage"])
    for r in rows:
        r.outcome = "stopped_early"
    with pytest.raises(ExportError, match="no trial .* reached max_t = 3"):
        best_trial(rows, spec)


def test_finalize_retrains_the_top_config_over_seeds_on_the_test_split(smoke, tmp_path):
    from richkd.tune.finalize import finalize_sweep
    from richkd.tracking import KIND_TAG, PARENT_TAG, client_for

    import ray

    shared_ray()
    result = finalize_sweep(smoke["name"], top=1, seeds=2, storage=smoke["storage"],
                            overrides=["train.epochs=1"], out_dir=str(tmp_path))
    (fin,) = result.finalists
    assert fin.seeds == [0, 1] and len(fin.test_top1) == 2
    assert all(0.0 <= v <= 100.0 for v in fin.test_top1)
    assert math.isclose(fin.mean, sum(fin.test_top1) / 2)
    assert math.isclose(fin.std, statistics.stdev(fin.test_top1))
    with open(result.csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["seed"] for r in rows] == ["0", "1", "mean/std"]
    assert math.isclose(float(rows[2]["test_top1_mean"]), fin.mean, rel_tol=1e-5)
    client = client_for(smoke["tracking_uri"])
    parent = client.get_run(smoke["parent_run_id"])
    finalists = client.search_runs([parent.info.experiment_id],
                                   filter_string=f"tags.`{KIND_TAG}` = 'finalist' and "
                                                 f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert len(finalists) == 1 and finalists[0].info.status == "FINISHED"
    assert math.isclose(finalists[0].data.metrics["test_top1_mean"], fin.mean)
    seeds = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.`{PARENT_TAG}` = '{finalists[0].info.run_id}'")
    assert sorted(r.data.params["seed"] for r in seeds) == ["0", "1"]
    assert all(r.data.params["train.epochs"] == "1" for r in seeds)
    assert "finalist1_test_top1_mean" in client.get_run(smoke["parent_run_id"]).data.metrics
    # the whole training split by default (the sweep held out 25%), so no validation number exists
    assert all(r.data.params["data.val_fraction"] == "0.0" for r in seeds)
    assert all(math.isnan(v) for v in fin.val_top1)
    # the teachers' Fig. 1 analysis on the test split, logged per seed and shown in the summary
    assert {"teacher_test_confident_correct_pct", "fused_test_confidently_wrong_pct"} <= set(fin.teachers)
    assert all("final_fused_test_confident_correct_pct" in r.data.metrics for r in seeds)
    from richkd.tune.finalize import describe_finalize

    text = describe_finalize(result)
    assert (f"confident-correct {fin.teachers['teacher_test_confident_correct_pct']:.1f}% -> "
            f"{fin.teachers['fused_test_confident_correct_pct']:.1f}%") in text

    # the trainings ran as Ray tasks, in worker processes of the Ray that was up (the CLI test below starts its own)
    import os

    assert len(fin.workers) == 2 and all(w["pid"] != os.getpid() and w["node_id"] for w in fin.workers)
    assert ray.is_initialized()                                  # the session's Ray: finalize left it running
    assert sorted(r.data.tags["richkd.worker_pid"] for r in seeds) == sorted(str(w["pid"]) for w in fin.workers)
    assert all("val_top1" not in r.data.metrics and "final_test_top1" in r.data.metrics for r in seeds)
    # each seed's student reached the driver: loadable, next to the config that reproduces it
    from richkd.models import load_teacher

    for seed, folder in zip(fin.seeds, fin.folders):
        assert folder == tmp_path / "finalists" / f"finalist1-seed{seed}"
        assert Config.from_yaml(folder / "config.yaml").seed == seed
        load_teacher("resnet8", folder / "student.pt", 10)
    # the finalist's student is an MLflow logged model of its run; without a validation split nothing chooses a
    # best finalist (never the test split), so nothing is registered
    (output,) = client.get_run(fin.run_id).outputs.model_outputs
    assert output.model_id == fin.model_id and fin.run_id == finalists[0].info.run_id
    assert result.registered is None
    assert ("  no model registered: the finalists trained on the whole training split, so no validation metric "
            "can choose one (the test split never does); --holdout keeps the validation split") in text.splitlines()

    # finalizing again into the same folder never replaces these finalists silently: refused before any work,
    # or, with force=True, they are replaced as a whole (no seed-1 folder of the earlier run is left)
    from richkd.config import ConfigError

    with pytest.raises(ConfigError, match="finalists.csv holds the finalists of an earlier finalize; keep them and "
                                          "write to another folder with --out DIR, or replace them with --force"):
        finalize_sweep(smoke["name"], top=1, seeds=1, storage=smoke["storage"], out_dir=str(tmp_path))
    assert all((folder / "student.pt").is_file() for folder in fin.folders)
    again = finalize_sweep(smoke["name"], top=1, seeds=1, storage=smoke["storage"], overrides=["train.epochs=1"],
                           out_dir=str(tmp_path), force=True)
    assert [len(f.seeds) for f in again.finalists] == [1]
    assert sorted(p.name for p in (tmp_path / "finalists").iterdir()) == ["finalist1-seed0"]


def test_finalize_with_holdout_keeps_the_sweeps_validation_split(smoke, tmp_path, capsys):
    import re

    import mlflow
    import ray

    from richkd.cli import main
    from richkd.tracking import client_for

    if ray.is_initialized():          # the session's shared Ray: this command starts its own, and stops it
        ray.shutdown()
    code = main(["finalize", smoke["name"], "--storage", smoke["storage"], "--top", "1", "--seeds", "1",
                 "--set", "train.epochs=1", "--out", str(tmp_path), "--holdout"])
    assert code == 0 and not ray.is_initialized()
    with open(tmp_path / "finalists.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert 0.0 <= float(rows[0]["val_top1"]) <= 100.0      # a real validation number: the split was kept
    out = capsys.readouterr().out
    assert "test split, teacher -> fused teacher: confident-correct" in out
    # with the validation split, the finalist (the only one) is registered as the best, by the sweep's metric
    name = f"richkd-{smoke['name']}"
    found = re.search(rf"registered in MLflow: {re.escape(name)} version (\d+) \(finalist #1, best mean val_loss "
                      r"on the validation split\)", out)
    assert found, out
    client = client_for(smoke["tracking_uri"])
    version = client.get_model_version(name, found.group(1))
    (output,) = client.get_run(version.run_id).outputs.model_outputs
    assert version.tags["richkd.model_id"] == output.model_id
    assert {v.version for v in client.search_model_versions(f"name='{name}'")} >= {version.version}
    files = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, tracking_uri=smoke["tracking_uri"]))
    assert sorted(p.name for p in files.iterdir()) == ["config.yaml", "result.json", "student.pt"]
    student = tmp_path / "finalists" / "finalist1-seed0" / "student.pt"
    assert (files / "student.pt").read_bytes() == student.read_bytes()
    assert client.get_run(smoke["parent_run_id"]).data.tags["richkd.registered_model"] == f"{name}/{version.version}"
