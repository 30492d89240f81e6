"""The driver-side MLflow callback on a real SQLite store with real (stub) Tune Trial objects.

Covers parent/child runs, flat params, batched per-epoch metrics, best_/final_ summaries, and what happens
across a driver restart: the same child runs continue, nothing is duplicated, nothing stays RUNNING.
"""
from __future__ import annotations

import pickle

import pytest
from mlflow.entities import ViewType
from ray.tune.experiment import Trial

from richkd.tracking import HASH_TAG, KIND_TAG, OUTCOME_TAG, PARENT_TAG, PRIMARY_METRIC_TAG, TRIAL_TAG, client_for
from richkd.tune.mlflow_callback import sweep_callback
from richkd.tune.spec import spec_from_mapping

from tests.factories import base_spec, make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds); one experiment per test."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow_store')}/mlflow.db"


@pytest.fixture
def world(assets, tmp_path, store, request):
    raw = base_spec(assets, tmp_path, mlflow={"tracking_uri": store, "experiment": request.node.name})
    raw["space"]["loss.feat_weight"] = {"sampler": "choice", "values": [0.0, 0.8]}
    raw["space"]["loss.feat_lambda"] = {"sampler": "uniform", "low": 0.0, "high": 1.0,
                                        "when": {"loss.feat_weight": {"gt": 0}}}
    spec = spec_from_mapping(raw, check_resources=False, check_data=False)
    cb = sweep_callback(spec)          # the experiment, the parent run, and the callback, as the runner makes them
    return spec, client_for(spec.mlflow.tracking_uri), cb.experiment_id, cb.parent_run_id, cb


def make_trial(trial_id: str, **config) -> Trial:
    cfg = {"loss.fusion_alpha": 0.5, "loss.temperature": 2.0, "loss.feat_weight": 0.8, "loss.feat_lambda": 0.3}
    cfg.update(config)
    return Trial("richkd_trial", config=cfg, trial_id=trial_id, stub=True)


def report(cb, trial: Trial, epoch: int, val: float) -> None:
    result = {"training_iteration": epoch, "epoch": float(epoch), "val_top1": val, "train_loss": 1.0 / epoch,
              "time_this_iter_s": 0.5, "pid": 123, "nonfinite_loss": 0.0}
    trial.update_last_result(result)
    cb.on_trial_result(iteration=0, trials=[trial], trial=trial, result=result)


def finish(cb, trial: Trial, trials: list) -> None:
    cb.on_trial_complete(iteration=0, trials=trials, trial=trial)
    trial.set_status(Trial.TERMINATED)


def children(client, experiment_id, parent, view=ViewType.ACTIVE_ONLY):
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'", run_view_type=view)


def test_parent_and_child_runs_with_params_metrics_and_summaries(world):
    spec, client, experiment_id, parent, cb = world
    t1, t2 = make_trial("t1"), make_trial("t2", **{"loss.feat_weight": 0.0})
    cb.setup(total_num_samples=2)
    for t in (t1, t2):
        cb.on_trial_start(iteration=0, trials=[t1, t2], trial=t)
    for epoch, val in ((1, 10.0), (2, 30.0), (3, 20.0)):
        report(cb, t1, epoch, val)
    report(cb, t2, 1, 5.0)
    finish(cb, t2, [t1, t2])           # ASHA stopped it after 1 of 3 epochs
    finish(cb, t1, [t1, t2])
    cb.on_experiment_end(trials=[t1, t2])

    runs = {r.data.tags[TRIAL_TAG]: r for r in children(client, experiment_id, parent)}
    assert set(runs) == {"t1", "t2"}
    r1, r2 = client.get_run(runs["t1"].info.run_id), client.get_run(runs["t2"].info.run_id)
    assert r1.data.tags[PARENT_TAG] == parent and r1.data.tags[KIND_TAG] == "trial"
    # the full flat config as params: the trial's effective config, inactive keys dropped
    expected = spec.trial_config(t1.config).to_flat_dict()
    assert r1.data.params == {k: str(v) for k, v in expected.items()}
    assert r2.data.params["loss.feat_lambda"] == "None"       # feat_weight 0: lambda was not applied
    history = client.get_metric_history(r1.info.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(1, 10.0), (2, 30.0), (3, 20.0)]
    assert "pid" not in r1.data.metrics and "training_iteration" not in r1.data.metrics
    assert r1.data.metrics["best_val_top1"] == 30.0 and r1.data.metrics["final_val_top1"] == 20.0
    assert r1.data.metrics["epochs_run"] == 3.0
    assert (r1.info.status, r1.data.tags[OUTCOME_TAG]) == ("FINISHED", "completed")
    assert (r2.info.status, r2.data.tags[OUTCOME_TAG]) == ("FINISHED", "stopped_early")
    p = client.get_run(parent)
    assert p.info.status == "FINISHED"
    assert p.data.metrics["n_trials_completed"] == 1 and p.data.metrics["n_trials_stopped_early"] == 1
    assert p.data.metrics["best_val_top1"] == 20.0             # the LAST value of the survivor
    assert p.data.params["tune.max_t"] == "3"
    assert {"spec.yaml", "search_space.json", "base_config.yaml"} <= {a.path for a in client.list_artifacts(parent)}
    assert client.get_experiment(experiment_id).tags[PRIMARY_METRIC_TAG] == "val_top1"   # the UI charts it first


