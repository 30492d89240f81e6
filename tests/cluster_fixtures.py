"""A real multi-node Ray cluster and a real `mlflow server` on the test machine, for the cluster tests.

Why not `ray.init()`: an embedded cluster is one node, so it cannot show what breaks when trials run on another
machine (a folder the driver sees but a worker does not, a node that dies, a node that joins later). Here every
node is its own `ray start --block` process group; a worker can run in its own mount namespace
(`unshare -m`) with empty tmpfs mounts over chosen folders, which imitates a machine with its own disk.

Every node and server is stopped by the process group this module started (never `ray stop`, which kills every
Ray process on the machine, including other test sessions'). Nodes share the IP, so each one carries its own
custom resource (`RayNode.resource`) and its Ray node id is looked up once the cluster is up.

Use from a test module (pytest registers the imported fixtures):

    from tests.cluster_fixtures import RayCluster, make_ray_cluster, mlflow_server  # noqa: F401

    def test_x(make_ray_cluster, mlflow_server):
        cluster = make_ray_cluster(workers=[{"hide": [shared_dir]}])
        ... richkd sweep ... --address cluster.address (env=cluster.driver_env()) ...
        cluster.workers[0].kill_raylet()
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
# What every process this module starts gets: no Ray token auth (the test clusters live on 127.0.0.1 only and
# would otherwise need a shared token), no telemetry, offline Hugging Face, and this checkout's richkd.
BASE_ENV = {"RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merged_env(base: Mapping[str, str], changes: Optional[Mapping[str, Optional[str]]] = None) -> dict:
    """A copy of `base` with `changes` applied (a None value removes that variable)."""
    env = dict(base)
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def child_env(extra: Optional[Mapping[str, Optional[str]]] = None) -> dict:
    """os.environ + BASE_ENV + PYTHONPATH=<repo> + extra (a None value removes that variable)."""
    env = {**os.environ, **BASE_ENV}
    env.pop("RAY_ADDRESS", None)   # a driver's RAY_ADDRESS must not steer `ray start --head`
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return merged_env(env, extra)


def _kill_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGKILL the process group `proc` leads (started with start_new_session), then reap the leader.

    SIGKILL, not SIGTERM: `ray start --block` can take 15 s and more to shut its children down on SIGTERM, and a
    throw-away test node has nothing to flush."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - a leader that ignores SIGKILL is stuck in the kernel
        pass


def group_pids(pgid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the live processes in process group `pgid` (read from /proc, no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ')'
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append((int(entry.name), comm))
    return found


@lru_cache(maxsize=1)
def hiding_unsupported() -> Optional[str]:
    """None when the tests may run a process in its own mount namespace with tmpfs mounts (`unshare -m` needs
    root or CAP_SYS_ADMIN); else why not, for pytest.skip."""
    if shutil.which("unshare") is None:
        return "a node with its own folders needs util-linux's `unshare`, which is not installed"
    probe = Path(tempfile.mkdtemp(prefix="rk-hide-"))
    try:
        res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                              f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(probe))}"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare -m` + `mount -t tmpfs` could not run here: {exc}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if res.returncode != 0:
        return ("`unshare -m` + `mount -t tmpfs` is not permitted here (it needs root or CAP_SYS_ADMIN): "
                f"{res.stderr.strip()[-300:]}")
    return None


class RayNode:
    """One `ray start --block` node (its process group), with its custom resource and Ray node id."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path, hidden: Sequence[Path]) -> None:
        self.name = name
        self.resource = f"node_{name}"       # {resource: 1} on this node only: pin work with it
        self.proc = proc
        self.log = log
        self.hidden = tuple(hidden)
        self.node_id: Optional[str] = None   # filled in by RayCluster once the node is registered

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def raylet_pid(self) -> int:
        pids = [pid for pid, comm in group_pids(self.proc.pid) if comm == "raylet"]
        if not pids:
            raise RuntimeError(f"node {self.name}: no raylet process is running\n{self.log_tail()}")
        return pids[0]

    def kill_raylet(self, sig: int = signal.SIGKILL) -> int:
        """Kill this node's raylet (the node dies as a machine would; its workers go with it). Returns its pid."""
        pid = self.raylet_pid()
        os.kill(pid, sig)
        return pid

    def stop(self) -> None:
        """Kill everything this node started (its process group) and reap it."""
        _kill_group(self.proc)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"RayNode({self.name!r}, pid={self.proc.pid}, node_id={self.node_id}, hidden={list(self.hidden)})"


