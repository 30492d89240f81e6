"""Run, resume and describe sweeps: Ray start-up, caches before trials, MLflow parent run, Tuner / Tuner.restore."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from richkd.cache.signature import cache_signature
from richkd.provenance import code_version
from richkd.tune.errors import SpecError
from richkd.tune.paths import is_shared_filesystem
from richkd.tune.spec import SweepSpec
from richkd.tune.sweep_record import SweepRecord, sweep_record_exists, write_sweep_record

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 * 2**20      # small machines: trials share caches by path, not through the store


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


# ----- Ray ---------------------------------------------------------------------------------------------

def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, verbose: bool = False) -> bool:
    """Connect to `address` or start an embedded local Ray sized for this machine. Returns True if this call
    started/connected Ray (so the caller shuts it down), False if Ray was already initialised."""
    import ray

    # Every per-epoch checkpoint forces an experiment snapshot (CheckpointConfig.num_to_keep): that is what
    # makes `--resume` lose at most one epoch, so Ray's "snapshotting may become a bottleneck" warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    common = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, **common)
    return True


def check_cluster(spec: SweepSpec, embedded: bool) -> None:
    """Refuse what cannot work on the connected cluster: a node-local storage_path with several nodes, or
    trial resources the (embedded) cluster does not have (Tune would wait forever)."""
    import ray

    t = spec.tune
    problem = storage_problem(t, len([n for n in ray.nodes() if n.get("Alive")]))
    if problem:
        raise SpecError(problem)
    if embedded:
        total = ray.cluster_resources()
        if t.gpu > 0 and total.get("GPU", 0) < t.gpu:
            raise SpecError(f"tune.resources.gpu: {t.gpu} per trial, but Ray sees {total.get('GPU', 0):g} GPUs on this "
                            "machine; set tune.resources.gpu: 0 (CPU trials) or run on a GPU machine / --address")
        if total.get("CPU", 0) < t.cpu:
            raise SpecError(f"tune.resources.cpu: {t.cpu} per trial, but Ray has {total.get('CPU', 0):g} CPUs; "
                            "lower it or pass --num-cpus")


def storage_problem(t, n_nodes: int, mounts_text: Optional[str] = None) -> Optional[str]:
    """Why tune.storage_path cannot serve a cluster of n_nodes, or None when it can."""
    if n_nodes <= 1 or t.storage_is_uri or t.shared_storage or is_shared_filesystem(t.storage_path, mounts_text):
        return None
    return (f"tune.storage_path: {t.storage_path!r} is a local folder, but the Ray cluster has {n_nodes} nodes; "
            "trials on other nodes could not save or restore checkpoints there (Ray 2.7+ has no head-node "
            "syncing). Use shared storage: s3://bucket/prefix, gs://..., or an NFS path mounted on every node (set "
            "tune.shared_storage: true if it is shared but not detected as NFS/Lustre/...)")


def check_outputs(spec: SweepSpec) -> None:
    """Local folders the sweep writes (Tune storage, SQLite MLflow store) must be writable: one clear
    OutputError before Ray starts, instead of a failure deep inside Tune after the caches were built."""
    from richkd.io import ensure_writable

    if not spec.tune.storage_is_uri:
        ensure_writable(spec.tune.storage_path, "tune.storage_path")
    uri = spec.mlflow.tracking_uri if spec.mlflow.enabled else ""
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        ensure_writable(os.path.dirname(uri[len("sqlite:///"):]), "the folder of mlflow.tracking_uri")


# ----- caches ------------------------------------------------------------------------------------------

def prepare_sweep_caches(spec: SweepSpec, progress: bool = False) -> list[dict]:
    """Build every cache any trial can read, once, before trials start (docs/architecture.md, "Caching")."""
    from richkd.cache import prepare_caches

    records = []
    for cfg in spec.cache_probe_configs():
        entries = prepare_caches(cfg, progress=progress)
        records.append({"signature": cache_signature(cfg), "entries": [Path(e).name for e in entries]})
    return records


# ----- Tuner ---------------------------------------------------------------------------------------------

def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_trainable(spec: SweepSpec):
    from ray import tune

    from richkd.tune.trainable import train_trial

    return tune.with_resources(tune.with_parameters(train_trial, plan=spec.plan()),
                               {"cpu": spec.tune.cpu, "gpu": spec.tune.gpu})


def build_tuner(spec: SweepSpec, callbacks: list, verbose: int = 1):
    from ray import tune

    from richkd.tune.search import build_scheduler, build_search_alg, tune_param_space

    t = spec.tune
    param_space = {} if t.search.algorithm == "optuna" else tune_param_space(spec)
    tune_config = tune.TuneConfig(
        metric=t.metric, mode=t.mode, search_alg=build_search_alg(spec), scheduler=build_scheduler(spec),
        num_samples=t.num_samples, time_budget_s=t.time_budget_s, reuse_actors=t.resolved_reuse_actors,
        trial_name_creator=trial_name, trial_dirname_creator=trial_name)
    run_config = tune.RunConfig(
        name=spec.name, storage_path=t.storage_path, callbacks=callbacks, verbose=verbose,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=t.checkpoint_num_to_keep),
        failure_config=tune.FailureConfig(max_failures=t.max_failures))
    return tune.Tuner(build_trainable(spec), param_space=param_space, tune_config=tune_config,
                      run_config=run_config)


def _mlflow_setup(spec: SweepSpec) -> tuple[Optional[str], Optional[str], list]:
    if not spec.mlflow.enabled:
        return None, None, []
    from richkd.tune.mlflow_callback import MlflowSweepCallback
    from richkd.tune.mlflow_client import client_for, create_parent_run, ensure_experiment

    client = client_for(spec.mlflow.tracking_uri)
    experiment_id = ensure_experiment(client, spec.mlflow.experiment, spec.mlflow.artifact_location)
    parent = create_parent_run(spec, client, experiment_id)
    callback = MlflowSweepCallback(spec.mlflow.tracking_uri, experiment_id, parent, spec.plan(), spec.name)
    return experiment_id, parent, [callback]


def run_sweep(spec: SweepSpec, *, address: Optional[str] = None, num_cpus: Optional[int] = None,
              verbose: int = 1, progress: bool = False) -> SweepOutcome:
    """Run a validated sweep to completion (or until interrupted; then `resume_sweep` continues it)."""
    from ray import tune

    started_at = time.perf_counter()
    path = spec.experiment_path
    if sweep_record_exists(path) or tune.Tuner.can_restore(path):
        raise SpecError(f"a sweep named {spec.name!r} already exists at {path}; continue it with "
                        f"`richkd sweep --resume {spec.name}`, or pick a new name with --name")
    check_outputs(spec)
    started = init_ray(address, num_cpus, verbose=verbose >= 2)
    try:
        check_cluster(spec, embedded=address is None)
        caches = prepare_sweep_caches(spec, progress=progress)
        experiment_id, parent, callbacks = _mlflow_setup(spec)
        record = SweepRecord(spec=spec, tracking_uri=spec.mlflow.tracking_uri if spec.mlflow.enabled else None,
                             experiment_id=experiment_id, parent_run_id=parent, caches=tuple(caches), **code_version(),
                             path=path)
        try:
            write_sweep_record(record)
            build_tuner(spec, callbacks, verbose=verbose).fit()
        finally:
            close_parent_if_running(record)
        return sweep_outcome(record, time.perf_counter() - started_at)
    finally:
        if started:
            import ray

            ray.shutdown()


def close_parent_if_running(record: SweepRecord) -> None:
    """Safety net for abnormal exits: the callback closes the parent run; if Tune raised first, mark it KILLED
    (`--resume` reopens it). A SIGKILLed driver cannot do this; its resume does."""
    if not record.has_mlflow_run:
        return
    try:
        from richkd.tune.mlflow_client import client_for

        client = client_for(record.tracking_uri)
        if client.get_run(record.parent_run_id).info.status == "RUNNING":
            client.set_terminated(record.parent_run_id, status="KILLED")
    except Exception as exc:  # never mask the original error
        log.warning("could not close the MLflow parent run %s: %s", record.parent_run_id, exc)


def sweep_outcome(record: SweepRecord, wall_s: float) -> SweepOutcome:
    """Summarise from the experiment folder (Tune's public offline view: real trial statuses, so trials left
    unfinished by Ctrl-C are not mistaken for early stops)."""
    from richkd.tune.results import collect_trials, survivors

    spec = record.spec
    rows = collect_trials(spec.experiment_path, spec)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    alive = survivors(rows)
    best = ({"trial_id": alive[0].trial_id, "value": alive[0].value, "config": alive[0].sampled} if alive else None)
    return SweepOutcome(name=spec.name, experiment_path=spec.experiment_path, num_trials=len(rows),
                        counts=counts, best=best, parent_run_id=record.parent_run_id,
                        tracking_uri=record.tracking_uri, wall_s=wall_s)


def describe_outcome(outcome: SweepOutcome, metric) -> str:
    metric = metric[0] if isinstance(metric, (list, tuple)) else metric   # multi-objective: the first objective
    parts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(outcome.counts.items()))
    lines = [f"sweep {outcome.name}: {outcome.num_trials} trials ({parts}) in {outcome.wall_s:.0f}s",
             f"  results: {outcome.experiment_path}"]
    if outcome.best:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in outcome.best["config"].items())
        lines.append(f"  best (reached max_t): {metric}={outcome.best['value']:.4g}  {shown}")
    if outcome.tracking_uri:
        lines.append(f"  MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id}); `richkd ui` to browse")
    if outcome.counts.get("unfinished"):
        lines.append(f"  interrupted: continue with `richkd sweep --resume {outcome.name}`")
    if outcome.counts.get("error"):
        lines.append("  some trials failed: see error.txt in their trial folders (and the MLflow runs' tags)")
    lines.append(f"  next: richkd export {outcome.name}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
