"""A sweep's caches built as Ray work where the trials' accelerators are: row-block tasks with the trials' resources
spread over the nodes, then one assembly task per entry (docs/architecture.md, "Building on the workers")."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from richkd.cache.build import ROW_KINDS, EntryJob, build_entry, plan_caches
from richkd.cache.row_blocks import assemble_entry, block_ranges, block_root, compute_block, remove_blocks
from richkd.tune.cluster import (alive_nodes, current_node_id, node_problems, raise_problems, say,
                                 use_task_resources, wait_each)
from richkd.tune.node_check import sweep_needs

log = logging.getLogger(__name__)

MAX_SHARDS = 64   # per entry: each shard loads the teacher / CLIP once, so more only pays on huge datasets


def node_slots(cpu: float, gpu: float, nodes: Optional[list] = None) -> list[str]:
    """One alive node id per task with the trials' resources that fits on it, interleaved across nodes
    (A, B, A, B, ...): before the trials start the whole cluster is free, and shard i goes to slot i."""
    per_node = []
    for node in alive_nodes() if nodes is None else nodes:
        res = node.get("Resources", {})
        slots = math.floor(res.get("CPU", 0) / cpu + 1e-9)
        if gpu > 0:
            slots = min(slots, math.floor(res.get("GPU", 0) / gpu + 1e-9))
        per_node.append([node["NodeID"]] * slots)
    return [ids[i] for i in range(max(map(len, per_node), default=0)) for ids in per_node if i < len(ids)]


def shard_count(cpu: float, gpu: float, nodes: Optional[list] = None) -> int:   # row shards per entry: per slot
    return max(1, min(len(node_slots(cpu, gpu, nodes)), MAX_SHARDS))


def usable_nodes(configs: list) -> list[dict]:
    """For callers without a preflight of their own (finalize): the alive nodes that see what the configs' caches
    read; no usable node is the preflight's error. A lone driver's node is not checked."""
    nodes, here = alive_nodes(), current_node_id()
    if all(n["NodeID"] == here for n in nodes):
        return nodes
    problems = node_problems(sweep_needs(configs, (), None), nodes=nodes)
    usable = [n for n in nodes if not problems.get(n["NodeID"])]
    if not usable:
        raise_problems(problems)
    if len(usable) < len(nodes):
        log.warning("caches: built on %d of %d nodes; the others cannot see the sweep's files", len(usable), len(nodes))
    return usable


def _where() -> dict:
    return {"node_id": current_node_id(), "pid": os.getpid()}


def _shard_task(job: EntryJob, start: int, stop: int, root: str, cpu: float, gpu: float) -> dict:
    use_task_resources(cpu, gpu, f"the cache task for {job.name}")
    return {**compute_block(job, start, stop, root), **_where()}


def _assemble_task(job: EntryJob, root: str, *shards: dict) -> dict:
    path = assemble_entry(job, shards, root)
    return {"path": str(path), "shards": [{k: s[k] for k in ("start", "stop", "node_id", "pid")} for s in shards]}


def _whole_task(job: EntryJob, cpu: float, gpu: float) -> dict:
    use_task_resources(cpu, gpu, f"the cache task for {job.name}")
    return {"path": str(build_entry(job)), "shards": [{"start": 0, "stop": job.n_rows, **_where()}]}


@dataclass
class BuiltCaches:
    paths: list = field(default_factory=list)      # one list of entry folders per config
    built: list = field(default_factory=list)      # {"entry", "path", "shards": [{start, stop, node_id, pid}], "s"}


def build_caches(configs: Iterable, *, cpu: float, gpu: float = 0.0, shards: Optional[int] = None,
                 progress: bool = False, nodes: Optional[list] = None,
                 splits: tuple[str, ...] = ("train",)) -> BuiltCaches:
    """Every cache entry each config reads (its entry folders, as prepare_caches returns them), the missing
    ones built by Ray tasks (Ray must be initialised), all submitted at once, shard i of each entry preferring slot
    i's node among `nodes` (soft affinity: a dead node is replaced by any); one line per entry built. `shards`: row
    shards per entry (default shard_count). `nodes`: the nodes that may run cache tasks (ray.nodes() entries; None:
    the alive nodes that pass the node check). `splits`: the dataset splits whose caches are read (finalize: "test")."""
    configs = list(configs)
    plans = [plan_caches(cfg, splits) for cfg in configs]
    jobs = list({job.path: job for plan in plans for job in plan.missing}.values())   # shared entries: once
    result = BuiltCaches(paths=[plan.paths for plan in plans])
    if not jobs:
        return result
    nodes = usable_nodes(configs) if nodes is None else nodes
    slots = node_slots(cpu, gpu, nodes)
    shards = shards or shard_count(cpu, gpu, nodes)
    shard, assemble, whole = ray.remote(_shard_task), ray.remote(_assemble_task), ray.remote(_whole_task)

    def on_slot(task, i: int, **resources):
        if slots:   # else nothing fits yet (e.g. an autoscaling cluster without GPU nodes): Ray places the task
            resources["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slots[i % len(slots)], soft=True)
        return task.options(**resources)

    pending: dict = {}
    shard_refs: list = []
    roots: list[Path] = []
    started = time.perf_counter()
    for j, job in enumerate(jobs):
        if job.kind not in ROW_KINDS:   # the text classifier; a photo dataset's entries (their own shards)
            pending[on_slot(whole, j, num_cpus=cpu, num_gpus=gpu).remote(job, cpu, gpu)] = (job, 1)
            continue
        root = block_root(job)
        roots.append(root)
        ranges = block_ranges(job.n_rows, job.batch_size, shards)
        refs = [on_slot(shard, i, num_cpus=cpu, num_gpus=gpu).remote(job, a, b, str(root), cpu, gpu)
                for i, (a, b) in enumerate(ranges)]
        shard_refs.extend(refs)
        pending[on_slot(assemble, j, num_cpus=0).remote(job, str(root), *refs)] = (job, len(ranges))
    say(f"caches: building {len(jobs)} entr{'y' if len(jobs) == 1 else 'ies'} as Ray tasks "
        f"({shards} row shard(s) per entry, {cpu:g} CPU / {gpu:g} GPU each)", progress)
    built = result.built

    def on_built(job_n: tuple, res: dict) -> None:
        (job, n), nodes = job_n, {s["node_id"] for s in res["shards"]}
        built.append({"entry": job.name, **res, "s": time.perf_counter() - started})
        say(f"cache {len(built)}/{len(jobs)}: {job.name} built ({n} shard{'s' if n > 1 else ''} on "
            f"{len(nodes)} node{'s' if len(nodes) > 1 else ''}, {built[-1]['s']:.1f}s)", progress)

    try:
        wait_each(pending, on_built, also_cancel=shard_refs)
    except Exception:
        for root in roots:
            remove_blocks(root)
        raise
    return result
