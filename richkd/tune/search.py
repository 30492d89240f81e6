"""Spec samplers -> Optuna / Tune search spaces, the searcher (Optuna TPE, random, grid) and the ASHA scheduler.

Why `PrunedAwareOptunaSearch`: Ray's OptunaSearch (2.60) tells Optuna COMPLETE with the last reported value for
every trial that reported anything, so a trial ASHA stopped after 2 of 30 epochs enters TPE as if its epoch-2
accuracy were final and pollutes the "good" Parzen estimator. Here such trials are told PRUNED (ranked by their
intermediate values, below complete ones) and non-finite results FAIL. A multi-objective study gets one direction per
objective; Optuna records no intermediate values there, so a stopped trial is PRUNED without values and Optuna's
Pareto front holds COMPLETE trials only, as `richkd export`'s does. ASHA sees only the first objective.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from richkd.config import flatten
from richkd.pareto import finite
from richkd.tune.params import Param, walk_active
from richkd.tune.spec import SweepSpec
from richkd.tune.warm_start import tell_optuna

log = logging.getLogger(__name__)

TIME_ATTR = "training_iteration"  # one tune.report per epoch, so training_iteration == epoch


def suggest(trial, p: Param) -> Any:
    """Ask an Optuna trial for one entry's value (define-by-run), from the entry's Optuna distribution."""
    d = p.optuna_distribution()
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(p.key, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(p.key, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(p.key, d.low, d.high, step=d.step, log=d.log)


class OptunaSpace:
    """Define-by-run search space. A class, not a closure: Ray pickles it into the experiment checkpoint. Returns
    None, so Ray passes on exactly the `suggest_*` values (ray#35319: constants would bypass points_to_evaluate)."""

    def __init__(self, base_flat: dict, params: tuple) -> None:
        self.base_flat = dict(base_flat)
        self.params = tuple(params)

    def __call__(self, trial) -> None:
        list(walk_active(self.params, self.base_flat, lambda p: suggest(trial, p)))


def tune_param_space(spec: SweepSpec) -> dict:
    return {p.key: p.tune_domain() for p in spec.params}


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED for trials stopped before max_t and FAIL for non-finite values."""

    def __init__(self, *args, max_t: int, time_attr: str = TIME_ATTR, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._max_t = int(max_t)
        self._time_attr = time_attr

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        multi = isinstance(self.metric, list)
        values = [result.get(m) for m in (self.metric if multi else [self.metric])] if result else []
        if all(v is None for v in values):
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        reached = (result.get(self._time_attr) or 0) >= self._max_t
        if error or not all(map(finite, values)):
            state, told = TrialState.FAIL, None     # also: an objective missing from the last report
        elif not reached:
            # single objective: Optuna records the last intermediate value itself; multi-objective trials have
            # none (Trial.report is single-objective only), so the trial is PRUNED without values
            state, told = TrialState.PRUNED, None
        else:
            state, told = TrialState.COMPLETE, ([float(v) for v in values] if multi else values[0])
        try:
            self._ot_study.tell(ot_trial, told, state=state)
        except Exception as exc:  # e.g. told twice after a restore: keep the sweep going, as Ray does
            log.warning("could not tell Optuna the result of trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


def build_search_alg(spec: SweepSpec, warm=None):
    """The searcher for spec.tune.search.algorithm, already limited to tune.max_concurrent in flight; `warm` (a
    richkd.tune.warm_start.WarmStart) is told to the Optuna study before it proposes anything."""
    t = spec.tune
    points = [dict(p) for p in spec.points]
    if t.search.algorithm == "optuna":
        with warnings.catch_warnings():  # `group` is flagged experimental; it is what conditional spaces need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=t.search.seed, multivariate=True, group=True,
                                                 constant_liar=True, n_startup_trials=t.search.n_startup_trials)
        storage = optuna.storages.RDBStorage(t.search.storage) if t.search.storage else None
        # lists for a multi-objective sweep (one study direction per objective); Ray's tune.py never overrides
        # them: with an empty param_space it does not call the searcher's set_search_properties
        metric, mode = (t.metrics, t.modes) if t.multi_objective else (t.metric, t.mode)
        searcher = PrunedAwareOptunaSearch(
            space=OptunaSpace(flatten(spec.base_config.to_dict()), spec.params), metric=metric, mode=mode,
            points_to_evaluate=points or None, sampler=sampler, study_name=spec.name, storage=storage,
            max_t=spec.max_t)
        if warm is not None:
            tell_optuna(searcher._ot_study, spec, warm)
        return ConcurrencyLimiter(searcher, max_concurrent=t.max_concurrent)
    return BasicVariantGenerator(points_to_evaluate=points or None, max_concurrent=t.max_concurrent,
                                 random_state=t.search.seed)


def build_scheduler(spec: SweepSpec):
    s = spec.tune.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=spec.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, brackets=s.brackets)
