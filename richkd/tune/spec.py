"""A sweep spec read from YAML and checked completely, without side effects, before Ray starts: every problem is one
SpecError (docs/architecture.md, "Data flow", 2). `SweepSpec.to_dict()` is itself a valid spec (env variables
expanded, paths absolute, defaults spelt out) that the sweep folder stores and later commands read back.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from richkd.cache.signature import CACHE_AFFECTING_PREFIXES, affects_cache, cache_signature
from richkd.config import Config, ConfigError, load_yaml_mapping
from richkd.metric_names import needs_robustness, per_corruption
from richkd.schema import build, flatten, parse_override, read_yaml, suggest, to_plain
from richkd.tracking import default_artifact_location
from richkd.tune.errors import SpecError
from richkd.tune.params import Param, TrialPlan, check_keys, config_or_error, parse_space
from richkd.tune.paths import PATH_KEYS, absolutize, join_storage, resolve_tracking_uri
from richkd.tune.preflight import check_inputs, check_space_values
from richkd.tune.settings import FinalizeSettings, MlflowSettings, TuneSettings

log = logging.getLogger(__name__)

SPEC_KEYS = ("name", "description", "base", "config", "space", "points_to_evaluate", "tune", "mlflow", "finalize",
             "arms")
ARM_KEYS = ("description", "config", "space", "points_to_evaluate")
SHARED_KEYS = ("train.epochs", "seed")    # every arm trains the same schedule from the same seed
CONFIG_SECTIONS = tuple(f.name for f in fields(Config))   # `--set clip.model=...` means config.clip.model
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class SweepSpec:
    name: str
    source: Optional[str]          # the spec file, if loaded from one
    base_config: Config
    params: tuple
    points: tuple
    tune: TuneSettings
    mlflow: MlflowSettings
    finalize: FinalizeSettings
    description: str = ""

    @property
    def max_t(self) -> int:
        return self.base_config.train.epochs

    @property
    def space_keys(self) -> list[str]:
        return [p.key for p in self.params]

    def plan(self) -> TrialPlan:
        return TrialPlan(base=self.base_config.to_dict(), params=self.params, metric=self.tune.metric,
                         mode=self.tune.mode, max_t=self.max_t, gpu=self.tune.gpu,
                         objectives=self.tune.objectives)

    def trial_config(self, sampled: Mapping[str, Any]) -> Config:
        return self.plan().trial_config(sampled)

    @property
    def experiment_path(self) -> str:
        return join_storage(self.tune.storage_path, self.name)

    def space_hash(self) -> str:
        blob = json.dumps([[p.key, p.describe()] for p in self.params], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe_space(self) -> dict:
        return {p.key: p.describe() for p in self.params}

    def random_points(self, n: int, seed: int = 0) -> list[dict]:
        return self.plan().random_points(n, seed)

    @cached_property
    def cache_probe_configs(self) -> list[Config]:
        """Configs that together need every cache any trial can read, one per distinct cache need: every combination
        of the cache-affecting choice values crossed with the base config, the points to evaluate and seeded draws
        of the other knobs (which decide e.g. whether CLIP is used); each must be a valid config."""
        cache_params = [p for p in self.params if any(affects_cache(k) for k in p.config_keys)]
        combos = [dict(zip([p.key for p in cache_params], vals))
                  for vals in itertools.product(*[p.values for p in cache_params])] or [{}]
        others = [{}] + [dict(pt) for pt in self.points] + self.random_points(32, seed=12345)
        plan = self.plan()
        seen: dict = {}
        for other, combo in itertools.product(others, combos):
            sampled = {**{k: v for k, v in other.items() if k not in combo}, **combo}
            cfg = config_or_error(plan, sampled, "a configuration this space can produce")
            seen.setdefault(cache_signature(cfg), cfg)
        return list(seen.values())

    def to_dict(self) -> dict:
        """The resolved spec as a spec mapping (see the module docstring); `spec_from_mapping` reads it back."""
        return {"name": self.name, "description": self.description, "config": self.base_config.to_dict(),
                "space": {p.key: p.to_entry() for p in self.params},
                "points_to_evaluate": [dict(pt) for pt in self.points],
                "tune": to_plain(self.tune), "mlflow": to_plain(self.mlflow), "finalize": to_plain(self.finalize)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Optional[str] = None, check: bool = False) -> "SweepSpec":
        """A spec saved by `to_dict`; `check` re-runs the file and data checks (on the machine reading it)."""
        return spec_from_mapping(data, source=source, check_resources=check, check_data=check)


def load_spec(path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = (),
              *, check_resources: bool = True, check_data: bool = True) -> SweepSpec:
    """Read and validate a sweep spec file. `overrides` are `dotted.key=value` strings on the spec mapping
    (e.g. `tune.num_samples=4`, `config.train.epochs=2`). Raises SpecError; never writes anything."""
    specs = load_specs(path, overrides, check_resources=check_resources, check_data=check_data)
    if len(specs) > 1:
        raise SpecError(f"{path} compares {len(specs)} arms ({', '.join(s.name for s in specs.values())}): "
                        "`richkd sweep` runs them one after the other; other commands take one arm's sweep name")
    return next(iter(specs.values()))


def load_specs(path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = (),
               *, check_resources: bool = True, check_data: bool = True) -> dict[str, SweepSpec]:
    """{arm: spec} of a spec file with `arms:` (each arm its own sweep named <name>.<arm>, everything but its
    `config:`, `space:` and `points_to_evaluate:` shared, so every arm gets the same budget), or {"": spec}."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"sweep spec {str(p)!r} does not exist (shipped specs are in search_spaces/)")
    try:
        raw = load_yaml_mapping(p)
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    kw = {"source": str(p.resolve()), "base_dir": p.resolve().parent, "check_resources": check_resources,
          "check_data": check_data}
    if "arms" not in raw:
        return {"": spec_from_mapping(raw, overrides=overrides, **kw)}
    raw = copy.deepcopy({"name": p.stem, **raw})   # YAML aliases may share nodes the overrides change
    _apply_spec_overrides(raw, overrides)
    return {arm: spec_from_mapping(m, **kw) for arm, m in arm_mappings(expand_env(raw)).items()}


