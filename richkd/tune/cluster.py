"""The Ray cluster a sweep runs on (docs/architecture.md, "Running on a cluster"): the settings workers get, what the
cluster must offer, the node preflight, waiting on Ray tasks, and what a trial or task claims of its node."""
from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from typing import Callable, Optional, Sequence

import ray
import torch
from ray.exceptions import LocalRayletDiedError, RaySystemError, RpcError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from richkd.data.sources import DATA_ENV_VAR, default_data_root
from richkd.device import require_cuda
from richkd.tune.errors import SpecError
from richkd.tune.node_check import NodeCheckError, SweepNeeds, check_needs
from richkd.tune.paths import is_shared_filesystem

log = logging.getLogger(__name__)

SHIPPED_PREFIXES = ("RICHKD_", "HF_", "MLFLOW_", "TORCH_HOME", "OPEN_CLIP_")
SHIPPED_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "HF_HUB_OFFLINE",
                 "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S")
PREFLIGHT_TIMEOUT_S = 120.0


# Ray errors that mean the driver lost its cluster (its raylet or the GCS), not a problem of one task
CLUSTER_LOST_ERRORS = (LocalRayletDiedError, RaySystemError, RpcError)


def shipped_env(environ: Optional[dict] = None) -> dict:
    """The driver's environment variables every worker must share. The default data folder (`data.root: null`)
    is pinned to the driver's, so a worker never resolves its own home directory."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items()
           if k.startswith(SHIPPED_PREFIXES) or k in SHIPPED_NAMES}
    env.setdefault(DATA_ENV_VAR, str(default_data_root()))
    return env


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def node_label(node: dict) -> str:
    return f"node {node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')})"


def node_problems(needs: SweepNeeds, timeout_s: float = PREFLIGHT_TIMEOUT_S,
                  nodes: Optional[list] = None) -> dict[str, list[str]]:
    """{node id: problems, one line each naming the node} of every alive node, checked by a zero-CPU task pinned
    to it (not running the check, or not answering within timeout_s, is a problem too)."""
    nodes = alive_nodes() if nodes is None else nodes
    remote_check = ray.remote(num_cpus=0, max_retries=0)(check_needs)
    refs = {remote_check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(needs, n.get("Resources", {}).get("GPU", 0)): n for n in nodes}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    problems: dict[str, list[str]] = {}
    for ref in ready:
        node = refs[ref]
        try:
            found = ray.get(ref)
        except CLUSTER_LOST_ERRORS:   # the cluster, not this node: richkd.tune.session.ray_session says so
            raise
        except Exception as exc:  # the node cannot even run the check (e.g. richkd not importable there)
            found = [f"the check itself failed: {str(exc).strip().splitlines()[-1][:300]} (install richkd-tune with "
                     "the same versions on every node)"]
        problems[node["NodeID"]] = [f"{node_label(node)}: {p}" for p in found]
    for ref in pending:
        ray.cancel(ref, force=True)
        problems[refs[ref]["NodeID"]] = [f"{node_label(refs[ref])}: did not answer the preflight check within "
                                         f"{timeout_s:.0f} s"]
    return problems


def raise_problems(problems: dict[str, list[str]]) -> None:
    lines = [p for found in problems.values() for p in found]
    if lines:
        raise NodeCheckError(f"{len(lines)} problem(s) on the cluster; no trial was started:\n  - "
                             + "\n  - ".join(lines))


def preflight_nodes(needs: SweepNeeds, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> float:
    """Check `needs` on every alive node; raise one NodeCheckError naming node, path and fix. Returns seconds."""
    started = time.perf_counter()
    problems = node_problems(needs, timeout_s)
    elapsed = time.perf_counter() - started
    raise_problems(problems)
    log.info("preflight: %d node(s) ready in %.2f s", len(problems), elapsed)
    return elapsed


# Each process's CUDA context (~0.3-0.5 GB) lives outside torch's allocator, so the cap leaves room for it.
CUDA_CONTEXT_BYTES = 512 << 20


def claim_gpu(fraction: float, where: str) -> None:
    """In a trial or task Ray gave `fraction` of a GPU: fail with one line (richkd.device.cuda_problem) when torch
    cannot use it, instead of training on the CPU; a fractional share caps this process's GPU memory at its share
    minus a CUDA context, so an overflowing trial or task fails alone (ray#5902)."""
    if fraction <= 0:
        return
    require_cuda(where)
    if fraction < 1:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(max(0.05, fraction - CUDA_CONTEXT_BYTES / total))


def threads_for(cpu: float) -> int:   # torch threads of a trial or task granted `cpu` CPUs
    return max(1, math.floor(cpu + 1e-9))


def use_task_resources(cpu: float, gpu: float, what: str) -> None:
    """In a Ray task (`what`: cache shard, finalist): torch threads = its CPUs (more only fight the other tasks on
    the node); a GPU share must be usable (claim_gpu)."""
    torch.set_num_threads(threads_for(cpu))
    claim_gpu(gpu, f"{what} on {this_node()}")


def this_node() -> str:   # this process's node, as node_label names a node
    try:
        address = ray.util.get_node_ip_address()
    except Exception:
        address = socket.gethostname()
    return f"node {(current_node_id() or '?')[:12]} ({address})"


def current_node_id() -> Optional[str]:   # None outside Ray
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def check_trial_resources(t) -> None:
    """Trial resources (tune.resources) the connected Ray cannot grant would make Tune (and finalize's tasks) wait
    forever: one SpecError instead (checked on embedded clusters, whose size is known)."""
    total = ray.cluster_resources()
    if t.gpu > 0 and total.get("GPU", 0) < t.gpu:
        raise SpecError(f"tune.resources.gpu: {t.gpu} per trial, but Ray sees {total.get('GPU', 0):g} GPUs on this "
                        "machine; set tune.resources.gpu: 0 (CPU trials) or run on a GPU machine / --address")
    if total.get("CPU", 0) < t.cpu:
        raise SpecError(f"tune.resources.cpu: {t.cpu} per trial, but Ray has {total.get('CPU', 0):g} CPUs; "
                        "lower it or pass --num-cpus")


def storage_problem(t, n_nodes: int, mounts_text: Optional[str] = None) -> Optional[str]:   # why it cannot, or None
    if n_nodes <= 1 or t.storage_is_uri or t.shared_storage or is_shared_filesystem(t.storage_path, mounts_text):
        return None
    return (f"tune.storage_path: {t.storage_path!r} is a local folder, but the Ray cluster has {n_nodes} nodes; "
            "trials on other nodes could not save or restore checkpoints there (Ray 2.7+ has no head-node "
            "syncing). Use shared storage: s3://bucket/prefix, gs://..., or an NFS path mounted on every node (set "
            "tune.shared_storage: true if it is shared but not detected as NFS/Lustre/...)")


def wait_each(pending: dict, on_result: Callable, on_error: Callable = lambda value: None,
              also_cancel: Sequence = ()) -> None:
    """on_result(pending[ref], result) for each Ray task of `pending` as it finishes. On the first failure (a
    task's: on_error(its value), then the task's own error is raised, not Ray's wrapper: a CacheError names the
    folder and the fix; or one of on_result) the other tasks and `also_cancel` are cancelled."""
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            value = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:
                on_error(value)
                raise (exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc) from None
            on_result(value, result)
    except BaseException:
        for other in [*pending, *also_cancel]:
            ray.cancel(other, force=True)
        raise


def say(line: str, progress: bool) -> None:   # a progress line: on stderr at a terminal, else logged
    if progress:
        print(line, file=sys.stderr, flush=True)
    else:
        log.info(line)
