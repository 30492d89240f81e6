"""Gather what a sweep report shows: ranked trial rows, per-epoch curves read from the trial folders, counts.

Curves come from each trial's `result.json` (Ray Tune writes one JSON object per `tune.report`, i.e. per
epoch) or, when that is missing, its `progress.csv`; both are plain files, so no Ray runtime is needed to read
them. The trial rows themselves come from `richkd.tune.results.load_sweep` (Ray's offline ExperimentAnalysis, imported
lazily inside richkd.tune), so the report ranks trials exactly as `richkd export` does.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

RESULT_JSON = "result.json"
PROGRESS_CSV = "progress.csv"
EPOCH_KEYS = ("training_iteration", "epoch")   # one tune.report per epoch: training_iteration == epoch
FAILED_OUTCOMES = ("error", "nonfinite_loss")


class ReportError(ValueError):
    """A report cannot be built as asked (e.g. an unreadable trial folder); the message says what to do."""


@dataclass
class TrialCurve:
    """Per-epoch history of one trial: `epochs` ascending, `metrics[name][i]` the value at `epochs[i]` (NaN
    where that report lacks the metric or it is non-finite)."""
    trial_id: str
    epochs: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    stop_reason: str = ""
    source: str = ""                 # the file the history was read from ("" when none was found)

    def series(self, name: str) -> list[tuple[int, float]]:
        """(epoch, value) pairs with a finite value."""
        values = self.metrics.get(name) or []
        return [(e, v) for e, v in zip(self.epochs, values) if math.isfinite(v)]

    def value_at(self, name: str, epoch: int) -> Optional[float]:
        values = self.metrics.get(name) or []
        for e, v in zip(self.epochs, values):
            if e == epoch:
                return v if math.isfinite(v) else None
        return None


@dataclass
class ReportData:
    spec: Any                         # richkd.tune.spec.SweepSpec
    experiment_path: str
    record: Any                       # richkd.tune.results.SweepRecord (parent_run_id, tracking_uri, ...)
    rows: list                        # richkd.tune.results.TrialRow, ranked (export's order)
    curves: dict                      # trial_id -> TrialCurve
    out_dir: Path                     # where index.html and the PNGs go
    export_dir: Path                  # where `richkd export` writes best_config.yaml / leaderboard.csv
    notes: list = field(default_factory=list)

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
        from richkd.pareto import front_rows

        return front_rows(self.rows, [m for m, _ in self.objectives], [d for _, d in self.objectives])

    @property
    def best(self):
        """The trial `richkd export` selects: the best LAST value among trials that reached max_t, or None
        (for a multi-objective sweep: the Pareto-front member best by the first objective)."""
        from richkd.tune.results import survivors

        if self.multi_objective:
            front = self.front
            return front[0] if front else None
        alive = survivors(self.rows)
        return alive[0] if alive else None

    def counts(self) -> dict:
        out: dict = {}
        for r in self.rows:
            out[r.outcome] = out.get(r.outcome, 0) + 1
        return out

    @property
    def total_epochs(self) -> int:
        return sum(int(r.epochs or 0) for r in self.rows)

    def best_so_far(self) -> list[tuple[int, float, str]]:
        """(trial-epochs spent, best value, trial) each time a trial reaching max_t improved on the best: the
        search's progress against its budget, the epochs of every trial counted in the order they were reported."""
        reports = sorted((h.get("timestamp", 0.0), i, r) for r in self.rows for i, h in enumerate(r.history))
        sign, out, spent = (1.0 if self.mode == "max" else -1.0), [], 0
        for _, i, r in reports:
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
        winner = {int(h.get("training_iteration", 0)): h.get(self.metric) for h in best.history}
        sign, out = (1.0 if self.mode == "max" else -1.0), []
        for r in self.rows:
            if r.outcome != "stopped_early" or not r.history:
                continue
            value, theirs = r.history[-1].get(self.metric), winner.get(int(r.epochs))
            if value is not None and theirs is not None and sign * value > sign * theirs:
                out.append((r.trial_id, int(r.epochs), value, theirs))
        return out


# ----- reading one trial's history ------------------------------------------------------------------------

