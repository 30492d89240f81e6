"""The search space: entries (`Param`), their `when:` conditions, and the walk over the entries a sample activates.

Samplers (`sampler:` in each space entry):
    uniform(low, high)          float in [low, high]
    loguniform(low, high)       float, log-uniform, low > 0
    quniform(low, high, q)      float on the grid low, low+q, ..., high ((high - low) / q must be whole)
    randint(low, high)          int in [low, high], both ends inclusive
    choice(values)              one of the values (scalars)
    grid(values)                every value (random/grid search only)
Any entry may carry `when: {KEY: TEST}`: the key is sampled only when every test holds on the config built
so far (base config + entries above it). TEST is a scalar (equality) or one of {eq, ne, gt, ge, lt, le, in,
not_in: VALUE}. A *variant* entry has a free name (not a config key) and `values:` mapping variant names to
{dotted.key: value} bundles, e.g. the L / F / L+F ablation.

`walk_active` is the one reading of `when:`: the trial's config, the MLflow params, the random draws, the
point checks and Optuna's define-by-run space all go through it, so they cannot disagree.
"""
from __future__ import annotations

import copy
import json
import math
import operator
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple

from richkd.config import Config, ConfigError, dotted_keys, flatten
from richkd.schema import suggest, unknown_key
from richkd.tune.errors import SpecError
from richkd.tune.paths import absolutize

# `when:` tests; an ordering test of an unset key (None) or of values that do not compare is false
CONDITION_TESTS = {"eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "ge": operator.ge, "lt": operator.lt,
                   "le": operator.le, "in": lambda a, b: a in b, "not_in": lambda a, b: a not in b}
_SKIP = object()


@dataclass(frozen=True)
class Sampler:
    """How one `sampler:` is drawn, placed in [0, 1] and handed to Optuna and Tune: the one sampler table."""
    keys: Tuple[str, ...]                       # the entry's keys besides sampler / when
    draw: Callable                              # (param, random.Random) -> value
    unit: Optional[Callable] = None             # (param, value) -> coordinate in [0, 1]; None: categorical
    optuna: Optional[Callable] = None           # (param, optuna.distributions) -> distribution; None: not Optuna
    tune: Optional[Callable] = None             # (param, ray.tune) -> Tune domain


def _lin(p, v):
    return (v - p.low) / (p.high - p.low)


SAMPLER_TABLE = {
    "uniform": Sampler(("low", "high"), lambda p, r: r.uniform(p.low, p.high), _lin,
                       lambda p, d: d.FloatDistribution(float(p.low), float(p.high)),
                       lambda p, t: t.uniform(p.low, p.high)),
    "loguniform": Sampler(("low", "high"), lambda p, r: math.exp(r.uniform(math.log(p.low), math.log(p.high))),
                          lambda p, v: (math.log(v) - math.log(p.low)) / (math.log(p.high) - math.log(p.low)),
                          lambda p, d: d.FloatDistribution(float(p.low), float(p.high), log=True),
                          lambda p, t: t.loguniform(p.low, p.high)),
    "quniform": Sampler(("low", "high", "q"),
                        # rounded to q's decimals + 6, so that 0.1 * 3 is 0.3
                        lambda p, r: round(p.low + p.q * r.randint(0, round((p.high - p.low) / p.q)),
                                           max(0, 6 - math.floor(math.log10(p.q)))),
                        _lin, lambda p, d: d.FloatDistribution(float(p.low), float(p.high), step=float(p.q)),
                        lambda p, t: t.quniform(p.low, p.high, p.q)),
    "randint": Sampler(("low", "high"), lambda p, r: r.randint(int(p.low), int(p.high)), _lin,
                       lambda p, d: d.IntDistribution(int(p.low), int(p.high)),
                       lambda p, t: t.randint(int(p.low), int(p.high) + 1)),   # Tune's high is exclusive
    "choice": Sampler(("values",), lambda p, r: r.choice(p.values), None,
                      lambda p, d: d.CategoricalDistribution(tuple(p.values)),
                      lambda p, t: t.choice(list(p.values))),
    "grid": Sampler(("values",), lambda p, r: r.choice(p.values), None, None,
                    lambda p, t: t.grid_search(list(p.values))),
}
CONTINUOUS_SAMPLERS = tuple(name for name, s in SAMPLER_TABLE.items() if s.unit is not None)
# Keys a space may not sample: ASHA's max_t is train.epochs, and the sweep names its own trials.
FIXED_KEYS = ("train.epochs", "name")


