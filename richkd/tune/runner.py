"""Run sweeps and learning-curve table builds on Ray Tune: Ray start-up, caches before trials, MLflow parent run,
the Tuner (richkd.tune.resume continues an interrupted sweep)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Optional

from richkd.cache.signature import cache_signature
from richkd.io import atomic_write_text, ensure_writable
from richkd.provenance import code_version
from richkd.tune.errors import SpecError
from richkd.tune.node_check import SweepNeeds, shared_markers, sweep_needs
from richkd.tune.outcome import SweepOutcome, sweep_outcome
from richkd.tune.params import TrialPlan
from richkd.tune.paths import is_shared_filesystem
from richkd.tune.spec import SweepSpec
from richkd.tune.sweep_record import SweepRecord, sweep_record_exists, write_sweep_record
from richkd.tune.table import (SEED_KEY, Table, TableError, append_row, check_same_space, plan_rows, read_table,
                               row_from_history, table_header, table_plan)
from richkd.tune.warm_start import load_warm_start

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 * 2**20      # small machines: trials share caches by path, not through the store


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
    from richkd.tune.cluster import job_runtime_env

    common = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
                  runtime_env=job_runtime_env())
    if address:
        ray.init(address=address, **common)
    else:
        # address="local": always a new embedded cluster, never the last one `ray start` left on this machine
        # (Ray would otherwise attach to it, or fail on num_cpus, when /tmp/ray/ray_current_cluster exists)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
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
        check_trial_resources(t)


def check_trial_resources(t) -> None:
    """Trial resources (tune.resources) the connected Ray cannot grant would make Tune (and finalize's tasks) wait
    forever: one SpecError instead (checked on embedded clusters, whose size is known)."""
    import ray

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


def fit_quietly(tuner, verbose: int):
    """Tuner.fit(); with verbose 0 (`-q`) Tune's own console lines ("View detailed results here", the
    TensorBoard hint), which it prints at every verbosity, are dropped too. Errors still reach stderr."""
    if verbose > 0:
        return tuner.fit()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return tuner.fit()


def check_tracking(spec: SweepSpec) -> None:
    """The MLflow tracking server must answer before Ray starts (richkd.tune.mlflow_client)."""
    if spec.mlflow.enabled:
        from richkd.tune.mlflow_client import check_tracking_server

        check_tracking_server(spec.mlflow.tracking_uri)


def check_outputs(spec: SweepSpec) -> None:
    """Local folders the sweep writes (Tune storage, SQLite MLflow store) must be writable: one clear
    OutputError before Ray starts, instead of a failure deep inside Tune after the caches were built."""
    if not spec.tune.storage_is_uri:
        ensure_writable(spec.tune.storage_path, "tune.storage_path")
    uri = spec.mlflow.tracking_uri if spec.mlflow.enabled else ""
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        ensure_writable(os.path.dirname(uri[len("sqlite:///"):]), "the folder of mlflow.tracking_uri")


# ----- caches ------------------------------------------------------------------------------------------

def prepare_sweep_caches(spec: SweepSpec, progress: bool = False, shards: Optional[int] = None,
                         nodes_checked: bool = True, splits: tuple = ("train",)) -> list[dict]:
    """Build every cache any trial can read, once, before trials start (docs/architecture.md, "Caching").

    The missing entries are computed by Ray tasks with the trials' resources, in row shards over the alive nodes
    (richkd.tune.cache_tasks); the driver only checks existing manifests and waits. Ray must be initialised.
    `nodes_checked`: every alive node passed check_nodes_share (run_sweep and resume_sweep call it first), so any
    may compute shards; False: each node is checked here and only those that see the inputs get cache tasks.
    """
    from richkd.tune.cache_tasks import build_caches
    from richkd.tune.cluster import alive_nodes

    configs = spec.cache_probe_configs()
    built = build_caches(configs, cpu=spec.tune.cpu, gpu=spec.tune.gpu, shards=shards, progress=progress,
                         nodes=alive_nodes() if nodes_checked else None, splits=splits)
    return [{"signature": cache_signature(cfg), "dir": cfg.teaching.cache_dir,
             "entries": [Path(e).name for e in entries]} for cfg, entries in zip(configs, built.paths)]


def check_nodes_share(spec: SweepSpec) -> None:
    """Before anything is built: every node sees the data and weights, the driver's cache and storage folders
    (a marker file the driver writes there), runs the driver's versions, and can use its GPUs for GPU trials."""
    from richkd.tune.cluster import preflight_nodes

    configs = spec.cache_probe_configs()
    cache_dirs = sorted({c.teaching.cache_dir for c in configs if c.teaching.cache_dir})
    folders = [("teaching.cache_dir", d) for d in cache_dirs]
    with shared_markers(folders + [("tune.storage_path", spec.tune.storage_path)]) as markers:
        preflight_nodes(sweep_needs(configs, [], spec.tune.storage_path, shared=markers, gpu=spec.tune.gpu))