def arm_mappings(raw: Mapping[str, Any]) -> dict[str, dict]:
    """Each arm of a spec with `arms:` as a spec mapping of its own (see load_specs)."""
    arms, name = raw["arms"], raw.get("name")
    if not isinstance(arms, Mapping) or len(arms) < 2:
        raise SpecError(f"arms: expected a mapping of two or more arm names to {{space: ..., config: ...}}, "
                        f"got {arms!r}")
    for key in ("space", "points_to_evaluate"):
        if raw.get(key):
            raise SpecError(f"{key}: with arms, each arm has its own (arms.<arm>.{key}); move it there")
    out = {}
    for arm, body in arms.items():
        where = f"arms.{arm}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", str(arm)):
            raise SpecError(f"{where}: {arm!r} must be a folder-safe name (letters, digits, _ -)")
        check_keys(body, ARM_KEYS, where)
        config = body.get("config") or {}
        for key in set(SHARED_KEYS) & set(flatten(config) if isinstance(config, Mapping) else ()):
            raise SpecError(f"{where}.config.{key}: every arm trains with the same {key} (equal budgets); set it "
                            "in the shared config:")
        m = {k: v for k, v in raw.items() if k != "arms"}
        m.update(name=f"{name}.{arm}", config=_deep_merge(dict(raw.get("config") or {}), config),
                 space=body.get("space"), points_to_evaluate=body.get("points_to_evaluate") or [],
                 description=body.get("description") or f"{raw.get('description') or name}: arm {arm}")
        out[str(arm)] = m
    return out


