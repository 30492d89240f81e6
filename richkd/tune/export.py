"""Export a sweep: the best trial's full config (loadable by `richkd train --config`) and a leaderboard of all trials,
selected as richkd.tune.results selects, also attached to the sweep's MLflow parent run. Multi-objective sweeps (and
`richkd export --pareto METRICS`) also get the Pareto front of the same trials (richkd.pareto): pareto_front.json and
a config per front member under pareto/; best_config.yaml is then the front member best by the first objective."""
from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from richkd.io import atomic_write_text, ensure_writable
from richkd.metric_names import KNOWN_METRICS, direction, is_reported
from richkd.provenance import code_version
from richkd import tracking
from richkd.tune.paths import sweep_ref
from richkd.tune.results import (ExportError, TrialRow, best_trial, compute_front, load_sweep, missing_trials,
                                 output_dir, survivors)
from richkd.tune.trainable import trial_threads_config

log = logging.getLogger(__name__)

BEST_CONFIG = "best_config.yaml"
BEST_TRIAL = "best_trial.json"
LEADERBOARD = "leaderboard.csv"
LEADERBOARD_METRICS = ("val_top1", "val_top5", "val_loss", "val_ece", "train_loss", "best_val_top1")
PARETO_JSON = "pareto_front.json"
PARETO_DIR = "pareto"          # <trial_id>.yaml per front member, each loadable by `richkd train --config`


@dataclass
class ExportResult:
    out_dir: Path
    best_config: Path
    best_trial: Path
    leaderboard: Path
    best: TrialRow
    rows: list
    attached_to_run: Optional[str] = None
    pareto: Optional[Path] = None                  # pareto_front.json, when a front was exported
    pareto_rows: list = field(default_factory=list)
    pareto_objectives: list = field(default_factory=list)   # [(metric, mode), ...]
    missing: int = 0                               # trials an interrupted sweep has not finished (or started)
    expected: int = 0                              # trials the finished sweep will have
    resume: str = ""                               # how to continue it


def pareto_objectives(spec, metrics: Optional[Sequence[str]] = None) -> list[tuple[str, str]]:
    """[(metric, mode), ...] for a Pareto export: `metrics` given (modes from metric_names.direction), else the
    sweep's objectives when it has several. [] when no front is asked for."""
    if metrics is None:
        return list(spec.tune.objective_pairs) if spec.tune.multi_objective else []
    metrics = [m.strip() for m in metrics if m and m.strip()]
    if not metrics:
        if not spec.tune.multi_objective:
            raise ExportError(f"sweep {spec.name!r} has one objective ({spec.tune.metric}); name the metrics of the "
                              "front, e.g. --pareto val_top1,val_corrupt_top1")
        return list(spec.tune.objective_pairs)
    if len(metrics) < 2 or len(set(metrics)) != len(metrics):
        raise ExportError(f"--pareto {','.join(metrics)}: a front needs two or more different metrics")
    unknown = [m for m in metrics if not is_reported(m)]
    if unknown:
        raise ExportError(f"--pareto: {unknown[0]!r} is not a metric the trainer reports (choose from "
                          f"{', '.join(KNOWN_METRICS)}, or val_corrupt_top1_<corruption>)")
    return [(m, direction(m)) for m in metrics]


def _write_pareto(folder: Path, spec, path: str, record, objectives: list, front: list, rows: list) -> list[Path]:
    """pareto_front.json + pareto/<trial>.yaml (atomic writes); configs of former front members are removed."""
    sub = folder / PARETO_DIR
    written = []
    for r in front:
        shown = ", ".join(f"{m}={r.metrics.get(m):.6g}" for m, _ in objectives)
        header = [f"# Pareto-front trial {r.trial_id} of sweep {spec.name!r} (last values on the validation split): "
                  f"{shown}", f"# sampled: {json.dumps(r.sampled, default=str)}",
                  f"# reproduce with: richkd train --config {PARETO_DIR}/{r.trial_id}.yaml", ""]
        f = sub / f"{r.trial_id}.yaml"
        atomic_write_text(f, "\n".join(header) + trial_threads_config(r.config, spec.tune.cpu).to_yaml())
        written.append(f)
    for old in sub.glob("*.yaml"):
        if old not in written:
            old.unlink()
    info = {
        "sweep": spec.name, "experiment_path": path,
        "objectives": [{"metric": m, "mode": d} for m, d in objectives],
        "selection": {"scope": "last", "split": "val", "among": f"trials that reached max_t = {spec.max_t} epochs",
                      "candidates": len(survivors(rows)),
                      "rule": "non-dominated: no other trial is at least as good in every objective and better "
                              "in one (ties are kept)"},
        "mlflow": {"tracking_uri": record.tracking_uri, "parent_run_id": record.parent_run_id},
        "members": [{"trial_id": r.trial_id, "rank": r.rank,
                     "objectives": {m: r.metrics.get(m) for m, _ in objectives},
                     "config_file": f"{PARETO_DIR}/{r.trial_id}.yaml", "sampled": r.sampled, "epochs": r.epochs,
                     "checkpoint": r.checkpoint, "mlflow_run_id": r.mlflow_run_id} for r in front],
    }
    out = folder / PARETO_JSON
    atomic_write_text(out, json.dumps(info, indent=1, default=str) + "\n")
    return [out, *written]


