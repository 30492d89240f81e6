"""Warm starts (`tune.warm_start`, docs/search.md "Warm starts"): earlier sweeps' and tables' trials told to a new
sweep's Optuna study first, finished ones as COMPLETE and ASHA-stopped ones as PRUNED, each with its per-epoch values,
where the new space can produce them (the others are left out and counted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from optuna.trial import TrialState, create_trial

from richkd.config import flatten
from richkd.tune.errors import SpecError
from richkd.tune.params import from_sample, walk_active
from richkd.tune.results import ExportError, finite_value, load_sweep
from richkd.tune.spec import SweepSpec
from richkd.tune.table import TableError, read_table


@dataclass(frozen=True)
class WarmTrial:
    params: dict               # active values of the new space's entries
    value: Optional[float]     # the last value (COMPLETE) or None (PRUNED)
    intermediate: dict         # epoch -> value


@dataclass
class WarmStart:
    trials: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    left_out: int = 0

    @property
    def completed(self) -> int:
        return sum(1 for t in self.trials if t.value is not None)

    @property
    def pruned(self) -> int:
        return len(self.trials) - self.completed

    def describe(self) -> str:
        left = f"; {self.left_out} outside this space left out" if self.left_out else ""
        return (f"warm start: {self.completed} completed and {self.pruned} pruned trial(s) from "
                f"{', '.join(self.sources)}{left}")


def _source(item: str, spec: SweepSpec) -> tuple[str, dict, list]:
    """(what it is, its {metric, mode, max_t, space keys, base flat config}, [(sampled, history, reached_max_t)])."""
    if Path(item).is_file():
        try:
            table = read_table(item)
        except TableError as exc:
            raise SpecError(f"tune.warm_start: {exc}") from None
        s = table.header["spec"]
        info = {"metric": table.metric, "mode": table.header["mode"], "max_t": table.max_t,
                "keys": list(s["space"]), "base": flatten(s["config"])}
        return f"table {item}", info, [(r.params, [{info["metric"]: v, "training_iteration": e + 1}
                                                    for e, v in enumerate(r.val_top1)], r.epochs >= table.max_t)
                                       for r in table.rows if r.outcome == "completed"]
    try:
        other, _, _, rows = load_sweep(item, spec.tune.storage_path)
    except (SpecError, ExportError) as exc:
        raise SpecError(f"tune.warm_start: {item!r} is neither a table file nor a sweep with results ({exc})") \
            from None
    info = {"metric": other.tune.metric, "mode": other.tune.mode, "max_t": other.max_t, "keys": other.space_keys,
            "base": flatten(other.base_config.to_dict())}
    return f"sweep {other.name}", info, [(r.sampled, r.history, r.outcome == "completed") for r in rows
                                         if r.outcome in ("completed", "stopped_early")]


def load_warm_start(spec: SweepSpec) -> Optional[WarmStart]:
    """The trials of spec.tune.warm_start's sources that the new space can produce (see the module docstring)."""
    if not spec.tune.warm_start:
        return None
    t, ours = spec.tune, {p.key: p for p in spec.params}
    base = flatten(spec.base_config.to_dict())
    out = WarmStart()
    for item in t.warm_start:
        what, info, trials = _source(item, spec)
        differ = [f"{k} {info[k]} (here {mine})" for k, mine in (("metric", t.metric), ("mode", t.mode),
                                                                 ("max_t", spec.max_t)) if info[k] != mine]
        if differ:
            raise SpecError(f"tune.warm_start: {what} is not comparable with this sweep: its {', '.join(differ)}; "
                            "warm-start only from sweeps or tables of the same metric and schedule")
        if not set(info["keys"]) & set(ours):
            raise SpecError(f"tune.warm_start: {what} searched {', '.join(info['keys'])}, none of which this space "
                            f"searches ({', '.join(ours)})")
        out.sources.append(what)
        for sampled, history, complete in trials:
            params = _inside(spec, sampled, info, base)
            curve = {int(r["training_iteration"]): finite_value(r.get(t.metric)) for r in history}
            curve = {e: v for e, v in curve.items() if v is not None}
            if params is None or not curve:
                out.left_out += 1
                continue
            out.trials.append(WarmTrial(params, curve[max(curve)] if complete else None, curve))
    return out


def _inside(spec: SweepSpec, sampled: dict, info: dict, base: dict) -> Optional[dict]:
    """The new space's active values for a source trial, or None when the new space cannot produce it."""
    ours = {p.key for p in spec.params}
    for key in info["keys"]:
        if key not in ours and key in sampled and (key not in base or sampled[key] != base[key]):
            return None      # it varied a key this space fixes, to another value than this base config's
    active, missing = {}, []
    for p, value in walk_active(spec.params, base, from_sample(sampled, missing)):
        if not p.contains(value):
            return None
        active[p.key] = value
    return None if missing else active     # missing: an entry active here that the source never set


def tell_optuna(study, spec: SweepSpec, warm: WarmStart) -> None:
    """Add the warm-start trials to an Optuna study (before it proposes anything)."""
    dists = {p.key: p.optuna_distribution() for p in spec.params}
    study.add_trials([create_trial(state=TrialState.PRUNED if w.value is None else TrialState.COMPLETE,
                                   value=w.value, params=w.params, intermediate_values=w.intermediate,
                                   distributions={k: dists[k] for k in w.params}) for w in warm.trials])
