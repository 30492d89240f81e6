"""A command's Ray session: an embedded local Ray or a running cluster (`--address`), watched while the command
uses it (a cluster that goes away is one line and exit code 4), and the signals that stop a sweep
(docs/architecture.md, "Data flow")."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

import ray
from ray._private.services import canonicalize_bootstrap_address_or_die
from ray.exceptions import NodeDiedError

from richkd.tune.cluster import CLUSTER_LOST_ERRORS, alive_nodes, shipped_env
from richkd.tune.errors import EXIT_CLUSTER_LOST, ClusterLostError, SpecError

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 * 2**20      # small machines: trials share caches by path, not through the store
PROBE_TIMEOUT_S = 5.0                  # a Ray head (GCS) that does not accept a TCP connection by then is not there


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, verbose: bool = False) -> bool:
    """Connect to `address` or start an embedded local Ray sized for this machine; False if Ray was already up."""
    # Every per-epoch checkpoint forces an experiment snapshot (CheckpointConfig.num_to_keep): that is what
    # makes `--resume` lose at most one epoch, so Ray's "snapshotting may become a bottleneck" warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # build_tuner adds Tune's CSV and JSON loggers itself: no TensorBoard event files, nor Tune's hint about them
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if ray.is_initialized():
        return False
    common = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
                  runtime_env={"env_vars": shipped_env()})
    # ray.init replaces the SIGTERM handler (sys.exit, then its C++ crash handler aborts the driver): keep the
    # caller's (stop_signals), so a SIGTERM stops a sweep as Ctrl-C does
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        # one TCP connect to the HOST:PORT it stands for (`auto`: what ray.init would pick): one SpecError within
        # seconds where nothing listens, not minutes of Ray's GCS retries
        start = "start one with `ray start --head`, or leave out --address to run on an embedded local Ray"
        try:
            target = address[len("ray://"):] if address.startswith("ray://") else \
                canonicalize_bootstrap_address_or_die(address)
            host, _, port = target.rpartition(":")
            port = int(port)
        except ConnectionError as exc:   # auto: no Ray on this machine
            raise SpecError(f"--address {address}: {str(exc).split('. ')[0]}; {start}") from None
        except ValueError:
            raise SpecError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.1:6379), ray://HOST:PORT or auto") \
                from None
        try:
            socket.create_connection((host.strip("[]"), port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as exc:   # refused, timed out, unknown host, no route
            shown = f"auto ({target})" if address == "auto" else address
            raise SpecError(f"--address {shown}: no Ray cluster answers there "
                            f"({exc.strerror or f'no answer within {PROBE_TIMEOUT_S:g} s'}); check the address, or "
                            f"{start}") from None
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError) as exc:   # something listens there, but not a Ray head
            raise SpecError(f"--address {address}: {target} answers, but not as a Ray cluster "
                            f"({str(exc).splitlines()[0]}); check the address (HEAD:6379)") from None
        # said before any work, so attaching to the wrong cluster (`auto` picks the newest on this machine) is seen
        nodes, total = alive_nodes(), ray.cluster_resources()
        session = re.search(r"session_(\d{4}-\d\d-\d\d)_(\d\d)-(\d\d)-(\d\d)",
                            next((n.get("RayletSocketName", "") for n in nodes), ""))
        started = ", started {} {}:{}:{}".format(*session.groups()) if session else ""
        gpus = f", {total.get('GPU', 0):g} GPUs" if total.get("GPU") else ""
        print(f"connected to the Ray cluster at {ray.get_runtime_context().gcs_address} (--address {address}): "
              f"{len(nodes)} node(s), {total.get('CPU', 0):g} CPUs{gpus}{started}", flush=True)
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
    """Ray for one command (init_ray), shut down afterwards when this call started it, with an embedded Ray's
    session folder unless an unexpected error may need its logs. A cluster that goes away meanwhile is one line
    with `next_step` and exit code 4: a ClusterLostError for Ray's errors, `watch_gcs` for a head that stops
    answering (Ray's core worker would end the driver a minute later with exit code 1)."""
    started = init_ray(address, num_cpus, verbose=verbose)
    gcs = ray.get_runtime_context().gcs_address
    where = f"at {gcs}" if address else "(embedded)"
    # an embedded Ray's session folder (Ray's temp dir/session_<time>_<pid>), from where its raylet listens
    raylet = Path(alive_nodes()[0].get("RayletSocketName", "")) if started and not address else Path()
    session = raylet.parent.parent if raylet.parent.parent.name.startswith("session_") else None
    keep_logs = False
    stop_watch = threading.Event()
    threading.Thread(target=watch_gcs, args=(gcs, where, next_step, stop_watch), daemon=True,
                     name="richkd-gcs-watch").start()
    try:
        yield
    except (*CLUSTER_LOST_ERRORS, NodeDiedError) as exc:
        keep_logs = True
        problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ClusterLostError(cluster_lost(where, f"{type(exc).__name__}: {problem}", next_step)) from None
    except BaseException as exc:   # Ctrl-C and bad input (ValueError) need no logs
        keep_logs = not isinstance(exc, (KeyboardInterrupt, ValueError))
        raise
    finally:
        stop_watch.set()
        if started:
            ray.shutdown()
        if session and keep_logs:
            log.warning("Ray's logs of this run are in %s", session)
        elif session:
            latest = session.parent / "session_latest"
            if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
                latest.unlink(missing_ok=True)
            shutil.rmtree(session, ignore_errors=True)


GCS_WATCH_S = 5.0       # how often the cluster's head is probed while a command uses it


def cluster_lost(where: str, reason: str, next_step: str) -> str:
    return f"the Ray cluster {where} went away ({reason}); finished trials and checkpoints are kept: {next_step}"


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


# ----- signals ------------------------------------------------------------------------------------------

class SweepStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM outside Tuner.fit (or a second one inside it): the command ends at once (128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


def _drop_tune_hints(record: logging.LogRecord) -> bool:
    """Ray Tune's own hints after an interrupt (`Tuner.restore(...)`, the unfinished trials) compete with richkd's
    `richkd sweep --resume` line: dropped."""
    return not str(record.msg).startswith(("Experiment has been interrupted", "Trials did not complete"))


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

