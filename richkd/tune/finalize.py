"""Re-train a sweep's top-K configs (Pareto-front members, in a multi-objective sweep) over several seeds, each
(finalist, seed) a Ray task, and report their test top-1, mean and sample std: the only sweep command that reads the
test split (docs/architecture.md, "Data flow", 11). The sweep's short ASHA schedule misranks step-LR recipes
(docs/method.md, "Recipes"), so `finalize.overrides` restore the full one; finalists train on the whole training
split unless `holdout`, the only case where a best finalist (by validation) is registered in MLflow."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import ray

from richkd.config import Config
from richkd.io import atomic_path, atomic_write_text, ensure_writable
from richkd.schema import ConfigError, parse_override
from richkd.pareto import finite
from richkd.tracking import KIND_TAG, NODE_TAG, SWEEP_TAG, TRIAL_TAG, RunWriter
from richkd.trainer import Run
from richkd.tune.cache_tasks import build_caches
from richkd.tune.cluster import check_trial_resources, current_node_id, say, use_task_resources, wait_each
from richkd.tune.node_check import SweepNeeds, raise_if_unmet, sweep_needs
from richkd.tune.results import (SweepRecord, best_trial, compute_front, load_sweep, output_dir, shown_config,
                                 survivors)
from richkd.tune.session import ray_session
from richkd.validate import check_resources

log = logging.getLogger(__name__)

FINALISTS = "finalists.csv"
RUNS_FOLDER = "finalists"
RUN_FILES = ("student.pt", "config.yaml", "result.json")   # what richkd.trainer.Run.save_outputs writes
PARENT = "parent"


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
    def std(self) -> float:   # sample std over seeds (n - 1); 0 for a single seed
        return statistics.stdev(self.test_top1) if len(self.test_top1) > 1 else 0.0

    @property
    def key(self) -> str:
        return f"finalist{self.rank}"


@dataclass
class FinalizeResult:
    finalists: list
    csv_path: Path
    parent_run_id: Optional[str] = None
    registered: Optional[dict] = None     # {"name", "version", "rank", "metric"} of the registered best student
    holdout: bool = False                 # trained with the validation hold-out (what registration chooses by)


@dataclass(frozen=True)
class SeedJob:   # one finalist trained with one seed
    rank: int
    trial_id: str
    seed: int
    config: Config

    @property
    def key(self) -> str:
        return f"finalist{self.rank}-seed{self.seed}"


def finalize_sweep(sweep: str, *, top: Optional[int] = None, seeds: Optional[int] = None,
                   storage: Optional[str] = None, tracking_uri: Optional[str] = None,
                   overrides: Mapping[str, Any] | Sequence[str] = (), progress: bool = False,
                   out_dir: Optional[str] = None, holdout: bool = False, address: Optional[str] = None,
                   num_cpus: Optional[int] = None, force: bool = False) -> FinalizeResult:
    """`holdout`: keep the sweep's validation hold-out (default: data.val_fraction 0, the whole training split).
    `address`: the Ray cluster to train on (None: an embedded Ray of `num_cpus` CPUs on this machine).
    `force`: replace the finalists of an earlier finalize in the same output folder (else that is refused)."""
    spec, path, record, rows = load_sweep(sweep, storage, tracking_uri)
    best_trial(rows, spec)  # raises a clear error when no trial reached max_t
    top = spec.finalize.top if top is None else top   # >= 1: checked by the spec and the CLI (0 is no "default")
    n_seeds = spec.finalize.seeds if seeds is None else seeds
    extra = dict(overrides) if isinstance(overrides, Mapping) else dict(parse_override(o) for o in overrides)
    chosen = (compute_front(rows, spec, list(spec.tune.objective_pairs)) if spec.tune.multi_objective
              else survivors(rows))[:top]
    results: list[FinalistResult] = []
    jobs: list[SeedJob] = []
    # without holdout the whole training split, as the paper (validation-only metrics go with the hold-out)
    whole = {} if holdout else {"data.val_fraction": 0.0, "robustness.enabled": False}
    for rank, row in enumerate(chosen, start=1):
        cfg = row.config.with_overrides({**spec.finalize.overrides, **whole, **extra})
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
    runs = FinalistRuns(record) if record.has_mlflow_run else None
    with ray_session(address, num_cpus, next_step="run finalize again, with --force, once a cluster is up"):
        if address is None:
            check_trial_resources(spec.tune)
        for p in earlier:   # --force, and every check passed: the earlier finalists go
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        _train(spec, jobs, results, folder, runs, progress)
    if runs:
        runs.put("summary", PARENT, {f"finalist{f.rank}_test_top1_{k}": getattr(f, k) for f in results
                                     for k in ("mean", "std")})
        if holdout:   # without a validation split there is nothing to choose by (describe_finalize says so)
            runs.register_best(results, spec.tune.objective_pairs[0])
        delivered = runs.done(results)   # the run ids finalists.csv names
    atomic_write_text(folder / FINALISTS, finalists_csv(results, spec.space_keys))
    if runs:
        runs.put("artifact", PARENT, str(folder / FINALISTS), "export")
        runs.drain(None if delivered else 0)   # MLflow down: done() waited once already and said so
    return FinalizeResult(finalists=results, csv_path=folder / FINALISTS, holdout=holdout,
                          parent_run_id=record.parent_run_id if runs else None,
                          registered=runs.registered if runs else None)


def _train(spec, jobs: list, results: list, folder: Path, runs: Optional["FinalistRuns"], progress: bool) -> None:
    """Caches (the test split's too: the final evaluation and Fig. 1 read them), then every (finalist, seed) as a
    Ray task; results are recorded as they arrive."""
    t = spec.tune
    configs = [job.config for job in jobs]
    caches = build_caches(configs, cpu=t.cpu, gpu=t.gpu, progress=progress, splits=("train", "test"))
    needs = sweep_needs(configs, sorted({p for paths in caches.paths for p in paths}), None)
    metric = t.objective_pairs[0][0]
    by_rank = {fin.rank: fin for fin in results}
    done: dict = {}
    if runs:
        for fin in results:
            runs.start(fin.key, f"finalist-{fin.rank}-{fin.trial_id}", PARENT, {
                KIND_TAG: "finalist", SWEEP_TAG: runs.sweep, TRIAL_TAG: fin.trial_id, "richkd.rank": str(fin.rank),
                "richkd.sampled": json.dumps(fin.sampled, default=str)})
        for j in jobs:
            runs.start(j.key, f"finalist-{j.rank}-seed{j.seed}", by_rank[j.rank].key,
                       {KIND_TAG: "finalist_seed", TRIAL_TAG: j.trial_id, "richkd.seed": str(j.seed)})
            runs.put("params", j.key, j.config.to_flat_dict())

    def on_done(job: SeedJob, res: dict) -> None:
        res["folder"] = folder / RUNS_FOLDER / job.key
        for name, blob in res.pop("files").items():
            with atomic_path(res["folder"] / name) as tmp:
                tmp.write_bytes(blob)
        done[job.key] = res
        say(f"finalist {job.rank} (trial {job.trial_id}), seed {job.seed}: test top-1 "
            f"{res['test_metrics'].get('test_top1', float('nan')):.2f} after {res['epochs_run']} epochs "
            f"[{len(done)}/{len(jobs)}]", progress)
        if runs:
            runs.finish_seed(job.key, res)
        fin = by_rank[job.rank]
        keys = [f"{fin.key}-seed{s}" for s in fin.seeds]
        if all(k in done for k in keys):   # the finalist's results, in seed order
            for res in (done[k] for k in keys):
                fin.test_top1.append(float(res["test_metrics"].get("test_top1", float("nan"))))
                fin.val_top1.append(float(res["metrics"].get("val_top1", float("nan"))))
                fin.val_metric.append(float(res["metrics"].get(metric, float("nan"))))
                fin.workers.append({"pid": res["pid"], "node_id": res["node_id"]})
                fin.folders.append(res["folder"])
                fin.teachers = {k: v for k, v in res["test_metrics"].items() if k.startswith(("teacher_", "fused_"))}
            if runs:
                runs.finish_finalist(fin)

    def on_failed(job: SeedJob) -> None:
        if runs:
            runs.end(job.key, "FAILED")
            runs.end(by_rank[job.rank].key, "FAILED")

    try:
        run_seed_jobs(jobs, cpu=t.cpu, gpu=t.gpu, needs=needs, max_retries=t.max_failures, on_done=on_done,
                      on_failed=on_failed)
    except BaseException:
        if runs:   # the cancelled seeds, then their finalists (also on Ctrl-C): never left RUNNING
            for key in reversed(list(runs.open)):
                runs.end(key, "KILLED")
            runs.drain()
        raise


# ----- the trainings, as Ray tasks ---------------------------------------------------------------------------

def train_seed(config: dict, cpu: float, gpu: float, needs: Optional[SweepNeeds] = None) -> dict:
    """Check this node, train as `richkd train` does with the test split evaluated; the results, files as bytes."""
    raise_if_unmet(needs, "this node")
    cfg = Config.from_dict(config)
    use_task_resources(cpu, gpu, f"finalist {cfg.name} (seed {cfg.seed})")
    run = Run(cfg)
    result = run.train(final=True)
    with tempfile.TemporaryDirectory(prefix="richkd-finalist-") as tmp:
        run.save_outputs(result, tmp)
        files = {name: (Path(tmp) / name).read_bytes() for name in RUN_FILES}
    return {"metrics": result.metrics, "test_metrics": result.test_metrics, "history": result.history,
            "best_val_top1": result.best_val_top1, "epochs_run": result.epochs_run, "files": files,
            "pid": os.getpid(), "node_id": current_node_id()}


def run_seed_jobs(jobs: list[SeedJob], *, cpu: float, gpu: float, needs: Optional[SweepNeeds] = None,
                  max_retries: int = 0, on_done: Callable[[SeedJob, dict], None],
                  on_failed: Callable[[SeedJob], None]) -> None:
    """Every job submitted at once, as richkd.tune.cluster.wait_each runs them. `max_retries` retries tasks whose node
    died, not errors."""
    remote = ray.remote(train_seed).options(num_cpus=cpu, num_gpus=gpu, max_retries=max_retries)
    wait_each({remote.remote(job.config.to_dict(), cpu, gpu, needs): job for job in jobs}, on_done, on_failed)


# ----- MLflow ------------------------------------------------------------------------------------------------

class FinalistRuns(RunWriter):
    """A run per finalist (key `finalist<R>`) under the sweep's parent run, a nested run per seed (`-seed<S>`)."""

    def __init__(self, record: SweepRecord) -> None:
        super().__init__(record.tracking_uri)
        self.experiment_id, self.sweep = record.experiment_id, record.name
        self.runs[PARENT] = record.parent_run_id
        self.open: list = []      # keys of runs started here and not yet ended
        self.registered: Optional[dict] = None    # {"name", "version", "rank", "metric"} once registered

    def start(self, key: str, name: str, parent: str, tags: dict) -> None:
        self.put("run", key, self.experiment_id, name, tags, parent)
        self.open.append(key)

    def end(self, key: str, status: str) -> None:
        if key in self.open:
            self.open.remove(key)
            self.send("end", key, status)

    def finish_seed(self, key: str, res: dict) -> None:   # history (step = epoch), test metrics as final_*, node
        self.put("history", key, [(int(e["epoch"]), {k: v for k, v in e.items() if finite(v)})
                                  for e in res["history"]])
        self.put("summary", key, {f"final_{k}": v for k, v in res["test_metrics"].items() if finite(v)})
        self.put("tags", key, {NODE_TAG: res["node_id"] or "", "richkd.worker_pid": res["pid"]})
        self.end(key, "FINISHED")

    def finish_finalist(self, fin: FinalistResult) -> None:
        """Mean/std metrics; the student of its first seed (the one its config.yaml reproduces) as a logged model."""
        self.put("summary", fin.key, {k: v for k, v in {"test_top1_mean": fin.mean, "test_top1_std": fin.std,
                                                        "val_top1_mean": _mean(fin.val_top1)}.items() if finite(v)})
        self.put("model", fin.key, str(fin.folders[0]), "student", {"seed": fin.seeds[0]},
                 {"richkd.sweep": self.sweep, "richkd.trial_id": fin.trial_id, "richkd.rank": fin.rank})
        self.end(fin.key, "FINISHED")

    def register_best(self, results: list, objective: tuple) -> None:
        """Register the finalist with the best mean validation metric (the sweep's first objective; val_top1 if no
        finalist reported it); once written, `registered` and a tag of the parent run name the version."""
        metric, mode = objective
        idx = best_index([_mean(f.val_metric) for f in results], mode)
        if idx is None:
            metric, mode = "val_top1", "max"
            idx = best_index([_mean(f.val_top1) for f in results], mode)
        if idx is None:
            log.warning("no finalist has a finite validation metric: no model was registered")
            return
        best = results[idx]
        self.put("register", best.key, f"richkd-{self.sweep}",
                 f"Best finalist student of RichKD sweep {self.sweep} (richkd finalize)",
                 {"richkd.sweep": self.sweep, "richkd.rank": best.rank, "richkd.trial_id": best.trial_id,
                  "richkd.selected_by": f"mean {metric} ({mode}) on the validation split over seeds {best.seeds}"},
                 {"rank": best.rank, "metric": metric})

    def _op_register(self, key: str, name: str, description: str, tags: dict, info: Optional[dict] = None) -> None:
        super()._op_register(key, name, description, tags)
        self.client.set_tag(self.runs[PARENT], "richkd.registered_model", f"{name}/{self.versions[name]}")
        self.registered = {"name": name, "version": self.versions[name], **(info or {})}

    def done(self, results: list) -> bool:
        """Wait for every write, then note each finalist's run ids and logged model; False if MLflow did not take
        them all."""
        delivered = self.drain()
        if not delivered:
            log.error("MLflow at %s did not take %d writes of this finalize; the finalists' files and "
                      "finalists.csv hold every number", self.tracking_uri, len(self.outbox))
        for fin in results:
            fin.run_id, fin.model_id = self.runs.get(fin.key), self.models.get(fin.key)
            fin.runs = [self.runs.get(f"{fin.key}-seed{s}") for s in fin.seeds]
        return delivered


def best_index(values: Sequence[float], mode: str) -> Optional[int]:   # the first on ties; None: none finite
    kept = [i for i, v in enumerate(values) if finite(v)]
    return (max if mode == "max" else min)(kept, key=values.__getitem__) if kept else None


def _mean(values: list) -> float:
    kept = [v for v in values if math.isfinite(v)]
    return statistics.fmean(kept) if kept else float("nan")


# ----- what the user reads -------------------------------------------------------------------------------------

def finalists_csv(results: list, space_keys: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "trial_id", "seed", "test_top1", "val_top1", "test_top1_mean", "test_top1_std",
                *space_keys, "mlflow_run_id"])
    for fin in results:
        params = [fin.sampled.get(k, "") for k in space_keys]
        for seed, test, val, run in zip(fin.seeds, fin.test_top1, fin.val_top1, fin.runs or [None] * len(fin.seeds)):
            w.writerow([fin.rank, fin.trial_id, seed, f"{test:.6g}", f"{val:.6g}", "", "", *params, run or ""])
        w.writerow([fin.rank, fin.trial_id, "mean/std", "", "", f"{fin.mean:.6g}", f"{fin.std:.6g}", *params, ""])
    return buf.getvalue()


def describe_finalize(result: FinalizeResult) -> str:
    lines = [f"finalists ({len(result.finalists)}), test top-1 over seeds (mean ± sample std):"]
    for fin in result.finalists:
        lines.append(f"  #{fin.rank} trial {fin.trial_id}: {fin.mean:.2f} ± {fin.std:.2f} "
                     f"(seeds {fin.seeds})  {shown_config(fin.sampled)}")
        if "fused_test_confident_correct_pct" in fin.teachers:   # the paper's Fig. 1, on the test split
            pct = {k: f"{v:.1f}%" for k, v in fin.teachers.items()}
            lines.append("     test split, teacher -> fused teacher: " + ", ".join(
                f"{k.replace('_', '-')} {pct[f'teacher_test_{k}_pct']} -> {pct[f'fused_test_{k}_pct']}"
                for k in ("confident_correct", "confidently_wrong")))
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
