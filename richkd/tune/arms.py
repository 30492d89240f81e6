"""Fair comparisons (docs/search.md, "Fair comparisons"): a spec's `arms:` are sweeps `<name>.<arm>` with the same
budget, listed in `<storage>/<name>/arms.json`; `richkd finalize <name>` re-trains each arm's best over the same seeds
and writes `comparison.json` (and one MLflow run) with 95% percentile-bootstrap intervals of the differences.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from html import escape
from typing import Optional

import numpy as np

from richkd.io import atomic_write_text
from richkd.tracking import KIND_TAG, log_run
from richkd.tune.errors import SpecError
from richkd.tune.finalize import finalize_sweep
from richkd.tune.outcome import describe_outcome, sweep_outcome
from richkd.tune.paths import DEFAULT_STORAGE, absolute_storage, join_storage, read_text, write_text
from richkd.tune.results import read_sweep_record, sweep_record_exists
from richkd.tune.runner import resume_sweep, run_sweep
from richkd.tune.spec import SweepSpec

log = logging.getLogger(__name__)

ARMS_FILE = "arms.json"
COMPARISON_FILE = "comparison.json"
BOOTSTRAP_SAMPLES = 10000


@dataclass
class ArmsGroup:
    name: str
    storage: str
    sweeps: dict                   # arm -> its sweep name

    @property
    def path(self) -> str:
        return join_storage(self.storage, self.name)


def group_for(specs: dict[str, SweepSpec]) -> ArmsGroup:
    first = next(iter(specs.values()))
    return ArmsGroup(name=first.name.rsplit(".", 1)[0], storage=first.tune.storage_path,
                     sweeps={arm: s.name for arm, s in specs.items()})


def write_group(group: ArmsGroup, specs: dict[str, SweepSpec]) -> None:
    write_text(join_storage(group.path, ARMS_FILE), json.dumps(
        {"name": group.name, "sweeps": group.sweeps, "specs": {a: s.to_dict() for a, s in specs.items()}}, indent=1,
        default=str))


def read_group(name: str, storage: Optional[str] = None) -> Optional[tuple[ArmsGroup, dict]]:
    """(group, {arm: spec}) when `name` is an arms group under `storage` (default tune_runs), else None."""
    root = absolute_storage(storage or DEFAULT_STORAGE)
    text = read_text(join_storage(join_storage(root, name), ARMS_FILE))
    if text is None:
        return None
    data = json.loads(text)
    specs = {arm: SweepSpec.from_dict(d) for arm, d in data["specs"].items()}
    return ArmsGroup(name=data["name"], storage=root, sweeps=dict(data["sweeps"])), specs


def run_arms(specs: dict[str, SweepSpec], *, address=None, num_cpus=None, verbose: int = 1,
             progress: bool = False) -> list:
    """Each arm's sweep in turn (started, or continued when it exists and is unfinished); their outcomes."""
    group = group_for(specs)
    write_group(group, specs)
    outcomes = []
    for arm, spec in specs.items():
        print(f"arm {arm}: sweep {spec.name} ({spec.tune.num_samples} trials, {spec.max_t} epochs, "
              f"{spec.tune.search.algorithm} seed {spec.tune.search.seed})", flush=True)
        done = (sweep_outcome(read_sweep_record(spec.experiment_path), 0.0)
                if sweep_record_exists(spec.experiment_path) else None)
        if done is None:
            done = run_sweep(spec, address=address, num_cpus=num_cpus, verbose=verbose, progress=progress)
        elif done.num_trials < spec.tune.num_samples or done.counts.get("unfinished"):
            done = resume_sweep(spec.experiment_path, address=address, num_cpus=num_cpus, verbose=verbose,
                                progress=progress)
        print(describe_outcome(done, spec.tune.metric), flush=True)
        outcomes.append(done)
        if done.interrupted:     # a signal stopped this arm: the next ones wait for --resume
            raise KeyboardInterrupt
    return outcomes


