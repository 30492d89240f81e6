"""Re-train a sweep's top-K configs on the full schedule over several seeds and report test accuracy mean/std.

This is the only sweep command that reads the test split (run_training(final=True)); selection of the K
configs used the validation split only. The sweep's shortened ASHA schedule misranks step-LR recipes at early
rungs (docs/method.md, "Recipes"), so `finalize.overrides` in the spec (e.g. train.epochs: 240, optim.schedule: step)
restore the paper's full schedule here. Finalists train on the whole training split (data.val_fraction 0, as the
paper; `holdout=True` keeps the sweep's split) and report the last epoch's test top-1 and the teachers' Fig. 1
analysis on the test split (docs/method.md#what-a-sweep-should-search). In a multi-objective sweep the finalists
are Pareto-front members (the trade-offs the sweep found), in the order of the first objective; trials off the
front are never re-run.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

FINALISTS = "finalists.csv"


@dataclass
class FinalistResult:
    rank: int
    trial_id: str
    sampled: dict
    seeds: list
    test_top1: list
    val_top1: list
    runs: list = field(default_factory=list)   # MLflow run ids per seed
    teachers: dict = field(default_factory=dict)   # test-split Fig. 1 analysis (teacher_* / fused_*), seed-free

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_top1)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (n - 1); 0 for a single seed."""
        return statistics.stdev(self.test_top1) if len(self.test_top1) > 1 else 0.0


@dataclass
class FinalizeResult:
    finalists: list
    csv_path: Path
    parent_run_id: Optional[str] = None


def finalize_sweep(sweep: str, *, top: Optional[int] = None, seeds: Optional[int] = None,
                   storage: Optional[str] = None, tracking_uri: Optional[str] = None,
                   overrides: Mapping[str, Any] | Sequence[str] = (), progress: bool = False,
                   out_dir: Optional[str] = None, holdout: bool = False) -> FinalizeResult:
    from richkd.cache import prepare_caches
    from richkd.config import ConfigError, parse_override
    from richkd.tune.selection import best_trial, load_sweep, output_dir
    from richkd.io import atomic_write_text
    from richkd.trainer import run_training
    from richkd.tune.results import survivors
    from richkd.validate import check_resources

    spec, path, record, rows = load_sweep(sweep, storage, tracking_uri)
    best_trial(rows, spec)  # raises a clear error when no trial reached max_t
    top = top or spec.finalize.top
    n_seeds = seeds or spec.finalize.seeds
    if top < 1 or n_seeds < 1:
        raise ConfigError("finalize: --top and --seeds must be >= 1")
    extra = dict(overrides) if isinstance(overrides, Mapping) else dict(parse_override(o) for o in overrides)
    if spec.tune.multi_objective:
        from richkd.tune.selection import compute_front

        chosen = compute_front(rows, spec, list(spec.tune.objective_pairs))[:top]
    else:
        chosen = survivors(rows)[:top]
    tracker = _Tracker(record) if record.has_mlflow_run else None
    results: list[FinalistResult] = []
    for rank, row in enumerate(chosen, start=1):
        cfg = row.config.with_overrides(spec.finalize.overrides)
        if not holdout:  # the whole training split, as the paper (validation-only metrics go with the hold-out)
            cfg = cfg.with_overrides({"data.val_fraction": 0.0, "robustness.enabled": False})
        if extra:
            cfg = cfg.with_overrides(extra)
        check_resources(cfg)
        seeds_list = [cfg.seed + i for i in range(n_seeds)]
        fin = FinalistResult(rank=rank, trial_id=row.trial_id, sampled=row.sampled, seeds=seeds_list,
                             test_top1=[], val_top1=[])
        group = tracker.start_finalist(rank, row, cfg) if tracker else None
        for seed in seeds_list:
            cfg_s = cfg.with_overrides({"seed": seed})
            prepare_caches(cfg_s, progress=progress, splits=("train", "test"))
            run_id = tracker.start_seed(group, cfg_s, rank, row.trial_id, seed) if tracker else None
            on_epoch = tracker.epoch_logger(run_id) if tracker else None
            log.info("finalist %d (trial %s), seed %d: %d epochs", rank, row.trial_id, seed, cfg_s.train.epochs)
            try:
                result = run_training(cfg_s, on_epoch=on_epoch, final=True, progress=progress)
            except Exception:
                if tracker:
                    tracker.end(run_id, "FAILED")
                    tracker.end(group, "FAILED")
                raise
            test = result.test_metrics.get("test_top1", float("nan"))
            fin.test_top1.append(float(test))
            fin.val_top1.append(float(result.metrics.get("val_top1", float("nan"))))
            fin.runs.append(run_id)
            fin.teachers = {k: v for k, v in result.test_metrics.items() if k.startswith(("teacher_", "fused_"))}
            if tracker:
                tracker.log(run_id, {f"final_{k}": v for k, v in result.test_metrics.items()})
                tracker.end(run_id, "FINISHED")
        if tracker:
            tracker.log(group, {"test_top1_mean": fin.mean, "test_top1_std": fin.std,
                                "val_top1_mean": statistics.fmean(fin.val_top1)})
            tracker.end(group, "FINISHED")
        results.append(fin)
    folder = Path(out_dir) if out_dir else output_dir(path, spec.name)
    csv_path = folder / FINALISTS
    atomic_write_text(csv_path, finalists_csv(results, spec.space_keys))
    if tracker:
        tracker.summary(results, csv_path)
    return FinalizeResult(finalists=results, csv_path=csv_path,
                          parent_run_id=record.parent_run_id if tracker else None)


