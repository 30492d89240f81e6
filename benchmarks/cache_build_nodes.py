"""The demo's caches built as Ray tasks on a 1-node vs a 2-node cluster: build time and the speed-up ratio.

What it measures: `richkd.tune.cache_tasks.build_caches` (what `richkd sweep` runs before its trials) for the
demo's RichKD config (richkd.demo, full sizes: Fashion-MNIST subset at 28 px, resnet8 teacher, tiny CLIP; --teacher
swaps in a larger teacher):
teacher logits and features, CLIP image features and the text classifier, into a fresh cache folder. Each node
has 1 CPU and each task takes 1 CPU (tune.resources.cpu: 1), so 1 node builds every entry in one shard and 2
nodes in two shards that run at once. The nodes are real Ray nodes on this machine (ray.cluster_utils.Cluster:
one raylet each); on a real cluster each would be a machine.

Per round and cluster size, two builds into new cache folders: `cold` (the first on a new cluster: worker
processes start and import torch, as in a sweep) and `warm` (the workers already run). Rounds alternate the two
cluster sizes; medians over rounds are reported. The teacher is random-init (its cost is that of a trained one).

    PYTHONPATH=$PWD RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/cache_build_nodes.py [--rounds 3]
        [--teacher resnet32] [--out benchmarks/results_cache_nodes.json]
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

for _k, _v in (("RAY_AUTH_MODE", "disabled"), ("MLFLOW_DISABLE_TELEMETRY", "true"), ("HF_HUB_OFFLINE", "1"),
               ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_k, _v)
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def demo_config(root: Path, teacher: str = "resnet8"):
    """The demo's RichKD student config (full sizes) on a random teacher and the tiny CLIP under root."""
    import torch

    from richkd.clip import init_tiny_clip
    from richkd.demo import demo_configs
    from richkd.models import create_model, save_model_checkpoint

    (root / "teacher").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_model_checkpoint(create_model(teacher, 10), root / "teacher" / "student.pt", arch=teacher,
                          num_classes=10)
    init_tiny_clip(root / "tiny_clip.pt")
    return demo_configs(root)["richkd"].with_overrides({"device": "cpu", "teacher.arch": teacher})


def build_once(cfg, cache_dir: Path) -> tuple[float, list]:
    from richkd.tune.cache_tasks import build_caches

    started = time.perf_counter()
    result = build_caches([cfg.with_overrides({"teaching.cache_dir": str(cache_dir)})], cpu=1)
    return time.perf_counter() - started, result.built


def measure(cfg, n_nodes: int, work: Path) -> dict:
    """Start an n-node cluster (1 CPU each), build the caches twice (cold, warm), shut it down."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 128 * 2**20})
    try:
        for _ in range(n_nodes - 1):
            cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        try:
            out = {}
            for kind in ("cold", "warm"):
                cache = Path(tempfile.mkdtemp(prefix=f"cache-{n_nodes}-{kind}-", dir=work))
                seconds, built = build_once(cfg, cache)
                out[kind] = seconds
                out[f"{kind}_nodes_used"] = len({s["node_id"] for b in built for s in b["shards"]})
                shutil.rmtree(cache, ignore_errors=True)
            out["shards_per_entry"] = max(len(b["shards"]) for b in built)
            return out
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--teacher", default="resnet8", help="teacher architecture (the demo's is resnet8; a larger one, "
                   "e.g. resnet32, shows the compute-bound case)")
    p.add_argument("--out", default=str(HERE / "results_cache_nodes.json"), help="JSON output (written atomically)")
    args = p.parse_args(argv)
    from benchmarks.benchkit import machine_info
    from richkd.cache import plan_caches
    from richkd.io import atomic_write_text

    work = Path(tempfile.mkdtemp(prefix="richkd-cache-nodes-"))
    try:
        cfg = demo_config(work / "assets", args.teacher)
        jobs = plan_caches(cfg.with_overrides({"teaching.cache_dir": str(work / "probe")})).missing
        rows = {j.name.rsplit("-", 1)[0]: j.n_rows for j in jobs}
        print(f"demo caches: {', '.join(f'{k} ({n} rows)' for k, n in rows.items())}", flush=True)
        rounds: dict = {1: [], 2: []}
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                res = measure(cfg, n, work)
                rounds[n].append(res)
                load.append(os.getloadavg()[0])
                print(f"round {r + 1} {n} node(s): cold {res['cold']:.1f}s warm {res['warm']:.1f}s "
                      f"({res['shards_per_entry']} shard(s) per entry on {res['warm_nodes_used']} node(s))", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for kind in ("cold", "warm"):
        one = statistics.median(x[kind] for x in rounds[1])
        two = statistics.median(x[kind] for x in rounds[2])
        summary[kind] = {"1_node_s": one, "2_nodes_s": two, "speedup": one / two,
                         "spread_1": (max(x[kind] for x in rounds[1]) - min(x[kind] for x in rounds[1])) / one,
                         "spread_2": (max(x[kind] for x in rounds[2]) - min(x[kind] for x in rounds[2])) / two}
    print("\n              1 node    2 nodes   speed-up (1 node / 2 nodes)")
    for kind, s in summary.items():
        print(f"  {kind:<10} {s['1_node_s']:7.1f}s  {s['2_nodes_s']:7.1f}s   {s['speedup']:.2f}x")
    payload = {"benchmark": "cache_build_nodes", "machine": machine_info(), "teacher": args.teacher, "rows": rows, "rounds": rounds,
               "summary": summary, "load_avg": load}
    atomic_write_text(args.out, json.dumps(payload, indent=1, default=str))
    print(f"\n{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
