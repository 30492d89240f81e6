"""The report's Optuna study, rebuilt in memory from the trials, and the parameter importances scored on it.

Why rebuild instead of reading the searcher's study: random / grid sweeps have none, and the searcher's study
holds ASHA-stopped trials as PRUNED (their last values were measured after fewer epochs). For the importances
every trial is scored at ONE common epoch, so all values compare like with like: the last epoch that at least
`min_trials` trials reached with a finite metric (max_t when enough trials survived ASHA). Distributions come
from the spec's samplers; a conditional (`when:`) entry is absent from the trials where it was inactive.

Evaluator: fANOVA (Optuna's FanovaImportanceEvaluator, a seeded random forest over all trials' values). Optuna's
default PED-ANOVA compares the top 10% of trials with all of them, which on sweeps of 8-30 trials means one or
two trials, and it then ranks a conditional parameter's small regime above the parameter that actually drives
the metric (checked on synthetic studies where value = f(a) only). fANOVA scores only parameters set in every
trial, so conditional entries get a note instead of a number.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from richkd.report.data import curve

log = logging.getLogger(__name__)

MIN_TRIALS = 4            # below this, importances are noise
EVALUATOR = "fANOVA"


@dataclass
class Importances:
    values: dict = field(default_factory=dict)   # space key -> importance (sums to 1 when any is > 0), descending
    epoch: Optional[int] = None                  # the epoch the trials were scored at
    n_trials: int = 0                            # trials that entered the study
    evaluator: str = ""
    notes: list = field(default_factory=list)    # why there are none, or what to keep in mind
    study: Any = None                            # the optuna.Study they were scored on (None when none was built)


def build_study(params: Sequence, samples: Sequence[tuple[Mapping[str, Any], Any]], directions: Sequence[str],
                notes: list) -> tuple[Any, list]:
    """An in-memory Optuna study of `samples` = [(active sampled values, value or [values]), ...] over the spec's
    entries (`params`), directions "max" / "min", and the entries it holds. What it cannot hold (an entry Optuna
    has no distribution for, a value outside the spec's space) is left out with a line in `notes`."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    distributions = {}
    for p in params:
        try:
            distributions[p.key] = CategoricalDistribution(p.values) if p.is_finite else p.optuna_distribution()
        except ValueError as exc:
            notes.append(str(exc))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)   # no "A new study created in memory" line
    try:
        study = optuna.create_study(directions=["maximize" if d == "max" else "minimize" for d in directions])
    finally:
        optuna.logging.set_verbosity(verbosity)
    skipped = 0
    for sampled, value in samples:
        trial_params = {k: v for k, v in sampled.items() if k in distributions}
        try:
            study.add_trial(create_trial(params=trial_params, distributions={k: distributions[k] for k in trial_params},
                                         **({"values": value} if len(directions) > 1 else {"value": value})))
        except ValueError as exc:   # a value outside the spec's space (the spec changed since the sweep?)
            skipped += 1
            log.debug("report study: skipping a trial: %s", exc)
    if skipped:
        notes.append(f"{skipped} trial(s) left out of the importances: their values lie outside the spec's space")
    return study, list(distributions)


def param_importances(params: Sequence, samples: Sequence[tuple[Mapping[str, Any], float]], mode: str,
                      min_trials: int = MIN_TRIALS) -> Importances:
    """Importances of `params` (spec Params) from `samples` = [(active sampled values, objective value), ...].

    Never raises for a data problem: too few samples, values outside the space, constant objectives or an
    Optuna error all yield an empty result with a note saying why.
    """
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    out = Importances(evaluator=EVALUATOR)
    try:
        usable = [(s, float(v)) for s, v in samples if v is not None and math.isfinite(v)]
        out.study, keys = build_study(params, usable, [mode], out.notes)
        trials = out.study.trials
        out.n_trials = len(trials)
        if out.n_trials < min_trials:
            out.notes.append(f"too few trials for parameter importances: {out.n_trials} with a finite value in the "
                             f"space, at least {min_trials} needed (run more samples, or resume the sweep)")
            return out
        if len({t.value for t in trials}) == 1:
            out.notes.append("every trial scored the same value; no parameter made a difference to measure")
            return out
        partial = {k: sum(k in t.params for t in trials) for k in keys}
        scored = [k for k, n in partial.items() if n == out.n_trials]
        if not scored:
            out.notes.append("no searched parameter is set in every trial; fANOVA has nothing to score")
            return out
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = get_param_importances(out.study, evaluator=FanovaImportanceEvaluator(seed=0), params=scored,
                                           normalize=True)
        for w in caught:
            text = f"Optuna: {w.message}"
            if text not in out.notes and not issubclass(w.category, DeprecationWarning):
                out.notes.append(text)
    except Exception as exc:  # importances are a diagnostic: report the problem, never fail the report
        out.notes.append(f"parameter importances could not be computed: {type(exc).__name__}: {exc}")
        return out
    for key, n in partial.items():
        if 0 < n < out.n_trials:
            out.notes.append(f"{key}: conditional, set in {n} of {out.n_trials} trials; fANOVA scores only "
                             "parameters set in every trial, so it has no importance here")
    never = [k for k, n in partial.items() if not n]
    if never:
        out.notes.append(f"not active in any of the {out.n_trials} trials (no importance): {', '.join(never)}")
    if values and not any(v > 0 for v in values.values()):
        out.notes.append("all importances are zero")
    out.values = {k: float(v) for k, v in sorted(values.items(), key=lambda kv: -kv[1])}
    return out


def sweep_importances(data, min_trials: int = MIN_TRIALS) -> Importances:
    """Importances for a ReportData (see module doc for how trials are scored)."""
    spec = data.spec
    if not spec.params:
        return Importances(notes=["the sweep searched no parameters"])
    curves = [(r, dict(curve(r, data.metric))) for r in data.rows]
    for epoch in range(int(spec.max_t), 0, -1):   # the last epoch min_trials trials reached with a finite value
        reached = [(r, c[epoch]) for r, c in curves if epoch in c]
        if len(reached) >= min_trials:
            break
    else:
        finite = [len(c) for _, c in curves]
        return Importances(notes=[f"too few trials for parameter importances: no epoch was reached by {min_trials} "
                                  f"trials with a finite {data.metric} ({sum(n > 0 for n in finite)} trial(s) have "
                                  f"any finite value, the longest ran {max(finite, default=0)} epoch(s)); run more "
                                  "samples"])
    out = param_importances(spec.params, [(r.sampled, v) for r, v in reached], data.mode, min_trials)
    out.epoch = epoch
    return out
