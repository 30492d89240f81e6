"""Hyperparameter importances of a finished sweep with Optuna, on a study rebuilt in memory from the trials.

Why rebuild instead of reading the searcher's study: random / grid sweeps have none, and the searcher's study
holds ASHA-stopped trials as PRUNED (their last values were measured after fewer epochs). Here every trial is
scored at ONE common epoch, so all values compare like with like: the last epoch that at least `min_trials`
trials reached with a finite metric (max_t when enough trials survived ASHA). Distributions come from the
spec's samplers; a conditional (`when:`) entry is absent from the trials where it was inactive.

Evaluator: fANOVA (Optuna's FanovaImportanceEvaluator, seeded random forest over all trials' values). Optuna's
default PED-ANOVA compares the top 10% of trials with all of them, which on sweeps of 8-30 trials means one
or two trials, and it then ranks a conditional parameter's small regime above the parameter that actually
drives the metric (checked on synthetic studies where value = f(a) only). fANOVA scores only parameters set
in every trial, so conditional entries get a note instead of a number. PED-ANOVA is the fallback when
scikit-learn (fANOVA's forest) is missing.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

MIN_TRIALS = 4            # below this, a "top quantile" has at most one trial and importances are noise
TOP_QUANTILE = 0.10       # PED-ANOVA fallback: its default target quantile (gamma') ...
MIN_TOP_TRIALS = 2        # ... raised so the top set holds at least two trials on small sweeps


@dataclass
class Importances:
    values: dict = field(default_factory=dict)   # space key -> importance (sums to 1 when any is > 0), descending
    epoch: Optional[int] = None                  # the epoch the trials were scored at
    n_trials: int = 0                            # trials that entered the rebuilt study
    evaluator: str = ""                          # fANOVA, or PED-ANOVA without scikit-learn
    target_quantile: Optional[float] = None      # PED-ANOVA only
    notes: list = field(default_factory=list)    # why there are none, or what to keep in mind

    @property
    def ok(self) -> bool:
        return bool(self.values)


def _quantile(n: int) -> float:
    return min(0.5, max(TOP_QUANTILE, MIN_TOP_TRIALS / n))


def _evaluator(n_trials: int, out: "Importances"):
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    try:
        import sklearn  # noqa: F401  (fANOVA's random forest)
    except ImportError:
        out.target_quantile = _quantile(n_trials)
        out.evaluator = "PED-ANOVA"
        out.notes.append("scikit-learn is not installed: importances use PED-ANOVA (top "
                         f"{100 * out.target_quantile:.0f}% of trials vs all), which is noisy on small sweeps")
        return PedAnovaImportanceEvaluator(target_quantile=out.target_quantile)
    out.evaluator = "fANOVA"
    return FanovaImportanceEvaluator(seed=0)


def param_importances(params: Sequence, samples: Sequence[tuple[Mapping[str, Any], float]], mode: str,
                      min_trials: int = MIN_TRIALS) -> Importances:
    """Importances of `params` (spec Params) from `samples` = [(active sampled values, objective value), ...].

    Never raises for a data problem: too few samples, values outside the space, constant objectives or an
    Optuna error all yield an empty result with a note saying why.
    """
    import optuna
    from optuna.importance import get_param_importances
    from optuna.trial import create_trial

    out = Importances()
    usable = [(dict(s), float(v)) for s, v in samples if v is not None and math.isfinite(v)]
    if len(usable) < min_trials:
        out.notes.append(f"too few trials for parameter importances: {len(usable)} with a finite value, at least "
                         f"{min_trials} needed (run more samples, or resume the sweep)")
        return out
    distributions = {}
    for p in params:
        try:
            distributions[p.key] = p.optuna_distribution()
        except ValueError as exc:
            out.notes.append(str(exc))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)   # no "A new study created in memory" line
    try:
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        skipped = 0
        for sampled, value in usable:
            trial_params = {k: v for k, v in sampled.items() if k in distributions}
            try:
                study.add_trial(create_trial(params=trial_params, value=value,
                                             distributions={k: distributions[k] for k in trial_params}))
            except ValueError as exc:   # a value outside the spec's space (the spec changed since the sweep?)
                skipped += 1
                log.debug("importance: skipping a trial: %s", exc)
        if skipped:
            out.notes.append(f"{skipped} trial(s) left out of the importances: their values lie outside the "
                             "spec's space")
        trials = study.trials
        out.n_trials = len(trials)
        if out.n_trials < min_trials:
            out.notes.append(f"too few trials for parameter importances: {out.n_trials} usable, at least "
                             f"{min_trials} needed")
            return out
        if len({t.value for t in trials}) == 1:
            out.notes.append("every trial scored the same value; no parameter made a difference to measure")
            return out
        evaluator = _evaluator(out.n_trials, out)
        in_all = [k for k in distributions if all(k in t.params for t in trials)]
        partial = {k: sum(1 for t in trials if k in t.params) for k in distributions if k not in in_all}
        scored = in_all if out.evaluator == "fANOVA" else [k for k in distributions if k in in_all or partial.get(k)]
        if not scored:
            out.notes.append("no searched parameter is set in every trial; fANOVA has nothing to score")
            return out
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = get_param_importances(study, evaluator=evaluator, params=scored, normalize=True)
        for w in caught:
            text = f"Optuna: {w.message}"
            if text not in out.notes and not issubclass(w.category, DeprecationWarning):
                out.notes.append(text)
    except Exception as exc:  # importances are a diagnostic: report the problem, never fail the report
        out.notes.append(f"parameter importances could not be computed: {type(exc).__name__}: {exc}")
        return out
    finally:
        optuna.logging.set_verbosity(verbosity)
    if out.evaluator == "fANOVA":
        for key, n in partial.items():
            if n:
                out.notes.append(f"{key}: conditional, set in {n} of {out.n_trials} trials; fANOVA scores only "
                                 "parameters set in every trial, so it has no importance here")
    never = [k for k, n in partial.items() if not n]
    if never:
        out.notes.append(f"not active in any of the {out.n_trials} trials (no importance): {', '.join(never)}")
    if values and not any(v > 0 for v in values.values()):
        out.notes.append("all importances are zero")
    out.values = {k: float(v) for k, v in sorted(values.items(), key=lambda kv: -kv[1])}
    return out


def choose_epoch(curves: Mapping, metric: str, max_t: int, min_trials: int = MIN_TRIALS) -> tuple[Optional[int], list]:
    """The last epoch (<= max_t) that at least `min_trials` trials reached with a finite `metric`, and those
    trial ids; (None, []) when no epoch qualifies."""
    for epoch in range(int(max_t), 0, -1):
        ids = [tid for tid, c in curves.items() if c.value_at(metric, epoch) is not None]
        if len(ids) >= min_trials:
            return epoch, ids
    return None, []


def sweep_importances(data, min_trials: int = MIN_TRIALS) -> Importances:
    """Importances for a ReportData (see module doc for how trials are scored)."""
    spec = data.spec
    if not spec.params:
        return Importances(notes=["the sweep searched no parameters"])
    epoch, ids = choose_epoch(data.curves, data.metric, spec.max_t, min_trials)
    if epoch is None:
        reached = max((len(c.series(data.metric)) for c in data.curves.values()), default=0)
        n_any = sum(1 for c in data.curves.values() if c.series(data.metric))
        out = Importances(notes=[f"too few trials for parameter importances: no epoch was reached by {min_trials} "
                                 f"trials with a finite {data.metric} ({n_any} trial(s) have any finite value, the "
                                 f"longest ran {reached} epoch(s)); run more samples"])
        return out
    by_id = {r.trial_id: r for r in data.rows}
    samples = [(by_id[tid].sampled, data.curves[tid].value_at(data.metric, epoch)) for tid in ids if tid in by_id]
    out = param_importances(spec.params, samples, data.mode, min_trials)
    out.epoch = epoch
    return out