def check_nodes(spec: SweepSpec, caches: list[dict]) -> SweepNeeds:
    """What every node must see (data, weights, the caches just built, storage, versions), checked on every
    alive node before any trial; returned so that each trial checks it again where it starts."""
    from richkd.tune.cluster import preflight_nodes

    folders = [Path(c["dir"]) / name for c in caches for name in c["entries"]]
    needs = sweep_needs(spec.cache_probe_configs(), folders, spec.tune.storage_path)
    preflight_nodes(needs)
    return needs


# ----- Tuner ---------------------------------------------------------------------------------------------

def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_trainable(spec: SweepSpec, needs: Optional[SweepNeeds] = None, plan=None):
    from ray import tune

    from richkd.tune.trainable import train_trial

    return tune.with_resources(tune.with_parameters(train_trial, plan=plan or spec.plan(), needs=needs),
                               {"cpu": spec.tune.cpu, "gpu": spec.tune.gpu})


def build_tuner(spec: SweepSpec, callbacks: list, verbose: int = 1, needs: Optional[SweepNeeds] = None, warm=None):
    from ray import tune

    from richkd.tune.search import build_scheduler, build_search_alg, tune_param_space

    t = spec.tune
    param_space = {} if t.search.algorithm == "optuna" else tune_param_space(spec)
    tune_config = tune.TuneConfig(
        metric=t.metric, mode=t.mode, search_alg=build_search_alg(spec, warm), scheduler=build_scheduler(spec),
        num_samples=t.num_samples, time_budget_s=t.time_budget_s, reuse_actors=t.resolved_reuse_actors,
        trial_name_creator=trial_name, trial_dirname_creator=trial_name)
    run_config = tune.RunConfig(
        name=spec.name, storage_path=t.storage_path, callbacks=callbacks, verbose=verbose,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=t.checkpoint_num_to_keep),
        failure_config=tune.FailureConfig(max_failures=t.max_failures))
    return tune.Tuner(build_trainable(spec, needs), param_space=param_space, tune_config=tune_config,
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
    warm = load_warm_start(spec)
    if warm is not None:
        print(warm.describe(), flush=True)
    check_outputs(spec)
    check_tracking(spec)
    with ray_for(spec, address, num_cpus, verbose):
        check_nodes_share(spec)
        caches = prepare_sweep_caches(spec, progress=progress)
        needs = check_nodes(spec, caches)
        experiment_id, parent, callbacks = _mlflow_setup(spec)
        record = SweepRecord(spec=spec, tracking_uri=spec.mlflow.tracking_uri if spec.mlflow.enabled else None,
                             experiment_id=experiment_id, parent_run_id=parent, caches=tuple(caches), **code_version(),
                             path=path)
        write_sweep_record(record)
        return fit_and_summarise(build_tuner(spec, callbacks, verbose=verbose, needs=needs, warm=warm), record,
                                 verbose, started_at)


@contextlib.contextmanager
def ray_for(spec: SweepSpec, address: Optional[str], num_cpus: Optional[int], verbose: int) -> Iterator[None]:
    """Ray for one sweep: started (embedded) or connected, and the cluster checked; shut down afterwards when
    this call started it."""
    started = init_ray(address, num_cpus, verbose=verbose >= 2)
    try:
        check_cluster(spec, embedded=address is None)
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def fit_and_summarise(tuner, record: SweepRecord, verbose: int, started_at: float) -> SweepOutcome:
    """Run the Tuner, make sure the MLflow parent run is not left RUNNING, and summarise what happened."""
    try:
        fit_quietly(tuner, verbose)
    finally:
        close_parent_if_running(record)
    return sweep_outcome(record, time.perf_counter() - started_at)


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


# ----- learning-curve tables ------------------------------------------------------------------------------

def build_table(spec: SweepSpec, out: str | os.PathLike, *, configs: int, seeds: int = 1,
                seeds_for: Optional[int] = None, address: Optional[str] = None, num_cpus: Optional[int] = None,
                verbose: int = 1, progress: bool = True) -> Table:
    """Train every planned row not yet in `out` (see plan_rows) through Ray Tune and append it there."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    out = Path(out).resolve()
    jobs = plan_rows(spec, configs, seeds, seeds_for)
    existing = read_table(out, repair=True) if out.exists() else None
    if existing is not None:
        check_same_space(existing, spec, "table build")
    done = {(r.config_id, r.seed) for r in existing.rows} if existing else set()
    pending = [j for j in jobs if (j.config_id, j.seed) not in done]
    if not pending:
        _table_say(f"table {out}: all {len(jobs)} planned rows are there; nothing to train", progress)
        return existing
    ensure_writable(out.parent, "the table's folder")
    check_outputs(spec)
    started = time.time()
    plan = table_plan(spec, jobs)
    _table_say(f"table {out}: {len(pending)} of {len(jobs)} rows to train ({len(done)} already there), "
               f"{spec.max_t} epochs each, {spec.tune.max_concurrent} at a time", progress)
    with ray_for(spec, address, num_cpus, verbose):
        check_nodes_share(spec)
        caches = prepare_sweep_caches(spec, progress=progress, splits=("train", "test"))
        needs = check_nodes(spec, caches)
        if existing is None:
            atomic_write_text(out, json.dumps(table_header(
                spec, source=spec.source, caches=[c["entries"] for c in caches])) + "\n")
        space = {p.key: tune.choice(list(p.values)) if p.is_finite else p.tune_domain() for p in plan.params}
        points = [{**j.sampled, SEED_KEY: j.seed} for j in pending]
        name = f"table-{out.stem}-{time.strftime('%Y%m%d_%H%M%S')}"
        tuner = tune.Tuner(
            build_trainable(spec, needs, plan=plan), param_space=space,
            tune_config=tune.TuneConfig(
                metric=spec.tune.metric, mode=spec.tune.mode, num_samples=len(points),
                search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=spec.tune.max_concurrent),
                reuse_actors=spec.tune.resolved_reuse_actors),
            run_config=tune.RunConfig(name=name, storage_path=spec.tune.storage_path, verbose=verbose,
                                      callbacks=[_row_writer(out, plan, len(pending), progress)],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=spec.tune.max_failures)))
        fit_quietly(tuner, verbose)
    table = read_table(out)
    _record_build_seconds(out, time.time() - started)
    missing = len([j for j in jobs if (j.config_id, j.seed) not in {(r.config_id, r.seed) for r in table.rows}])
    if missing:
        raise TableError(f"table build: {missing} row(s) failed (see the trials' error.txt under "
                         f"{spec.tune.storage_path}/{name}); run the same command again to retry them")
    return read_table(out)


def _record_build_seconds(out: Path, seconds: float) -> None:
    table = read_table(out)
    prov = table.header.setdefault("provenance", {})
    prov["build_seconds"] = float(prov.get("build_seconds", 0.0)) + seconds
    atomic_write_text(out, "".join([json.dumps(table.header) + "\n"] + [r.to_json() + "\n" for r in table.rows]))


def _row_writer(out: Path, plan: TrialPlan, total: int, progress: bool):
    """A driver-side Tune callback that appends each finished trial's learning curve to the table."""
    from ray.tune import Callback

    class RowWriter(Callback):
        def __init__(self) -> None:
            self.history: dict = {}
            self.written = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            epochs = self.history.setdefault(trial.trial_id, {})
            epochs[int(result.get("training_iteration", len(epochs) + 1))] = dict(result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            history = [r for _, r in sorted(self.history.pop(trial.trial_id, {}).items())]
            active = plan.active_sampled(trial.config)
            seed = active.pop(SEED_KEY)
            row = row_from_history(history, active, seed, plan.metric,
                                   {"node_id": (history[-1].get("node_id") if history else None)})
            if row.epochs < plan.max_t and row.outcome == "completed":
                return   # interrupted: trained again on the next build
            append_row(out, row)
            self.written += 1
            _table_say(f"  row {self.written}/{total}: config {row.config_id} seed {row.seed}: final {plan.metric} "
                       f"{row.final if row.final is not None else float('nan'):.2f} ({row.outcome}, "
                       f"{sum(s for s in row.seconds if s):.0f} s)", progress)

    return RowWriter()


def _table_say(line: str, progress: bool) -> None:
    if progress:
        print(line, flush=True)
