"""Robustness metrics as sweep objectives: spec validation, the Pareto front, the multi-objective Optuna searcher,
the trainer's val_corrupt_* report, and one small multi-objective sweep through Ray Tune, Optuna and MLflow."""
from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from richkd.config import Config, ConfigError
from richkd.pareto import dominates, front_rows, pareto_front
from richkd.tune.errors import SpecError
from richkd.tune.spec import spec_from_mapping

from tests.factories import base_spec, find_study, make_assets, shared_ray

optuna.logging.set_verbosity(optuna.logging.WARNING)
OBJECTIVES = ["val_top1", "val_corrupt_top1", "val_ece"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def multi_spec(assets: Path, work: Path, **tune) -> dict:
    raw = base_spec(assets, work)
    raw["tune"] = {**raw["tune"], "metric": list(OBJECTIVES), **tune}
    return raw


def spec_error(raw: dict) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_mapping(raw, check_data=False)
    return str(info.value)


# ----- spec validation ------------------------------------------------------------------------------------------

def test_metric_list_derives_modes_and_switches_robustness_on(assets, tmp_path):
    raw = multi_spec(assets, tmp_path)
    assert Config.from_dict(raw["config"]).robustness.enabled is False
    spec = spec_from_mapping(raw, check_data=False)
    t = spec.tune
    assert t.multi_objective and t.metrics == OBJECTIVES and t.modes == ["max", "max", "min"]
    assert (t.metric, t.mode) == ("val_top1", "max")             # the primary objective: ASHA, ranking
    assert spec.base_config.robustness.enabled is True            # an objective needs val_corrupt_top1
    assert spec.plan().trial_config({"loss.fusion_alpha": 0.5, "loss.temperature": 2.0}).robustness.enabled
    assert spec.plan().metrics == OBJECTIVES
    again = spec_from_mapping(spec.to_dict(), check_data=False)        # what --resume / export re-read
    assert again.tune == t and again.base_config == spec.base_config


def test_single_objectives_keep_robustness_off_unless_needed(assets, tmp_path):
    plain = spec_from_mapping(base_spec(assets, tmp_path), check_data=False)
    assert not plain.tune.multi_objective and plain.base_config.robustness.enabled is False
    raw = base_spec(assets, tmp_path)
    raw["tune"]["metric"] = "val_corrupt_top1"
    robust = spec_from_mapping(raw, check_data=False)
    assert (robust.tune.metric, robust.tune.mode) == ("val_corrupt_top1", "max")
    assert robust.base_config.robustness.enabled is True and not robust.tune.multi_objective
    raw["tune"]["metric"] = ["val_ece"]                           # a one-element list is one objective
    one = spec_from_mapping(raw, check_data=False)
    assert (one.tune.metric, one.tune.mode, one.tune.multi_objective) == ("val_ece", "min", False)


@pytest.mark.parametrize("tune, expected", [
    ({"mode": ["max", "max"]}, "2 modes for 3 objectives"),
    ({"mode": ["max", "min", "min"]}, "tune.mode[1]: val_corrupt_top1 should be maximised"),
    ({"mode": "max"}, "one mode for 3 objectives"),
    ({"mode": ["max", "max", "sideways"]}, "'sideways' is not max or min"),
    ({"metric": ["val_top1", "val_corupt_top1"]}, "did you mean 'val_corrupt_top1'"),
    ({"metric": ["val_top1", "val_top1"]}, "'val_top1' is listed twice"),
    ({"metric": []}, "the list of objectives is empty"),
    ({"metric": "val_top1", "mode": ["max"]}, "needs tune.metric to be a list"),
    ({"search": {"algorithm": "random"}}, "multi-objective search needs algorithm: optuna"),
])
def test_bad_objectives_are_one_clear_error(assets, tmp_path, tune, expected):
    msg = spec_error(multi_spec(assets, tmp_path, **tune))
    assert expected in msg, msg


def test_searching_robustness_enabled_against_the_objective_is_refused(assets, tmp_path):
    raw = multi_spec(assets, tmp_path)
    raw["space"]["robustness.enabled"] = {"sampler": "choice", "values": [True, False]}
    assert "robustness.enabled cannot be searched" in spec_error(raw)


def test_robustness_config_is_validated_and_does_not_touch_caches():
    from richkd.robustness.corruptions import CORRUPTION_NAMES
    from richkd.cache.signature import cache_signature

    cfg = Config()
    assert set(cfg.robustness.corruptions) <= set(CORRUPTION_NAMES)   # the defaults skip the lazy name check
    on = cfg.with_overrides({"robustness.enabled": True, "robustness.corruptions": ["contrast"],
                             "robustness.severities": [1, 5], "robustness.max_samples": 10})
    assert cache_signature(on) == cache_signature(cfg)
    for bad, words in (({"robustness.corruptions": ["gaussian_nois"]}, "(?i)did you mean 'gaussian_noise'"),
                       ({"robustness.severities": [6]}, "robustness.severities: 6 is out of range"),
                       ({"robustness.severities": [3, 3]}, "has duplicates"),
                       ({"robustness.max_samples": 0}, "robustness.max_samples")):
        with pytest.raises(ConfigError, match=words):
            cfg.with_overrides(bad)
    with pytest.raises(ConfigError, match="did you mean 'robustness.enabled'"):
        Config.from_dict({"robustness": {"enabeld": True}})


# ----- the Pareto front on hand-made points ---------------------------------------------------------------------

def test_pareto_front_max_max_keeps_ties_and_drops_dominated():
    # (a, b), both maximised. By hand: D(1,4) is dominated by A(1,5); F(2,3) by B(2,4); A, B, C = B, E are not.
    pts = [(1, 5), (2, 4), (2, 4), (1, 4), (3, 1), (2, 3)]
    assert pareto_front(pts, ["max", "max"]) == [0, 1, 2, 4]
    assert dominates((1, 5), (1, 4), ["max", "max"]) and not dominates((2, 4), (2, 4), ["max", "max"])


def test_pareto_front_mixed_modes():
    # (accuracy max, ECE min). By hand: P3 (90, .06) and P5 (85, .20) are dominated by P0 (90, .05); P1 and P4
    # tie (neither dominates the other); P2 is less accurate but the best calibrated.
    pts = [(90, 0.05), (91, 0.10), (89, 0.04), (90, 0.06), (91, 0.10), (85, 0.20)]
    assert pareto_front(pts, ["max", "min"]) == [0, 1, 2, 4]
    # both maximised (larger "ECE" now wins): P1 / P4 beat P0, P2 and P3 on both; P5 has the largest second value
    assert pareto_front(pts, ["max", "max"]) == [1, 4, 5]


def test_pareto_front_three_objectives_and_bad_values():
    # (top1 max, corrupt top1 max, ece min). By hand: T2 loses to T0 everywhere; T3 has a NaN (never on the front);
    # T1 is worse on top1 but best on corruption accuracy; T4 equals T0 on two and is worse on ECE.
    pts = [(90, 60, 0.05), (85, 70, 0.08), (89, 59, 0.06), (95, float("nan"), 0.01), (90, 60, 0.07)]
    assert pareto_front(pts, ["max", "max", "min"]) == [0, 1]
    assert pareto_front([], ["max"]) == []
    with pytest.raises(ValueError, match="not max or min"):
        pareto_front(pts, ["max", "up", "min"])
    with pytest.raises(ValueError, match="has 3 values for 2 objectives"):
        pareto_front(pts, ["max", "min"])


class _Row:
    def __init__(self, trial_id, outcome, **metrics):
        self.trial_id, self.outcome, self.metrics = trial_id, outcome, metrics


def test_front_rows_only_among_trials_that_reached_max_t():
    rows = [_Row("a", "completed", val_top1=80.0, val_ece=0.10),
            _Row("b", "completed", val_top1=70.0, val_ece=0.02),
            _Row("c", "stopped_early", val_top1=99.0, val_ece=0.01),    # would dominate both, but had fewer epochs
            _Row("d", "completed", val_top1=75.0, val_ece=0.20),        # dominated by a
            _Row("e", "completed", val_top1=90.0)]                      # no val_ece: cannot be placed
    assert [r.trial_id for r in front_rows(rows, ["val_top1", "val_ece"], ["max", "min"])] == ["a", "b"]


# ----- the multi-objective Optuna searcher -------------------------------------------------------------------

def _multi_searcher():
    from richkd.tune.search import OptunaSpace, PrunedAwareOptunaSearch
    from richkd.tune.params import Param

    space = OptunaSpace({}, (Param("loss.fusion_alpha", "uniform", low=0.3, high=1.0),))
    return PrunedAwareOptunaSearch(space=space, metric=["val_top1", "val_ece"], mode=["max", "min"],
                                   sampler=optuna.samplers.RandomSampler(seed=0), max_t=3)


def _run(searcher, trial_id, reports, error=False):
    assert searcher.suggest(trial_id) is not None
    result = None
    for epoch, metrics in enumerate(reports, start=1):
        result = {**metrics, "training_iteration": epoch}
        searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result=result, error=error)