def test_nonfinite_and_error_trials_fail_with_a_reason(world):
    spec, client, experiment_id, parent, cb = world
    t_nan, t_err = make_trial("nan"), make_trial("err")
    cb.setup(total_num_samples=2)
    for t in (t_nan, t_err):
        cb.on_trial_start(iteration=0, trials=[t_nan, t_err], trial=t)
    result = {"training_iteration": 1, "val_top1": float("nan"), "nonfinite_loss": 1.0,
              "stop_reason": "non-finite loss: training loss became nan in epoch 1"}
    t_nan.update_last_result(result)
    cb.on_trial_result(iteration=0, trials=[], trial=t_nan, result=result)
    finish(cb, t_nan, [t_nan, t_err])
    cb.on_trial_error(iteration=0, trials=[], trial=t_err)
    t_err.set_status(Trial.ERROR)
    cb.on_experiment_end(trials=[t_nan, t_err])
    runs = {r.data.tags[TRIAL_TAG]: r for r in children(client, experiment_id, parent)}
    assert runs["nan"].info.status == "FAILED" and runs["nan"].data.tags[OUTCOME_TAG] == "nonfinite_loss"
    assert "non-finite loss" in runs["nan"].data.tags["richkd.stop_reason"]
    assert runs["err"].info.status == "FAILED" and runs["err"].data.tags[OUTCOME_TAG] == "error"
    assert client.get_run(parent).data.metrics["n_trials_nonfinite_loss"] == 1


def test_restart_continues_the_same_runs_without_duplicates_or_dangling_runs(world):
    spec, client, experiment_id, parent, cb = world
    done, running, late, reissued = (make_trial("done"), make_trial("running"), make_trial("late"),
                                     make_trial("reid", **{"loss.fusion_alpha": 0.9}))
    trials = [done, running]
    cb.setup(total_num_samples=4)
    cb.on_trial_start(iteration=0, trials=trials, trial=done)
    for e in (1, 2, 3):
        report(cb, done, e, 10.0 * e)
    finish(cb, done, trials)
    cb.on_trial_start(iteration=0, trials=trials, trial=running)
    report(cb, running, 1, 11.0)
    # --- Tune's last experiment snapshot: tuner.pkl holds the pickled callback, callback state saved ---
    snapshot = cb.get_state()
    pickled = pickle.dumps(cb)
    # --- after the snapshot, before the driver is killed ---
    report(cb, running, 2, 12.0)
    cb.on_trial_start(iteration=0, trials=trials, trial=late)        # its trial will be re-created after restore
    stale = make_trial("reid")                                        # a trial id Tune will hand out again...
    cb.on_trial_start(iteration=0, trials=trials, trial=stale)        # ...with a different config
    runs_before = {r.data.tags[TRIAL_TAG]: r.info.run_id for r in children(client, experiment_id, parent)}

    # --- restore: a fresh driver unpickles the callback and sets its state; Tune calls setup afterwards ---
    cb2 = pickle.loads(pickled)
    cb2.set_state(snapshot)
    cb2.setup(total_num_samples=4)
    assert client.get_run(parent).info.status == "RUNNING"
    trials2 = [done, running, late, reissued]
    for t in (running, late, reissued):
        cb2.on_trial_start(iteration=0, trials=trials2, trial=t)
    report(cb2, running, 2, 12.5)            # epoch 2 re-run from the epoch-1 checkpoint: already logged
    report(cb2, running, 3, 13.0)
    finish(cb2, running, trials2)
    for t in (late, reissued):
        for e in (1, 2, 3):
            report(cb2, t, e, 5.0)
        finish(cb2, t, trials2)
    cb2.on_experiment_end(trials=trials2)

    active = children(client, experiment_id, parent)
    ids = [r.data.tags[TRIAL_TAG] for r in active]
    assert sorted(ids) == ["done", "late", "reid", "running"]        # one run per trial, no duplicates
    by_trial = {r.data.tags[TRIAL_TAG]: r for r in active}
    for name in ("done", "running", "late"):
        assert by_trial[name].info.run_id == runs_before[name]       # the same runs continued
    assert by_trial["reid"].info.run_id != runs_before["reid"]       # config changed: a new run
    assert by_trial["reid"].data.tags[HASH_TAG] != client.get_run(runs_before["reid"]).data.tags[HASH_TAG]
    everything = children(client, experiment_id, parent, view=ViewType.ALL)
    assert all(r.info.status != "RUNNING" for r in everything) and client.get_run(parent).info.status == "FINISHED"
    deleted = client.get_run(runs_before["reid"])
    assert deleted.info.lifecycle_stage == "deleted" and deleted.data.tags[OUTCOME_TAG] == "orphaned"
    steps = [m.step for m in client.get_metric_history(by_trial["running"].info.run_id, "val_top1")]
    values = [m.value for m in client.get_metric_history(by_trial["running"].info.run_id, "val_top1")]
    assert steps == [1, 2, 3] and values == [11.0, 12.0, 13.0]


