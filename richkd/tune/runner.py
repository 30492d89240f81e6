"""Run sweeps and learning-curve table builds on Ray Tune: Ray start-up, caches before trials, MLflow parent run,
the Tuner (richkd.tune.resume continues an interrupted sweep)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from richkd.cache.signature import cache_signature
from richkd.io import atomic_write_text, ensure_writable
from richkd.provenance import code_version
from richkd.tune.errors import EXIT_CLUSTER_LOST, ClusterLostError, SpecError
from richkd.tune.node_check import SweepNeeds, shared_markers, sweep_needs
from richkd.tune.outcome import SweepOutcome, sweep_outcome, sweep_ref
from richkd.tune.params import TrialPlan
from richkd.tune.paths import is_shared_filesystem
from richkd.tune.spec import SweepSpec
from richkd.tune.sweep_record import SweepRecord, remove_sweep_record, sweep_record_exists, write_sweep_record
from richkd.tune.table import (SEED_KEY, Table, TableError, append_row, check_same_space, plan_rows, read_table,
                               row_from_history, table_header, table_plan)
from richkd.tune.warm_start import load_warm_start

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 * 2**20      # small machines: trials share caches by path, not through the store
PROBE_TIMEOUT_S = 5.0                  # a Ray head (GCS) that does not accept a TCP connection by then is not there


# ----- Ray ---------------------------------------------------------------------------------------------

def probe_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """The HOST:PORT `--address` stands for (`auto`: what ray.init would pick, see README "Running on a
    cluster"), checked with one TCP connect: an address where nothing listens is one SpecError within seconds,
    not minutes of Ray's GCS retries."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    start = "start one with `ray start --head`, or leave out --address to run on an embedded local Ray"
    try:
        target = address[len("ray://"):] if address.startswith("ray://") else canonicalize_bootstrap_address_or_die(
            address)
        host, _, port = target.rpartition(":")
        port = int(port)
    except ConnectionError as exc:   # auto: no Ray on this machine
        raise SpecError(f"--address {address}: {str(exc).split('. ')[0]}; {start}") from None
    except ValueError:
        raise SpecError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.1:6379), ray://HOST:PORT or auto") \
            from None
    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout_s).close()
    except OSError as exc:   # refused, timed out, unknown host, no route
        shown = f"auto ({target})" if address == "auto" else address
        raise SpecError(f"--address {shown}: no Ray cluster answers there "
                        f"({exc.strerror or f'no answer within {timeout_s:g} s'}); check the address, or {start}") \
            from None
    return target