@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    value: Any

    def holds(self, values: Mapping[str, Any]) -> bool:
        try:
            return bool(CONDITION_TESTS[self.op](values.get(self.key), self.value))
        except TypeError:   # e.g. None > 0
            return False

    def describe(self) -> str:
        return f"{self.key} {self.op} {self.value!r}"


@dataclass(frozen=True)
class Param:
    """One space entry. `variants` is set for a variant entry (name -> {dotted key: value})."""
    key: str
    sampler: str
    low: Any = None
    high: Any = None
    q: Any = None
    values: Tuple[Any, ...] = ()
    when: Tuple[Condition, ...] = ()
    variants: Optional[dict] = None

    @property
    def is_variant(self) -> bool:
        return self.variants is not None

    @property
    def is_finite(self) -> bool:
        return self.sampler in ("choice", "grid")

    @property
    def config_keys(self) -> list[str]:
        """Every dotted config key this entry can set (a variant's keys across all its bundles)."""
        return [k for b in self.variants.values() for k in b] if self.is_variant else [self.key]

    def overrides_for(self, value: Any) -> dict:
        """The dotted config keys this entry sets when it takes `value`."""
        return dict(self.variants[value]) if self.is_variant else {self.key: value}

    def contains(self, value: Any) -> bool:
        if self.is_finite:   # True is not 1
            return any(v is value if isinstance(v, bool) or isinstance(value, bool) else v == value
                       for v in self.values)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.sampler == "quniform":
            return abs((value - self.low) / self.q - round((value - self.low) / self.q)) < 1e-6
        return self.sampler != "randint" or float(value).is_integer()

    def draw(self, rng: random.Random) -> Any:
        """A pure-Python sample (table rows, validation draws and cache probes; sweeps use Optuna / Tune)."""
        return SAMPLER_TABLE[self.sampler].draw(self, rng)

    def unit(self, value: Any) -> float:
        """The value's coordinate in [0, 1] (log scale for loguniform) in a continuous entry."""
        return float(SAMPLER_TABLE[self.sampler].unit(self, value))

    def optuna_distribution(self):
        """The Optuna distribution this entry samples from (Optuna's define-by-run, warm starts, importances)."""
        import optuna.distributions
        make = SAMPLER_TABLE[self.sampler].optuna
        if make is None:
            raise SpecError(f"space.{self.key}: the {self.sampler} sampler cannot be used with Optuna")
        return make(self, optuna.distributions)

    def tune_domain(self):
        """The Tune domain of this entry (random / grid search)."""
        from ray import tune
        return SAMPLER_TABLE[self.sampler].tune(self, tune)

    def corners(self) -> list:
        return list(self.values) if self.is_finite else [self.low, self.high]

    def corner_overrides(self) -> list:
        """(dotted key, value) pairs of every value and range end."""
        return [kv for value in self.corners() for kv in self.overrides_for(value).items()]

    def describe(self) -> dict:
        """A readable summary (MLflow, report): `when:` as text."""
        out = self.to_entry()
        if self.when:
            out["when"] = [c.describe() for c in self.when]
        return out

    def to_entry(self) -> dict:
        """The entry as a spec file writes it; `parse_space` reads it back as an equal Param."""
        out: dict = {"sampler": self.sampler}
        if self.is_variant:
            out["values"] = copy.deepcopy(self.variants)
        elif self.is_finite:
            out["values"] = list(self.values)
        else:
            out.update({"low": self.low, "high": self.high})
            if self.q is not None:
                out["q"] = self.q
        if self.when:
            out["when"] = {c.key: (c.value if c.op == "eq" else {c.op: c.value}) for c in self.when}
        return out


def walk_active(params: Sequence[Param], base_flat: Mapping[str, Any],
                choose: Callable[[Param], Any]) -> Iterator[tuple[Param, Any]]:
    """(entry, value) for each entry whose `when:` holds on the config built so far (each chosen value's overrides
    applied), in spec order; `choose(p)` gives the value (a sample, a draw, an Optuna suggestion) or _SKIP."""
    values = dict(base_flat)
    for p in params:
        if not all(c.holds(values) for c in p.when):
            continue
        value = choose(p)
        if value is _SKIP:
            continue
        yield p, value
        values.update(p.overrides_for(value))
        if p.is_variant:
            values[p.key] = value         # later `when:` tests may name the variant entry itself


def from_sample(sampled: Mapping[str, Any], missing: Optional[list] = None) -> Callable[[Param], Any]:
    """A `walk_active` chooser reading a sampled dict; entries it lacks are skipped (and listed in `missing`)."""
    def choose(p: Param) -> Any:
        if p.key in sampled:
            return sampled[p.key]
        if missing is not None:
            missing.append(p.key)
        return _SKIP
    return choose


