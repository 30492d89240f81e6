"""Cluster benchmarks, measured side by side in one run: the node preflight on a 2-node cluster, and the wall time
of the same smoke-shaped sweep (4 RichKD-L trials, 1 CPU each, caches built first) on a 1-node vs a 2-node cluster.

Both clusters are real multi-process Ray clusters on this machine (ray.cluster_utils.Cluster: a head and, for 2
nodes, one more raylet), each node with 1 CPU, so "2 nodes" means twice the trial slots, as on a real cluster.
On a 2-core machine the 2-node run is bounded by the cores; the ratio shows that trials spread and the
per-sweep overheads (preflight, node checks at trial start) stay small.

    python benchmarks/cluster_sweep.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_bench import make_assets, spec_mapping  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cluster(nodes: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def preflight_times(root: Path, repeats: int) -> list[float]:
    """Seconds of richkd.tune.cluster.preflight_nodes on a 2-node cluster for the benchmark sweep's needs."""
    import ray

    from richkd.tune.cluster import preflight_nodes
    from richkd.tune.node_check import sweep_needs
    from richkd.tune.spec import spec_from_mapping

    spec = spec_from_mapping(spec_mapping(root, root / "fmnist2000", "preflight", "fifo", 4, 2))
    Path(spec.tune.storage_path).mkdir(parents=True, exist_ok=True)     # as `richkd sweep` does before the check
    needs = sweep_needs(spec.cache_probe_configs, [], spec.tune.storage_path)
    cluster = _cluster(2)
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        return [preflight_nodes(needs) for _ in range(repeats)]
    finally:
        ray.shutdown()
        cluster.shutdown()


def sweep_wall(root: Path, nodes: int, epochs: int) -> dict:
    from richkd.tune.runner import run_sweep
    from richkd.tune.spec import spec_from_mapping

    name = f"nodes{nodes}"
    shutil.rmtree(root / "runs" / name, ignore_errors=True)
    raw = spec_mapping(root, root / "fmnist2000", name, "fifo", 4, epochs, max_concurrent=4)
    raw["tune"]["shared_storage"] = True          # one machine: every node sees the same disk
    spec = spec_from_mapping(raw)
    cluster = _cluster(nodes)
    try:
        started = time.perf_counter()
        outcome = run_sweep(spec, address=cluster.address, verbose=0)
        return {"nodes": nodes, "wall_s": round(time.perf_counter() - started, 1), "trials": outcome.num_trials,
                "by_node": {k[:8]: v for k, v in outcome.by_node.items()}}
    finally:
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results_cluster.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rk-cluster-bench-"))
    try:
        make_assets(root, n_train=2000)
        times = preflight_times(root, repeats=3 if args.quick else 5)
        epochs = 2 if args.quick else 3
        one, two = sweep_wall(root, 1, epochs), sweep_wall(root, 2, epochs)
        result = {"preflight_s": {"median": round(statistics.median(times), 3), "all": [round(t, 3) for t in times]},
                  "sweep_1_node": one, "sweep_2_nodes": two,
                  "wall_ratio_2_over_1": round(two["wall_s"] / one["wall_s"], 2), "cpu_count": os.cpu_count()}
        print(json.dumps(result, indent=1))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