def bootstrap_difference(a: list, b: list, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple:
    """mean(a) - mean(b) and its 95% percentile-bootstrap interval (each arm's seeds resampled on their own)."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diffs = (x[rng.integers(0, len(x), (samples, len(x)))].mean(axis=1)
             - y[rng.integers(0, len(y), (samples, len(y)))].mean(axis=1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(x.mean() - y.mean()), float(lo), float(hi)


@dataclass
class Comparison:
    name: str
    arms: dict = field(default_factory=dict)          # arm -> {"sweep", "trial_id", "seeds", "test_top1", mean, std}
    differences: list = field(default_factory=list)   # {"a", "b", "diff", "low", "high", "excludes_zero"}
    mlflow_run_id: Optional[str] = None

    def to_dict(self) -> dict:
        return {**asdict(self), "interval": f"95% percentile bootstrap over seeds ({BOOTSTRAP_SAMPLES} resamples)"}


def compare(name: str, results: dict) -> Comparison:
    """results: arm -> (sweep name, FinalizeResult of its best configuration)."""
    out = Comparison(name=name)
    for arm, (sweep, res) in results.items():
        fin = res.finalists[0]
        out.arms[arm] = {"sweep": sweep, "trial_id": fin.trial_id, "params": fin.sampled, "seeds": fin.seeds,
                         "test_top1": fin.test_top1, "mean": fin.mean, "std": fin.std}
    for a, b in itertools.combinations(out.arms, 2):
        diff, lo, hi = bootstrap_difference(out.arms[a]["test_top1"], out.arms[b]["test_top1"])
        out.differences.append({"a": a, "b": b, "diff": diff, "low": lo, "high": hi,
                                "excludes_zero": bool(lo > 0 or hi < 0)})
    return out


def finalize_arms(name: str, *, seeds: Optional[int] = None, storage: Optional[str] = None, progress: bool = False,
                  **finalize_args) -> Comparison:
    """Re-train every arm's best configuration over the same seeds and compare them (see the module docstring)."""
    found = read_group(name, storage)
    if found is None:
        raise SpecError(f"no arms group named {name!r} under {storage or 'tune_runs'}")
    group, specs = found
    n_seeds = seeds or next(iter(specs.values())).finalize.seeds
    if n_seeds < 2:
        raise SpecError(f"finalize {name}: comparing arms needs --seeds >= 2 (a confidence interval over seeds needs "
                        f"at least two), got {n_seeds}")
    results = {}
    for arm, sweep in group.sweeps.items():
        if progress:
            print(f"arm {arm}: re-training the best configuration of {sweep} with {n_seeds} seeds", flush=True)
        results[arm] = (sweep, finalize_sweep(sweep, top=1, seeds=n_seeds, storage=group.storage, progress=progress,
                                              **finalize_args))
    comparison = compare(name, results)
    comparison.mlflow_run_id = _log_mlflow(comparison, next(iter(specs.values())), group)
    atomic_write_text(join_storage(group.path, COMPARISON_FILE), json.dumps(comparison.to_dict(), indent=1))
    return comparison


def _log_mlflow(c: Comparison, spec: SweepSpec, group: ArmsGroup) -> Optional[str]:
    """The comparison as one MLflow run: means, stds, differences and intervals as metrics, comparison.json."""
    if not spec.mlflow.enabled:
        return None
    metrics = {f"{arm}_test_top1_{k}": v[k] for arm, v in c.arms.items() for k in ("mean", "std")}
    for d in c.differences:
        key = f"diff_{d['a']}_minus_{d['b']}"
        metrics.update({key: d["diff"], f"{key}_ci_low": d["low"], f"{key}_ci_high": d["high"]})
    try:
        return log_run(spec.mlflow.tracking_uri, spec.mlflow.experiment, f"{c.name}-comparison", metrics=metrics,
                       tags={KIND_TAG: "comparison", "richkd.arms": ",".join(c.arms),
                             "richkd.sweeps": ",".join(group.sweeps.values())},
                       texts={COMPARISON_FILE: json.dumps(c.to_dict(), indent=1)}, wait_s=None)
    except RuntimeError as exc:
        log.warning("%s; %s holds the comparison", exc, COMPARISON_FILE)
        return None


def describe_comparison(c: Comparison) -> str:
    lines = [f"arms of {c.name}: test top-1 of each arm's best configuration over seeds (mean ± sample std)"]
    for arm, v in c.arms.items():
        lines.append(f"  {arm:<12} {v['mean']:.2f} ± {v['std']:.2f}  (seeds {v['seeds']}, trial {v['trial_id']} of "
                     f"{v['sweep']})")
    for d in c.differences:
        verdict = "excludes 0" if d["excludes_zero"] else "includes 0: no difference shown"
        lines.append(f"  {d['a']} - {d['b']}: {d['diff']:+.2f}, 95% CI [{d['low']:+.2f}, {d['high']:+.2f}] ({verdict})")
    if c.mlflow_run_id:
        lines.append(f"  MLflow run {c.mlflow_run_id}")
    return "\n".join(lines)


def write_group_page(group: ArmsGroup, reports: dict) -> str:
    """<group>/report/index.html: the comparison (when `richkd finalize` has made one) and each arm's report."""
    text = read_text(join_storage(group.path, COMPARISON_FILE))
    c = json.loads(text) if text else None
    rows = "".join(f"<tr><td><a href=\"{escape(os.path.relpath(reports[a], os.path.join(group.path, 'report')))}\">"
                   f"{escape(a)}</a></td><td>{escape(s)}</td><td>" + (
                       f"{c['arms'][a]['mean']:.2f} ± {c['arms'][a]['std']:.2f} (seeds {c['arms'][a]['seeds']})"
                       if c and a in c["arms"] else "not finalized yet") + "</td></tr>"
                   for a, s in group.sweeps.items())
    diffs = "".join(f"<tr><td>{escape(d['a'])} - {escape(d['b'])}</td><td>{d['diff']:+.2f}</td><td>[{d['low']:+.2f}, "
                    f"{d['high']:+.2f}]</td><td>{'excludes 0' if d['excludes_zero'] else 'includes 0'}</td></tr>"
                    for d in (c["differences"] if c else []))
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Arms of {escape(group.name)}</title></head>"
            f"<body><h1>Arms of {escape(group.name)}</h1><p>Each arm was tuned with the same budget; the test top-1 "
            "is its best configuration re-trained over the same seeds (richkd finalize).</p><table border=1>"
            f"<tr><th>arm (its report)</th><th>sweep</th><th>test top-1 mean ± std</th></tr>{rows}</table>"
            + (f"<h2>Differences (95% bootstrap intervals over seeds)</h2><table border=1><tr><th>pair</th>"
               f"<th>difference</th><th>95% CI</th><th></th></tr>{diffs}</table>" if diffs else
               f"<p>Run <code>richkd finalize {escape(group.name)}</code> to compare the arms.</p>") + "</body></html>")
    path = os.path.join(group.path, "report", "index.html")
    atomic_write_text(path, page)
    return path
