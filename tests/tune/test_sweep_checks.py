"""Sweep-layer rules checked without running trials: data size vs loss.nce_k and eval_every in the spec preflight,
per-corruption objectives, tune.time_budget_s reaching Tune, runner.check_cluster against the cluster's
resources, `--resume` restoring the stored experiment, the end-of-sweep hints, and the threads an exported
config pins."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import yaml

from richkd.tune.errors import SpecError
from richkd.tune.spec import spec_from_mapping

from tests.factories import base_spec, make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def spec_error(raw: dict, **kw) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_mapping(raw, **kw)
    return str(info.value)


# ----- data size vs CRD negatives, before any cache or Ray --------------------------------------------------

def test_preflight_refuses_nce_k_above_the_negatives_of_a_small_subset(assets, tmp_path):
    """make_assets holds 400 training images; data.max_train_samples=40 leaves at most 36 rows of other classes
    for the rarest class, fewer than loss.nce_k=64: every trial would fail after the caches were built."""
    raw = base_spec(assets, tmp_path)
    raw["config"]["data"]["max_train_samples"] = 40
    msg = spec_error(raw)
    assert msg.startswith("config: loss.nce_k=64 exceeds the ") and "lower loss.nce_k below" in msg
    raw["config"]["loss"]["nce_k"] = 16
    assert spec_from_mapping(raw).base_config.loss.nce_k == 16       # fits: valid
    # nce_k searched: its largest value is what must fit
    raw["space"]["loss.nce_k"] = {"sampler": "choice", "values": [8, 48]}
    msg = spec_error(raw)
    assert msg.startswith("space.loss.nce_k: loss.nce_k=48 exceeds the "), msg
    raw["space"]["loss.nce_k"] = {"sampler": "randint", "low": 4, "high": 30}
    assert spec_from_mapping(raw).params[-1].key == "loss.nce_k"
    # no feature term, no CRD: the subset is fine whatever nce_k says
    raw = base_spec(assets, tmp_path)
    raw["config"]["data"]["max_train_samples"] = 40
    raw["config"]["loss"]["feat_weight"] = 0.0
    assert spec_from_mapping(raw).base_config.data.max_train_samples == 40


def test_sweep_check_refuses_the_spec_with_exit_2(assets, tmp_path, capsys):
    from richkd.cli import main

    raw = base_spec(assets, tmp_path)
    raw["config"]["data"]["max_train_samples"] = 40
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(spec), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("richkd sweep: error: config: loss.nce_k=64 exceeds the ")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_eval_every_above_one_is_refused_in_a_sweep(assets, tmp_path):
    """Tune needs the objective in every report (a trial whose first report lacks it errors), and ASHA compares
    it at every epoch."""
    raw = base_spec(assets, tmp_path)
    raw["config"]["train"]["eval_every"] = 2
    assert spec_error(raw, check_data=False).startswith("config.train.eval_every: 2; a sweep validates after every "
                                                        "epoch")
    raw = base_spec(assets, tmp_path)
    raw["space"]["train.eval_every"] = {"sampler": "choice", "values": [1, 2]}
    assert spec_error(raw, check_data=False).startswith("space.train.eval_every: train.eval_every cannot be searched")


# ----- per-corruption objectives ----------------------------------------------------------------------------

def test_a_per_corruption_accuracy_is_a_valid_objective(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["tune"]["metric"] = "val_corrupt_top1_contrast"
    spec = spec_from_mapping(raw, check_data=False)
    assert (spec.tune.metric, spec.tune.mode) == ("val_corrupt_top1_contrast", "max")
    assert spec.base_config.robustness.enabled                      # switched on: the trainer reports it then
    raw["tune"]["metric"] = ["val_top1", "val_corrupt_top1_gaussian_noise"]
    multi = spec_from_mapping(raw, check_data=False)
    assert multi.tune.objective_pairs == (("val_top1", "max"), ("val_corrupt_top1_gaussian_noise", "max"))


@pytest.mark.parametrize("metric, mode, corruptions, expected", [
    ("val_corrupt_top1_pixelate", None, None,
     "tune.metric: val_corrupt_top1_pixelate needs pixelate in config.robustness.corruptions"),
    ("val_corrupt_top1_pixelate", None, ["pixelate", "contrast"], None),
    ("val_corrupt_top1_contrst", None, None, "'contrst' in 'val_corrupt_top1_contrst' is not a corruption"),
    ("val_corrupt_top1_contrast", "min", None, "val_corrupt_top1_contrast should be maximised"),
])
def test_per_corruption_objective_errors(assets, tmp_path, metric, mode, corruptions, expected):
    raw = base_spec(assets, tmp_path)
    raw["tune"]["metric"] = metric
    if mode:
        raw["tune"]["mode"] = mode
    if corruptions:
        raw["config"]["robustness"] = {"corruptions": corruptions}
    if expected is None:
        assert spec_from_mapping(raw, check_data=False).tune.metric == metric
    else:
        msg = spec_error(raw, check_data=False)
        assert expected in msg, msg


def test_per_corruption_metrics_are_accepted_by_the_pareto_export(assets, tmp_path):
    from richkd.tune.export import pareto_objectives

    spec = spec_from_mapping(base_spec(assets, tmp_path), check_data=False)
    assert pareto_objectives(spec, ["val_top1", "val_corrupt_top1_contrast", "val_ece"]) == [
        ("val_top1", "max"), ("val_corrupt_top1_contrast", "max"), ("val_ece", "min")]


# ----- tune.time_budget_s -----------------------------------------------------------------------------------

def test_time_budget_is_validated_and_reaches_tune(assets, tmp_path, monkeypatch):
    from ray import tune

    from richkd.tune.runner import build_tuner

    raw = base_spec(assets, tmp_path)
    for bad, expected in ((0, "tune.time_budget_s: 0.0 is out of range; expected a value in (0, inf)"),
                          (-5, "-5.0 is out of range"), (float("nan"), "nan is out of range")):
        raw["tune"]["time_budget_s"] = bad
        assert expected in spec_error(raw, check_data=False)
    raw["tune"]["time_budget_s"] = 90
    spec = spec_from_mapping(raw, check_data=False)
    assert spec.tune.time_budget_s == 90
    given = []
    real = tune.TuneConfig

    def recording(**kwargs):
        given.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(tune, "TuneConfig", recording)
    build_tuner(spec, callbacks=[], verbose=0)
    assert given[-1]["time_budget_s"] == 90                        # Tune ends the sweep after 90 s
    raw["tune"].pop("time_budget_s")
    build_tuner(spec_from_mapping(raw, check_data=False), callbacks=[], verbose=0)
    assert given[-1]["time_budget_s"] is None


# ----- runner.check_cluster ---------------------------------------------------------------------------------

class FakeRay:
    def __init__(self, cpus: float, gpus: float = 0, nodes: int = 1) -> None:
        self.resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self.n_nodes = nodes

    def nodes(self):
        return [{"Alive": True, "NodeID": f"n{i}"} for i in range(self.n_nodes)] + [{"Alive": False}]

    def cluster_resources(self):
        return dict(self.resources)


@pytest.mark.parametrize("resources, ray_has, embedded, expected", [
    ({"cpu": 2}, (2, 0), True, None),
    ({"cpu": 4}, (2, 0), True, "tune.resources.cpu: 4.0 per trial, but Ray has 2 CPUs; lower it or pass --num-cpus"),
    ({"cpu": 1, "gpu": 0.5}, (8, 0), True, "tune.resources.gpu: 0.5 per trial, but Ray sees 0 GPUs"),
    ({"cpu": 1, "gpu": 0.5}, (8, 1), True, None),
    ({"cpu": 1, "gpu": 1}, (8, 0.5), True, "tune.resources.gpu: 1.0 per trial, but Ray sees 0.5 GPUs"),
    ({"cpu": 64, "gpu": 1}, (2, 0), False, None),     # a cluster may autoscale: only an embedded Ray is sized here
])
def test_check_cluster_compares_trial_resources_with_the_embedded_ray(assets, tmp_path, monkeypatch, resources,
                                                                       ray_has, embedded, expected):
    import ray

    from richkd.tune import runner

    raw = base_spec(assets, tmp_path)
    raw["config"]["device"] = "auto"
    raw["tune"]["resources"] = resources
    spec = spec_from_mapping(raw, check_data=False)
    fake = FakeRay(*ray_has)
    monkeypatch.setattr(ray, "nodes", fake.nodes)
    monkeypatch.setattr(ray, "cluster_resources", fake.cluster_resources)
    if expected is None:
        runner.check_cluster(spec, embedded=embedded)
    else:
        with pytest.raises(SpecError) as info:
            runner.check_cluster(spec, embedded=embedded)
        assert str(info.value).startswith(expected), str(info.value)


def test_check_cluster_refuses_node_local_storage_on_several_nodes(assets, tmp_path, monkeypatch):
    import ray

    from richkd.tune import runner

    raw = base_spec(assets, tmp_path)
    spec = spec_from_mapping(raw, check_data=False)
    fake = FakeRay(16, nodes=3)
    monkeypatch.setattr(ray, "nodes", fake.nodes)
    monkeypatch.setattr(ray, "cluster_resources", fake.cluster_resources)
    with pytest.raises(SpecError, match=r"is a local folder, but the Ray cluster has 3 nodes"):
        runner.check_cluster(spec, embedded=False)
    raw["tune"]["shared_storage"] = True                            # declared shared (e.g. an undetected NFS)
    runner.check_cluster(spec_from_mapping(raw, check_data=False), embedded=False)
    fake.n_nodes = 1
    runner.check_cluster(spec, embedded=False)                      # one node: a local folder is fine


# ----- --resume restores the stored experiment --------------------------------------------------------------

def test_resume_restores_the_stored_experiment_not_a_fresh_tuner(assets, tmp_path, monkeypatch):
    """The fast-tier check of what tests/reliability/test_sweep_kills.py proves end to end: `richkd sweep --resume`
    hands the sweep's own folder to Tuner.restore (finished trials kept, unfinished ones resumed, errored ones not
    re-run) and fits that restored Tuner; it never builds a new Tuner for the spec."""
    from ray import tune

    from richkd.tune import runner
    from richkd.tune.cache_tasks import BuiltCaches
    from richkd.tune.outcome import SweepOutcome
    from richkd.tune.results import SweepRecord, write_sweep_record

    raw = base_spec(assets, tmp_path)
    raw["mlflow"] = {"enabled": False}
    spec = spec_from_mapping(raw, check_data=False)
    write_sweep_record(SweepRecord(spec=spec))
    Path(spec.experiment_path, "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": []}))
    calls = {}

    def restore(path, trainable=None, **kwargs):
        calls["restore"] = (path, trainable, kwargs)
        return "the restored tuner"

    def fit(tuner, record, verbose, started_at):
        calls["fit"] = (tuner, record.path)
        return SweepOutcome(name=record.name, experiment_path=record.path, num_trials=0)

    # no Ray here (test_node_check.py and test_cluster_sweeps.py test the node checks on real nodes): each stub
    # records that resume calls it, and in which order
    order = []
    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda path: calls.setdefault("can", path) or True))
    monkeypatch.setattr(tune.Tuner, "restore", staticmethod(restore))
    monkeypatch.setattr(tune, "Tuner", type("NoFreshTuner", (tune.Tuner,), {
        "__init__": lambda self, *a, **k: pytest.fail("resume built a fresh Tuner")}))
    monkeypatch.setattr(runner, "build_tuner", lambda *a, **k: pytest.fail("resume built a fresh Tuner"))
    monkeypatch.setattr(runner, "ray_for", lambda *a, **k: contextlib.nullcontext(order.append("ray")))
    monkeypatch.setattr(runner, "alive_nodes", lambda: [])
    monkeypatch.setattr(runner, "preflight_nodes", lambda needs: order.append(
        "share" if any(n.kind == "shared" for n in needs.needs) else "nodes"))
    monkeypatch.setattr(runner, "build_caches", lambda configs, **k: order.append("caches") or
                        BuiltCaches(paths=[[] for _ in configs]))
    monkeypatch.setattr(runner, "fit_and_summarise", fit)

    outcome = runner.resume_sweep(spec.name, storage=spec.tune.storage_path)
    assert order == ["ray", "share", "caches", "nodes"]      # every node is checked before anything is built
    path, trainable, kwargs = calls["restore"]
    assert path == spec.experiment_path == calls["can"]
    assert kwargs == {"resume_unfinished": True, "resume_errored": False, "restart_errored": False}
    assert trainable is not None
    assert calls["fit"] == ("the restored tuner", spec.experiment_path)
    assert outcome.experiment_path == spec.experiment_path


# ----- what the user is told at the end of a sweep ----------------------------------------------------------

def _outcome(tmp_path, storage: Path, **counts):
    from richkd.tune.outcome import SweepOutcome

    return SweepOutcome(name="fm4", experiment_path=str(storage / "fm4"), num_trials=sum(counts.values()),
                        counts=counts, best={"trial_id": "a1", "value": 81.5, "config": {"loss.fusion_alpha": 0.7}},
                        parent_run_id="p1", tracking_uri="sqlite:///x/mlflow.db", wall_s=12.0)


def test_hints_name_the_storage_when_it_is_not_the_default(tmp_path, monkeypatch):
    from richkd.tune.outcome import describe_outcome

    monkeypatch.chdir(tmp_path)
    default = _outcome(tmp_path, tmp_path / "tune_runs", completed=2, stopped_early=1)
    text = describe_outcome(default, "val_top1")
    assert text.splitlines() == [
        "sweep fm4: 3 trials (2 completed, 1 stopped_early) in 12s",   # the names leaderboard.csv uses
        f"  results: {tmp_path / 'tune_runs' / 'fm4'}",
        "  best (reached max_t): val_top1=81.5  loss.fusion_alpha=0.7",
        "  MLflow: sqlite:///x/mlflow.db (parent run p1); `richkd ui --tracking-uri sqlite:///x/mlflow.db` to browse",
        "  next: richkd export fm4"]
    default.tracking_uri = f"sqlite:///{tmp_path / 'tune_runs' / 'mlflow.db'}"     # the default store: plain
    assert "; `richkd ui` to browse" in describe_outcome(default, "val_top1")
    # with its experiment known, the link that opens the sweep's runs on the UI's runs table, best first
    default.experiment_id, default.mode = "3", "min"
    assert describe_outcome(default, "val_loss").splitlines()[3].endswith(
        "; `richkd ui`, then open http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
        "&searchFilter=tags.%60richkd.sweep%60%20%3D%20%27fm4%27&orderByKey=metrics.%60val_loss%60&orderByAsc=true")
    default.tracking_uri = "http://mlflow.example:5000"                           # a server is its own UI
    assert describe_outcome(default, "val_loss").splitlines()[3].endswith(
        "; open http://mlflow.example:5000/#/experiments/3/runs?workflowType=machine_learning"
        "&searchFilter=tags.%60richkd.sweep%60%20%3D%20%27fm4%27&orderByKey=metrics.%60val_loss%60&orderByAsc=true")
    elsewhere = _outcome(tmp_path, tmp_path / "sweeps", completed=3)
    elsewhere.tracking_uri = f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}"      # --storage keeps its store
    lines = describe_outcome(elsewhere, ["val_top1", "val_ece"]).splitlines()
    assert lines[-2].endswith(f"`richkd ui --storage {tmp_path / 'sweeps'}` to browse")
    assert lines[-1] == f"  next: richkd export fm4 --storage {tmp_path / 'sweeps'}"


def test_an_interrupted_sweep_suggests_resume_not_export(tmp_path, monkeypatch):
    from richkd.tune.outcome import describe_outcome

    monkeypatch.chdir(tmp_path)
    text = describe_outcome(_outcome(tmp_path, tmp_path / "sweeps", completed=1, unfinished=2), "val_top1")
    assert f"  interrupted: continue with `richkd sweep --resume fm4 --storage {tmp_path / 'sweeps'}`" in text
    assert "richkd export" not in text
    errored = describe_outcome(_outcome(tmp_path, tmp_path / "tune_runs", completed=1, error=1), "val_top1")
    assert "1 trial(s) ended in error (exit code 3)" in errored and errored.endswith("next: richkd export fm4")


# ----- the threads an exported config pins ------------------------------------------------------------------

def test_exported_configs_pin_the_threads_the_trial_ran_with(assets, tmp_path):
    """A trial whose config leaves train.threads open runs with the whole CPUs Ray granted it; CPU results depend
    on the thread count, so best_config.yaml (and each Pareto config) says it (the slow test in test_export.py
    retrains one and gets the trial's numbers)."""
    from richkd.tune.trainable import threads_for, trial_threads_config

    spec = spec_from_mapping(base_spec(assets, tmp_path), check_data=False)
    assert [threads_for(c) for c in (0.5, 1, 2, 2.5, 4.0)] == [1, 1, 2, 2, 4]
    assert trial_threads_config(spec.base_config, 2.5).train.threads == 2
    pinned = spec.base_config.with_overrides({"train.threads": 3})
    assert trial_threads_config(pinned, 2.5) is pinned