def spec_from_mapping(raw: Mapping[str, Any], *, source: Optional[str] = None,
                      overrides: Sequence[str] | Mapping[str, Any] = (), base_dir: Optional[Path] = None,
                      check_resources: bool = True, check_data: bool = True) -> SweepSpec:
    """Validate a spec mapping (see module doc). Relative paths resolve against the current directory (a
    relative `base:` that is not found there is also looked for in `base_dir`, the spec file's folder)."""
    raw = copy.deepcopy(dict(raw))
    _apply_spec_overrides(raw, overrides)
    demo_base = "RICHKD_DEMO_DIR" in str(raw.get("base"))   # a spec that builds on `richkd demo`'s outputs
    raw = expand_env(raw)
    if misplaced := [k for k in raw if k in CONFIG_SECTIONS and k not in SPEC_KEYS]:
        raise SpecError(f"unknown spec key {misplaced[0]!r}: config sections go under `config:` (config: "
                        f"{{{misplaced[0]}: ...}}), or in the `base:` config file")
    check_keys(raw, SPEC_KEYS, "")
    if "arms" in raw:
        raise SpecError("arms: a spec with arms is several sweeps; read it with load_specs (richkd sweep does)")
    name = raw.get("name") or (Path(source).stem if source else None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""):
        raise SpecError(f"name: {name!r} must be a non-empty folder-safe name (letters, digits, _ . -)")

    base_cfg = _load_base_config(raw, base_dir or Path.cwd(), name, demo_base)
    params = parse_space(raw.get("space") or {}, base_cfg)
    tune = build(TuneSettings, raw.get("tune"), "tune.")
    tune = replace(tune, scheduler=tune.scheduler.for_epochs(base_cfg.train.epochs))
    _check_fits(tune, params, base_cfg)
    base_cfg = _enable_objective_metrics(base_cfg, tune, params)
    points = _parse_points(raw.get("points_to_evaluate") or [], params, tune)
    mlflow = build(MlflowSettings, raw.get("mlflow"), "mlflow.")
    uri = resolve_tracking_uri(mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), tune.storage_path)
    mlflow = replace(mlflow, tracking_uri=uri,
                     artifact_location=default_artifact_location(uri, mlflow.artifact_location))
    finalize = build(FinalizeSettings, raw.get("finalize"), "finalize.")
    finalize = replace(finalize, overrides={k: absolutize(k, v) for k, v in finalize.overrides.items()})
    try:
        base_cfg.with_overrides(finalize.overrides)
    except ConfigError as exc:
        raise SpecError(f"finalize.overrides: {exc}") from None
    spec = SweepSpec(name=name, source=source, base_config=base_cfg, params=params, points=points,
                     tune=tune, mlflow=mlflow, finalize=finalize, description=str(raw.get("description") or ""))
    check_space_values(base_cfg, spec.plan(), points)
    check_inputs(base_cfg, params, spec.cache_probe_configs, check_resources=check_resources, check_data=check_data)
    return spec