def leaderboard_csv(rows: list, spec) -> str:
    space_keys = spec.space_keys
    metric_keys = [spec.tune.metric] + [m for m in LEADERBOARD_METRICS if m != spec.tune.metric]
    metric_keys += [m for m in spec.tune.metrics if m not in metric_keys]
    header = (["rank", "trial_id", "status", "outcome", "epochs", f"{spec.tune.metric}_last",
               f"{spec.tune.metric}_best"] + [f"final_{m}" for m in metric_keys] + space_keys
              + ["mlflow_run_id", "stop_reason"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow([r.rank, r.trial_id, r.status, r.outcome, r.epochs, _cell(r.value), _cell(r.best_value)]
                        + [_cell(r.metrics.get(m)) for m in metric_keys]
                        + [_cell(r.sampled.get(k)) for k in space_keys]
                        + [r.mlflow_run_id or "", r.extra.get("stop_reason", "")])
    return buf.getvalue()


def export_sweep(sweep: str, storage: Optional[str] = None, tracking_uri: Optional[str] = None,
                 out_dir: Optional[str] = None, attach: bool = True,
                 pareto: Optional[Sequence[str]] = None) -> ExportResult:
    """best_config.yaml, best_trial.json and leaderboard.csv, attached to the parent run. `pareto`: the metrics of a
    front to export ([]: the sweep's objectives; None: a front exactly when the sweep has several objectives)."""
    spec, path, record, rows = load_sweep(sweep, storage, tracking_uri)
    best = best_trial(rows, spec)
    objectives = pareto_objectives(spec, pareto)
    front = compute_front(rows, spec, objectives) if objectives else []
    if front and spec.tune.multi_objective:
        best = front[0]   # the front member best by the first objective (a primary-metric tie can be dominated)
    folder = ensure_writable(Path(out_dir) if out_dir else output_dir(path, spec.name),
                             "the export folder" + (" (--out)" if out_dir else ""))
    version = code_version()
    cfg = trial_threads_config(best.config, spec.tune.cpu)   # the threads the trial ran with: same numbers
    cache_keys = record.cache_entries(cfg)
    info = {
        "sweep": spec.name, "experiment_path": path, "trial_id": best.trial_id, "trial_name": best.trial_name,
        "selection": {"metric": spec.tune.metric, "mode": spec.tune.mode, "scope": "last", "split": "val",
                      "among": f"trials that reached max_t = {spec.max_t} epochs"
                      + (f" and are on the Pareto front of {spec.tune.metrics}" if spec.tune.multi_objective else "")},
        "value": best.value, "best_value_over_epochs": best.best_value, "epochs": best.epochs,
        "metrics": best.metrics, "sampled": best.sampled, "checkpoint": best.checkpoint,
        "mlflow": {"tracking_uri": record.tracking_uri, "experiment_id": record.experiment_id,
                   "parent_run_id": record.parent_run_id, "run_id": best.mlflow_run_id},
        "cache_keys": cache_keys, "code_version": version, "sweep_code_version":
            {"git_commit": record.git_commit, "richkd_version": record.richkd_version},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.to_dict(),
    }
    on_front = f" (on the Pareto front, see {PARETO_JSON})" if front and spec.tune.multi_objective else ""
    header = [
        f"# Best trial of sweep {spec.name!r}: {best.trial_id}",
        f"# selected by the LAST {spec.tune.metric} ({spec.tune.mode}) on the validation split among trials that "
        f"reached max_t = {spec.max_t}{on_front}: {best.value:.6g}",
        f"# sampled: {json.dumps(best.sampled, default=str)}",
        f"# MLflow run: {best.mlflow_run_id or 'n/a'} (parent {record.parent_run_id or 'n/a'}, "
        f"{record.tracking_uri or 'MLflow off'})",
        f"# cache entries: {', '.join(cache_keys) or 'none'}",
        f"# code: richkd {version['richkd_version']} @ {version['git_commit']} (sweep ran at "
        f"{record.git_commit or 'unknown'})",
        f"# details: {BEST_TRIAL}; reproduce with: richkd train --config {BEST_CONFIG}",
        "",
    ]
    best_config, best_json, board = folder / BEST_CONFIG, folder / BEST_TRIAL, folder / LEADERBOARD
    for r in rows:
        if r.metrics.get("nonfinite_loss", 0) >= 1:
            r.extra["stop_reason"] = "non-finite loss"
    atomic_write_text(best_config, "\n".join(header) + cfg.to_yaml())
    atomic_write_text(best_json, json.dumps(info, indent=1, default=str) + "\n")
    atomic_write_text(board, leaderboard_csv(rows, spec))
    pareto_files = _write_pareto(folder, spec, path, record, objectives, front, rows) if front else []
    attached = None
    if attach and record.has_mlflow_run:   # the files under export/ (export/pareto/) of the parent run, the best
        # trial and the front (MLflow has no Pareto view) as its tags and a size metric
        tags = {"richkd.best_trial_id": best.trial_id, "richkd.best_run_id": best.mlflow_run_id or ""}
        if front:
            tags.update({"richkd.pareto_objectives": ",".join(f"{m}:{d}" for m, d in objectives),
                         "richkd.pareto_trial_ids": ",".join(r.trial_id for r in front)})
        uri, attached = record.tracking_uri, record.parent_run_id
        if not (tracking.attach(uri, attached, [best_config, best_json, board, *pareto_files[:1]], "export", tags,
                                {"pareto_front_size": float(len(front))} if front else None)
                and tracking.attach(uri, attached, pareto_files[1:], f"export/{PARETO_DIR}")):
            log.warning("MLflow at %s did not take the export files of run %s; they are in the export folder", uri,
                        attached)
            attached = None
    missing, expected = missing_trials(rows, spec)
    return ExportResult(out_dir=folder, best_config=best_config, best_trial=best_json, leaderboard=board,
                        best=best, rows=rows, attached_to_run=attached,
                        pareto=pareto_files[0] if pareto_files else None, pareto_rows=front,
                        pareto_objectives=objectives, missing=missing, expected=expected,
                        resume=f"richkd sweep --resume {sweep_ref(spec.name, path)}")


def _cell(v) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def describe_export(result: ExportResult, metric) -> str:
    metric = metric[0] if isinstance(metric, (list, tuple)) else metric   # a multi-objective sweep: the first
    best = result.best
    n_done = sum(1 for r in result.rows if r.outcome == "completed")
    front = []
    if result.pareto is not None:
        names = [m for m, _ in result.pareto_objectives]
        front = [f"pareto front ({len(result.pareto_rows)} of {n_done} trials that reached max_t; "
                 + ", ".join(f"{m} {d}" for m, d in result.pareto_objectives) + f"): {result.pareto}"]
        front += ["  " + r.trial_id + ": " + ", ".join(f"{m}={r.metrics.get(m):.4g}" for m in names)
                  for r in result.pareto_rows]
    unfinished = ([f"note: the sweep is unfinished: {result.missing} of its {result.expected} trials have not "
                   f"finished; exported from the trials that have (continue with `{result.resume}`, then export "
                   "again)"] if result.missing else [])
    return "\n".join([
        *unfinished,
        f"best trial {best.trial_id}: {metric}={best.value:.4g} (last epoch, {n_done} of {len(result.rows)} trials "
        f"reached max_t)",
        f"  {result.best_config}", f"  {result.best_trial}", f"  {result.leaderboard}",
        *( [f"  attached to MLflow run {result.attached_to_run}"] if result.attached_to_run else []),
        f"  reproduce: richkd train --config {result.best_config}",
        *front,
    ])
