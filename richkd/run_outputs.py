"""What a finished single run leaves in its folder: the student as a loadable checkpoint, its config, its result.

`student.pt` is in the mdistiller format, so the run can serve as a teacher (`teacher.checkpoint`) or be
evaluated (`richkd evaluate`, which finds `config.yaml` next to it).
"""
from __future__ import annotations

import json
from pathlib import Path

from richkd.io import atomic_write_text
from richkd.models import save_model_checkpoint


def save_run_outputs(run, result, out_dir: str | Path) -> Path:
    """Write student.pt, config.yaml and result.json into out_dir; return the student's path."""
    out = Path(out_dir)
    model_path = out / "student.pt"
    save_model_checkpoint(run.student, model_path, arch=run.cfg.student.arch, num_classes=run.data.num_classes)
    atomic_write_text(out / "config.yaml", run.cfg.to_yaml())
    summary = {"config": run.cfg.to_dict(), "metrics": result.metrics, "best_val_top1": result.best_val_top1,
               "test_metrics": result.test_metrics, "model": str(model_path)}
    atomic_write_text(out / "result.json", json.dumps(summary, indent=1, default=float))
    return model_path
