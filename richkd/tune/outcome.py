"""A sweep's outcome as the user sees it at the end: counts by outcome and by node, retries, where errors are,
and the exit code (0 every trial ran, 3 some trial ended in error; 2 and 130 come from the CLI)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from richkd.tune.sweep_record import SweepRecord

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_TRIALS_ERRORED = 3
EXIT_INTERRUPTED = 130


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
    by_node: dict = field(default_factory=dict)         # Ray node id -> {outcome: number of trials}
    retried: int = 0                                    # trials that failed at least once and were restarted
    error_logs: list = field(default_factory=list)      # error.txt of the trials that ended in error

    @property
    def exit_code(self) -> int:
        return EXIT_TRIALS_ERRORED if self.counts.get("error") else EXIT_OK


def sweep_outcome(record: SweepRecord, wall_s: float) -> SweepOutcome:
    """Summarise from the experiment folder (Tune's public offline view: real trial statuses, so trials left
    unfinished by Ctrl-C are not mistaken for early stops)."""
    from richkd.tune.results import collect_trials, survivors

    spec = record.spec
    rows = collect_trials(spec.experiment_path, spec)
    counts: dict[str, int] = {}
    by_node: dict[str, dict] = {}
    for r in rows:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
        node = by_node.setdefault(r.node_id or "unknown", {})
        node[r.outcome] = node.get(r.outcome, 0) + 1
    alive = survivors(rows)
    best = ({"trial_id": alive[0].trial_id, "value": alive[0].value, "config": alive[0].sampled} if alive else None)
    errors = [str(Path(r.path) / "error.txt") for r in rows if r.outcome == "error" and r.path]
    return SweepOutcome(name=spec.name, experiment_path=spec.experiment_path, num_trials=len(rows),
                        counts=counts, best=best, parent_run_id=record.parent_run_id,
                        tracking_uri=record.tracking_uri, wall_s=wall_s, by_node=by_node,
                        retried=sum(1 for r in rows if r.failures), error_logs=errors)


def sweep_ref(name: str, experiment_path: str) -> str:
    """How later commands name this sweep: `NAME`, plus `--storage DIR` when it is not under ./tune_runs (the
    default those commands look in), so a printed `richkd sweep --resume ...` or `richkd export ...` works."""
    from richkd.tune.paths import DEFAULT_STORAGE, absolute_storage, has_scheme

    local = not has_scheme(experiment_path)
    storage = str(Path(experiment_path).parent) if local else experiment_path.rsplit("/", 1)[0]
    if storage.rstrip("/") == absolute_storage(DEFAULT_STORAGE).rstrip("/"):
        return name
    return f"{name} --storage {storage}"


def describe_outcome(outcome: SweepOutcome, metric) -> str:
    metric = metric[0] if isinstance(metric, (list, tuple)) else metric   # multi-objective: the first objective
    lines = [f"sweep {outcome.name}: {outcome.num_trials} trials ({_counts(outcome.counts)}) in {outcome.wall_s:.0f}s",
             f"  results: {outcome.experiment_path}"]
    if len(outcome.by_node) > 1:
        per_node = "; ".join(f"{node[:12]} {_counts(c)}" for node, c in sorted(outcome.by_node.items()))
        lines.append(f"  per node: {per_node}")
    if outcome.retried:
        lines.append(f"  retried: {outcome.retried} trial(s) restarted after a failure (tune.max_failures)")
    if outcome.best:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in outcome.best["config"].items())
        lines.append(f"  best (reached max_t): {metric}={outcome.best['value']:.4g}  {shown}")
    if outcome.tracking_uri:
        lines.append(f"  MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id}); `richkd ui` to browse")
    ref = sweep_ref(outcome.name, outcome.experiment_path)
    interrupted = bool(outcome.counts.get("unfinished"))
    if interrupted:
        lines.append(f"  interrupted: continue with `richkd sweep --resume {ref}`")
    if outcome.counts.get("error"):
        shown = outcome.error_logs[:3] + (["..."] if len(outcome.error_logs) > 3 else [])
        lines.append(f"  {outcome.counts['error']} trial(s) ended in error (exit code {EXIT_TRIALS_ERRORED}); their "
                     "logs: " + ", ".join(shown or ["error.txt in their trial folders"]))
    if not interrupted:   # export ranks trials that reached max_t: finish the sweep first
        lines.append(f"  next: richkd export {ref}")
    return "\n".join(lines)


def _counts(counts: dict) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(counts.items()))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
