"""Sampler mapping to Tune / Optuna, the PRUNED-aware Optuna searcher, and searcher / scheduler construction.

No Ray runtime is started here: searchers and schedulers are plain driver-side objects.
"""
from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized

from richkd.tune.search import OptunaSpace, PrunedAwareOptunaSearch, build_scheduler, build_search_alg
from richkd.tune.params import Condition, Param
from richkd.tune.spec import spec_from_mapping

from tests.factories import base_spec, make_assets

optuna.logging.set_verbosity(optuna.logging.WARNING)

U = Param("loss.fusion_alpha", "uniform", low=0.3, high=1.0)
LU = Param("loss.clip_logit_scale", "loguniform", low=1.0, high=100.0)
QU = Param("loss.temperature", "quniform", low=1.0, high=8.0, q=0.5)
RI = Param("seed", "randint", low=0, high=4)
CH = Param("clip.prompt_set", "choice", values=("richkd12", "simple"))
GR = Param("loss.feat_weight", "grid", values=(0.0, 0.8))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


# ----- sampler mapping --------------------------------------------------------------------------------------

def test_tune_domains():
    d = U.tune_domain()
    assert isinstance(d, Float) and (d.lower, d.upper) == (0.3, 1.0) and not isinstance(d.get_sampler(), LogUniform)
    d = LU.tune_domain()
    assert isinstance(d, Float) and isinstance(d.get_sampler(), LogUniform) and (d.lower, d.upper) == (1.0, 100.0)
    d = QU.tune_domain()
    assert isinstance(d.get_sampler(), Quantized) and d.get_sampler().q == 0.5
    d = RI.tune_domain()
    assert isinstance(d, Integer) and (d.lower, d.upper) == (0, 5)   # spec randint is inclusive, Tune's exclusive
    d = CH.tune_domain()
    assert isinstance(d, Categorical) and d.categories == ["richkd12", "simple"]
    assert GR.tune_domain() == {"grid_search": [0.0, 0.8]}


def test_tune_randint_reaches_the_inclusive_high():
    d = RI.tune_domain()
    draws = {d.sample() for _ in range(200)}
    assert draws == {0, 1, 2, 3, 4}


def test_optuna_distributions():
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    OptunaSpace({}, (U, LU, QU, RI, CH))(trial)
    dist = trial.distributions
    assert dist["loss.fusion_alpha"] == FloatDistribution(0.3, 1.0)
    assert dist["loss.clip_logit_scale"] == FloatDistribution(1.0, 100.0, log=True)
    assert dist["loss.temperature"] == FloatDistribution(1.0, 8.0, step=0.5)
    assert dist["seed"] == IntDistribution(0, 4)
    assert dist["clip.prompt_set"] == CategoricalDistribution(["richkd12", "simple"])


def test_optuna_space_samples_conditional_keys_only_when_active():
    fw = Param("loss.feat_weight", "choice", values=(0.0, 0.8))
    lam = Param("loss.feat_lambda", "uniform", low=0.0, high=1.0,
                when=(Condition("loss.feat_weight", "gt", 0),))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"loss.feat_weight": 0.0})
    study.enqueue_trial({"loss.feat_weight": 0.8})
    off, on = study.ask(), study.ask()
    space = OptunaSpace({"loss.feat_weight": 0.8}, (fw, lam))
    space(off)
    space(on)
    assert set(off.params) == {"loss.feat_weight"}
    assert set(on.params) == {"loss.feat_weight", "loss.feat_lambda"}


def test_grid_sampler_is_refused_by_optuna():
    study = optuna.create_study()
    with pytest.raises(Exception, match="grid"):
        OptunaSpace({}, (GR,))(study.ask())


# ----- PRUNED reporting --------------------------------------------------------------------------------------

def _searcher(cls=PrunedAwareOptunaSearch, **kw):
    space = OptunaSpace({}, (U,))
    if cls is PrunedAwareOptunaSearch:
        kw.setdefault("max_t", 3)
    return cls(space=space, metric="val_top1", mode="max", sampler=optuna.samplers.RandomSampler(seed=0), **kw)


def _run(searcher, trial_id: str, values: list, error: bool = False):
    assert searcher.suggest(trial_id) is not None
    result = None
    for epoch, v in enumerate(values, start=1):
        result = {"val_top1": v, "training_iteration": epoch}
        searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result=result, error=error)


def test_asha_stopped_trial_is_pruned_and_survivor_complete():
    searcher = _searcher()
    _run(searcher, "stopped", [10.0])                  # ASHA stopped it after epoch 1 of 3
    _run(searcher, "survivor", [10.0, 20.0, 30.0])      # reached max_t
    _run(searcher, "blew_up", [10.0, float("nan")])     # a non-finite last report
    trials = {t.number: t for t in searcher._ot_study.get_trials(deepcopy=False)}
    stopped, survivor, blew_up = trials[0], trials[1], trials[2]
    assert stopped.state == TrialState.PRUNED
    assert stopped.value == 10.0 and stopped.intermediate_values == {1: 10.0}
    assert survivor.state == TrialState.COMPLETE and survivor.value == 30.0
    assert blew_up.state == TrialState.FAIL


