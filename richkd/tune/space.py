"""Sweep specs as data: load a search-space YAML, expand ${ENV}, validate all of it before Ray starts.

A spec has a base config (`base:` file and/or inline `config:`), a `space:` of dotted config keys with
samplers, optional `points_to_evaluate:`, `tune:` settings, `mlflow:` settings and `finalize:` settings.
Validation is complete and side-effect free: unknown keys (with the nearest valid key suggested), bad
ranges, values the config rejects, unknown models or prompt sets, missing files, and continuous samplers
on cache-affecting keys all raise one `SpecError` before anything is launched or written.

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
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from richkd.config import Config, ConfigError, dotted_keys, flatten, load_yaml_mapping
from richkd.robustness.val_metrics import ROBUSTNESS_METRICS

log = logging.getLogger(__name__)


class SpecError(ConfigError):
    """A sweep spec problem the user can fix; raised before Ray starts and before anything is written."""


SAMPLERS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
CONTINUOUS_SAMPLERS = ("uniform", "loguniform", "quniform", "randint")
SEARCH_ALGORITHMS = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "fifo")
CONDITION_OPS = ("eq", "ne", "gt", "ge", "lt", "le", "in", "not_in")
# Metrics the trainer reports every epoch (richkd.trainer.Run.train); the sweep metric must be one of them.
# The robustness ones (val_corrupt_top1 / val_corrupt_ece) need config robustness.enabled, which the spec
# loader switches on when an objective names them.
KNOWN_METRICS = {"val_top1": "max", "val_top5": "max", "best_val_top1": "max", "val_loss": "min",
                 "val_ece": "min", "train_loss": "min", **ROBUSTNESS_METRICS}
# Config keys holding paths: made absolute (against the current directory) before trials change directory.
PATH_KEYS = ("data.root", "teacher.checkpoint", "clip.pretrained", "clip.prompt_set", "teaching.cache_dir",
             "train.checkpoint_dir")
# Keys a space may not sample: ASHA's max_t is train.epochs, and the sweep names its own trials.
FIXED_KEYS = ("train.epochs", "name")

SPEC_KEYS = ("name", "description", "base", "config", "space", "points_to_evaluate", "tune", "mlflow", "finalize")
TUNE_KEYS = ("metric", "mode", "num_samples", "search", "scheduler", "max_concurrent", "resources",
             "max_failures", "storage_path", "shared_storage", "checkpoint_num_to_keep", "time_budget_s",
             "reuse_actors")
SEARCH_KEYS = ("algorithm", "seed", "n_startup_trials", "storage")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor", "brackets")
RESOURCE_KEYS = ("cpu", "gpu")
MLFLOW_KEYS = ("enabled", "tracking_uri", "experiment", "artifact_location")
FINALIZE_KEYS = ("top", "seeds", "overrides")
ENTRY_KEYS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "quniform": ("low", "high", "q"),
              "randint": ("low", "high"), "choice": ("values",), "grid": ("values",)}

DEFAULT_STORAGE = "tune_runs"
SHARED_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs",
                   "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs",
                   "fuse.mountpoint-s3", "fuse.rclone", "9p", "virtiofs", "wekafs", "panfs")


# ----- small records --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    value: Any

    def holds(self, values: Mapping[str, Any]) -> bool:
        have = values.get(self.key)
        try:
            if self.op == "eq":
                return have == self.value
            if self.op == "ne":
                return have != self.value
            if self.op == "in":
                return have in self.value
            if self.op == "not_in":
                return have not in self.value
            if have is None:
                return False
            return {"gt": have > self.value, "ge": have >= self.value,
                    "lt": have < self.value, "le": have <= self.value}[self.op]
        except TypeError:
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
    values: tuple = ()
    when: tuple = ()
    variants: Optional[dict] = None

    @property
    def is_variant(self) -> bool:
        return self.variants is not None

    @property
    def is_finite(self) -> bool:
        return self.sampler in ("choice", "grid")

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(c.holds(values) for c in self.when)

    @property
    def config_keys(self) -> list[str]:
        """Every dotted config key this entry can set (a variant's keys across all its bundles)."""
        return [k for b in self.variants.values() for k in b] if self.is_variant else [self.key]

    def overrides_for(self, value: Any) -> dict:
        """The dotted config keys this entry sets when it takes `value`."""
        if self.is_variant:
            return dict(self.variants[value])
        return {self.key: value}

    def contains(self, value: Any) -> bool:
        if self.is_finite:
            return any(_same(value, v) for v in self.values)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.sampler == "randint" and not float(value).is_integer():
            return False
        if not (self.low <= value <= self.high):
            return False
        if self.sampler == "quniform":
            steps = (value - self.low) / self.q
            return abs(steps - round(steps)) < 1e-6
        return True

    def draw(self, rng: random.Random) -> Any:
        """A pure-Python sample (validation draws and cache probes; trials use Optuna / Tune samplers)."""
        if self.is_finite:
            return self.values[rng.randrange(len(self.values))]
        if self.sampler == "uniform":
            return rng.uniform(self.low, self.high)
        if self.sampler == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        if self.sampler == "quniform":
            n = int(round((self.high - self.low) / self.q))
            return _qround(self.low + self.q * rng.randint(0, n), self.q)
        return rng.randint(int(self.low), int(self.high))

    def corners(self) -> list:
        if self.is_finite:
            return list(self.values)
        return [self.low, self.high]

    def describe(self) -> dict:
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
            out["when"] = [c.describe() for c in self.when]
        return out


@dataclass(frozen=True)
class SearchSettings:
    algorithm: str = "optuna"
    seed: int = 0
    n_startup_trials: int = 10
    storage: Optional[str] = None        # optional Optuna RDB URL, e.g. sqlite:////abs/optuna.db (optuna-dashboard)


@dataclass(frozen=True)
class SchedulerSettings:
    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 3
    brackets: int = 1


@dataclass(frozen=True)
class TuneSettings:
    metric: str = "val_top1"              # the primary (first) objective: ASHA, ranking and best_config use it
    mode: str = "max"
    num_samples: int = 8
    search: SearchSettings = field(default_factory=SearchSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    max_concurrent: int = 4
    cpu: float = 1.0
    gpu: float = 0.0
    max_failures: int = 2
    storage_path: str = DEFAULT_STORAGE   # absolute path, or a URI (s3://, gs://, ...)
    shared_storage: bool = False          # declare a path shared across nodes when detection cannot tell
    checkpoint_num_to_keep: int = 1
    time_budget_s: Optional[float] = None
    reuse_actors: Optional[bool] = None   # None: reuse trial processes for CPU trials, fresh ones for GPU trials
    objectives: tuple = ()                # ((metric, mode), ...) of a multi-objective sweep; () = (metric, mode)

    @property
    def objective_pairs(self) -> tuple:
        return self.objectives or ((self.metric, self.mode),)

    @property
    def metrics(self) -> list[str]:
        return [m for m, _ in self.objective_pairs]

    @property
    def modes(self) -> list[str]:
        return [d for _, d in self.objective_pairs]

    @property
    def multi_objective(self) -> bool:
        return len(self.objective_pairs) > 1

    @property
    def storage_is_uri(self) -> bool:
        return _has_scheme(self.storage_path)

    @property
    def resolved_reuse_actors(self) -> bool:
        """CPU trials reuse their worker process (saves the torch import and the dataset load per trial); GPU
        trials get a fresh process so that a stopped trial's GPU memory is surely freed (ray#23971)."""
        return self.gpu == 0 if self.reuse_actors is None else self.reuse_actors


@dataclass(frozen=True)
class MlflowSettings:
    enabled: bool = True
    tracking_uri: str = ""                # resolved: never empty after validation when enabled
    experiment: str = "richkd"
    artifact_location: Optional[str] = None


@dataclass(frozen=True)
class FinalizeSettings:
    top: int = 3
    seeds: int = 3
    overrides: dict = field(default_factory=dict)


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

    @property
    def metrics(self) -> list[str]:
        return [m for m, _ in getattr(self, "objectives", ())] or [self.metric]   # getattr: older pickles

    def effective_overrides(self, sampled: Mapping[str, Any]) -> dict:
        """Dotted overrides the sampled values amount to, dropping entries whose `when:` does not hold.

        Optuna never samples an inactive entry; random/grid search samples everything, so inactive values
        are dropped here (and in the MLflow params / leaderboard, which use the effective config).
        """
        values = flatten(self.base)
        out: dict = {}
        for p in self.params:
            if p.key not in sampled or not p.active(values):
                continue
            for key, value in p.overrides_for(sampled[p.key]).items():
                values[key] = value
                out[key] = value
        return out

    def active_sampled(self, sampled: Mapping[str, Any]) -> dict:
        """{space key: value} for the entries that are active for this sample (variants keep their name)."""
        values = flatten(self.base)
        out: dict = {}
        for p in self.params:
            if p.key not in sampled or not p.active(values):
                continue
            out[p.key] = sampled[p.key]
            values.update(p.overrides_for(sampled[p.key]))
        return out

    def trial_config(self, sampled: Mapping[str, Any]) -> Config:
        return Config.from_dict(self.base).with_overrides(self.effective_overrides(sampled))


@dataclass(frozen=True)
class SweepSpec:
    name: str
    source: Optional[str]          # the spec file, if loaded from one
    raw: dict                      # the resolved spec mapping (env expanded, paths absolute): saved for --resume
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
        """n seeded draws from the space (respecting `when:`), as Tune-style sampled dicts."""
        rng = random.Random(seed)
        plan = self.plan()
        out = []
        for _ in range(n):
            values = flatten(plan.base)
            point: dict = {}
            for p in self.params:
                if not p.active(values):
                    continue
                v = p.draw(rng)
                point[p.key] = v
                values.update(p.overrides_for(v))
            out.append(point)
        return out

    def cache_probe_configs(self, n_draws: int = 32) -> list[Config]:
        """Configs that together need every cache any trial can read, one per distinct cache need.

        Every combination of the cache-affecting choice values is crossed with the base config, the
        points to evaluate and seeded draws of the other knobs (which decide e.g. whether CLIP is used).
        """
        prefixes = cache_affecting_prefixes()
        cache_params = [p for p in self.params if _touches_cache(p, prefixes)]
        combos = [dict(zip([p.key for p in cache_params], vals))
                  for vals in itertools.product(*[p.values if not p.is_variant else tuple(p.variants)
                                                  for p in cache_params])] or [{}]
        others = [{}] + [dict(pt) for pt in self.points] + self.random_points(n_draws, seed=12345)
        plan = self.plan()
        seen: dict = {}
        for other in others:
            for combo in combos:
                sampled = {**{k: v for k, v in other.items() if k not in combo}, **combo}
                cfg = _config_or_error(plan, sampled, "a configuration this space can produce")
                seen.setdefault(cache_signature(cfg), cfg)
        return list(seen.values())


# ----- public entry points ----------------------------------------------------------------------------

def load_spec(path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = (),
              *, check_resources: bool = True, check_data: bool = True) -> SweepSpec:
    """Read and validate a sweep spec file. `overrides` are `dotted.key=value` strings on the spec mapping
    (e.g. `tune.num_samples=4`, `config.train.epochs=2`). Raises SpecError; never writes anything."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"sweep spec {str(p)!r} does not exist (shipped specs are in search_spaces/)")
    try:
        raw = load_yaml_mapping(p)
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    return spec_from_mapping(raw, source=str(p.resolve()), overrides=overrides, base_dir=p.resolve().parent,
                             check_resources=check_resources, check_data=check_data)


def spec_from_mapping(raw: Mapping[str, Any], *, source: Optional[str] = None,
                      overrides: Sequence[str] | Mapping[str, Any] = (), base_dir: Optional[Path] = None,
                      check_resources: bool = True, check_data: bool = True) -> SweepSpec:
    """Validate a spec mapping (see module doc). Relative paths resolve against the current directory (a
    relative `base:` that is not found there is also looked for in `base_dir`, the spec file's folder)."""
    raw = copy.deepcopy(dict(raw))
    _apply_spec_overrides(raw, overrides)
    raw = expand_env(raw)
    _check_keys(raw, SPEC_KEYS, "")
    name = raw.get("name") or (Path(source).stem if source else None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""):
        raise SpecError(f"name: {name!r} must be a non-empty folder-safe name (letters, digits, _ . -)")

    base_cfg = _load_base_config(raw, base_dir or Path.cwd(), name)
    raw["config"] = base_cfg.to_dict()
    raw.pop("base", None)
    raw["name"] = name
    params = _parse_space(raw.get("space") or {}, base_cfg)
    tune = _parse_tune(raw.get("tune") or {}, params, base_cfg)
    raw["tune"] = _tune_to_raw(tune)
    base_cfg = _enable_objective_metrics(base_cfg, tune, params)
    raw["config"] = base_cfg.to_dict()
    points = _parse_points(raw.get("points_to_evaluate") or [], params, tune)
    mlflow = _parse_mlflow(raw.get("mlflow") or {}, tune)
    raw["mlflow"] = {"enabled": mlflow.enabled, "tracking_uri": mlflow.tracking_uri,
                     "experiment": mlflow.experiment, "artifact_location": mlflow.artifact_location}
    finalize = _parse_finalize(raw.get("finalize") or {}, base_cfg)
    # the saved spec (for --resume / export) must not depend on the directory or environment it is read in
    for p in params:
        if p.key in PATH_KEYS and p.is_finite:
            raw["space"][p.key]["values"] = list(p.values)
    raw["points_to_evaluate"] = [dict(pt) for pt in points]
    raw["finalize"] = {"top": finalize.top, "seeds": finalize.seeds, "overrides": dict(finalize.overrides)}
    spec = SweepSpec(name=name, source=source, raw=raw, base_config=base_cfg, params=params, points=points,
                     tune=tune, mlflow=mlflow, finalize=finalize, description=str(raw.get("description") or ""))
    _check_space_values(spec)
    probes = spec.cache_probe_configs()
    if check_resources:
        _check_resources(spec, probes)
    if check_data:
        _check_data(probes)
    return spec


def cache_affecting_prefixes() -> tuple[str, ...]:
    from richkd.cache import CACHE_AFFECTING_PREFIXES

    return tuple(CACHE_AFFECTING_PREFIXES)


def _affects_cache(key: str, prefixes: tuple[str, ...]) -> bool:
    from richkd.cache import CACHE_NEUTRAL_KEYS

    return key.startswith(prefixes) and key not in CACHE_NEUTRAL_KEYS


def cache_signature(cfg: Config) -> str:
    """What decides which caches a config reads: its cache-affecting keys and which teachers it uses."""
    prefixes = cache_affecting_prefixes()
    flat = {k: v for k, v in cfg.to_flat_dict().items()
            if _affects_cache(k, prefixes) and (cfg.uses_clip or not k.startswith("clip."))}
    blob = json.dumps({"flat": flat, "method": cfg.loss.method, "uses_clip": cfg.uses_clip},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
            parsed = yaml.safe_load(out) if out.strip() else out
        except yaml.YAMLError:
            return out
        return parsed if isinstance(parsed, (int, float, bool)) or parsed is None else out
    return out


def join_storage(storage: str, name: str) -> str:
    return storage.rstrip("/") + "/" + name if _has_scheme(storage) else str(Path(storage) / name)


def resolve_tracking_uri(uri: Optional[str], storage_path: str) -> str:
    """Absolute tracking URI: sqlite paths made absolute; the default is sqlite:///<storage>/mlflow.db.

    The ./mlruns file store is refused: MLflow 3.13+ raises on it unless MLFLOW_ALLOW_FILE_STORE=true.
    """
    if not uri:
        root = storage_path if not _has_scheme(storage_path) else os.path.abspath(DEFAULT_STORAGE)
        return "sqlite:///" + os.path.join(os.path.abspath(root), "mlflow.db")
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path.startswith("/") or path == ":memory:":
            return uri
        return "sqlite:///" + os.path.abspath(os.path.expanduser(path))
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https", "databricks") or scheme.startswith(("postgresql", "mysql", "mssql")):
        return uri
    raise SpecError(f"mlflow.tracking_uri: {uri!r} is a file store (like ./mlruns), which MLflow 3 refuses; "
                    "use sqlite:///PATH/mlflow.db, an http://HOST:5000 server, or postgresql://...")


def is_shared_filesystem(path: str | os.PathLike, mounts_text: Optional[str] = None) -> bool:
    """True when `path` lies on a network/cluster file system according to /proc/mounts (NFS, Lustre, ...)."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return False
    target = os.path.abspath(path)
    best, best_type = "", ""
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, best_type = mount, parts[2]
    return best_type.lower() in SHARED_FS_TYPES


# ----- parsing ---------------------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _has_scheme(path: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", path))


def _suggest(key: str, valid: Iterable[str]) -> str:
    hint = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def _check_keys(mapping: Any, valid: Sequence[str], section: str) -> None:
    if not isinstance(mapping, Mapping):
        raise SpecError(f"{section or 'spec'}: expected a mapping, got {mapping!r}")
    for key in mapping:
        if key not in valid:
            where = f"{section}.{key}" if section else str(key)
            full = [f"{section}.{v}" if section else v for v in valid]
            raise SpecError(f"unknown spec key {where!r}{_suggest(where, full)} (valid keys"
                            f"{' in ' + section if section else ''}: {', '.join(valid)})")


def _apply_spec_overrides(raw: dict, overrides: Sequence[str] | Mapping[str, Any]) -> None:
    from richkd.config import parse_override

    items = overrides.items() if isinstance(overrides, Mapping) else [parse_override(o) for o in overrides]
    for dotted, value in items:
        parts = dotted.split(".")
        if parts[0] not in SPEC_KEYS:
            raise SpecError(f"--set {dotted}: unknown spec section {parts[0]!r}{_suggest(parts[0], SPEC_KEYS)}")
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


def _absolutize(key: str, value: Any) -> Any:
    """Make a path-valued config value absolute (trials run in their own working directory)."""
    if not isinstance(value, str) or not value:
        return value
    if key == "clip.pretrained":
        if value.startswith("local-dir:"):
            return "local-dir:" + os.path.abspath(os.path.expanduser(value[len("local-dir:"):]))
        if not ("/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))):
            return value  # an open_clip tag such as "openai"
    if key == "clip.prompt_set" and not ("/" in value or value.endswith((".yaml", ".yml"))):
        return value      # a built-in prompt set name
    if _has_scheme(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def _load_base_config(raw: dict, base_dir: Path, name: str) -> Config:
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
            raise SpecError(f"base: config file {base!r} does not exist (looked for "
                            f"{' and '.join(repr(str(t)) for t in tried)})")
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
    flat = {k: _absolutize(k, v) for k, v in cfg.to_flat_dict().items()}
    changed = {k: v for k, v in flat.items() if k in PATH_KEYS and v != cfg.to_flat_dict()[k]}
    if cfg.train.checkpoint_dir is not None:
        # every trial would write the same last.pt; trials checkpoint through Tune (one per epoch) instead
        log.info("config.train.checkpoint_dir is ignored in a sweep: trials checkpoint through Ray Tune")
        changed["train.checkpoint_dir"] = None
    return cfg.with_overrides(changed) if changed else cfg


def _number(value: Any, where: str, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: expected a number, got {value!r}")
    if integer:
        if not float(value).is_integer():
            raise SpecError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise SpecError(f"{where}: expected a finite number, got {value!r}")
    return value


def _scalar(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SpecError(f"{where}: choice/grid values must be scalars (number, string, true/false, null), got "
                    f"{value!r}; use a variant entry (values: {{name: {{key: value}}}}) for bundles")


def _parse_conditions(when: Any, where: str, known: Sequence[str]) -> tuple:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise SpecError(f"{where}.when: expected a mapping like {{loss.feat_weight: {{gt: 0}}}}, got {when!r}")
    out = []
    for key, test in when.items():
        if key not in known:
            raise SpecError(f"{where}.when: {key!r} is not a config key or an earlier space entry"
                            f"{_suggest(key, known)}")
        if isinstance(test, Mapping):
            if len(test) != 1:
                raise SpecError(f"{where}.when.{key}: give exactly one test of {', '.join(CONDITION_OPS)}")
            op, value = next(iter(test.items()))
            if op not in CONDITION_OPS:
                raise SpecError(f"{where}.when.{key}: unknown test {op!r}{_suggest(op, CONDITION_OPS)} "
                                f"(tests: {', '.join(CONDITION_OPS)})")
            if op in ("in", "not_in") and not isinstance(value, list):
                raise SpecError(f"{where}.when.{key}.{op}: expected a list, got {value!r}")
        else:
            op, value = "eq", test
        out.append(Condition(str(key), op, value))
    return tuple(out)


def _parse_space(space: Any, base: Config) -> tuple:
    if not isinstance(space, Mapping):
        raise SpecError(f"space: expected a mapping of dotted config keys to samplers, got {space!r}")
    config_keys = dotted_keys()
    params: list[Param] = []
    seen_config_keys: dict[str, str] = {}
    for key, entry in space.items():
        key = str(key)
        where = f"space.{key}"
        if not isinstance(entry, Mapping):
            raise SpecError(f"{where}: expected a mapping with `sampler:`, got {entry!r}")
        sampler = entry.get("sampler")
        if sampler not in SAMPLERS:
            raise SpecError(f"{where}.sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}"
                            f"{_suggest(str(sampler), SAMPLERS)}")
        allowed = ENTRY_KEYS[sampler] + ("sampler", "when")
        _check_keys(entry, allowed, where)
        missing = [k for k in ENTRY_KEYS[sampler] if k not in entry]
        if missing:
            raise SpecError(f"{where}: sampler {sampler} needs {', '.join(missing)}")
        known_for_when = config_keys + [p.key for p in params if p.is_variant]
        when = _parse_conditions(entry.get("when"), where, known_for_when)
        values_raw = entry.get("values")
        variants = None
        if key not in config_keys:
            if not (sampler in ("choice", "grid") and isinstance(values_raw, Mapping)):
                raise SpecError(f"unknown config key {where!r}{_suggest(key, config_keys)} (a free name is allowed "
                                "only for a variant entry: sampler choice/grid with values: {name: {key: value}})")
            if not values_raw:
                raise SpecError(f"{where}.values: a variant entry needs at least one variant")
            variants = {}
            for vname, bundle in values_raw.items():
                if not isinstance(bundle, Mapping) or not bundle:
                    raise SpecError(f"{where}.values.{vname}: expected a mapping of dotted config keys to values")
                for k in bundle:
                    if k not in config_keys:
                        raise SpecError(f"unknown config key {k!r} in {where}.values.{vname}{_suggest(k, config_keys)}")
                variants[str(vname)] = dict(bundle)
            values = tuple(variants)
            touched = sorted({k for b in variants.values() for k in b})
        else:
            touched = [key]
            values = ()
            if sampler in ("choice", "grid"):
                if not isinstance(values_raw, list) or not values_raw:
                    raise SpecError(f"{where}.values: expected a non-empty list, got {values_raw!r}")
                values = tuple(_scalar(v, f"{where}.values") for v in values_raw)
                values = tuple(_absolutize(key, v) if key in PATH_KEYS else v for v in values)
                if len({json.dumps(v) for v in values}) != len(values):
                    raise SpecError(f"{where}.values: {list(values_raw)} has duplicates")
        for k in touched:
            if k in FIXED_KEYS:
                raise SpecError(f"{where}: {k} cannot be searched (ASHA's max_t is train.epochs; use a separate "
                                "sweep per schedule)" if k == "train.epochs" else f"{where}: {k} cannot be searched")
            if k in seen_config_keys:
                raise SpecError(f"{where}: {k} is already set by space entry {seen_config_keys[k]!r}")
            seen_config_keys[k] = key
        p = Param(key=key, sampler=sampler, values=values, when=when, variants=variants)
        if sampler in CONTINUOUS_SAMPLERS:
            integer = sampler == "randint"
            low = _number(entry["low"], f"{where}.low", integer)
            high = _number(entry["high"], f"{where}.high", integer)
            if not low < high:
                raise SpecError(f"{where}: low ({low}) must be < high ({high})")
            q = None
            if sampler == "loguniform" and low <= 0:
                raise SpecError(f"{where}: loguniform needs low > 0, got {low}")
            if sampler == "quniform":
                q = _number(entry["q"], f"{where}.q")
                if q <= 0:
                    raise SpecError(f"{where}.q: must be > 0, got {q}")
                steps = (high - low) / q
                if not math.isfinite(steps) or steps > 1e9:
                    raise SpecError(f"{where}: (high - low) / q = {steps:g} grid steps is too many (at most 1e9); "
                                    "use a larger q or the uniform sampler")
                if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
                    raise SpecError(f"{where}: (high - low) / q = {steps:g} must be a whole number so that high "
                                    "is on the grid")
            p = Param(key=key, sampler=sampler, low=low, high=high, q=q, when=when)
        params.append(p)
    _check_cache_keys(params)
    return tuple(params)


def _touches_cache(p: Param, prefixes: tuple[str, ...]) -> bool:
    return any(_affects_cache(k, prefixes) for k in p.config_keys)


def _check_cache_keys(params: Sequence[Param]) -> None:
    prefixes = cache_affecting_prefixes()
    for p in params:
        if not p.is_finite and p.key.startswith(prefixes):
            raise SpecError(f"space.{p.key}: {p.key} changes the teacher/CLIP caches, which are built once before "
                            f"the trials; sample it with `choice` (finite values), not `{p.sampler}` "
                            f"(cache-affecting prefixes: {', '.join(prefixes)})")


def _subsection(value: Any, short_key: str, valid: Sequence[str], where: str) -> dict:
    """A tune sub-section given as a mapping, or as a bare string meaning {short_key: string}."""
    value = value or {}
    section = {short_key: value} if isinstance(value, str) else value
    _check_keys(section, valid, where)
    return section


def _one_of(value: Any, choices: Sequence[str], where: str) -> Any:
    if value not in choices:
        raise SpecError(f"{where}: {value!r} is not one of {', '.join(choices)}{_suggest(str(value), choices)}")
    return value


def _parse_objectives(metric_raw: Any, mode_raw: Any) -> tuple:
    """tune.metric (a name or a list of names) and tune.mode (the same shape, or absent) -> ((metric, mode), ...).

    Each mode must be the direction KNOWN_METRICS gives (a mis-typed min/max would silently optimise the wrong
    way); leaving mode out derives it. A one-element list is a single objective.
    """
    multi = isinstance(metric_raw, (list, tuple))
    metrics = list(metric_raw) if multi else [metric_raw]
    if not metrics:
        raise SpecError("tune.metric: the list of objectives is empty; name one metric (val_top1) or several "
                        "([val_top1, val_corrupt_top1, val_ece])")
    for i, metric in enumerate(metrics):
        where = f"tune.metric[{i}]" if multi else "tune.metric"
        if not isinstance(metric, str) or metric not in KNOWN_METRICS:
            raise SpecError(f"{where}: {metric!r} is not reported every epoch by the trainer"
                            f"{_suggest(str(metric), KNOWN_METRICS)} (choose from {', '.join(KNOWN_METRICS)})")
    dupes = sorted({m for m in metrics if metrics.count(m) > 1})
    if dupes:
        raise SpecError(f"tune.metric: {dupes[0]!r} is listed twice; each objective once")
    if mode_raw is None:
        modes = [KNOWN_METRICS[m] for m in metrics]
    elif isinstance(mode_raw, (list, tuple)):
        if not multi:
            raise SpecError(f"tune.mode: a list {list(mode_raw)} needs tune.metric to be a list of the same length")
        if len(mode_raw) != len(metrics):
            raise SpecError(f"tune.mode: {len(mode_raw)} modes for {len(metrics)} objectives {metrics}; give one "
                            f"mode per objective ({[KNOWN_METRICS[m] for m in metrics]}) or leave mode out")
        modes = list(mode_raw)
    elif multi and len(metrics) > 1:
        raise SpecError(f"tune.mode: {mode_raw!r} is one mode for {len(metrics)} objectives; give a list "
                        f"({[KNOWN_METRICS[m] for m in metrics]}) or leave mode out (derived per metric)")
    else:
        modes = [mode_raw]
    for i, (metric, mode) in enumerate(zip(metrics, modes)):
        where = f"tune.mode[{i}]" if multi and len(metrics) > 1 else "tune.mode"
        if mode not in ("max", "min"):
            raise SpecError(f"{where}: {mode!r} is not max or min")
        if mode != KNOWN_METRICS[metric]:
            better = "maximised" if KNOWN_METRICS[metric] == "max" else "minimised"
            raise SpecError(f"{where}: {metric} should be {better}; set {where[len('tune.'):]}: "
                            f"{KNOWN_METRICS[metric]} (or leave mode out)")
    return tuple(zip(metrics, modes))


def _enable_objective_metrics(base: Config, tune: TuneSettings, params: Sequence[Param]) -> Config:
    """Switch on robustness evaluation when an objective is a robustness metric (it is off by default, and
    costs extra forward passes, so it is computed only when enabled or needed)."""
    needed = [m for m in tune.metrics if m in ROBUSTNESS_METRICS]
    if not needed:
        return base
    for p in params:
        if "robustness.enabled" in p.config_keys:
            raise SpecError(f"space.{p.key}: robustness.enabled cannot be searched when the objective "
                            f"{needed[0]} needs it; drop the entry (the sweep switches it on)")
    if not base.robustness.enabled:
        log.info("config.robustness.enabled switched on: the sweep objective %s needs it", needed[0])
        base = base.with_overrides({"robustness.enabled": True})
    return base


def _parse_tune(raw: Any, params: Sequence[Param], base: Config) -> TuneSettings:
    _check_keys(raw, TUNE_KEYS, "tune")
    objectives = _parse_objectives(raw.get("metric", "val_top1"), raw.get("mode"))
    metric, mode = objectives[0]
    num_samples = _number(raw.get("num_samples", 8), "tune.num_samples", integer=True)
    if num_samples < 1:
        raise SpecError(f"tune.num_samples: must be >= 1, got {num_samples}")

    s_raw = _subsection(raw.get("search"), "algorithm", SEARCH_KEYS, "tune.search")
    algorithm = _one_of(s_raw.get("algorithm", "optuna"), SEARCH_ALGORITHMS, "tune.search.algorithm")
    if len(objectives) > 1 and algorithm != "optuna":
        raise SpecError(f"tune.search.algorithm: {algorithm} cannot search {len(objectives)} objectives "
                        f"{[m for m, _ in objectives]}; multi-objective search needs algorithm: optuna (or give "
                        "tune.metric a single metric)")
    seed = _number(s_raw.get("seed", 0), "tune.search.seed", integer=True)
    n_startup = _number(s_raw.get("n_startup_trials", 10), "tune.search.n_startup_trials", integer=True)
    if n_startup < 0:
        raise SpecError("tune.search.n_startup_trials: must be >= 0")
    storage = s_raw.get("storage")
    if storage is not None:
        if algorithm != "optuna":
            raise SpecError("tune.search.storage: an Optuna storage is only used with algorithm: optuna")
        if not isinstance(storage, str) or not re.match(r"^(sqlite|postgresql|mysql)[+a-z0-9]*://", storage):
            raise SpecError(f"tune.search.storage: {storage!r} must be an RDB URL such as sqlite:///tune_runs/optuna.db")
        if storage.startswith("sqlite:///") and not storage[len("sqlite:///"):].startswith("/"):
            storage = "sqlite:///" + os.path.abspath(storage[len("sqlite:///"):])
    if not params:
        raise SpecError("space: is empty; list at least one dotted config key with a sampler")
    if algorithm == "optuna":
        grid = [p.key for p in params if p.sampler == "grid"]
        if grid:
            raise SpecError(f"space.{grid[0]}: the grid sampler needs tune.search.algorithm: grid or random "
                            "(Optuna samples; use `choice` for a categorical knob)")
    if algorithm == "grid":
        bad = [p for p in params if p.sampler != "grid"]
        if bad:
            raise SpecError(f"space.{bad[0].key}: algorithm grid needs every entry to use the grid sampler "
                            f"(got {bad[0].sampler}); use algorithm: random to mix grid and random entries")
        cond = [p for p in params if p.when]
        if cond:
            raise SpecError(f"space.{cond[0].key}: `when:` is not supported with algorithm grid (it would run "
                            "duplicate configurations); use a variant entry or algorithm: optuna")

    sch_raw = _subsection(raw.get("scheduler"), "type", SCHEDULER_KEYS, "tune.scheduler")
    sch_type = _one_of(sch_raw.get("type", "asha"), SCHEDULERS, "tune.scheduler.type")
    max_t = base.train.epochs
    grace = _number(sch_raw.get("grace_period", 1), "tune.scheduler.grace_period", integer=True)
    if not 1 <= grace <= max_t:
        raise SpecError(f"tune.scheduler.grace_period: {grace} must be in [1, train.epochs = {max_t}] "
                        "(ASHA's max_t is the number of epochs)")
    rf = _number(sch_raw.get("reduction_factor", 3), "tune.scheduler.reduction_factor")
    if rf <= 1:
        raise SpecError(f"tune.scheduler.reduction_factor: must be > 1, got {rf}")
    brackets = _number(sch_raw.get("brackets", 1), "tune.scheduler.brackets", integer=True)
    if brackets < 1:
        raise SpecError("tune.scheduler.brackets: must be >= 1")

    max_conc = _number(raw.get("max_concurrent", 4), "tune.max_concurrent", integer=True)
    if max_conc < 1:
        raise SpecError(f"tune.max_concurrent: must be >= 1, got {max_conc}")
    res = raw.get("resources") or {}
    _check_keys(res, RESOURCE_KEYS, "tune.resources")
    cpu = _number(res.get("cpu", 1), "tune.resources.cpu")
    gpu = _number(res.get("gpu", 0), "tune.resources.gpu")
    if cpu <= 0:
        raise SpecError(f"tune.resources.cpu: must be > 0, got {cpu}")
    if gpu < 0 or (gpu > 1 and not float(gpu).is_integer()):
        raise SpecError(f"tune.resources.gpu: {gpu} must be 0, a fraction in (0, 1] (trials share a GPU) or a "
                        "whole number of GPUs")
    if gpu > 0 and base.device == "cpu":
        raise SpecError("tune.resources.gpu > 0 but config.device is cpu; set device: auto or cuda")
    if gpu > 0 and base.device.startswith("cuda:"):
        raise SpecError(f"config.device: {base.device!r} names a GPU, but Ray assigns each trial its GPU (it is "
                        "cuda:0 inside the trial); set device: auto or cuda")
    max_failures = _number(raw.get("max_failures", 2), "tune.max_failures", integer=True)
    if max_failures < -1:
        raise SpecError("tune.max_failures: must be >= 0 (or -1 for unlimited retries)")
    storage_path = raw.get("storage_path", DEFAULT_STORAGE)
    if not isinstance(storage_path, str) or not storage_path:
        raise SpecError(f"tune.storage_path: expected a folder or a URI such as s3://bucket/path, got {storage_path!r}")
    if not _has_scheme(storage_path):
        storage_path = os.path.abspath(os.path.expanduser(storage_path))
    shared = raw.get("shared_storage", False)
    if not isinstance(shared, bool):
        raise SpecError(f"tune.shared_storage: expected true or false, got {shared!r}")
    keep = _number(raw.get("checkpoint_num_to_keep", 1), "tune.checkpoint_num_to_keep", integer=True)
    if keep < 1:
        raise SpecError("tune.checkpoint_num_to_keep: must be >= 1 (trials resume from their latest checkpoint)")
    reuse = raw.get("reuse_actors")
    if reuse is not None and not isinstance(reuse, bool):
        raise SpecError(f"tune.reuse_actors: expected true, false or null (auto), got {reuse!r}")
    budget = raw.get("time_budget_s")
    if budget is not None:
        budget = _number(budget, "tune.time_budget_s")
        if budget <= 0:
            raise SpecError("tune.time_budget_s: must be > 0")
    return TuneSettings(metric=metric, mode=mode, num_samples=num_samples,
                        search=SearchSettings(algorithm, seed, n_startup, storage),
                        scheduler=SchedulerSettings(sch_type, grace, rf, brackets), max_concurrent=max_conc,
                        cpu=cpu, gpu=gpu, max_failures=max_failures, storage_path=storage_path,
                        shared_storage=shared, checkpoint_num_to_keep=keep, time_budget_s=budget,
                        reuse_actors=reuse, objectives=objectives if len(objectives) > 1 else ())


def _tune_to_raw(t: TuneSettings) -> dict:
    return {"metric": t.metrics if t.multi_objective else t.metric,
            "mode": t.modes if t.multi_objective else t.mode, "num_samples": t.num_samples,
            "search": {"algorithm": t.search.algorithm, "seed": t.search.seed,
                       "n_startup_trials": t.search.n_startup_trials, "storage": t.search.storage},
            "scheduler": {"type": t.scheduler.type, "grace_period": t.scheduler.grace_period,
                          "reduction_factor": t.scheduler.reduction_factor, "brackets": t.scheduler.brackets},
            "max_concurrent": t.max_concurrent, "resources": {"cpu": t.cpu, "gpu": t.gpu},
            "max_failures": t.max_failures, "storage_path": t.storage_path, "shared_storage": t.shared_storage,
            "checkpoint_num_to_keep": t.checkpoint_num_to_keep, "time_budget_s": t.time_budget_s,
            "reuse_actors": t.reuse_actors}


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
        for key, value in point.items():
            if key not in by_key:
                raise SpecError(f"{where}: {key!r} is not a space entry{_suggest(key, by_key)} (points may set "
                                f"only searched keys: {', '.join(by_key)})")
            p = by_key[key]
            if key in PATH_KEYS and isinstance(value, str):
                value = _absolutize(key, value)
            if not p.contains(value):
                rng = (f"one of {list(p.values)}" if p.is_finite else f"in [{p.low}, {p.high}]"
                       + (f" on steps of {p.q}" if p.q else ""))
                raise SpecError(f"{where}.{key}: {value!r} is outside the space ({p.sampler}: {rng})")
        points.append({k: (_absolutize(k, v) if k in PATH_KEYS and isinstance(v, str) else v)
                       for k, v in point.items()})
    return tuple(points)


def _parse_mlflow(raw: Any, tune: TuneSettings) -> MlflowSettings:
    _check_keys(raw, MLFLOW_KEYS, "mlflow")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise SpecError(f"mlflow.enabled: expected true or false, got {enabled!r}")
    uri = raw.get("tracking_uri")
    if uri is not None and not isinstance(uri, str):
        raise SpecError(f"mlflow.tracking_uri: expected a URI string, got {uri!r}")
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None   # MLflow's own variable, then the default
    uri = resolve_tracking_uri(uri, tune.storage_path)
    experiment = raw.get("experiment", "richkd")
    if not isinstance(experiment, str) or not experiment:
        raise SpecError(f"mlflow.experiment: expected a non-empty name, got {experiment!r}")
    artifacts = raw.get("artifact_location")
    if artifacts is None and uri.startswith("sqlite:///"):
        # without this MLflow puts artifacts in ./mlruns of whatever directory the driver runs in
        artifacts = Path(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts").as_uri()
    elif isinstance(artifacts, str) and not _has_scheme(artifacts):
        artifacts = Path(os.path.abspath(os.path.expanduser(artifacts))).as_uri()
    return MlflowSettings(enabled=enabled, tracking_uri=uri, experiment=experiment, artifact_location=artifacts)


def _parse_finalize(raw: Any, base: Config) -> FinalizeSettings:
    _check_keys(raw, FINALIZE_KEYS, "finalize")
    top = _number(raw.get("top", 3), "finalize.top", integer=True)
    seeds = _number(raw.get("seeds", 3), "finalize.seeds", integer=True)
    if top < 1 or seeds < 1:
        raise SpecError("finalize.top and finalize.seeds must be >= 1")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise SpecError(f"finalize.overrides: expected a mapping of dotted config keys, got {overrides!r}")
    overrides = {k: (_absolutize(k, v) if k in PATH_KEYS else v) for k, v in overrides.items()}
    try:
        base.with_overrides(overrides)
    except ConfigError as exc:
        raise SpecError(f"finalize.overrides: {exc}") from None
    return FinalizeSettings(top=top, seeds=seeds, overrides=dict(overrides))


# ----- whole-space checks -------------------------------------------------------------------------------

def _config_or_error(plan: TrialPlan, sampled: Mapping[str, Any], what: str) -> Config:
    try:
        return plan.trial_config(sampled)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in sampled.items())
        raise SpecError(f"space: {what} is invalid ({exc}); sampled values: {shown or 'none (the base config)'}") from None


def _field_error(exc: ConfigError, keys: Iterable[str]) -> bool:
    """Is this ConfigError about one of `keys` itself (not a cross-field rule such as "richkd needs w_L or w_F")?"""
    msg = str(exc)
    return any(msg.startswith(f"{k}:") or f"{k!r}" in msg for k in keys)


def _check_space_values(spec: SweepSpec) -> None:
    """Every value and range end must be a valid value of its key, and every point / draw a valid config."""
    plan = spec.plan()
    base = spec.base_config
    for p in spec.params:
        for value in p.corners():
            overrides = p.overrides_for(value)
            try:
                base.with_overrides(overrides)
            except ConfigError as exc:
                if _field_error(exc, overrides):
                    label = f"variant {value!r}" if p.is_variant else repr(value)
                    raise SpecError(f"space.{p.key}: {label} is not a valid value: {exc}") from None
        if p.key == "clip.prompt_set":
            from richkd.clip import load_prompt_set

            for value in p.values:
                try:
                    load_prompt_set(value)
                except ValueError as exc:
                    raise SpecError(f"space.clip.prompt_set: {exc}") from None
    for i, point in enumerate(spec.points):
        values = flatten(plan.base)
        for p in spec.params:
            if p.key in point and not p.active(values):
                raise SpecError(f"points_to_evaluate[{i}].{p.key}: this entry is inactive for the point because "
                                f"its `when:` ({', '.join(c.describe() for c in p.when)}) does not hold; drop it "
                                "from the point")
            if p.key in point:
                values.update(p.overrides_for(point[p.key]))
        _config_or_error(plan, point, f"points_to_evaluate[{i}]")
    for point in spec.random_points(32, seed=777):
        _config_or_error(plan, point, "a configuration this space can produce")


def _check_resources(spec: SweepSpec, probes: Sequence[Config]) -> None:
    """Unknown models / prompt sets and missing files, for every distinct config the trials can run."""
    from richkd.validate import check_resources

    seen = set()
    for cfg in probes:
        sig = json.dumps({k: v for k, v in cfg.to_flat_dict().items()
                          if k.startswith(("student.", "teacher.", "clip.", "data."))}, sort_keys=True, default=str)
        key = (sig, cfg.loss.method, cfg.uses_clip)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_resources(cfg)
        except ConfigError as exc:
            raise SpecError(f"config: {exc}") from None
        if cfg.uses_clip:
            _check_clip_model(cfg.clip.model)
        root = cfg.data.root
        if root and not cfg.data.download and not Path(root).exists():
            raise SpecError(f"config.data.root: folder {root!r} does not exist (set data.root to the dataset folder "
                            "or data.download: true)")
    # student archs sampled in the space but perhaps never drawn above
    for p in spec.params:
        for k, v in ((k, v) for value in p.corners() for k, v in p.overrides_for(value).items()):
            if k in ("student.arch", "teacher.arch") and v is not None:
                from richkd.models import MODELS

                if v not in MODELS:
                    try:
                        MODELS.get(v)
                    except KeyError as exc:
                        raise SpecError(f"space.{p.key}: {exc.args[0]}") from None


def _check_clip_model(name: str) -> None:
    from richkd.clip import TINY_CLIP_MODEL

    if name == TINY_CLIP_MODEL:
        return
    import open_clip

    known = open_clip.list_models()
    if name not in known:
        raise SpecError(f"config: clip.model: {name!r} is not an open_clip architecture{_suggest(name, known)} "
                        f"(e.g. ViT-B-32, ViT-L-14; or {TINY_CLIP_MODEL} for the offline tiny model)")


def _check_data(probes: Sequence[Config]) -> None:
    """Build each distinct dataset once (cheap, memoised in richkd.data) so a missing dataset fails here."""
    from richkd.data import build_data

    seen = set()
    for cfg in probes:
        key = json.dumps(dataclass_dict(cfg.data), sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            build_data(cfg.data)
        except (ValueError, FileNotFoundError) as exc:
            raise SpecError(f"config.data: {exc}") from None


def dataclass_dict(obj: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _qround(value: float, q: float) -> float:
    decimals = max(0, -int(math.floor(math.log10(q))) + 6) if q > 0 else 6
    return round(value, decimals)