def finalists_csv(results: list, space_keys: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "trial_id", "seed", "test_top1", "val_top1", "test_top1_mean", "test_top1_std",
                *space_keys, "mlflow_run_id"])
    for fin in results:
        params = [fin.sampled.get(k, "") for k in space_keys]
        for seed, test, val, run in zip(fin.seeds, fin.test_top1, fin.val_top1, fin.runs):
            w.writerow([fin.rank, fin.trial_id, seed, f"{test:.6g}", f"{val:.6g}", "", "", *params, run or ""])
        w.writerow([fin.rank, fin.trial_id, "mean/std", "", "", f"{fin.mean:.6g}", f"{fin.std:.6g}", *params, ""])
    return buf.getvalue()


def describe_finalize(result: FinalizeResult) -> str:
    lines = [f"finalists ({len(result.finalists)}), test top-1 over seeds (mean ± sample std):"]
    for fin in result.finalists:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fin.sampled.items())
        lines.append(f"  #{fin.rank} trial {fin.trial_id}: {fin.mean:.2f} ± {fin.std:.2f} "
                     f"(seeds {fin.seeds})  {shown}")
        t = fin.teachers
        if "fused_test_confident_correct_pct" in t:   # the paper's Fig. 1, on the test split
            pct = {k: f"{v:.1f}%" for k, v in t.items()}
            lines.append(f"     test split, teacher -> fused teacher: confident-correct "
                         f"{pct['teacher_test_confident_correct_pct']} -> {pct['fused_test_confident_correct_pct']}, "
                         f"confidently-wrong {pct['teacher_test_confidently_wrong_pct']} -> "
                         f"{pct['fused_test_confidently_wrong_pct']}")
    lines.append(f"  {result.csv_path}")
    return "\n".join(lines)


class _Tracker:
    """Finalist runs under the sweep's parent run: one per finalist, one nested run per seed."""

    def __init__(self, record) -> None:
        from richkd.tune.mlflow_client import client_for

        self.client = client_for(record.tracking_uri)
        self.experiment_id = record.experiment_id
        self.parent = record.parent_run_id
        self.sweep = record.name

    def start_finalist(self, rank: int, row, cfg) -> str:
        from richkd.tune.mlflow_client import KIND_TAG, PARENT_TAG, SWEEP_TAG, TRIAL_TAG

        run = self.client.create_run(self.experiment_id, run_name=f"finalist-{rank}-{row.trial_id}", tags={
            PARENT_TAG: self.parent, KIND_TAG: "finalist", SWEEP_TAG: self.sweep, TRIAL_TAG: row.trial_id,
            "richkd.rank": str(rank), "richkd.sampled": json.dumps(row.sampled, default=str)})
        return run.info.run_id

    def start_seed(self, group: str, cfg, rank: int, trial_id: str, seed: int) -> str:
        from richkd.tune.mlflow_client import KIND_TAG, PARENT_TAG, TRIAL_TAG, log_params

        run = self.client.create_run(self.experiment_id, run_name=f"finalist-{rank}-seed{seed}", tags={
            PARENT_TAG: group, KIND_TAG: "finalist_seed", TRIAL_TAG: trial_id, "richkd.seed": str(seed)})
        log_params(self.client, run.info.run_id, cfg.to_flat_dict())
        return run.info.run_id

    def epoch_logger(self, run_id: str):
        from richkd.tune.mlflow_client import log_metrics

        def on_epoch(report) -> None:
            metrics = {k: float(v) for k, v in report.metrics.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            log_metrics(self.client, run_id, metrics, step=report.epoch)

        return on_epoch

    def log(self, run_id: str, metrics: dict) -> None:
        from richkd.tune.mlflow_client import log_metrics

        log_metrics(self.client, run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def end(self, run_id: Optional[str], status: str) -> None:
        if run_id:
            self.client.set_terminated(run_id, status=status)

    def summary(self, results: list, csv_path: Path) -> None:
        from richkd.tune.mlflow_client import log_metrics

        metrics = {}
        for fin in results:
            metrics[f"finalist{fin.rank}_test_top1_mean"] = fin.mean
            metrics[f"finalist{fin.rank}_test_top1_std"] = fin.std
        log_metrics(self.client, self.parent, metrics)
        self.client.log_artifact(self.parent, str(csv_path), artifact_path="export")