def _float(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return math.nan


def _is_number(value: Any) -> bool:
    """Numbers, including NaN (a non-finite metric is still a metric); numeric strings (progress.csv)."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value).strip())
    except ValueError:
        return False
    return True


def _records_from_json_lines(text: str) -> list[dict]:
    """One dict per line; Python's json reads the NaN / Infinity that Ray writes for non-finite metrics."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:   # a line cut short by a killed writer: keep what precedes it
            log.debug("skipping an unreadable line of a result.json")
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _records_from_csv(text: str) -> list[dict]:
    return [dict(r) for r in csv.DictReader(io.StringIO(text))]


def _read_trial_file(trial_path: str, name: str) -> Optional[str]:
    if "://" in trial_path:
        from richkd.tune.paths import join_storage

        try:
            import pyarrow.fs

            fs, p = pyarrow.fs.FileSystem.from_uri(join_storage(trial_path, name))
            if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
                return None
            with fs.open_input_stream(p) as f:
                return f.readall().decode()
        except Exception as exc:  # an unreachable bucket: the curve is missing, the report still builds
            log.warning("could not read %s/%s: %s", trial_path, name, exc)
            return None
    path = Path(trial_path) / name
    return path.read_text() if path.is_file() else None


def read_trial_curve(trial_id: str, trial_path: str) -> TrialCurve:
    """The per-epoch history of the trial in `trial_path` (a folder or URI).

    When an epoch was reported twice (a trial restored from an older checkpoint re-runs epochs), the LAST
    report wins: it is the one the trial's later epochs continue from.
    """
    records, source = [], ""
    for name, parse in ((RESULT_JSON, _records_from_json_lines), (PROGRESS_CSV, _records_from_csv)):
        text = _read_trial_file(trial_path, name)
        if text is None:
            continue
        records = parse(text)
        if records:
            source = name
            break
    by_epoch: dict[int, dict] = {}
    for record in records:
        epoch = next((_float(record.get(k)) for k in EPOCH_KEYS if math.isfinite(_float(record.get(k)))), math.nan)
        if math.isfinite(epoch):
            by_epoch[int(epoch)] = record
    epochs = sorted(by_epoch)
    names: list[str] = []
    for e in epochs:
        for key, value in by_epoch[e].items():
            if key not in names and key != "config" and not isinstance(value, (dict, list)):
                names.append(key)
    metrics = {key: [_float(by_epoch[e].get(key)) for e in epochs] for key in names
               if any(_is_number(by_epoch[e].get(key)) for e in epochs)}
    stop_reason = ""
    if epochs:
        stop_reason = str(by_epoch[epochs[-1]].get("stop_reason") or "")
    return TrialCurve(trial_id=trial_id, epochs=epochs, metrics=metrics, stop_reason=stop_reason, source=source)


# ----- the whole sweep ------------------------------------------------------------------------------------------

def trial_folder(row, experiment_path: str) -> str:
    """The trial's folder: Tune's recorded path, else <experiment>/trial_<id> (our trial_dirname_creator)."""
    if row.path:
        return row.path
    from richkd.tune.paths import join_storage

    return join_storage(experiment_path, f"trial_{row.trial_id}")


def load_report_data(sweep: str, storage: Optional[str] = None, tracking_uri: Optional[str] = None,
                     out_dir: Optional[str] = None) -> ReportData:
    """Rows, curves and paths of a sweep given by name (under `storage`, default tune_runs) or folder.

    Raises the SpecError of `read_sweep_record` for an unknown sweep and ExportError for a sweep without results.
    """
    from richkd.tune.results import load_sweep, output_dir

    spec, path, record, rows = load_sweep(sweep, storage, tracking_uri)
    curves = {}
    notes = []
    for row in rows:
        curve = read_trial_curve(row.trial_id, trial_folder(row, path))
        if not curve.source:
            notes.append(f"trial {row.trial_id}: no {RESULT_JSON} or {PROGRESS_CSV} in its folder; no curve drawn")
        curves[row.trial_id] = curve
        if curve.stop_reason and not row.extra.get("stop_reason"):
            row.extra["stop_reason"] = curve.stop_reason
    export_dir = output_dir(path, spec.name)
    folder = Path(out_dir) if out_dir else export_dir / "report"
    return ReportData(spec=spec, experiment_path=path, record=record, rows=rows, curves=curves,
                      out_dir=Path(os.path.abspath(folder)), export_dir=Path(os.path.abspath(export_dir)), notes=notes)