class RayCluster:
    """A head and any number of workers, all on 127.0.0.1, each node with `num_cpus` CPUs and its own resource.

    `root` (default: a short folder under /tmp, since Ray's unix socket paths must stay under 107 characters)
    holds Ray's temp dir and the node logs; it is deleted by shutdown() when this class made it.
    """

    def __init__(self, root: Optional[Path] = None, env: Optional[Mapping[str, Optional[str]]] = None,
                 object_store_mb: int = 256) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="rk-ray-", dir="/tmp"))
        self.temp_dir = self.root / "ray"
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.env = child_env(env)
        self.object_store_mb = object_store_mb
        self.port = free_port()
        self.head: Optional[RayNode] = None
        self.workers: list[RayNode] = []

    # ----- addresses and environments -----------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def nodes(self) -> list[RayNode]:
        return [n for n in (self.head, *self.workers) if n is not None]

    def driver_env(self, **extra: Optional[str]) -> dict:
        """The environment for a driver subprocess (`richkd sweep --address ...`): the nodes' env + extra."""
        return merged_env({**self.env, "RAY_ADDRESS": self.address}, extra)

    # ----- starting nodes ----------------------------------------------------------------------------------
    def _launch(self, name: str, args: list[str], num_cpus: int, resources: Optional[Mapping] = None,
                hide: Iterable[str | os.PathLike] = (), env: Optional[Mapping[str, Optional[str]]] = None) -> RayNode:
        hidden = [Path(p).resolve() for p in hide]
        if hidden:
            reason = hiding_unsupported()
            if reason:
                pytest.skip(reason)
            for folder in hidden:
                if self.temp_dir.resolve().is_relative_to(folder) or REPO.is_relative_to(folder):
                    raise ValueError(f"cannot hide {folder}: the node needs {self.temp_dir} and {REPO} under it")
                folder.mkdir(parents=True, exist_ok=True)   # a mount point must exist
        res = {f"node_{name}": 1, **(resources or {})}
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", *args,
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--resources={json.dumps(res)}",
               f"--temp-dir={self.temp_dir}", f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
               f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", "--block"]
        if hidden:
            mounts = " && ".join(f"mount -t tmpfs -o size=256m tmpfs {shlex.quote(str(f))}" for f in hidden)
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *cmd]
        log = self.root / f"{name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, env=merged_env(self.env, env), stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return RayNode(name, proc, log, hidden)

    def _wait(self, node: RayNode, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if not node.alive:
                raise RuntimeError(f"`ray start` for node {node.name} exited with {node.proc.returncode}:\n"
                                   f"{node.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node.name}: {what} not within {START_TIMEOUT_S:.0f}s:\n{node.log_tail()}")
            time.sleep(0.1)

    def _wait_gcs(self) -> None:
        """Until the head's GCS accepts connections: workers can join from then on, before the head is done."""
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        self._wait(self.head, listening, f"GCS listening on port {self.port}")

    def wait_ready(self) -> dict[str, str]:
        """Wait until the new nodes' `ray start` is done and they are registered; returns {node name: node id}."""
        for node in [n for n in self.nodes if n.node_id is None]:
            self._wait(node, lambda: "Ray runtime started" in node.log_tail(n=1_000_000), "`ray start`")
        return self.refresh_node_ids()

    def start_head(self, num_cpus: int = 1, resources: Optional[Mapping] = None,
                   env: Optional[Mapping[str, Optional[str]]] = None, wait: bool = True) -> RayNode:
        """Start the head; wait=False returns once its GCS listens (add workers, then wait_ready())."""
        if self.head is not None:
            raise RuntimeError("this cluster already has a head")
        self.head = self._launch("head", ["--head", f"--port={self.port}", "--include-dashboard=false",
                                          f"--dashboard-port={free_port()}"], num_cpus, resources, env=env)
        if wait:
            self.wait_ready()
        else:
            self._wait_gcs()
        return self.head

    def add_worker(self, num_cpus: int = 1, hide: Iterable[str | os.PathLike] = (),
                   resources: Optional[Mapping] = None, env: Optional[Mapping[str, Optional[str]]] = None,
                   name: Optional[str] = None, wait: bool = True) -> RayNode:
        """Start a worker node (also later, as a node joining a running sweep would). `hide`: folders this node
        sees as empty tmpfs mounts (skips the test when mount namespaces are not permitted). `env`: changes to
        this node's environment (None removes a variable). wait=True returns once its node id is known;
        wait=False at once (call wait_ready())."""
        if self.head is None:
            raise RuntimeError("start_head() first")
        name = name or f"worker{len(self.workers) + 1}"
        node = self._launch(name, [f"--address={self.address}"], num_cpus, resources, hide, env)
        self.workers.append(node)
        if wait:
            self.wait_ready()
        return node

    # ----- node ids ----------------------------------------------------------------------------------------
    def alive_nodes(self) -> list[dict]:
        """ray.nodes() of the alive nodes, read by a short driver subprocess (the test process stays Ray-free)."""
        code = ("import json, ray\n"
                f"ray.init(address={self.address!r}, log_to_driver=False, logging_level='ERROR')\n"
                "print('NODES=' + json.dumps([{'id': n['NodeID'], 'resources': sorted(n['Resources'])} "
                "for n in ray.nodes() if n['Alive']]))\n")
        res = subprocess.run([sys.executable, "-c", code], env=self.driver_env(), capture_output=True, text=True,
                             timeout=120)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("NODES=")]
        if res.returncode != 0 or not lines:
            raise RuntimeError(f"could not list the cluster's nodes:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
        return json.loads(lines[-1][len("NODES="):])

    def refresh_node_ids(self, timeout: float = 60.0) -> dict[str, str]:
        """Wait until every started, alive node is registered; set and return {node name: Ray node id}."""
        deadline = time.monotonic() + timeout
        while True:
            by_resource = {r: n["id"] for n in self.alive_nodes() for r in n["resources"]}
            missing = [n for n in self.nodes if n.alive and n.resource not in by_resource]
            for node in self.nodes:
                if node.resource in by_resource:
                    node.node_id = by_resource[node.resource]
            if not missing:
                return {n.name: n.node_id for n in self.nodes if n.node_id}
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {[n.name for n in missing]} never registered with the head")
            time.sleep(0.5)

    def node_by_id(self, node_id: str) -> RayNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(f"no node of this cluster has id {node_id}")

    # ----- teardown ----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kill the workers, then the head (each by its own process group), and delete the folder we made."""
        for node in reversed(self.nodes):
            node.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_cluster(workers: Sequence[Mapping] = ({},), head: Optional[Mapping] = None,
                  **cluster_kwargs) -> RayCluster:
    """A started cluster: a head (`head`: start_head kwargs) + one worker per mapping (add_worker kwargs)."""
    cluster = RayCluster(**cluster_kwargs)
    try:
        cluster.start_head(wait=False, **(head or {}))
        for spec in workers:
            cluster.add_worker(wait=False, **spec)
        cluster.wait_ready()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


@pytest.fixture()
def make_ray_cluster() -> Iterator:
    """A factory: make_ray_cluster(workers=[{...}, ...], head={...}, env={...}) -> a started RayCluster; every
    cluster it made is shut down after the test."""
    made: list[RayCluster] = []

    def make(**kwargs) -> RayCluster:
        cluster = start_cluster(**kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.shutdown()


# ----- MLflow ---------------------------------------------------------------------------------------------------
class MlflowService:
    """A real `mlflow server` on 127.0.0.1 over SQLite in `folder`, in its own process group so that stop()
    also ends its gunicorn/uvicorn workers; start() again reuses the port and the store (an outage)."""

    # MLflow 3's server also starts a job runner with several huey consumer processes (for GenAI jobs this
    # project never submits); on a 2-core test machine they double the start time.
    SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def __init__(self, folder: Path, port: Optional[int] = None,
                 env: Optional[Mapping[str, Optional[str]]] = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.env = merged_env(self.SERVER_ENV, env)
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / f"server{self.starts}.log"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.read().decode().strip().upper() == "OK"
        except OSError:
            return False

    def start(self, timeout: float = 120.0) -> "MlflowService":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("this mlflow server is already running")
        self.starts += 1
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
               "--artifacts-destination", str(self.folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(cmd, cwd=self.folder, env=child_env(self.env), stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mlflow server on port {self.port} not healthy after {timeout:.0f}s")
            time.sleep(0.25)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Kill the server's process group and wait until the port stops answering."""
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None
        deadline = time.monotonic() + timeout
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture()
def mlflow_server(tmp_path_factory) -> Iterator[MlflowService]:
    """A started MlflowService (its .uri is the tracking URI); stopped after the test."""
    server = MlflowService(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