def expand_env(value: Any, where: str = "") -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string. A string that is exactly one ${...} is re-read
    as a YAML scalar, so `num_samples: ${N:-8}` gives the integer 8."""
    if isinstance(value, Mapping):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def repl(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        raise SpecError(f"{where or 'spec'}: environment variable ${{{var}}} is not set "
                        f"(export it, or write ${{{var}:-default}} in the spec)")

    whole = _ENV_RE.fullmatch(value)
    out = _ENV_RE.sub(repl, value)
    if "${" in out:
        raise SpecError(f"{where or 'spec'}: malformed ${{...}} in {value!r}; write ${{VAR}} or ${{VAR:-default}}")
    if whole:
        try:
            parsed = read_yaml(out) if out.strip() else out
        except yaml.YAMLError:
            return out
        return parsed if isinstance(parsed, (int, float, bool)) or parsed is None else out
    return out


def _apply_spec_overrides(raw: dict, overrides: Sequence[str] | Mapping[str, Any]) -> None:
    items = overrides.items() if isinstance(overrides, Mapping) else [parse_override(o) for o in overrides]
    for dotted, value in items:
        parts = dotted.split(".")
        if parts[0] not in SPEC_KEYS:
            hint = (f"; a config key takes the config. prefix: --set config.{dotted}={value}"
                    if parts[0] in CONFIG_SECTIONS else suggest(parts[0], SPEC_KEYS))
            raise SpecError(f"--set {dotted}: unknown spec section {parts[0]!r}{hint}")
        node = raw
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise SpecError(f"--set {dotted}: {part!r} is not a mapping in the spec")
            node = node[part]
        node[parts[-1]] = value


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_base_config(raw: dict, base_dir: Path, name: str, demo_base: bool = False) -> Config:
    nested: dict = {}
    base = raw.get("base")
    if base is not None:
        if not isinstance(base, str):
            raise SpecError(f"base: expected the path of a config YAML, got {base!r}")
        base_path = Path(base).expanduser()
        tried = [base_path.resolve()]
        if not base_path.is_absolute() and not base_path.is_file():
            # like every path in a spec, relative to the current directory; else next to the spec file
            base_path = base_dir / base_path
            tried.append(base_path)
        if not base_path.is_file():
            fix = ("; `richkd demo` writes it: run that first, or set RICHKD_DEMO_DIR to the folder a demo ran "
                   "in (its --out)" if demo_base else "")
            raise SpecError(f"base: config file {base!r} does not exist (looked for "
                            f"{' and '.join(repr(str(t)) for t in tried)}){fix}")
        try:
            nested = load_yaml_mapping(base_path)
        except ConfigError as exc:
            raise SpecError(f"base: {exc}") from None
    inline = raw.get("config") or {}
    if not isinstance(inline, Mapping):
        raise SpecError(f"config: expected a mapping of config sections, got {inline!r}")
    nested = _deep_merge(nested, inline)
    nested.setdefault("name", name)
    try:
        cfg = Config.from_dict(nested)
    except ConfigError as exc:
        raise SpecError(f"config: {exc}") from None
    flat = cfg.to_flat_dict()
    changed = {k: absolutize(k, flat[k]) for k in PATH_KEYS if absolutize(k, flat[k]) != flat[k]}
    if cfg.train.checkpoint_dir is not None:
        # every trial would write the same last.pt; trials checkpoint through Tune (one per epoch) instead
        log.info("config.train.checkpoint_dir is ignored in a sweep: trials checkpoint through Ray Tune")
        changed["train.checkpoint_dir"] = None
    return cfg.with_overrides(changed) if changed else cfg


def _check_fits(t: TuneSettings, params: Sequence[Param], base: Config) -> None:
    """Rules between the tune settings, the space and the base config."""
    # every trial needs a validation split: a sweep ranks, prunes and selects trials on validation metrics
    why = ("0 leaves no validation split, but a sweep ranks and selects trials on validation metrics (val_*); "
           "use a value in (0, 0.9), e.g. 0.1 (`richkd finalize` trains the finalists on the whole split)")
    if base.data.val_fraction == 0:
        raise SpecError(f"config.data.val_fraction: {why}")
    for p in params:
        if not p.is_finite and p.key.startswith(CACHE_AFFECTING_PREFIXES):
            raise SpecError(f"space.{p.key}: {p.key} changes the teacher/CLIP caches, which are built once before "
                            f"the trials; sample it with `choice` (finite values), not `{p.sampler}` "
                            f"(cache-affecting prefixes: {', '.join(CACHE_AFFECTING_PREFIXES)})")
        if ("data.val_fraction", 0) in p.corner_overrides():
            raise SpecError(f"space.{p.key}: data.val_fraction {why}")
    algorithm = t.search.algorithm
    if not params:
        raise SpecError("space: is empty; list at least one dotted config key with a sampler")
    if algorithm == "optuna" and (grid := [p.key for p in params if p.sampler == "grid"]):
        raise SpecError(f"space.{grid[0]}: the grid sampler needs tune.search.algorithm: grid or random "
                        "(Optuna samples; use `choice` for a categorical knob)")
    if algorithm == "grid" and (bad := [p for p in params if p.sampler != "grid"]):
        raise SpecError(f"space.{bad[0].key}: algorithm grid needs every entry to use the grid sampler "
                        f"(got {bad[0].sampler}); use algorithm: random to mix grid and random entries")
    if algorithm == "grid" and (cond := [p for p in params if p.when]):
        raise SpecError(f"space.{cond[0].key}: `when:` is not supported with algorithm grid (it would run "
                        "duplicate configurations); use a variant entry or algorithm: optuna")
    # Tune needs the objective in every report and ASHA compares it at each epoch (its rungs), so a trial
    # validates after every epoch; with eval_every > 1 the first reports would lack the metric and fail the trial.
    if base.train.eval_every != 1:
        raise SpecError(f"config.train.eval_every: {base.train.eval_every}; a sweep validates after every epoch "
                        "(Tune and ASHA compare the objective at each epoch), set train.eval_every: 1")
    if searched := [p.key for p in params if "train.eval_every" in p.config_keys]:
        raise SpecError(f"space.{searched[0]}: train.eval_every cannot be searched; a sweep validates after every "
                        "epoch (drop the entry)")
    if not t.scheduler.grace_period <= base.train.epochs:
        raise SpecError(f"tune.scheduler.grace_period: {t.scheduler.grace_period} must be in [1, train.epochs = "
                        f"{base.train.epochs}] (ASHA's max_t is the number of epochs)")
    if t.gpu > 0 and base.device == "cpu":
        raise SpecError("tune.resources.gpu > 0 but config.device is cpu; set device: auto or cuda")
    if t.gpu > 0 and base.device.startswith("cuda:"):
        raise SpecError(f"config.device: {base.device!r} names a GPU, but Ray assigns each trial its GPU (it is "
                        "cuda:0 inside the trial); set device: auto or cuda")


def _enable_objective_metrics(base: Config, tune: TuneSettings, params: Sequence[Param]) -> Config:
    """Switch on robustness evaluation when an objective is a robustness metric (it is off by default, and
    costs extra forward passes, so it is computed only when enabled or needed)."""
    needed = [m for m in tune.metrics if needs_robustness(m)]
    for m in needed:
        if (corruption := per_corruption(m)) and corruption not in base.robustness.corruptions:
            raise SpecError(f"tune.metric: {m} needs {corruption} in config.robustness.corruptions (now "
                            f"{list(base.robustness.corruptions)}); add it there, or choose one of "
                            + ", ".join(f"val_corrupt_top1_{c}" for c in base.robustness.corruptions))
    if needed and (p := next((p for p in params if "robustness.enabled" in p.config_keys), None)):
        raise SpecError(f"space.{p.key}: robustness.enabled cannot be searched when the objective "
                        f"{needed[0]} needs it; drop the entry (the sweep switches it on)")
    if needed and not base.robustness.enabled:
        log.info("config.robustness.enabled switched on: the sweep objective %s needs it", needed[0])
        base = base.with_overrides({"robustness.enabled": True})
    return base


def _parse_points(raw: Any, params: Sequence[Param], tune: TuneSettings) -> tuple:
    if not isinstance(raw, list):
        raise SpecError(f"points_to_evaluate: expected a list of {{space key: value}} mappings, got {raw!r}")
    if raw and tune.search.algorithm == "grid":
        raise SpecError("points_to_evaluate: not used by algorithm grid (the grid already lists every point)")
    by_key = {p.key: p for p in params}
    points = []
    for i, point in enumerate(raw):
        where = f"points_to_evaluate[{i}]"
        if not isinstance(point, Mapping) or not point:
            raise SpecError(f"{where}: expected a non-empty mapping of space keys to values, got {point!r}")
        point = {k: absolutize(k, v) for k, v in point.items()}
        for key, value in point.items():
            if key not in by_key:
                raise SpecError(f"{where}: {key!r} is not a space entry{suggest(key, by_key)} (points may set "
                                f"only searched keys: {', '.join(by_key)})")
            p = by_key[key]
            if not p.contains(value):
                rng = (f"one of {list(p.values)}" if p.is_finite else f"in [{p.low}, {p.high}]"
                       + (f" on steps of {p.q}" if p.q else ""))
                raise SpecError(f"{where}.{key}: {value!r} is outside the space ({p.sampler}: {rng})")
        points.append(point)
    return tuple(points)
