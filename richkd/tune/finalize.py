"""Re-train a sweep's top-K configs on the full schedule over several seeds and report test accuracy mean/std.

This is the only sweep command that reads the test split (run_training(final=True)); selection of the K
configs used the validation split only. The sweep's shortened ASHA schedule misranks step-LR recipes at early
rungs (docs/method.md, "Recipes"), so `finalize.overrides` in the spec (e.g. train.epochs: 240, optim.schedule: step)
restore the paper's full schedule here. Finalists train on the whole training split (data.val_fraction 0, as the
paper; `holdout=True` keeps the sweep's split) and report the last epoch's test top-1 and the teachers' Fig. 1
analysis on the test split (docs/method.md#what-a-sweep-should-search). In a multi-objective sweep the finalists
are Pareto-front members (the trade-offs the sweep found), in the order of the first objective; trials off the
front are never re-run.

Every (finalist, seed) training is a Ray task with the sweep's resources (richkd.tune.finalize_tasks), run in
parallel on the workers, never in the driver; so are the caches they read, the test split's included
(richkd.tune.cache_tasks). The Fig. 1 analysis is computed inside the task and returned with its test metrics.
The driver writes each run's files under `<export folder>/finalists/finalist<R>-seed<S>/` and all of MLflow: a
run per finalist (its student as a logged model, richkd.tune.mlflow_models) with a nested run per seed, and the
best finalist registered as `richkd-<sweep>`. "Best" is the highest mean of the sweep's metric on the validation
split over the seeds, never the test split: the test numbers stay an unbiased report of the chosen model. Without
a hold-out (the default) there is no validation metric to choose by, so nothing is registered; `holdout=True`
keeps the sweep's split and the registration.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

FINALISTS = "finalists.csv"
RUNS_FOLDER = "finalists"


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
    val_metric: list = field(default_factory=list)   # the sweep's (first) metric on the validation split, per seed
    workers: list = field(default_factory=list)      # {"pid", "node_id"} of the Ray task that trained each seed
    folders: list = field(default_factory=list)      # each seed's run files (student.pt, config.yaml, result.json)
    run_id: Optional[str] = None                     # the finalist's MLflow run
    model_id: Optional[str] = None                   # its student as an MLflow logged model

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
    registered: Optional[dict] = None     # {"name", "version", "rank", "metric"} of the registered best student
    holdout: bool = False                 # trained with the validation hold-out (what registration chooses by)


def finalize_sweep(sweep: str, *, top: Optional[int] = None, seeds: Optional[int] = None,
                   storage: Optional[str] = None, tracking_uri: Optional[str] = None,
                   overrides: Mapping[str, Any] | Sequence[str] = (), progress: bool = False,
                   out_dir: Optional[str] = None, holdout: bool = False, address: Optional[str] = None,
                   num_cpus: Optional[int] = None, force: bool = False) -> FinalizeResult:
    """`holdout`: keep the sweep's validation hold-out (default: data.val_fraction 0, the whole training split).
    `address`: the Ray cluster to train on (None: an embedded Ray of `num_cpus` CPUs on this machine).
    `force`: replace the finalists of an earlier finalize in the same output folder (else that is refused)."""
    from richkd.config import ConfigError, parse_override
    from richkd.io import atomic_write_text, ensure_writable
    from richkd.tune.finalize_tasks import SeedJob
    from richkd.tune.results import survivors
    from richkd.tune.runner import check_trial_resources, ray_session
    from richkd.tune.selection import best_trial, load_sweep, output_dir
    from richkd.validate import check_resources

    spec, path, record, rows = load_sweep(sweep, storage, tracking_uri)
    best_trial(rows, spec)  # raises a clear error when no trial reached max_t
    top = spec.finalize.top if top is None else top         # 0 is refused, never "the default"
    n_seeds = spec.finalize.seeds if seeds is None else seeds
    if top < 1 or n_seeds < 1:
        raise ConfigError(f"finalize: --top and --seeds must be 1 or more (got {top} and {n_seeds}; leave one out "
                          "for the spec's finalize.top / finalize.seeds)")
    extra = dict(overrides) if isinstance(overrides, Mapping) else dict(parse_override(o) for o in overrides)
    if spec.tune.multi_objective:
        from richkd.tune.selection import compute_front

        chosen = compute_front(rows, spec, list(spec.tune.objective_pairs))[:top]
    else:
        chosen = survivors(rows)[:top]
    results: list[FinalistResult] = []
    jobs: list = []
    for rank, row in enumerate(chosen, start=1):
        cfg = row.config.with_overrides(spec.finalize.overrides)
        if not holdout:  # the whole training split, as the paper (validation-only metrics go with the hold-out)
            cfg = cfg.with_overrides({"data.val_fraction": 0.0, "robustness.enabled": False})
        if extra:
            cfg = cfg.with_overrides(extra)
        check_resources(cfg)
        seeds_list = [cfg.seed + i for i in range(n_seeds)]
        results.append(FinalistResult(rank=rank, trial_id=row.trial_id, sampled=row.sampled, seeds=seeds_list,
                                      test_top1=[], val_top1=[]))
        jobs.extend(SeedJob(rank, row.trial_id, seed, cfg.with_overrides({"seed": seed})) for seed in seeds_list)
    folder = Path(out_dir).expanduser() if out_dir else output_dir(path, spec.name)
    earlier = [p for p in (folder / FINALISTS, folder / RUNS_FOLDER) if p.exists()]
    if earlier and not force:
        raise ConfigError(f"{earlier[0]} holds the finalists of an earlier finalize; keep them and write to another "
                          "folder with --out DIR, or replace them with --force")
    folder = ensure_writable(folder, "the finalize output folder")
    tracker = _Tracker(record) if record.has_mlflow_run else None
    with ray_session(address, num_cpus, next_step="run finalize again, with --force, once a cluster is up"):
        if address is None:
            check_trial_resources(spec.tune)
        for p in earlier:   # --force, and every check passed: the earlier finalists go
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        _train(spec, jobs, results, folder, tracker, progress)
    csv_path = folder / FINALISTS
    atomic_write_text(csv_path, finalists_csv(results, spec.space_keys))
    registered = None
    if tracker:
        tracker.summary(results, csv_path)
        if holdout:   # without a validation split there is nothing to choose by (describe_finalize says so)
            registered = tracker.register_best(results, spec)
    return FinalizeResult(finalists=results, csv_path=csv_path, holdout=holdout,
                          parent_run_id=record.parent_run_id if tracker else None, registered=registered)


def _train(spec, jobs: list, results: list, folder: Path, tracker: Optional["_Tracker"], progress: bool) -> None:
    """Caches, then every (finalist, seed) as a Ray task; results are recorded as they arrive."""
    from richkd.tune.cache_tasks import build_caches
    from richkd.tune.finalize_tasks import run_seed_jobs, write_run_files
    from richkd.tune.node_check import sweep_needs

    t = spec.tune
    configs = [job.config for job in jobs]
    # the test split's caches too: the final evaluation and the Fig. 1 analysis read them
    caches = build_caches(configs, cpu=t.cpu, gpu=t.gpu, progress=progress, splits=("train", "test"))
    needs = sweep_needs(configs, sorted({p for paths in caches.paths for p in paths}), None)
    metric = t.objective_pairs[0][0]
    by_rank = {fin.rank: fin for fin in results}
    done: dict = {}
    groups = {fin.rank: tracker.start_finalist(fin) for fin in results} if tracker else {}
    seed_runs = ({(j.rank, j.seed): tracker.start_seed(groups[j.rank], j.config, j.rank, j.trial_id, j.seed)
                  for j in jobs} if tracker else {})

    def on_done(job, res: dict) -> None:
        res["folder"] = folder / RUNS_FOLDER / job.folder_name
        write_run_files(res["folder"], res.pop("files"))
        done[(job.rank, job.seed)] = res
        _say(f"finalist {job.rank} (trial {job.trial_id}), seed {job.seed}: test top-1 "
             f"{res['test_metrics'].get('test_top1', float('nan')):.2f} after {res['epochs_run']} epochs "
             f"[{len(done)}/{len(jobs)}]", progress)
        if tracker:
            tracker.finish_seed(seed_runs[(job.rank, job.seed)], res)
        fin = by_rank[job.rank]
        if all((fin.rank, s) in done for s in fin.seeds):
            _collect(fin, [done[(fin.rank, s)] for s in fin.seeds], [seed_runs.get((fin.rank, s)) for s in fin.seeds],
                     metric)
            if tracker:
                tracker.finish_finalist(groups[fin.rank], fin)

    def on_failed(job, cancelled: list) -> None:
        if tracker:
            tracker.end(seed_runs[(job.rank, job.seed)], "FAILED")
            tracker.end(groups[job.rank], "FAILED")

    try:
        run_seed_jobs(jobs, cpu=t.cpu, gpu=t.gpu, needs=needs, max_retries=t.max_failures, on_done=on_done,
                      on_failed=on_failed)
    except BaseException:
        if tracker:   # the cancelled seeds and their finalists (also on Ctrl-C): never left RUNNING
            tracker.close_open("KILLED")
        raise


def _collect(fin: FinalistResult, outcomes: list, runs: list, metric: str) -> None:
    """A finalist's per-seed results, in seed order."""
    for res, run_id in zip(outcomes, runs):
        fin.test_top1.append(float(res["test_metrics"].get("test_top1", float("nan"))))
        fin.val_top1.append(float(res["metrics"].get("val_top1", float("nan"))))
        fin.val_metric.append(float(res["metrics"].get(metric, float("nan"))))
        fin.workers.append({"pid": res["pid"], "node_id": res["node_id"]})
        fin.folders.append(res["folder"])
        fin.runs.append(run_id)
        fin.teachers = {k: v for k, v in res["test_metrics"].items() if k.startswith(("teacher_", "fused_"))}


