"""The `tune:`, `mlflow:` and `finalize:` sections of a sweep spec as typed records, built by `richkd.schema.build` as
the run config is; rules that involve the base config or the space live in `richkd.tune.spec`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Optional, Tuple

from richkd.config import CORRUPTION_NAMES
from richkd.metric_names import KNOWN_METRICS, PER_CORRUPTION_PREFIX, direction, is_reported, per_corruption
from richkd.schema import check, in_range, one_of, suggest
from richkd.tune.errors import SpecError
from richkd.tune.paths import DEFAULT_STORAGE, absolute_storage, has_scheme, resolve_tracking_uri

SEARCH_ALGORITHMS = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "fifo")
need = partial(check, error=SpecError)
positive = partial(in_range, lo=0, lo_open=True, hi=math.inf, hi_open=True, error=SpecError)   # finite, > 0


class _Section:
    """Schema settings shared by the spec's records: problems are SpecErrors about "spec key"s."""
    __schema_error__ = SpecError
    __schema_noun__ = "spec key"


@dataclass(frozen=True)
class SearchSettings(_Section):
    __schema_shorthand__ = "algorithm"     # `search: random` means {algorithm: random}
    algorithm: str = "optuna"
    seed: int = 0
    n_startup_trials: int = 10
    storage: Optional[str] = None        # optional Optuna RDB URL, e.g. sqlite:////abs/optuna.db (optuna-dashboard)

    def __post_init__(self) -> None:
        one_of(self.algorithm, "tune.search.algorithm", SEARCH_ALGORITHMS, SpecError)
        need(self.n_startup_trials >= 0, "tune.search.n_startup_trials", "must be >= 0")
        if self.storage is None:
            return
        need(self.algorithm == "optuna", "tune.search.storage", "an Optuna storage is only used with algorithm: optuna")
        need(bool(re.match(r"^(sqlite|postgresql|mysql)(\+[a-z0-9]+)?://", self.storage)), "tune.search.storage",
             f"{self.storage!r} must be an RDB URL such as sqlite:///tune_runs/optuna.db")
        object.__setattr__(self, "storage", resolve_tracking_uri(self.storage, DEFAULT_STORAGE))   # sqlite: absolute