def test_interrupted_sweep_leaves_nothing_running_and_resume_reopens(world):
    spec, client, experiment_id, parent, cb = world
    t = make_trial("t")
    cb.setup(total_num_samples=2)
    cb.on_trial_start(iteration=0, trials=[t], trial=t)
    report(cb, t, 1, 1.0)
    t.set_status(Trial.RUNNING)
    cb.on_experiment_end(trials=[t])               # Ctrl-C: Tune ends the experiment with the trial unfinished
    run = children(client, experiment_id, parent)[0]
    assert run.info.status == "KILLED" and run.data.tags[OUTCOME_TAG] == "interrupted"
    assert client.get_run(parent).info.status == "KILLED"
    cb2 = pickle.loads(pickle.dumps(cb))
    cb2.setup(total_num_samples=2)
    cb2.on_trial_start(iteration=0, trials=[t], trial=t)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert len(children(client, experiment_id, parent)) == 1


def test_child_runs_hold_every_reported_metric_at_every_epoch(world):
    """Everything numeric a trial reports (richkd.tune.trainable: the trainer's epoch metrics, nonfinite_loss)
    is in the child run's history at each epoch; Tune's own bookkeeping keys are not."""
    spec, client, experiment_id, parent, cb = world
    trial = make_trial("full")
    cb.setup(total_num_samples=1)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    reported = {}
    for epoch in (1, 2, 3):
        result = {"epoch": float(epoch), "train_loss": 2.0 / epoch, "lr": 0.05 / epoch, "train_ce": 1.5 / epoch,
                  "train_logit": 0.3 / epoch, "train_feat": 0.2 / epoch, "epoch_time_s": 1.25 * epoch,
                  "val_top1": 40.0 + epoch, "val_top5": 80.0 + epoch, "val_ece": 0.1 / epoch, "val_loss": 1.0 / epoch,
                  "best_val_top1": 40.0 + epoch, "val_corrupt_top1": 30.0 + epoch, "nonfinite_loss": 0.0,
                  "node_id": "abc123", "training_iteration": epoch, "time_this_iter_s": 0.5,
                  "time_total_s": 0.5 * epoch, "timestamp": 1700000000 + epoch, "pid": 42, "done": False}
        trial.update_last_result(result)
        cb.on_trial_result(iteration=0, trials=[trial], trial=trial, result=result)
        reported[epoch] = result
    finish(cb, trial, [trial])
    cb.on_experiment_end(trials=[trial])

    run = children(client, experiment_id, parent)[0]
    model_keys = [k for k, v in reported[1].items() if isinstance(v, float) and k not in
                  ("time_this_iter_s", "time_total_s")]
    assert len(model_keys) == 14
    for key in model_keys:
        # (a set: best_val_top1 is also the trial's end-of-run summary, logged once more at the last step)
        history = sorted({(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)})
        assert history == [(e, pytest.approx(reported[e][key])) for e in (1, 2, 3)], key
    logged = client.get_run(run.info.run_id).data.metrics
    for key in ("training_iteration", "time_total_s", "timestamp", "pid", "done", "node_id"):
        assert key not in logged, key


def test_log_run_and_attach_write_one_finished_run_in_the_clients_style(tmp_path):
    """richkd.tracking's one-call helpers (`richkd evaluate`'s run, an arms comparison; export and report files on a
    parent run) go through the same writer and outbox as the sweep; artifacts land beside the SQLite store."""
    from richkd.tracking import EXPERIMENT_KIND_TAG, attach, log_run

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "report.json").write_text("{}")
    run_id = log_run(uri, "evals", "resnet8-eval", params={"arch": "resnet8", "max_samples": None},
                     metrics={"top1": 71.5, "ece": None}, tags={KIND_TAG: "evaluate"},
                     artifacts=[tmp_path / "report.json"], texts={"note.txt": "hello"})
    client = client_for(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"arch": "resnet8", "max_samples": ""}
    assert run.data.metrics == {"top1": 71.5} and run.data.tags[KIND_TAG] == "evaluate"
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert run.info.artifact_uri.startswith((tmp_path / "store" / "mlartifacts").as_uri())
    assert attach(uri, run_id, [tmp_path / "report.json"], "again", tags={"k": "v"}, metrics={"m": 1.0})
    assert {a.path for a in client.list_artifacts(run_id)} == {"report.json", "note.txt", "again"}
    assert client.get_run(run_id).data.tags["k"] == "v" and client.get_run(run_id).data.metrics["m"] == 1.0
