"""Replays of the real searcher and scheduler against a learning-curve table (richkd.tune.replay), and warm starts.

The tables here are synthetic (tests.factories.synthetic_table): what is tested is the event loop, the nearest-row
rule and the bookkeeping, not the curves. The fidelity test runs the same searcher and scheduler in a real Ray Tune
run with a trainable that reports the table's curves, and checks that the replay proposed the same configurations
and trained each for the same number of epochs.
"""
from __future__ import annotations

import json
import math
import random

import optuna
import pytest

from richkd.tune.replay import TableIndex, describe_replays, one_epoch_top_k, replay, replay_many, with_seed
from richkd.tune.spec import spec_from_mapping
from richkd.tune.table import read_table
from richkd.tune.warm_start import load_warm_start

from tests.factories import ENV, base_spec, make_assets, synthetic_table

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "loss.fusion_alpha": {"sampler": "uniform", "low": 0.3, "high": 1.0},
    "loss.temperature": {"sampler": "choice", "values": [2.0, 4.0]},
    "optim.lr": {"sampler": "loguniform", "low": 0.001, "high": 0.2},
    "loss.feat_weight": {"sampler": "choice", "values": [0.0, 0.5]},
    "loss.feat_lambda": {"sampler": "uniform", "low": 0.0, "high": 1.0, "when": {"loss.feat_weight": {"gt": 0}}},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def _spec(assets, work, **tune):
    raw = base_spec(assets, work, space=SPACE)
    raw["config"]["train"] = {"epochs": 4}
    raw["tune"] = {"num_samples": 10, "max_concurrent": 2, "storage_path": str(work / "runs"),
                   "search": {"algorithm": "optuna", "seed": 0, "n_startup_trials": 3},
                   "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}, **tune}
    return spec_from_mapping(raw, check_resources=False, check_data=False)


@pytest.fixture(scope="module")
def table(assets, tmp_path_factory):
    work = tmp_path_factory.mktemp("replay")
    return read_table(synthetic_table(_spec(assets, work), work / "t.jsonl", n_configs=30, seeds=2, seeds_for=5))


def test_nearest_row_is_exact_for_a_table_configuration_and_grows_with_the_difference(assets, tmp_path, table):
    spec = _spec(assets, tmp_path)
    index = TableIndex(table, spec)
    row = table.rows[0]
    got, d = index.answer(row.params, random.Random(0))
    assert d == 0 and got.config_id == row.config_id
    moved = dict(row.params, **{"loss.temperature": 2.0 if row.params["loss.temperature"] == 4.0 else 4.0})
    d_cat = index.distances(moved)[0]
    assert d_cat == pytest.approx(math.sqrt(1 / len(spec.params)))      # one categorical entry differs: 1
    lam = {k: v for k, v in row.params.items() if k != "loss.feat_lambda"}
    lam["loss.feat_weight"] = 0.0 if row.params["loss.feat_weight"] else 0.5   # feat_lambda turns (in)active
    assert index.distances(lam)[0] >= d_cat


def test_a_replay_is_deterministic_for_a_seed(assets, tmp_path, table):
    spec = _spec(assets, tmp_path)
    a, b, c = replay(spec, table, seed=3), replay(spec, table, seed=3), replay(spec, table, seed=4)
    assert a.proposals == b.proposals and a.decisions == b.decisions and a.curve == b.curve
    assert a.proposals != c.proposals
    assert a.trials == spec.tune.num_samples and a.completed + a.stopped == a.trials
    assert a.trial_epochs == len(a.decisions) <= spec.tune.num_samples * spec.max_t
    assert a.stopped > 0 and a.trial_epochs < spec.tune.num_samples * spec.max_t   # ASHA stopped some trials
    assert a.best_val == max(v for _, _, v, _ in a.curve)
    best_row = next(r for r in table.rows if r.config_id == a.best_config)
    assert a.best_test == best_row.test_top1 and a.best_val == best_row.final


def test_random_search_and_fifo_replay_train_every_trial_to_the_end(assets, tmp_path, table):
    spec = _spec(assets, tmp_path, search={"algorithm": "random", "seed": 0}, scheduler="fifo", num_samples=6)
    out = replay(spec, table, seed=0)
    last = {}
    for tid, e, _ in out.decisions:
        last[tid] = e
    assert all(d == "CONTINUE" for *_, d in out.decisions)          # FIFO never stops a trial
    assert out.trials == len(last) == 6 and out.trial_epochs == sum(last.values())
    assert out.completed == sum(1 for e in last.values() if e == spec.max_t)   # the others diverged
    assert out.proposals != replay(spec, table, seed=1).proposals


def test_a_budget_stops_proposing_and_one_epoch_top_k_counts_every_epoch(assets, tmp_path, table):
    spec = _spec(assets, tmp_path, num_samples=100)
    out = replay(spec, table, seed=0, budget=12)
    assert 12 <= out.trial_epochs < 12 + spec.tune.max_concurrent * spec.max_t and out.trials < 100
    top = one_epoch_top_k(spec, table, n=10, k=3, seed=0)
    assert top.trials == 10 and top.completed <= 3
    assert top.trial_epochs == 10 + sum(r.epochs - 1 for r in _top_rows(spec, table, 10, 3))


def _top_rows(spec, table, n, k):
    index, rng = TableIndex(table, spec), random.Random(0)
    rows = [index.answer(s, rng)[0] for s in spec.random_points(n, seed=0)]
    firsts = [(r.val_top1[0], -i, r) for i, r in enumerate(rows) if r.val_top1[0] is not None]
    return [r for *_, r in sorted(firsts, key=lambda x: (-x[0], -x[1]))[:k]]


def test_replay_summary_reports_best_test_budget_and_distances(assets, tmp_path, table):
    spec = _spec(assets, tmp_path)
    text = describe_replays(replay_many(spec, table, seeds=3), spec)
    assert "best val_top1 found: median" in text and "test top-1 of that configuration" in text
    assert "trial-epochs" in text and "nearest-row answers" in text


def test_warm_start_imports_completed_and_pruned_trials_as_such(assets, tmp_path, table):
    from richkd.tune.search import build_search_alg

    spec = _spec(assets, tmp_path, warm_start=[str(table.path)])
    warm = load_warm_start(spec)
    usable = [r for r in table.rows if r.outcome == "completed"]
    assert warm.completed == len(usable) and warm.pruned == 0 and warm.left_out == 0
    study = build_search_alg(spec, warm).searcher._ot_study
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == len(usable)
    first = study.trials[0]
    assert first.intermediate_values == {e + 1: v for e, v in enumerate(usable[0].val_top1)}
    # a narrower space keeps the trials it can produce and counts the others
    narrow = dict(SPACE, **{"optim.lr": {"sampler": "loguniform", "low": 0.001, "high": 0.01}})
    raw = base_spec(assets, tmp_path, space=narrow)
    raw["config"]["train"] = {"epochs": 4}
    raw["tune"] = {"storage_path": str(tmp_path / "runs"), "warm_start": [str(table.path)]}
    w2 = load_warm_start(spec_from_mapping(raw, check_resources=False, check_data=False))
    inside = [r for r in usable if r.params["optim.lr"] <= 0.01]
    assert w2.completed == len(inside) and w2.left_out == len(usable) - len(inside)


def test_warm_start_from_an_asha_sweep_imports_stopped_trials_as_pruned(tmp_path_factory):
    from tests.factories import ensure_smoke_sweep

    from richkd.tune.results import read_sweep_record

    info = ensure_smoke_sweep(tmp_path_factory.getbasetemp())
    spec = read_sweep_record(info["name"], info["storage"]).spec
    raw = spec.to_dict()
    raw["tune"]["warm_start"] = [info["name"]]
    warm = load_warm_start(spec_from_mapping(raw, check_resources=False, check_data=False))
    counts = info["counts"]
    assert warm.completed == counts.get("completed", 0) and warm.pruned == counts.get("stopped_early", 0)
    assert all(w.value is None and w.intermediate for w in warm.trials if w.value is None)


def test_warm_start_with_nothing_in_common_is_one_error(assets, tmp_path, table):
    other = base_spec(assets, tmp_path, space={"loss.ce_weight": {"sampler": "uniform", "low": 0.5, "high": 1.0}})
    other["config"]["train"] = {"epochs": 4}
    other["tune"] = {"storage_path": str(tmp_path / "runs"), "warm_start": [str(table.path)]}
    with pytest.raises(ValueError, match="none of which this space searches"):
        load_warm_start(spec_from_mapping(other, check_resources=False, check_data=False))
    longer = base_spec(assets, tmp_path, space=SPACE)
    longer["config"]["train"] = {"epochs": 6}
    longer["tune"] = {"storage_path": str(tmp_path / "runs"), "warm_start": [str(table.path)]}
    with pytest.raises(ValueError, match="max_t 4 \\(here 6\\)"):
        load_warm_start(spec_from_mapping(longer, check_resources=False, check_data=False))


def test_replay_cli_refuses_a_table_of_another_space_and_bad_seeds(assets, tmp_path, table):
    import subprocess
    import sys

    import yaml

    raw = base_spec(assets, tmp_path, space={"loss.fusion_alpha": SPACE["loss.fusion_alpha"]})
    raw["config"]["train"] = {"epochs": 4}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    env = {**__import__("os").environ, **ENV}
    for extra, expected in ((["--seeds", "2"], "was built from another space"), (["--seeds", "0"], "--seeds")):
        p = subprocess.run([sys.executable, "-m", "richkd", "replay", str(tmp_path / "s.yaml"), "--table",
                            str(table.path), *extra], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 2 and expected in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.slow
def test_the_replay_makes_the_decisions_and_sees_the_proposals_of_a_real_ray_tune_run(assets, tmp_path, table):
    """One worker (max_concurrent 1) makes a real Tune run's order deterministic; the replay must match it."""
    from ray import tune

    from richkd.tune.session import init_ray
    from richkd.tune.search import build_scheduler, build_search_alg

    spec = with_seed(_spec(assets, tmp_path, num_samples=8, max_concurrent=1), 0)
    sim = replay(spec, table, seed=0)
    index = TableIndex(table, spec)

    def trainable(config):
        row, _ = index.answer(config, random.Random(0))
        for value in row.val_top1:
            tune.report({"val_top1": math.nan if value is None else value, "nonfinite_loss": float(value is None)})

    started = init_ray(num_cpus=1)
    try:
        grid = tune.Tuner(trainable, tune_config=tune.TuneConfig(
            metric="val_top1", mode="max", num_samples=8, search_alg=build_search_alg(spec),
            scheduler=build_scheduler(spec)), run_config=tune.RunConfig(
            name="real", storage_path=str(tmp_path / "ray"), verbose=0)).fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    plan = spec.plan()
    real = {json.dumps(plan.active_sampled(r.config), sort_keys=True): int(r.metrics["training_iteration"])
            for r in grid}
    epochs = {}
    for tid, e, _ in sim.decisions:
        epochs[tid] = e
    replayed = {json.dumps(cfg, sort_keys=True): epochs[tid] for tid, cfg in sim.proposals}
    assert len(real) == len(replayed) == spec.tune.num_samples
    assert real == replayed     # the same proposals (bit for bit), each trained for the same number of epochs
    assert any(e < spec.max_t for e in real.values()), "ASHA stopped no trial: the check would be vacuous"