def test_stock_optuna_search_would_tell_complete():
    """The behaviour the subclass exists for (ray 2.60 optuna_search.py: COMPLETE whenever a value exists)."""
    searcher = _searcher(OptunaSearch)
    _run(searcher, "stopped", [10.0])
    assert searcher._ot_study.get_trials()[0].state == TrialState.COMPLETE


def test_errored_trial_fails_and_pickling_keeps_max_t(tmp_path):
    searcher = _searcher()
    _run(searcher, "crashed", [10.0, 20.0, 30.0], error=True)
    assert searcher._ot_study.get_trials()[0].state == TrialState.FAIL
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    restored = _searcher(max_t=99)
    restored.restore(str(path))
    assert restored._max_t == 3
    _run(restored, "later", [1.0])
    assert restored._ot_study.get_trials()[-1].state == TrialState.PRUNED


# ----- build_search_alg / build_scheduler --------------------------------------------------------------------

def _spec(assets, tmp_path, **tune_over):
    raw = base_spec(assets, tmp_path)
    raw["tune"].update(tune_over)
    raw["points_to_evaluate"] = [{"loss.fusion_alpha": 0.7, "loss.temperature": 4.0},
                                 {"loss.fusion_alpha": 1.0, "loss.temperature": 2.0}]
    return spec_from_mapping(raw, check_resources=False, check_data=False)


def test_optuna_searcher_settings_and_points_first(assets, tmp_path):
    from ray.tune.search import ConcurrencyLimiter

    spec = _spec(assets, tmp_path, max_concurrent=3, search={"algorithm": "optuna", "seed": 7})
    alg = build_search_alg(spec)
    assert isinstance(alg, ConcurrencyLimiter) and alg.max_concurrent == 3
    inner = alg.searcher
    assert isinstance(inner, PrunedAwareOptunaSearch) and inner._max_t == spec.max_t == 3
    sampler = inner._ot_study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert (sampler._multivariate, sampler._group, sampler._constant_liar) == (True, True, True)
    # ray#35319: with define-by-run, the first suggestions must be exactly the seeded points
    assert alg.suggest("a") == {"loss.fusion_alpha": 0.7, "loss.temperature": 4.0}
    assert alg.suggest("b") == {"loss.fusion_alpha": 1.0, "loss.temperature": 2.0}


def test_third_suggestion_is_sampled_within_the_space(assets, tmp_path):
    spec = _spec(assets, tmp_path, max_concurrent=3)
    alg = build_search_alg(spec)
    alg.suggest("a")
    alg.suggest("b")
    third = alg.suggest("c")
    assert 0.3 <= third["loss.fusion_alpha"] <= 1.0 and third["loss.temperature"] in (2.0, 4.0)
    assert alg.suggest("d") is None                          # max_concurrent = 3 in flight


def test_random_search_uses_basic_variant_generator(assets, tmp_path):
    from ray.tune.search import BasicVariantGenerator

    spec = _spec(assets, tmp_path, search={"algorithm": "random", "seed": 1}, max_concurrent=2)
    alg = build_search_alg(spec)
    assert isinstance(alg, BasicVariantGenerator) and alg.max_concurrent == 2


def test_asha_uses_the_epochs_as_max_t(assets, tmp_path):
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    spec = _spec(assets, tmp_path, scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    sched = build_scheduler(spec)
    assert isinstance(sched, AsyncHyperBandScheduler)
    assert sched._max_t == 3 and sched._time_attr == "training_iteration"
    milestones = sorted(m for m, _ in sched._brackets[0]._rungs)
    assert milestones == [1, 2]                                  # rungs at epochs 1 and 2, stop at 3
    spec = _spec(assets, tmp_path, scheduler="fifo")
    assert isinstance(build_scheduler(spec), FIFOScheduler)


def test_quniform_draws_stay_on_the_grid():
    import random

    draws = [QU.draw(random.Random(i)) for i in range(50)]
    assert all(math.isfinite(d) and 1.0 <= d <= 8.0 and (d - 1.0) % 0.5 == 0.0 for d in draws)
    assert len(set(draws)) > 5


def test_optuna_rdb_storage_makes_the_study_visible_to_optuna_dashboard(assets, tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    spec = _spec(assets, tmp_path, search={"algorithm": "optuna", "storage": url})
    alg = build_search_alg(spec)
    alg.suggest("a")
    assert optuna.get_all_study_names(url) == [spec.name]
    study = optuna.load_study(study_name=spec.name, storage=url)
    assert study.trials[0].params == {"loss.fusion_alpha": 0.7, "loss.temperature": 4.0}


@pytest.mark.parametrize("url", ["sqlite3:///x.db", "mysqlx://host/db", "redis://host"])
def test_an_optuna_storage_that_is_not_an_rdb_url_is_refused_under_its_own_key(assets, tmp_path, url):
    from richkd.tune.errors import SpecError

    with pytest.raises(SpecError, match=r"tune\.search\.storage.*must be an RDB URL"):
        _spec(assets, tmp_path, search={"algorithm": "optuna", "storage": url})