def _say(line: str, progress: bool) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)
    else:
        log.info(line)


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
    if result.finalists and result.finalists[0].folders:
        lines.append(f"  students: {Path(result.finalists[0].folders[0]).parent}/finalist<R>-seed<S>/student.pt")
    if result.registered:
        r = result.registered
        lines.append(f"  registered in MLflow: {r['name']} version {r['version']} (finalist #{r['rank']}, best mean "
                     f"{r['metric']} on the validation split)")
    elif result.parent_run_id and not result.holdout:
        lines.append("  no model registered: the finalists trained on the whole training split, so no validation "
                     "metric can choose one (the test split never does); --holdout keeps the validation split")
    lines.append(f"  {result.csv_path}")
    return "\n".join(lines)


class _Tracker:
    """Finalist runs under the sweep's parent run: one per finalist, one nested run per seed (driver only)."""

    def __init__(self, record) -> None:
        from richkd.tune.mlflow_client import client_for

        self.client = client_for(record.tracking_uri)
        self.experiment_id = record.experiment_id
        self.parent = record.parent_run_id
        self.sweep = record.name
        self.open: list = []      # runs started here and not yet ended

    def start_finalist(self, fin: FinalistResult) -> str:
        from richkd.tune.mlflow_client import KIND_TAG, PARENT_TAG, SWEEP_TAG, TRIAL_TAG

        run = self.client.create_run(self.experiment_id, run_name=f"finalist-{fin.rank}-{fin.trial_id}", tags={
            PARENT_TAG: self.parent, KIND_TAG: "finalist", SWEEP_TAG: self.sweep, TRIAL_TAG: fin.trial_id,
            "richkd.rank": str(fin.rank), "richkd.sampled": json.dumps(fin.sampled, default=str)})
        fin.run_id = run.info.run_id
        self.open.append(run.info.run_id)
        return run.info.run_id

    def start_seed(self, group: str, cfg, rank: int, trial_id: str, seed: int) -> str:
        from richkd.tune.mlflow_client import KIND_TAG, PARENT_TAG, TRIAL_TAG, log_params

        run = self.client.create_run(self.experiment_id, run_name=f"finalist-{rank}-seed{seed}", tags={
            PARENT_TAG: group, KIND_TAG: "finalist_seed", TRIAL_TAG: trial_id, "richkd.seed": str(seed)})
        self.open.append(run.info.run_id)
        log_params(self.client, run.info.run_id, cfg.to_flat_dict())
        return run.info.run_id

    def finish_seed(self, run_id: str, res: dict) -> None:
        """The task's per-epoch history (step = epoch), its test metrics as final_*, where it ran; FINISHED."""
        from mlflow.entities import Metric

        from richkd.tune.mlflow_client import NODE_TAG, set_tags

        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, int(epoch["epoch"])) for epoch in res["history"]
                   for k, v in epoch.items() if _loggable(v)]
        for i in range(0, len(entries), 1000):
            self.client.log_batch(run_id, metrics=entries[i:i + 1000], synchronous=True)
        self.log(run_id, {f"final_{k}": v for k, v in res["test_metrics"].items()})
        set_tags(self.client, run_id, {NODE_TAG: res["node_id"] or "", "richkd.worker_pid": res["pid"]})
        self.end(run_id, "FINISHED")

    def finish_finalist(self, run_id: str, fin: FinalistResult) -> None:
        """Mean/std metrics and the student of the finalist's first seed (the one its config.yaml reproduces as
        is) as an MLflow logged model on the finalist run; FINISHED."""
        from richkd.tune.mlflow_models import log_student_model

        self.log(run_id, {"test_top1_mean": fin.mean, "test_top1_std": fin.std,
                          "val_top1_mean": statistics.fmean(fin.val_top1)})
        fin.model_id = log_student_model(self.client, self.experiment_id, run_id, Path(fin.folders[0]),
                                         params={"seed": fin.seeds[0]},
                                         tags={"richkd.sweep": self.sweep, "richkd.trial_id": fin.trial_id,
                                               "richkd.rank": fin.rank})
        self.end(run_id, "FINISHED")

    def register_best(self, results: list, spec) -> Optional[dict]:
        """Register the finalist with the best mean validation metric (the sweep's first objective; val_top1 if
        no finalist reported it) in the model registry; the parent run gets a tag naming the version."""
        from richkd.tune.mlflow_client import set_tags
        from richkd.tune.mlflow_models import best_index, register_model, registered_name

        metric, mode = spec.tune.objective_pairs[0]
        idx = best_index([_mean(f.val_metric) for f in results], mode)
        if idx is None:
            metric, mode = "val_top1", "max"
            idx = best_index([_mean(f.val_top1) for f in results], mode)
        if idx is None or results[idx].model_id is None:
            log.warning("no finalist has a finite validation metric: no model was registered")
            return None
        best, name = results[idx], registered_name(self.sweep)
        version = register_model(self.client, name, best.model_id, best.run_id, tags={
            "richkd.sweep": self.sweep, "richkd.rank": best.rank, "richkd.trial_id": best.trial_id,
            "richkd.selected_by": f"mean {metric} ({mode}) on the validation split over seeds {best.seeds}"},
            description=f"Best finalist student of RichKD sweep {self.sweep} (richkd finalize)")
        set_tags(self.client, self.parent, {"richkd.registered_model": f"{name}/{version.version}"})
        return {"name": name, "version": str(version.version), "rank": best.rank, "metric": metric}

    def log(self, run_id: str, metrics: dict) -> None:
        from richkd.tune.mlflow_client import log_metrics

        log_metrics(self.client, run_id, {k: v for k, v in metrics.items() if _loggable(v)})

    def end(self, run_id: Optional[str], status: str) -> None:
        if run_id:
            self.client.set_terminated(run_id, status=status)
            if run_id in self.open:
                self.open.remove(run_id)

    def close_open(self, status: str) -> None:
        """End every run still open (seeds first, as they were started after their finalist); never raises, so
        the error that got here is the one reported."""
        for run_id in reversed(list(self.open)):
            try:
                self.end(run_id, status)
            except Exception as exc:
                log.warning("could not close the MLflow run %s: %s", run_id, exc)

    def summary(self, results: list, csv_path: Path) -> None:
        from richkd.tune.mlflow_client import log_metrics

        metrics = {}
        for fin in results:
            metrics[f"finalist{fin.rank}_test_top1_mean"] = fin.mean
            metrics[f"finalist{fin.rank}_test_top1_std"] = fin.std
        log_metrics(self.client, self.parent, metrics)
        self.client.log_artifact(self.parent, str(csv_path), artifact_path="export")


def _loggable(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: list) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")
