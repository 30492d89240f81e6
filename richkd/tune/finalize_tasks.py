"""finalize's trainings as Ray tasks: one task per (finalist, seed) on the workers, with the sweep's resources.

Why tasks: a finalist retrains on the full schedule (often hundreds of epochs), which belongs on the cluster's
accelerators, in parallel, not in the driver process. A task runs the same training as `richkd train`
(richkd.trainer.Run + train(final=True), what run_training does) and returns plain values: the metrics, the
per-epoch history and the files of the run (student.pt, config.yaml, result.json) as bytes. Returning bytes,
not a path, means the student reaches the driver whether or not the export folder is shared storage. MLflow is
written by the driver only (docs/architecture.md, "Tracking").
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from richkd.config import Config
from richkd.tune.node_check import SweepNeeds, raise_if_unmet

log = logging.getLogger(__name__)

RUN_FILES = ("student.pt", "config.yaml", "result.json")   # what richkd.trainer.Run.save_outputs writes


@dataclass(frozen=True)
class SeedJob:
    """One finalist trained with one seed."""
    rank: int
    trial_id: str
    seed: int
    config: Config

    @property
    def folder_name(self) -> str:
        return f"finalist{self.rank}-seed{self.seed}"


def train_seed(config: dict, cpu: float, gpu: float, needs: Optional[SweepNeeds] = None) -> dict:
    """The task body: check this node, train on the full schedule with the test split evaluated, return the
    results and the run's files (bytes)."""
    from richkd.trainer import Run
    from richkd.tune.cluster import current_node_id, use_task_resources

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
                  on_failed: Callable[[SeedJob, list], None]) -> None:
    """Submit every job at once (Ray runs as many as the cluster's resources allow) and hand each result to
    on_done as it arrives. On the first failure the others are cancelled, on_failed(job, cancelled jobs) runs
    and the task's own error is raised. `max_retries` retries tasks whose node died (not training errors)."""
    import ray

    remote = ray.remote(train_seed).options(num_cpus=cpu, num_gpus=gpu, max_retries=max_retries)
    pending = {remote.remote(job.config.to_dict(), cpu, gpu, needs): job for job in jobs}
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ref)
        try:
            result = ray.get(ref)
        except Exception as exc:
            for other in pending:
                ray.cancel(other, force=True)
            on_failed(job, list(pending.values()))
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, Exception) else exc) from None
        try:
            on_done(job, result)
        except BaseException:
            for other in pending:
                ray.cancel(other, force=True)
            raise


def write_run_files(folder: Path, files: dict) -> Path:
    """The task's run files into folder (atomically each); returns the student's path."""
    from richkd.io import atomic_path

    for name, blob in files.items():
        with atomic_path(folder / name) as tmp:
            tmp.write_bytes(blob)
    return folder / "student.pt"