def test_multi_objective_searcher_tells_complete_pruned_and_fail():
    s = _multi_searcher()
    ok = {"val_top1": 80.0, "val_ece": 0.1}
    _run(s, "survivor", [ok, ok, {"val_top1": 85.0, "val_ece": 0.05}])
    _run(s, "asha_stopped", [ok])                                  # stopped by ASHA after 1 of 3 epochs
    _run(s, "nan", [ok, {"val_top1": float("nan"), "val_ece": 0.1}])
    _run(s, "missing", [ok, ok, {"val_top1": 85.0}])                # an objective absent from the last report
    _run(s, "crashed", [ok, ok, ok], error=True)
    study = s._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.COMPLETE and trials[0].values == [85.0, 0.05]
    assert trials[1].state == TrialState.PRUNED and trials[1].values is None
    assert [t.state for t in trials[2:]] == [TrialState.FAIL] * 3
    assert [t.number for t in study.best_trials] == [0]               # Optuna's own front: complete trials only
    assert s.suggest("next") is not None                              # TPE/random go on after PRUNED and FAIL


# ----- the trainer reports the robustness metrics ---------------------------------------------------------------

def test_trainer_reports_val_corruption_accuracy_on_the_val_split(richkd_cfg):
    from richkd.data import normalize
    from richkd.robustness.corruptions import corrupt
    from richkd.robustness.engine import select_positions
    from richkd.trainer import Run

    cfg = richkd_cfg.with_overrides({"loss.method": "supervised", "robustness.enabled": True,
                                     "robustness.corruptions": ["contrast", "gaussian_noise"],
                                     "robustness.severities": [2, 5], "robustness.max_samples": 40,
                                     "robustness.seed": 3})
    run = Run(cfg)
    result = run.train()
    m = result.metrics
    for key in ("val_corrupt_top1", "val_corrupt_ece", "val_corrupt_top1_contrast", "val_corrupt_top1_gaussian_noise"):
        assert key in m and math.isfinite(m[key])
    # recompute by hand from the val split: the same seeded 40 rows, each corruption x severity, plain argmax
    val = run.data.val
    pos = select_positions(len(val), torch.as_tensor(val.targets), 40, 3)
    images, targets, index = val.get_batch(pos)
    run.student.eval()
    acc = {}
    with torch.no_grad():
        for c in ("contrast", "gaussian_noise"):
            for s in (2, 5):
                x = normalize(corrupt(images, c, s, seed=3, index=index), run.data.mean, run.data.std)
                acc[c, s] = 100.0 * (run.student(x).logits.argmax(1) == targets).float().mean().item()
    assert m["val_corrupt_top1"] == pytest.approx(sum(acc.values()) / 4, abs=1e-4)
    assert m["val_corrupt_top1_contrast"] == pytest.approx((acc["contrast", 2] + acc["contrast", 5]) / 2, abs=1e-4)
    off = Run(richkd_cfg.with_overrides({"loss.method": "supervised"})).train().metrics
    assert not any(k.startswith("val_corrupt") for k in off)        # opt-in: nothing computed when off


