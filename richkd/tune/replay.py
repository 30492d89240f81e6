"""Replay the searcher and scheduler `richkd sweep` builds against a learning-curve table on a virtual clock
(docs/search.md, "Replays"): each proposal is answered by its nearest table row, each epoch's result delivered when
the table's seconds for it have passed, and both told in the order Tune's `TuneController._process_trial_result` does.
"""
from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
import tempfile
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Optional

import numpy as np
import optuna
from ray.tune.experiment import Experiment
from ray.tune.search import Searcher

from richkd.tune.search import build_scheduler, build_search_alg, tune_param_space
from richkd.tune.spec import SweepSpec
from richkd.tune.table import Table, TableRow, check_same_space
from richkd.tune.warm_start import WarmStart


class TableIndex:
    """Nearest-row look-up in the space's normalised coordinates."""

    def __init__(self, table: Table, spec: SweepSpec) -> None:
        self.params = spec.params
        self.plan = spec.plan()
        self.rows = list(table.configs().values())           # one list of seed rows per configuration
        self.codes = [dict() for _ in self.params]           # categorical value -> code, per entry
        self.matrix = np.array([self._coords(rows[0].params) for rows in self.rows], dtype=float)
        self.numeric = np.array([not p.is_finite for p in self.params])

    def _coords(self, sampled: dict) -> list:
        out = []
        for p, codes in zip(self.params, self.codes):
            if p.key not in sampled:
                out.append(math.nan)
            elif p.is_finite:
                out.append(codes.setdefault(repr(sampled[p.key]), len(codes)))
            else:
                out.append(p.unit(sampled[p.key]))
        return out

    def distances(self, sampled: dict) -> np.ndarray:
        q = np.array(self._coords(sampled), dtype=float)
        a, qa = np.isnan(self.matrix), np.isnan(q)
        diff = np.where(self.numeric, np.abs(self.matrix - q), (self.matrix != q).astype(float))
        diff = np.where(a & qa, 0.0, np.where(a | qa, 1.0, diff))
        return np.sqrt((diff ** 2).mean(axis=1))

    def answer(self, config: dict, rng: random.Random) -> tuple[TableRow, float]:
        """The table row answering a proposed configuration (Tune's sampled dict) and its distance."""
        d = self.distances(self.plan.active_sampled(config))
        i = int(np.argmin(d))
        rows = self.rows[i]
        return rows[rng.randrange(len(rows))], float(d[i])


@dataclass
class ReplayResult:
    seed: int
    best_val: float = math.nan              # best final val top-1 among trials that reached max_t
    best_test: float = math.nan             # the test top-1 of that trial's table row
    best_config: Optional[str] = None
    trial_epochs: int = 0                   # epochs trained over all trials (the budget)
    seconds: float = 0.0                    # the table's seconds of those epochs (compute)
    makespan: float = 0.0                   # the virtual wall clock at the end
    trials: int = 0
    completed: int = 0
    stopped: int = 0
    distances: list = field(default_factory=list)    # how far each proposal was from its answering row
    answered: list = field(default_factory=list)     # the table configuration that answered each proposal
    curve: list = field(default_factory=list)        # (trial_epochs, seconds, best_val, best_test) per new best
    proposals: list = field(default_factory=list)    # (trial_id, active config) in proposal order
    decisions: list = field(default_factory=list)    # (trial_id, epoch, "CONTINUE" | "STOP")

    def finished(self, row: TableRow, value: float, sign: float) -> None:
        """A trial that reached max_t with `value` (its row's last): counted, and the best if it is (sign: +1 max)."""
        self.completed += 1
        if math.isnan(self.best_val) or sign * value > sign * self.best_val:
            self.best_val, self.best_config = value, row.config_id
            self.best_test = math.nan if row.test_top1 is None else row.test_top1
            self.curve.append((self.trial_epochs, self.seconds, self.best_val, self.best_test))


