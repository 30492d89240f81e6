"""Build a sweep's static report (index.html + PNGs) and log it as artifacts on the sweep's MLflow parent run."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from richkd.io import atomic_write_text, ensure_writable
from richkd.report import figures
from richkd.report.data import load_report_data
from richkd.report.importance import sweep_importances
from richkd.report.page import render_page
from richkd.tracking import attach

log = logging.getLogger(__name__)

ARTIFACT_DIR = "report"


@dataclass
class ReportResult:
    index: Path
    images: list                         # PNG paths written beside index.html
    importances: object                  # richkd.report.importance.Importances
    n_trials: int
    mlflow_run_id: Optional[str] = None  # the parent run the files were logged to
    notes: list = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return self.index.parent


def build_report(sweep: str, storage: Optional[str] = None, tracking_uri: Optional[str] = None,
                 out_dir: Optional[str] = None, log_mlflow: bool = True) -> ReportResult:
    """Write <out_dir>/index.html (default out_dir: <sweep folder>/report) and its PNGs for a sweep name or folder,
    finished, running or interrupted; the sweep loader's SpecError / ExportError for an unknown or empty sweep."""
    what = "the report folder" + (" (--out)" if out_dir else "")
    if out_dir:   # before reading the sweep, so a bad --out is the one error shown
        ensure_writable(out_dir, what, create=False)
    data = load_report_data(sweep, storage, tracking_uri, out_dir)
    out = ensure_writable(data.out_dir, what)
    importances = sweep_importances(data)
    images: dict = {}   # key -> <key>.png beside index.html (pareto: multi-objective sweeps only)
    for key, draw in (("curves", figures.learning_curves), ("budget", figures.budget_progress),
                      ("params", figures.param_slice),
                      ("importances", lambda _, p: figures.importance_bars(importances, p)),
                      ("pareto", figures.pareto_front)):
        if draw(data, out / f"{key}.png") is not None:
            images[key] = f"{key}.png"
        else:   # a figure not drawn this time must not leave an older PNG behind that the page no longer shows
            (out / f"{key}.png").unlink(missing_ok=True)
    record = data.record
    if not log_mlflow:
        mlflow_note = "MLflow: not logged (--no-mlflow)"
    elif not record.has_mlflow_run:
        mlflow_note = ("MLflow: the sweep ran without MLflow (no parent run id in its richkd_sweep.json); "
                       "the report was not logged")
    else:
        mlflow_note = (f"MLflow: this report is logged on the sweep's parent run {record.parent_run_id} "
                       f"({record.tracking_uri}) under {ARTIFACT_DIR}/")
    index = out / "index.html"
    written = [out / name for name in images.values()]
    atomic_write_text(index, render_page(data, importances, images, mlflow_note))
    mlflow_run = None
    if log_mlflow and record.has_mlflow_run:   # re-running the report replaces the files
        if attach(record.tracking_uri, record.parent_run_id, [index, *written], ARTIFACT_DIR):
            mlflow_run = record.parent_run_id
        else:   # a down tracking server must not cost the user the report itself
            mlflow_note = (f"MLflow: could not log the report to run {record.parent_run_id}: {record.tracking_uri} "
                           "did not take the files")
            log.warning("%s", mlflow_note)
            atomic_write_text(index, render_page(data, importances, images, mlflow_note))
    return ReportResult(index=index, images=written, importances=importances, n_trials=len(data.rows),
                        mlflow_run_id=mlflow_run, notes=[mlflow_note])