@dataclass(frozen=True)
class TrialPlan:
    """What a trial needs to turn Tune's sampled dict into a typed Config (small, picklable, no validation I/O)."""
    base: dict                 # nested Config.to_dict() of the base config (paths absolute)
    params: tuple              # Param entries in spec order
    metric: str
    mode: str
    max_t: int
    gpu: float = 0.0
    objectives: tuple = ()     # ((metric, mode), ...) when the sweep has several objectives
    final: bool = False        # evaluate the test split after the last epoch (learning-curve tables only)

    @property
    def metrics(self) -> list[str]:
        return [m for m, _ in getattr(self, "objectives", ())] or [self.metric]   # getattr: older pickles

    def effective_overrides(self, sampled: Mapping[str, Any]) -> dict:
        """Dotted overrides the sampled values amount to, without inactive entries (random/grid search samples
        every entry; Optuna only the active ones)."""
        return {k: v for p, value in walk_active(self.params, flatten(self.base), from_sample(sampled))
                for k, v in p.overrides_for(value).items()}

    def active_sampled(self, sampled: Mapping[str, Any]) -> dict:
        """{space key: value} for the entries that are active for this sample (variants keep their name)."""
        return {p.key: value for p, value in walk_active(self.params, flatten(self.base), from_sample(sampled))}

    def trial_config(self, sampled: Mapping[str, Any]) -> Config:
        return Config.from_dict(self.base).with_overrides(self.effective_overrides(sampled))

    def random_points(self, n: int, seed: int = 0) -> list[dict]:
        """n seeded draws from the space (respecting `when:`), as Tune-style sampled dicts."""
        rng = random.Random(seed)
        base = flatten(self.base)
        return [{p.key: v for p, v in walk_active(self.params, base, lambda p: p.draw(rng))} for _ in range(n)]


def config_or_error(plan: TrialPlan, sampled: Mapping[str, Any], what: str) -> Config:
    """The trial config of a sample, or one SpecError naming the sampled values that make it invalid."""
    try:
        return plan.trial_config(sampled)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in sampled.items())
        raise SpecError(f"space: {what} is invalid ({exc}); sampled values: "
                        f"{shown or 'none (the base config)'}") from None


def parse_space(space: Any, base: Config) -> tuple:
    """The `space:` mapping -> Param entries in spec order; every problem is one SpecError naming the entry."""
    if not isinstance(space, Mapping):
        raise SpecError(f"space: expected a mapping of dotted config keys to samplers, got {space!r}")
    config_keys = dotted_keys()
    params: list[Param] = []
    seen_config_keys: dict[str, str] = {}
    for key, entry in space.items():
        key = str(key)
        p = _parse_entry(key, entry, config_keys, [q.key for q in params if q.is_variant])
        for k in sorted(set(p.config_keys)):
            if k in FIXED_KEYS:
                raise SpecError(f"space.{key}: {k} cannot be searched" + (" (ASHA's max_t is train.epochs; use a "
                                "separate sweep per schedule)" if k == "train.epochs" else ""))
            if k in seen_config_keys:
                raise SpecError(f"space.{key}: {k} is already set by space entry {seen_config_keys[k]!r}")
            seen_config_keys[k] = key
        params.append(p)
    return tuple(params)


def _parse_entry(key: str, entry: Any, config_keys: list[str], variant_keys: list[str]) -> Param:
    where = f"space.{key}"
    if not isinstance(entry, Mapping):
        raise SpecError(f"{where}: expected a mapping with `sampler:`, got {entry!r}")
    sampler = entry.get("sampler")
    if sampler not in SAMPLER_TABLE:
        raise SpecError(f"{where}.sampler: {sampler!r} is not one of {', '.join(SAMPLER_TABLE)}"
                        f"{suggest(str(sampler), SAMPLER_TABLE)}")
    keys = SAMPLER_TABLE[sampler].keys
    check_keys(entry, keys + ("sampler", "when"), where)
    if missing := [k for k in keys if k not in entry]:
        raise SpecError(f"{where}: sampler {sampler} needs {', '.join(missing)}")
    when = _parse_conditions(entry.get("when"), where, config_keys + variant_keys)
    values_raw = entry.get("values")
    if key not in config_keys:
        variants = _variants(key, sampler, values_raw, config_keys)
        return Param(key=key, sampler=sampler, values=tuple(variants), when=when, variants=variants)
    if sampler in CONTINUOUS_SAMPLERS:
        low, high, q = _range(entry, sampler, where)
        return Param(key=key, sampler=sampler, low=low, high=high, q=q, when=when)
    if not isinstance(values_raw, list) or not values_raw:
        raise SpecError(f"{where}.values: expected a non-empty list, got {values_raw!r}")
    values = tuple(absolutize(key, _scalar(v, f"{where}.values")) for v in values_raw)
    if len({json.dumps(v) for v in values}) != len(values):
        raise SpecError(f"{where}.values: {list(values_raw)} has duplicates")
    return Param(key=key, sampler=sampler, values=values, when=when)