def with_seed(spec: SweepSpec, seed: int) -> SweepSpec:
    return replace(spec, tune=replace(spec.tune, search=replace(spec.tune.search, seed=seed)))


def replay(spec: SweepSpec, table: Table, seed: int = 0, index: Optional[TableIndex] = None,
           budget: Optional[int] = None, warm: Optional[WarmStart] = None) -> ReplayResult:
    """One sweep of `spec` (its searcher seeded with `seed`) against the table; `budget` (trial-epochs), when
    given, stops proposing new trials once it is spent, as a time budget would."""
    check_same_space(table, spec, "replay")
    index = index or TableIndex(table, spec)
    spec = with_seed(spec, seed)
    np.random.seed(seed)                  # ASHA draws each trial's bracket from numpy's global generator
    rng = random.Random(seed)
    metric, t = spec.tune.metric, spec.tune
    sign = 1.0 if t.mode == "max" else -1.0
    searcher, scheduler = build_search_alg(spec, warm), build_scheduler(spec)
    scheduler.set_search_properties(metric, t.mode)
    optuna = t.search.algorithm == "optuna"
    out = ReplayResult(seed=seed)
    plan, order = spec.plan(), itertools.count()
    events, running, finished = [], {}, False   # events: (clock, order, trial_id) of each next epoch's end
    with tempfile.TemporaryDirectory(prefix="richkd-replay-") as folder:
        if not optuna:   # Tune's BasicVariantGenerator is fed an Experiment, as Tuner.fit feeds it
            searcher.add_configurations([Experiment(name="replay", run=lambda config: None, storage_path=folder,
                                                    config=tune_param_space(spec), num_samples=t.num_samples)])
        clock = 0.0
        while True:
            while (not finished and out.trials < t.num_samples and len(running) < t.max_concurrent
                   and (budget is None or out.trial_epochs < budget)):
                if optuna:
                    trial_id = f"{seed:03d}_{out.trials:05d}"
                    config = searcher.suggest(trial_id)
                    if config is None or config == Searcher.FINISHED:
                        finished = config == Searcher.FINISHED
                        break
                    trial = SimpleNamespace(trial_id=trial_id, config=config)
                else:
                    trial = searcher.next_trial()
                    if trial is None:
                        finished = searcher.is_finished()
                        break
                trial.row, distance = index.answer(trial.config, rng)
                trial.epoch = 0
                out.trials += 1
                out.distances.append(distance)
                out.answered.append(trial.row.config_id)
                out.proposals.append((trial.trial_id, plan.active_sampled(trial.config)))
                scheduler.on_trial_add(None, trial)
                running[trial.trial_id] = trial
                heapq.heappush(events, (clock + (trial.row.seconds[0] or 0.0), next(order), trial.trial_id))
            if not events:
                break
            clock, _, trial_id = heapq.heappop(events)
            trial = running[trial_id]
            row, e = trial.row, trial.epoch + 1
            trial.epoch = e
            out.trial_epochs += 1
            out.seconds += row.seconds[e - 1] or 0.0
            value = row.val_top1[e - 1]
            result = {"training_iteration": e, metric: math.nan if value is None else value,
                      "nonfinite_loss": float(value is None), "trial_id": trial_id}
            decision = scheduler.on_trial_result(None, trial, result)
            out.decisions.append((trial_id, e, decision))
            ends = decision == "STOP" or e >= row.epochs or value is None
            if decision != "STOP":
                searcher.on_trial_result(trial_id, result)
            if not ends:
                heapq.heappush(events, (clock + (row.seconds[e] or 0.0), next(order), trial_id))
                continue
            scheduler.on_trial_complete(None, trial, result)
            searcher.on_trial_complete(trial_id, result=result)
            del running[trial_id]
            if e >= spec.max_t and value is not None:
                out.finished(row, value, sign)
            else:
                out.stopped += 1
        out.makespan = clock
    return out