# ----- end to end: a multi-objective sweep, its Pareto export and report -------------------------------------------

# ECE is left out here: a model that learned nothing predicts near-uniformly and is well calibrated, so with ECE
# every trial tends to be on the front; val_loss (min) still exercises a minimised objective end to end.
E2E_OBJECTIVES = ["val_top1", "val_corrupt_top1", "val_loss"]


def e2e_spec(assets: Path, work: Path) -> dict:
    return {
        "name": "robust_e2e",
        "config": {
            "device": "cpu",
            "data": {"dataset": "fashion_mnist", "root": str(assets / "fmnist"), "val_fraction": 0.25,
                     "batch_size": 64, "augment": "none", "max_train_samples": 200},
            "student": {"arch": "resnet8"},
            "teacher": {"arch": "resnet8", "checkpoint": str(assets / "teacher.pth")},
            "loss": {"method": "kd"},
            "teaching": {"mode": "cached", "cache_dir": str(work / "cache")},
            "optim": {"lr": 0.05, "schedule": "cosine", "milestones": []},
            "train": {"epochs": 2},
            "robustness": {"corruptions": ["contrast", "gaussian_noise"], "severities": [3], "max_samples": 50},
        },
        "space": {"optim.lr": {"sampler": "loguniform", "low": 1e-6, "high": 0.2},
                  "loss.temperature": {"sampler": "choice", "values": [1.0, 4.0]}},
        # a learning rate that learns well, and one too small to learn anything (worse in every objective)
        "points_to_evaluate": [{"optim.lr": 0.1, "loss.temperature": 4.0}, {"optim.lr": 1e-6, "loss.temperature": 1.0}],
        "tune": {"metric": E2E_OBJECTIVES, "num_samples": 4, "max_concurrent": 2,
                 "search": {"algorithm": "optuna", "seed": 0, "n_startup_trials": 2},
                 "scheduler": "fifo", "resources": {"cpu": 1}, "max_failures": 0,
                 "storage_path": str(work / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{work}/runs/mlflow.db", "experiment": "robust_e2e"},
        "finalize": {"top": 1, "seeds": 1},
    }


@pytest.mark.slow
def test_multi_objective_sweep_exports_the_pareto_front_and_reports_it(tmp_path_factory, tmp_path):
    from richkd.tune.export import PARETO_JSON, export_sweep
    from richkd.report.build import build_report
    from richkd.tracking import client_for
    from richkd.tune.runner import run_sweep

    assets = make_assets(tmp_path_factory.getbasetemp() / "tune_assets", clip=False)
    spec = spec_from_mapping(e2e_spec(assets, tmp_path))
    shared_ray()
    started = time.perf_counter()
    outcome = run_sweep(spec, num_cpus=2, verbose=0)
    sweep_s = time.perf_counter() - started
    assert outcome.counts == {"completed": 4}, outcome.counts

    result = export_sweep(spec.name, storage=spec.tune.storage_path)
    rows = [r for r in result.rows if r.outcome == "completed"]
    # a FIFO sweep is a learning-curve table: every trial's every epoch, as the trials reported them
    from richkd.tune.table import table_from_sweep

    table = table_from_sweep(spec.name, tmp_path / "from_sweep.jsonl", storage=spec.tune.storage_path)
    assert sorted(r.final for r in table.rows) == sorted(r.metrics["val_top1"] for r in rows)
    assert all(r.epochs == spec.max_t and r.test_top1 is None for r in table.rows)
    assert all(math.isfinite(r.metrics[m]) for r in rows for m in E2E_OBJECTIVES)
    info = json.loads((result.out_dir / PARETO_JSON).read_text())
    assert [o["metric"] for o in info["objectives"]] == E2E_OBJECTIVES
    assert [o["mode"] for o in info["objectives"]] == ["max", "max", "min"]
    members = {m["trial_id"] for m in info["members"]}
    modes = ["max", "max", "min"]
    vals = {r.trial_id: [r.metrics[m] for m in E2E_OBJECTIVES] for r in rows}
    print("\nobjective values per trial:", json.dumps(vals))

    def beaten(a, b):   # written out here, independent of richkd.pareto
        better_or_equal = all((x >= y) if d == "max" else (x <= y) for x, y, d in zip(vals[a], vals[b], modes))
        return better_or_equal and vals[a] != vals[b]

    for t in vals:      # members are beaten by nobody; every other trial is beaten by someone
        assert (t in members) == (not any(beaten(o, t) for o in vals if o != t)), (t, vals)
    assert 1 <= len(members) < len(vals), vals    # the lr = 1e-6 trial learned nothing: it is off the front
    for m in info["members"]:
        cfg = Config.from_yaml(result.out_dir / m["config_file"])
        row = next(r for r in rows if r.trial_id == m["trial_id"])
        # the trial's config, with the threads it ran with pinned (resources.cpu: 1) so that it reproduces
        assert cfg.train.threads == 1 and row.config.train.threads is None
        assert cfg.with_overrides({"train.threads": None}) == row.config and cfg.robustness.enabled
        assert m["objectives"] == {k: row.metrics[k] for k in E2E_OBJECTIVES}
    assert result.best.trial_id in members
    assert result.best.metrics["val_top1"] == max(vals[t][0] for t in members)

    client = client_for(spec.mlflow.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags["richkd.pareto_trial_ids"].split(",") == [m["trial_id"] for m in info["members"]]
    assert parent.data.metrics["pareto_front_size"] == len(members)
    assert parent.data.params["tune.objectives"] == json.dumps(E2E_OBJECTIVES)
    logged = {a.path for a in client.list_artifacts(outcome.parent_run_id, "export")}
    assert f"export/{PARETO_JSON}" in logged and "export/pareto" in logged
    child = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.`richkd.trial_id` = '{rows[0].trial_id}'")[0]
    assert {"best_val_top1", "best_val_corrupt_top1", "best_val_loss"} <= set(child.data.metrics)

    study = None
    for f in Path(outcome.experiment_path).glob("searcher-state-*.pkl"):
        study = find_study(pickle.loads(f.read_bytes()))
    assert study is not None and len(study.directions) == 3
    assert {t.number for t in study.best_trials} and all(t.state == TrialState.COMPLETE for t in study.trials)

    report = build_report(spec.name, storage=spec.tune.storage_path)
    png = report.out_dir / "pareto.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = report.index.read_text()
    assert "Pareto front" in page and "pareto.png" in page
    for m in members:
        assert f"pareto/{m}.yaml" in page

    from richkd.tune.finalize import finalize_sweep

    fin = finalize_sweep(spec.name, storage=spec.tune.storage_path, top=5, seeds=1)
    assert [f.trial_id for f in fin.finalists] == [m["trial_id"] for m in info["members"]]   # front members only

    from richkd.cli import main

    code = main(["export", spec.name, "--storage", spec.tune.storage_path, "--pareto", "val_top1,val_loss"])
    assert code == 0
    two = json.loads((result.out_dir / PARETO_JSON).read_text())
    assert [o["metric"] for o in two["objectives"]] == ["val_top1", "val_loss"]
    expect = [t for t in vals if not any(vals[o][0] >= vals[t][0] and vals[o][2] <= vals[t][2]
                                         and (vals[o][0], vals[o][2]) != (vals[t][0], vals[t][2]) for o in vals)]
    assert sorted(m["trial_id"] for m in two["members"]) == sorted(expect)
    assert main(["export", spec.name, "--storage", spec.tune.storage_path, "--pareto", "val_top1,val_acc"]) == 2
    print(f"\nmulti-objective sweep: 4 trials in {sweep_s:.1f}s; front {sorted(members)} of {sorted(vals)}")


def test_pareto_objectives_of_a_single_objective_sweep(assets, tmp_path):
    from richkd.tune.export import ExportError, pareto_objectives

    spec = spec_from_mapping(base_spec(assets, tmp_path), check_data=False)
    assert pareto_objectives(spec) == []                                  # no front unless asked
    assert pareto_objectives(spec, ["val_top1", "val_corrupt_ece"]) == [("val_top1", "max"), ("val_corrupt_ece", "min")]
    with pytest.raises(ExportError, match="has one objective"):
        pareto_objectives(spec, [])
    with pytest.raises(ExportError, match="two or more different metrics"):
        pareto_objectives(spec, ["val_top1", "val_top1"])
    with pytest.raises(ExportError, match="'val_acc' is not a metric"):
        pareto_objectives(spec, ["val_top1", "val_acc"])
    multi = spec_from_mapping(multi_spec(assets, tmp_path), check_data=False)
    assert pareto_objectives(multi) == pareto_objectives(multi, []) == list(zip(OBJECTIVES, ["max", "max", "min"]))