def _variants(key: str, sampler: str, values_raw: Any, config_keys: list[str]) -> dict:
    where = f"space.{key}"
    if not (sampler in ("choice", "grid") and isinstance(values_raw, Mapping)):
        raise SpecError(f"unknown config key {where!r}{suggest(key, config_keys)} (a free name is allowed "
                        "only for a variant entry: sampler choice/grid with values: {name: {key: value}})")
    if not values_raw:
        raise SpecError(f"{where}.values: a variant entry needs at least one variant")
    variants = {}
    for vname, bundle in values_raw.items():
        if not isinstance(bundle, Mapping) or not bundle:
            raise SpecError(f"{where}.values.{vname}: expected a mapping of dotted config keys to values")
        for k in bundle:
            if k not in config_keys:
                raise SpecError(f"unknown config key {k!r} in {where}.values.{vname}{suggest(k, config_keys)}")
        variants[str(vname)] = dict(bundle)
    return variants


def _range(entry: Mapping, sampler: str, where: str) -> tuple:
    integer = sampler == "randint"
    low = number(entry["low"], f"{where}.low", integer)
    high = number(entry["high"], f"{where}.high", integer)
    if not low < high:
        raise SpecError(f"{where}: low ({low}) must be < high ({high})")
    if sampler == "loguniform" and low <= 0:
        raise SpecError(f"{where}: loguniform needs low > 0, got {low}")
    q = None
    if sampler == "quniform":
        q = number(entry["q"], f"{where}.q")
        if q <= 0:
            raise SpecError(f"{where}.q: must be > 0, got {q}")
        steps = (high - low) / q
        if not math.isfinite(steps) or steps > 1e9:
            raise SpecError(f"{where}: (high - low) / q = {steps:g} grid steps is too many (at most 1e9); "
                            "use a larger q or the uniform sampler")
        if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
            raise SpecError(f"{where}: (high - low) / q = {steps:g} must be a whole number so that high "
                            "is on the grid")
    return low, high, q


def _parse_conditions(when: Any, where: str, known: Sequence[str]) -> tuple:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise SpecError(f"{where}.when: expected a mapping like {{loss.feat_weight: {{gt: 0}}}}, got {when!r}")
    out = []
    for key, test in when.items():
        if key not in known:
            raise SpecError(f"{where}.when: {key!r} is not a config key or an earlier space entry"
                            f"{suggest(key, known)}")
        if isinstance(test, Mapping):
            if len(test) != 1:
                raise SpecError(f"{where}.when.{key}: give exactly one test of {', '.join(CONDITION_TESTS)}")
            op, value = next(iter(test.items()))
            if op not in CONDITION_TESTS:
                raise SpecError(f"{where}.when.{key}: unknown test {op!r}{suggest(op, CONDITION_TESTS)} "
                                f"(tests: {', '.join(CONDITION_TESTS)})")
            if op in ("in", "not_in") and not isinstance(value, list):
                raise SpecError(f"{where}.when.{key}.{op}: expected a list, got {value!r}")
        else:
            op, value = "eq", test
        out.append(Condition(str(key), op, value))
    return tuple(out)


def check_keys(mapping: Any, valid: Sequence[str], section: str) -> None:
    if not isinstance(mapping, Mapping):
        raise SpecError(f"{section or 'spec'}: expected a mapping, got {mapping!r}")
    for key in (k for k in mapping if k not in valid):
        unknown_key(str(key), valid, section, SpecError, noun="spec key")


def number(value: Any, where: str, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: expected a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise SpecError(f"{where}: expected an integer, got {value!r}")
    if not math.isfinite(value):
        raise SpecError(f"{where}: expected a finite number, got {value!r}")
    return int(value) if integer else value


def _scalar(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SpecError(f"{where}: choice/grid values must be scalars (number, string, true/false, null), got "
                    f"{value!r}; use a variant entry (values: {{name: {{key: value}}}}) for bundles")