def one_epoch_top_k(spec: SweepSpec, table: Table, n: int, k: int, seed: int = 0,
                    index: Optional[TableIndex] = None) -> ReplayResult:
    """Egele et al. (2023): train n random configurations for one epoch, then finish the k best (by their first
    epoch's validation value) to max_t. Sequential; the budget counts every epoch once."""
    index = index or TableIndex(table, spec)
    rng = random.Random(seed)
    sign = 1.0 if spec.tune.mode == "max" else -1.0
    out = ReplayResult(seed=seed)
    first = []
    for sampled in spec.random_points(n, seed=seed):
        row, distance = index.answer(sampled, rng)
        out.distances.append(distance)
        out.answered.append(row.config_id)
        out.trials += 1
        out.trial_epochs += 1
        out.seconds += row.seconds[0] or 0.0
        if row.val_top1[0] is not None:
            first.append((sign * row.val_top1[0], len(first), row))
    for _, _, row in sorted(first, key=lambda x: (-x[0], x[1]))[:k]:
        out.trial_epochs += row.epochs - 1
        out.seconds += sum(s or 0.0 for s in row.seconds[1:])
        if row.epochs >= spec.max_t and row.final is not None:
            out.finished(row, row.final, sign)
    out.stopped = out.trials - out.completed
    return out


def replay_many(spec: SweepSpec, table: Table, seeds: int = 20, progress: bool = False,
                budget: Optional[int] = None, warm: Optional[WarmStart] = None) -> list[ReplayResult]:
    if seeds < 1:
        raise ValueError("replay: --seeds must be >= 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)    # no "A new study created" line per replay
    index = TableIndex(table, spec)
    results = []
    for seed in range(seeds):
        results.append(replay(spec, table, seed=seed, index=index, budget=budget, warm=warm))
        if progress:
            print(f"  seed {seed}: best {spec.tune.metric} {results[-1].best_val:.2f}", flush=True)
    return results


def quartiles(values: list) -> tuple[float, float, float]:
    values = [v for v in values if not math.isnan(v)]
    return tuple(float(q) for q in np.percentile(values, [25, 50, 75])) if values else (math.nan,) * 3


def describe_replays(results: list[ReplayResult], spec: SweepSpec) -> str:
    t = spec.tune
    val, test = quartiles([r.best_val for r in results]), quartiles([r.best_test for r in results])
    epochs, seconds = quartiles([r.trial_epochs for r in results]), quartiles([r.seconds for r in results])
    d = [x for r in results for x in r.distances]
    exact = sum(1 for x in d if x == 0) / max(len(d), 1)
    return "\n".join([
        f"replayed {spec.name!r} {len(results)} times (seeds 0..{len(results) - 1}): {t.search.algorithm} + "
        f"{t.scheduler.type}, {t.num_samples} trials, {t.max_concurrent} at a time, max_t {spec.max_t}",
        f"  best {t.metric} found: median {val[1]:.2f} (quartiles {val[0]:.2f} - {val[2]:.2f})",
        f"  test top-1 of that configuration: median {test[1]:.2f} (quartiles {test[0]:.2f} - {test[2]:.2f})",
        f"  budget: median {epochs[1]:.0f} trial-epochs, {seconds[1] / 3600:.2f} trial-hours of the table's seconds",
        f"  trials: {statistics.fmean(r.completed for r in results):.1f} reached max_t, "
        f"{statistics.fmean(r.stopped for r in results):.1f} stopped early (mean per replay)",
        f"  nearest-row answers: {100 * exact:.0f}% exact, distance median {statistics.median(d):.3f}, max "
        f"{max(d):.3f} (root mean square over the space's entries, each in [0, 1]); "
        f"{statistics.median(len(set(r.answered)) for r in results):.0f} distinct table configurations answered "
        f"{statistics.median(len(r.answered) for r in results):.0f} proposals (median)" if d else "  no proposals",
    ])
