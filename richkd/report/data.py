"""What a sweep report shows: the trials ranked as `richkd export` ranks them (richkd.tune.results), their
per-epoch curves (each trial's reports, `TrialRow.history`), and the counts derived from them. The sweep reader is
imported where a sweep is read: it loads the spec's cache signature and with it torch, and `import richkd.report`
stays light (docs/architecture.md, "Layers")."""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from richkd.pareto import front_rows

EPOCH = "training_iteration"   # one tune.report per epoch: training_iteration == epoch


def curve(row, name: str) -> list[tuple[int, float]]:
    """(epoch, value) of a trial's finite `name` values in epoch order. An epoch reported twice (a trial restored
    from an older checkpoint re-runs epochs) keeps its last report: the one its later epochs continue from."""
    by_epoch = {int(h[EPOCH]): h.get(name) for h in row.history if EPOCH in h}
    return [(e, v) for e, v in sorted(by_epoch.items()) if v is not None and math.isfinite(v)]


@dataclass
class ReportData:
    spec: Any                         # richkd.tune.spec.SweepSpec
    experiment_path: str
    record: Any                       # richkd.tune.results.SweepRecord (parent_run_id, tracking_uri, ...)
    rows: list                        # richkd.tune.results.TrialRow, ranked (export's order)
    out_dir: Path                     # where index.html and the PNGs go
    export_dir: Path                  # where `richkd export` writes best_config.yaml / leaderboard.csv

    @property
    def metric(self) -> str:
        return self.spec.tune.metric

    @property
    def mode(self) -> str:
        return self.spec.tune.mode

    @property
    def objectives(self) -> list:
        """[(metric, mode), ...]: one pair, or several for a multi-objective sweep."""
        return list(self.spec.tune.objective_pairs)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def front(self) -> list:
        """Pareto-front rows (reached max_t, non-dominated in the objectives) of a multi-objective sweep, else []."""
        if not self.multi_objective:
            return []
        return front_rows(self.rows, [m for m, _ in self.objectives], [d for _, d in self.objectives])

    @property
    def best(self):
        """The trial `richkd export` selects: the best LAST value among trials that reached max_t, or None
        (for a multi-objective sweep: the Pareto-front member best by the first objective)."""
        from richkd.tune.results import survivors

        alive = self.front if self.multi_objective else survivors(self.rows)
        return alive[0] if alive else None

    def counts(self) -> dict:
        return dict(Counter(r.outcome for r in self.rows))

    @property
    def total_epochs(self) -> int:
        return sum(int(r.epochs or 0) for r in self.rows)

    def best_so_far(self) -> list[tuple[int, float, str]]:
        """(trial-epochs spent, best value, trial) each time a trial reaching max_t improved on the best: the
        search's progress against its budget, the epochs of every trial counted in the order they were reported."""
        reports = sorted((h.get("timestamp", 0.0), k, i) for k, r in enumerate(self.rows)
                         for i, h in enumerate(r.history))
        sign, out, spent = (1.0 if self.mode == "max" else -1.0), [], 0
        for _, k, i in reports:
            r = self.rows[k]
            spent += 1
            value = r.history[i].get(self.metric)
            if (r.outcome == "completed" and i == len(r.history) - 1 and value is not None and math.isfinite(value)
                    and (not out or sign * value > sign * out[-1][1])):
                out.append((spent, value, r.trial_id))
        return out

    def stopped_ahead_of_winner(self) -> list[tuple[str, int, float, float]]:
        """ASHA-stopped trials that were better than the final winner at the epoch where they were stopped:
        (trial, epoch, its value, the winner's value then). Early stopping that did harm shows up here."""
        best = self.best
        if best is None:
            return []
        winner = dict(curve(best, self.metric))
        sign, out = (1.0 if self.mode == "max" else -1.0), []
        for r in self.rows:
            if r.outcome != "stopped_early" or not r.history:
                continue
            value, theirs = r.history[-1].get(self.metric), winner.get(int(r.epochs))
            if value is not None and theirs is not None and sign * value > sign * theirs:
                out.append((r.trial_id, int(r.epochs), value, theirs))
        return out


def load_report_data(sweep: str, storage: Optional[str] = None, tracking_uri: Optional[str] = None,
                     out_dir: Optional[str] = None) -> ReportData:
    """Rows and paths of a sweep given by name (under `storage`, default tune_runs) or folder.

    Raises the SpecError of `read_sweep_record` for an unknown sweep and ExportError for a sweep without results.
    """
    from richkd.tune.results import load_sweep, output_dir

    spec, path, record, rows = load_sweep(sweep, storage, tracking_uri)
    export_dir = output_dir(path, spec.name)
    folder = Path(out_dir) if out_dir else export_dir / "report"
    return ReportData(spec=spec, experiment_path=path, record=record, rows=rows,
                      out_dir=Path(os.path.abspath(folder)), export_dir=Path(os.path.abspath(export_dir)))
