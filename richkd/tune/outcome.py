"""A sweep's outcome as the user sees it at the end: counts by outcome and by node, retries, where errors are, where
its runs are in the MLflow UI, and the exit code (`exit_code`; 2, bad input, and 4, a lost cluster (errors.py),
come from the CLI)."""
from __future__ import annotations

import signal
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from richkd.tracking import experiment_url, local_ui
from richkd.tune.paths import DEFAULT_STORAGE, resolve_tracking_uri, storage_of, sweep_ref
from richkd.tune.results import SweepRecord, collect_trials, shown_config, survivors

EXIT_TRIALS_ERRORED = 3


@dataclass
class SweepOutcome:
    name: str
    experiment_path: str
    num_trials: int
    counts: dict = field(default_factory=dict)          # outcome -> number of trials
    best: Optional[dict] = None                           # {"trial_id", "value", "config"} among completed
    parent_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    wall_s: float = 0.0
    by_node: dict = field(default_factory=dict)         # "node id (IP)" -> {outcome: number of trials}
    retried: int = 0                                    # trials that failed at least once and were restarted
    error_logs: list = field(default_factory=list)      # error.txt of the trials that ended in error
    stopped_by: Optional[int] = None                    # the signal (SIGINT, SIGTERM) that stopped the sweep
    experiment_id: Optional[str] = None                 # the sweep's MLflow experiment
    mode: str = "max"                                   # of the (first) objective

    @property
    def exit_code(self) -> int:
        """128 + N when signal N (SIGINT: 130, SIGTERM: 143) stopped the sweep, even if every trial had finished by
        then; else 3 when some trial ended in error; else 0."""
        return 128 + int(self.stopped_by) if self.stopped_by else EXIT_TRIALS_ERRORED if self.counts.get("error") else 0

    @property
    def interrupted(self) -> bool:
        return bool(self.stopped_by or self.counts.get("unfinished"))


def sweep_outcome(record: SweepRecord, wall_s: float) -> SweepOutcome:
    """Summarise from the experiment folder (Tune's public offline view: real trial statuses, so trials left
    unfinished by Ctrl-C are not mistaken for early stops)."""
    spec = record.spec
    rows = collect_trials(spec.experiment_path, spec)
    by_node: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        where = f"{r.node_id[:12]} ({r.node_ip})" if r.node_ip else r.node_id
        if where:   # a trial that never reported ran nowhere yet
            by_node[where][r.outcome] += 1
    alive = survivors(rows)
    best = ({"trial_id": alive[0].trial_id, "value": alive[0].value, "config": alive[0].sampled} if alive else None)
    return SweepOutcome(name=spec.name, experiment_path=spec.experiment_path, num_trials=len(rows),
                        counts=dict(Counter(r.outcome for r in rows)), best=best, parent_run_id=record.parent_run_id,
                        tracking_uri=record.tracking_uri, wall_s=wall_s, by_node=dict(by_node),
                        retried=sum(1 for r in rows if r.restarts),
                        error_logs=[str(Path(r.path) / "error.txt") for r in rows if r.outcome == "error" and r.path],
                        experiment_id=record.experiment_id, mode=spec.tune.mode)


def describe_outcome(outcome: SweepOutcome, metric) -> str:
    metric = metric[0] if isinstance(metric, (list, tuple)) else metric   # multi-objective: the first objective
    lines = [f"sweep {outcome.name}: {outcome.num_trials} trials ({_counts(outcome.counts)}) in {outcome.wall_s:.0f}s",
             f"  results: {outcome.experiment_path}"]
    if len(outcome.by_node) > 1:
        per_node = "; ".join(f"{node} {_counts(c)}" for node, c in sorted(outcome.by_node.items()))
        lines.append(f"  per node: {per_node}")
    if outcome.retried:
        lines.append(f"  retried: {outcome.retried} trial(s) restarted after a failure (tune.max_failures)")
    if outcome.stopped_by:
        lines.append(f"  stopped by {signal.Signals(outcome.stopped_by).name} (exit code {outcome.exit_code})")
    if outcome.best:
        best = outcome.best
        lines.append(f"  best (reached max_t): {metric}={best['value']:.4g}  {shown_config(best['config'])}")
    if uri := outcome.tracking_uri:   # how to see its runs: `richkd ui` for its store (a server is its own UI)
        ui, command = local_ui(), f"richkd ui --tracking-uri {uri}"
        storage = storage_of(outcome.experiment_path)
        if uri.startswith(("http://", "https://")):
            ui, command = uri, ""
        elif uri == resolve_tracking_uri(None, storage or DEFAULT_STORAGE):   # the storage's own store
            command = f"richkd ui --storage {storage}" if storage else "richkd ui"
        link = outcome.experiment_id and experiment_url(ui, outcome.experiment_id, metric, outcome.mode, outcome.name)
        see = f"`{command}`, then open {link}" if link else f"`{command}` to browse"
        see = see if command else f"open {link or ui}"
        lines.append(f"  MLflow: {uri} (parent run {outcome.parent_run_id}); {see}")
    ref = sweep_ref(outcome.name, outcome.experiment_path)
    if outcome.interrupted:
        lines.append(f"  interrupted: continue with `richkd sweep --resume {ref}`")
    if outcome.counts.get("error"):
        shown = outcome.error_logs[:3] + (["..."] if len(outcome.error_logs) > 3 else [])
        lines.append(f"  {outcome.counts['error']} trial(s) ended in error (exit code {EXIT_TRIALS_ERRORED}); their "
                     "logs: " + ", ".join(shown or ["error.txt in their trial folders"]))
    if not outcome.interrupted:   # export ranks trials that reached max_t: finish the sweep first
        lines.append(f"  next: richkd export {ref}")
    return "\n".join(lines)


def _counts(counts: dict) -> str:
    """"2 completed, 1 stopped_early": the outcome names of leaderboard.csv and the MLflow outcome tag."""
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