@dataclass(frozen=True)
class SchedulerSettings(_Section):
    __schema_shorthand__ = "type"          # `scheduler: fifo` means {type: fifo}
    type: str = "asha"
    # None: a quarter of train.epochs (the spec resolves it; docs/search.md#how-the-defaults-were-chosen: a grace
    # period of 1 epoch ranks trials on noise)
    grace_period: Optional[int] = None
    reduction_factor: float = 3
    brackets: int = 1

    def __post_init__(self) -> None:
        one_of(self.type, "tune.scheduler.type", SCHEDULERS, SpecError)
        in_range(self.reduction_factor, "tune.scheduler.reduction_factor", lo=1, lo_open=True, hi=math.inf,
                 hi_open=True, error=SpecError)
        need(self.brackets >= 1, "tune.scheduler.brackets", "must be >= 1")
        need(self.grace_period is None or self.grace_period >= 1, "tune.scheduler.grace_period",
             f"{self.grace_period} must be >= 1")

    def for_epochs(self, epochs: int) -> "SchedulerSettings":
        """The settings with the default grace period (a quarter of the epochs, at least 1) filled in."""
        return self if self.grace_period is not None else replace(self, grace_period=max(1, epochs // 4))


@dataclass(frozen=True)
class Resources(_Section):
    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        positive(self.cpu, "tune.resources.cpu")
        need(0 <= self.gpu <= 1, "tune.resources.gpu", f"{self.gpu:g} must be 0 or a fraction in (0, 1] (trials share "
             "a GPU); a trial trains on one GPU (there is no multi-GPU training), so more would sit idle")


@dataclass(frozen=True)
class TuneSettings(_Section):
    # a name or a list of names (several objectives); once built, the first: ASHA, ranking and best_config use it
    metric: Any = "val_top1"
    mode: Any = None                      # max / min (a list for several objectives); None: derived per metric
    objectives: Tuple[Tuple[str, ...], ...] = ()   # ((metric, mode), ...) of a multi-objective sweep, as saved
    num_samples: int = 8
    search: SearchSettings = field(default_factory=SearchSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    max_concurrent: int = 4
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 2
    storage_path: str = DEFAULT_STORAGE   # absolute path, or a URI (s3://, gs://, ...)
    shared_storage: bool = False          # declare a path shared across nodes when detection cannot tell
    checkpoint_num_to_keep: int = 1
    time_budget_s: Optional[float] = None
    reuse_actors: Optional[bool] = None   # None: reuse trial processes for CPU trials, fresh ones for GPU trials
    warm_start: Tuple[str, ...] = ()      # earlier sweeps (names) or table files told to Optuna first

    def __post_init__(self) -> None:
        if self.objectives:   # as saved: metric and mode are the first objective's
            need(tuple(self.objectives[0]) == (self.metric, self.mode), "tune.objectives",
                 "must start with (tune.metric, tune.mode)")
        metrics, modes = zip(*self.objectives) if self.objectives else (self.metric, self.mode)
        multi = isinstance(metrics, (list, tuple))
        pairs = check_objectives(list(metrics) if multi else [metrics], modes, multi)
        object.__setattr__(self, "metric", pairs[0][0])
        object.__setattr__(self, "mode", pairs[0][1])
        object.__setattr__(self, "objectives", pairs if len(pairs) > 1 else ())
        need(len(pairs) == 1 or self.search.algorithm == "optuna", "tune.search.algorithm",
             f"{self.search.algorithm} cannot search {len(pairs)} objectives {[m for m, _ in pairs]}; multi-objective "
             "search needs algorithm: optuna (or give tune.metric a single metric)")
        for key in ("num_samples", "max_concurrent"):
            need(getattr(self, key) >= 1, f"tune.{key}", f"must be >= 1, got {getattr(self, key)}")
        need(self.max_failures >= -1, "tune.max_failures", "must be >= 0 (or -1 for unlimited retries)")
        need(bool(self.storage_path), "tune.storage_path", f"expected a folder or a URI such as s3://bucket/path, "
                                                            f"got {self.storage_path!r}")
        object.__setattr__(self, "storage_path", absolute_storage(self.storage_path))
        need(self.checkpoint_num_to_keep >= 1, "tune.checkpoint_num_to_keep",
             "must be >= 1 (trials resume from their latest checkpoint)")
        if self.warm_start:
            need(self.search.algorithm == "optuna" and len(pairs) == 1, "tune.warm_start",
                 "earlier trials seed Optuna's TPE; it needs tune.search.algorithm: optuna and a single objective "
                 "(random and grid search do not learn from earlier trials)")
            object.__setattr__(self, "warm_start", tuple(os.path.abspath(w) if os.path.isfile(w) else w
                                                         for w in self.warm_start))
        if self.time_budget_s is not None:
            positive(self.time_budget_s, "tune.time_budget_s")

    @property
    def cpu(self) -> float:
        return self.resources.cpu

    @property
    def gpu(self) -> float:
        return self.resources.gpu

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
        return has_scheme(self.storage_path)

    @property
    def resolved_reuse_actors(self) -> bool:
        """CPU trials reuse their worker process (saves the torch import and the dataset load per trial); GPU
        trials get a fresh process so that a stopped trial's GPU memory is surely freed (ray#23971)."""
        return self.gpu == 0 if self.reuse_actors is None else self.reuse_actors


@dataclass(frozen=True)
class MlflowSettings(_Section):
    enabled: bool = True
    tracking_uri: Optional[str] = None    # resolved by the spec loader: never empty in a loaded spec
    experiment: str = "richkd"
    artifact_location: Optional[str] = None

    def __post_init__(self) -> None:
        need(bool(self.experiment), "mlflow.experiment", f"expected a non-empty name, got {self.experiment!r}")


@dataclass(frozen=True)
class FinalizeSettings(_Section):
    top: int = 3
    seeds: int = 3
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        need(self.top >= 1 and self.seeds >= 1, "finalize.top and finalize.seeds", "must be >= 1")


def check_objectives(metrics: list, modes: Any, multi: bool) -> tuple:
    """((metric, mode), ...) from tune.metric (one or several names) and tune.mode (the same shape, or None: derived).
    Each mode must be the metric's direction: a mis-typed min/max would silently optimise the wrong way."""
    if not metrics:
        raise SpecError("tune.metric: the list of objectives is empty; name one metric (val_top1) or several "
                        "([val_top1, val_corrupt_top1, val_ece])")
    for i, metric in enumerate(metrics):
        where = f"tune.metric[{i}]" if multi else "tune.metric"
        if not isinstance(metric, str) or not is_reported(metric):
            raise SpecError(f"{where}: {metric!r} is not reported every epoch by the trainer"
                            f"{suggest(str(metric), KNOWN_METRICS)} (choose from {', '.join(KNOWN_METRICS)}, "
                            f"or {PER_CORRUPTION_PREFIX}<corruption>)")
        corruption = per_corruption(metric)
        if corruption and corruption not in CORRUPTION_NAMES:
            raise SpecError(f"{where}: {corruption!r} in {metric!r} is not a corruption"
                            f"{suggest(corruption, CORRUPTION_NAMES)} (choose from {', '.join(CORRUPTION_NAMES)})")
    if dupes := sorted({m for m in metrics if metrics.count(m) > 1}):
        raise SpecError(f"tune.metric: {dupes[0]!r} is listed twice; each objective once")
    expected = [direction(m) for m in metrics]
    if modes is None:
        modes = expected
    elif isinstance(modes, (list, tuple)):
        if not multi:
            raise SpecError(f"tune.mode: a list {list(modes)} needs tune.metric to be a list of the same length")
        if len(modes) != len(metrics):
            raise SpecError(f"tune.mode: {len(modes)} modes for {len(metrics)} objectives {metrics}; give one "
                            f"mode per objective ({expected}) or leave mode out")
    elif multi and len(metrics) > 1:
        raise SpecError(f"tune.mode: {modes!r} is one mode for {len(metrics)} objectives; give a list "
                        f"({expected}) or leave mode out (derived per metric)")
    else:
        modes = [modes]
    for i, (metric, mode) in enumerate(zip(metrics, modes)):
        where = f"tune.mode[{i}]" if multi and len(metrics) > 1 else "tune.mode"
        if mode not in ("max", "min"):
            raise SpecError(f"{where}: {mode!r} is not max or min")
        if mode != direction(metric):
            better = "maximised" if direction(metric) == "max" else "minimised"
            raise SpecError(f"{where}: {metric} should be {better}; set {where[len('tune.'):]}: "
                            f"{direction(metric)} (or leave mode out)")
    return tuple(zip(metrics, modes))