def describe_cluster(address: str) -> str:
    """"connected to the Ray cluster at HOST:PORT (--address auto): 2 nodes, 8 CPUs, 1 GPU, started ...": said
    before any work, so attaching to the wrong cluster (`auto` picks the newest on this machine) is seen."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    started = ""
    session = re.search(r"session_(\d{4}-\d\d-\d\d)_(\d\d)-(\d\d)-(\d\d)",
                        next((n.get("RayletSocketName", "") for n in nodes), ""))
    if session:
        day, hh, mm, ss = session.groups()
        started = f", started {day} {hh}:{mm}:{ss}"
    gpus = f", {total.get('GPU', 0):g} GPUs" if total.get("GPU") else ""
    return (f"connected to the Ray cluster at {ray.get_runtime_context().gcs_address} (--address {address}): "
            f"{len(nodes)} node(s), {total.get('CPU', 0):g} CPUs{gpus}{started}")


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, verbose: bool = False) -> bool:
    """Connect to `address` or start an embedded local Ray sized for this machine. Returns True if this call
    started/connected Ray (so the caller shuts it down), False if Ray was already initialised."""
    import ray

    # Every per-epoch checkpoint forces an experiment snapshot (CheckpointConfig.num_to_keep): that is what
    # makes `--resume` lose at most one epoch, so Ray's "snapshotting may become a bottleneck" warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # build_tuner adds Tune's CSV and JSON loggers itself: no TensorBoard event files, nor Tune's hint about them
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if ray.is_initialized():
        return False
    from richkd.tune.cluster import job_runtime_env

    common = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
                  runtime_env=job_runtime_env())
    # ray.init replaces the SIGTERM handler (sys.exit, then its C++ crash handler aborts the driver): keep the
    # caller's (stop_signals), so a SIGTERM stops a sweep as Ctrl-C does
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        target = probe_address(address)
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError) as exc:   # something listens there, but not a Ray head
            raise SpecError(f"--address {address}: {target} answers, but not as a Ray cluster "
                            f"({str(exc).splitlines()[0]}); check the address (HEAD:6379)") from None
        print(describe_cluster(address), flush=True)
    else:
        # address="local": always a new embedded cluster, never the last one `ray start` left on this machine
        # (Ray would otherwise attach to it, or fail on num_cpus, when /tmp/ray/ray_current_cluster exists)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, **common)
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)
    return True


@contextlib.contextmanager
def ray_session(address: Optional[str], num_cpus: Optional[int], verbose: bool = False,
                next_step: str = "run the command again once a cluster is up") -> Iterator[None]:
    """Ray for one command: embedded or connected (init_ray), shut down afterwards when this call started it.
    An embedded Ray's session folder (its logs and sockets under Ray's temp dir) is removed then too, unless an
    unexpected error may need its logs. A cluster that goes away meanwhile is one line and exit code 4
    (EXIT_CLUSTER_LOST), with `next_step`: a ClusterLostError for Ray's errors, and `watch_gcs` for a head that
    stops answering (Ray's core worker would end the driver a minute later with exit code 1)."""
    import ray
    from ray.exceptions import NodeDiedError

    from richkd.tune.cluster import cluster_lost_errors

    started = init_ray(address, num_cpus, verbose=verbose)
    gcs = ray.get_runtime_context().gcs_address
    where = f"at {gcs}" if address else "(embedded)"
    session = _session_dir() if started and not address else None
    keep_logs = False
    stop_watch = threading.Event()
    threading.Thread(target=watch_gcs, args=(gcs, where, next_step, stop_watch), daemon=True,
                     name="richkd-gcs-watch").start()
    try:
        yield
    except (*cluster_lost_errors(), NodeDiedError) as exc:
        keep_logs = True
        problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ClusterLostError(cluster_lost(where, f"{type(exc).__name__}: {problem}", next_step)) from None
    except (KeyboardInterrupt, ValueError):
        raise
    except BaseException:
        keep_logs = True
        raise
    finally:
        stop_watch.set()
        if started:
            ray.shutdown()
        if session and not keep_logs:
            _remove_session(session)
        elif session:
            log.warning("Ray's logs of this run are in %s", session)


GCS_WATCH_S = 5.0       # how often the cluster's head is probed while a command uses it


def cluster_lost(where: str, reason: str, next_step: str) -> str:
    return (f"the Ray cluster {where} went away ({reason}); finished trials and checkpoints are kept: "
            f"{next_step}")


def watch_gcs(gcs_address: str, where: str, next_step: str, stop: threading.Event) -> None:
    """While `stop` is not set, probe the head (GCS) every GCS_WATCH_S s; when it has not answered for 3/4 of
    Ray's own reconnect timeout (RAY_gcs_rpc_server_reconnect_timeout_s, 60 s by default) print the one line and
    end the process with exit code 4. Nothing else can: Ray's core worker ends a driver whose GCS stays away for
    that timeout with exit code 1, from C++ (no Python exception)."""
    host, _, port = gcs_address.rpartition(":")
    limit = max(1, int(0.75 * float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", 60)) / GCS_WATCH_S))
    misses = 0
    while not stop.wait(GCS_WATCH_S):
        try:
            socket.create_connection((host, int(port)), timeout=GCS_WATCH_S).close()
            misses = 0
        except OSError:
            misses += 1
        if misses >= limit and not stop.is_set():
            print(f"richkd: error: {cluster_lost(where, 'its head stopped answering', next_step)}", file=sys.stderr,
                  flush=True)
            os._exit(EXIT_CLUSTER_LOST)


def _session_dir() -> Optional[Path]:
    """The embedded Ray's session folder (Ray's temp dir/session_<time>_<pid>), from where its raylet listens."""
    import ray

    sockets = [n.get("RayletSocketName", "") for n in ray.nodes() if n.get("Alive")]
    folder = Path(sockets[0]).parent.parent if sockets and sockets[0] else None
    return folder if folder is not None and folder.name.startswith("session_") else None


def _remove_session(folder: Path) -> None:
    latest = folder.parent / "session_latest"
    if latest.is_symlink() and Path(os.readlink(latest)).name == folder.name:
        latest.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


# ----- signals ------------------------------------------------------------------------------------------

class SweepStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM outside Tuner.fit (or a second one inside it): the command ends at once, with exit
    code 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


_TUNE_NOISE = ("Experiment has been interrupted", "Trials did not complete")


def _drop_tune_hints(record: logging.LogRecord) -> bool:
    """Ray Tune's own hints after an interrupt (`Tuner.restore(...)`, the list of unfinished trials) compete with
    richkd's `richkd sweep --resume` line: dropped."""
    return not str(record.msg).startswith(_TUNE_NOISE)


@contextlib.contextmanager
def stop_signals() -> Iterator[list]:
    """Ctrl-C (SIGINT) and SIGTERM (`ray job stop`, Kubernetes, Slurm) stop a sweep alike. While Tuner.fit runs,
    the first one asks Tune to stop: it saves the experiment state and returns, unfinished trials keep their
    checkpoints, and `richkd sweep --resume` continues them. Anywhere else, or a second time, it raises
    SweepStopped at once. Yields the list of signals received (the exit code is 128 + the first)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():   # signal handlers live in the main thread
        yield received
        return
    usr1 = signal.getsignal(signal.SIGUSR1)

    def on_signal(signum, frame) -> None:
        received.append(signum)
        tune_stop = signal.getsignal(signal.SIGUSR1)   # Tune's graceful stop, registered by each Tuner.fit
        if len(received) == 1 and callable(tune_stop) and tune_stop is not usr1:
            tune_stop(signum, frame)
        else:
            raise SweepStopped(signum)

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"      # Tune leaves SIGINT to on_signal
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(_drop_tune_hints)
    for s in saved:
        signal.signal(s, on_signal)
    try:
        yield received
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        signal.signal(signal.SIGUSR1, usr1)
        tune_log.removeFilter(_drop_tune_hints)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env


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
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    run_config = tune.RunConfig(
        name=spec.name, storage_path=t.storage_path, verbose=verbose,
        callbacks=[*callbacks, CSVLoggerCallback(), JsonLoggerCallback()],   # not TensorBoard's (init_ray)
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
        try:
            return fit_and_summarise(build_tuner(spec, callbacks, verbose=verbose, needs=needs, warm=warm), record,
                                     verbose, started_at)
        except KeyboardInterrupt:
            if not tune.Tuner.can_restore(path):   # stopped before Tune's first snapshot: nothing to resume, and
                remove_sweep_record(path)          # the same command may start it again
            raise


@contextlib.contextmanager
def ray_for(spec: SweepSpec, address: Optional[str], num_cpus: Optional[int], verbose: int) -> Iterator[None]:
    """Ray for one sweep (ray_session), and the cluster checked."""
    resume = f"continue with `richkd sweep --resume {sweep_ref(spec.name, spec.experiment_path)}` once a cluster is up"
    with ray_session(address, num_cpus, verbose=verbose >= 2, next_step=resume):
        check_cluster(spec, embedded=address is None)
        yield


def fit_and_summarise(tuner, record: SweepRecord, verbose: int, started_at: float) -> SweepOutcome:
    """Run the Tuner, make sure the MLflow parent run is not left RUNNING, and summarise what happened."""
    from richkd.tune.cluster import alive_nodes

    try:
        fit_quietly(tuner, verbose)
    finally:
        close_parent_if_running(record)
    outcome = sweep_outcome(record, time.perf_counter() - started_at)
    if len(alive_nodes()) < 2:   # one machine (an embedded Ray, each resume a new node id): no split per node
        outcome.by_node = {}
    return outcome


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
        grid = fit_quietly(tuner, verbose)
    table = read_table(out)
    _record_build_seconds(out, time.time() - started)
    missing = len([j for j in jobs if (j.config_id, j.seed) not in {(r.config_id, r.seed) for r in table.rows}])
    if missing and not grid.errors:
        raise KeyboardInterrupt   # a signal stopped the build: the finished rows are kept
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
