"""Sweep-level benchmarks on the real richkd.tune stack (Ray Tune trials, MLflow parent/child runs, cached teachers):
per-trial start-up overhead, and ASHA vs no early stopping on the same sampled configurations (18 trials x 9
cheap epochs, grace 1, reduction factor 3: the shape in which early stopping pays off).

Built from richkd.tune's public pieces (spec.spec_from_mapping, session.init_ray, runner.prepare_nodes /
build_tuner) plus a driver-side timing callback; mlflow_callback.sweep_callback is reused so trials log to MLflow
exactly as `richkd sweep` does. The data is the first rows of the real Fashion-MNIST (Debian package) when present, else random
images; the teacher is a random-init resnet8 and CLIP the offline tiny model (costs, not accuracy, are measured).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

from ray.tune import Callback

_FIFO_CACHE: dict = {}


class TimingCallback(Callback):
    """Driver-side wall clock per trial: start, every result, end (perf_counter seconds)."""

    def __init__(self) -> None:
        self.trials: dict = {}

    def _rec(self, trial) -> dict:
        return self.trials.setdefault(trial.trial_id, {"start": None, "results": [], "end": None})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._rec(trial)["start"] = time.perf_counter()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._rec(trial)["results"].append({
            "t": time.perf_counter(), "iter": result.get("training_iteration"),
            "time_this_iter_s": result.get("time_this_iter_s"), "epoch_time_s": result.get("epoch_time_s"),
            "val_top1": result.get("val_top1")})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._rec(trial)["end"] = time.perf_counter()

    on_trial_error = on_trial_complete


# ----- assets and specs ----------------------------------------------------------------------------------------

def _write_idx(path: Path, array) -> None:
    import gzip
    import struct

    import numpy as np

    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.tobytes())


def make_assets(root: Path, n_train: int, n_test: int = 200) -> Path:
    """Fashion-MNIST subset (IDX files), a random resnet8 teacher checkpoint and the tiny CLIP under root."""
    import numpy as np
    import torch

    from richkd.clip import init_tiny_clip
    from richkd.models import create_model, save_model_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    data = root / f"fmnist{n_train}"
    if not data.is_dir():
        data.mkdir()
        src = Path("/usr/share/datasets/fashion-mnist")
        rng = np.random.default_rng(0)
        for prefix, n in (("train", n_train), ("t10k", n_test)):
            if (src / f"{prefix}-images-idx3-ubyte.gz").is_file():
                from richkd.data import read_idx

                images = read_idx(src / f"{prefix}-images-idx3-ubyte.gz")[:n]
                labels = read_idx(src / f"{prefix}-labels-idx1-ubyte.gz")[:n]
            else:
                images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
                labels = (np.arange(n) % 10).astype(np.uint8)
            _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images)
            _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", labels)
    if not (root / "teacher.pth").is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save_model_checkpoint(create_model("resnet8", 10), root / "teacher.pth", arch="resnet8", num_classes=10)
    if not (root / "tiny_clip.pt").is_file():
        init_tiny_clip(root / "tiny_clip.pt")
    return data


def spec_mapping(root: Path, data: Path, name: str, scheduler: str, num_samples: int, epochs: int,
                 max_concurrent: int = 2, reduction_factor: float = 2) -> dict:
    """A smoke.yaml-like sweep: RichKD-L on cached teachers, random search over lr and alpha (seeded, so the
    FIFO and ASHA sweeps sample the same configurations), one CPU per trial."""
    return {
        "name": name,
        "config": {
            "device": "cpu",
            "data": {"dataset": "fashion_mnist", "root": str(data), "val_fraction": 0.25, "batch_size": 64,
                     "augment": "standard"},
            "student": {"arch": "resnet8"},
            "teacher": {"arch": "resnet8", "checkpoint": str(root / "teacher.pth")},
            "clip": {"model": "richkd-tiny", "pretrained": str(root / "tiny_clip.pt"), "prompt_set": "simple"},
            "loss": {"method": "richkd", "logit_weight": 3.0, "feat_weight": 0.0},
            "teaching": {"mode": "cached", "cache_dir": str(root / "cache")},
            "optim": {"lr": 0.05, "schedule": "cosine", "milestones": []},
            "train": {"epochs": epochs},
        },
        "space": {
            "optim.lr": {"sampler": "loguniform", "low": 1e-4, "high": 0.3},
            "loss.fusion_alpha": {"sampler": "uniform", "low": 0.3, "high": 1.0},
        },
        "tune": {"metric": "val_top1", "mode": "max", "num_samples": num_samples, "max_concurrent": max_concurrent,
                 "search": {"algorithm": "random", "seed": 0},
                 "scheduler": {"type": scheduler, "grace_period": 1, "reduction_factor": reduction_factor},
                 "resources": {"cpu": 1, "gpu": 0}, "max_failures": 0, "storage_path": str(root / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{root}/runs/mlflow.db", "experiment": "richkd-bench"},
    }


def run_sweep_timed(spec, log: Optional[Callable] = None) -> dict:
    """richkd.tune.runner.run_sweep's steps (Ray already initialised), with a timing callback added."""
    from richkd.tune import runner
    from richkd.tune.mlflow_callback import sweep_callback

    t0 = time.perf_counter()
    runner.prepare_nodes(spec)
    cache_s = time.perf_counter() - t0
    callbacks: list = []
    try:
        callbacks = [sweep_callback(spec)]
    except Exception as exc:  # the runner's internals moved: measure without MLflow rather than fail
        if log:
            log(f"  (MLflow callback unavailable: {exc})")
    timing = TimingCallback()
    tuner = runner.build_tuner(spec, [timing, *callbacks], verbose=0)
    t1 = time.perf_counter()
    results = tuner.fit()
    fit_s = time.perf_counter() - t1
    for rec in timing.trials.values():  # make times relative to fit()'s start
        for key in ("start", "end"):
            rec[key] = None if rec[key] is None else rec[key] - t1
        for r in rec["results"]:
            r["t"] -= t1
    trials = []
    for r in results:
        tid = (r.metrics or {}).get("trial_id")
        rec = timing.trials.get(tid, {"start": None, "results": [], "end": None})
        trials.append({"trial_id": tid, "config": dict(r.config or {}),
                       "epochs": int((r.metrics or {}).get("training_iteration") or 0),
                       "val_top1": (r.metrics or {}).get("val_top1"), "error": bool(r.error), "timing": rec})
    return {"cache_prepare_s": cache_s, "fit_s": fit_s, "trials": trials}


def _ensure_ray(log) -> float:
    import ray

    from richkd.tune.session import init_ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        init_ray(num_cpus=os.cpu_count() or 1)
    return time.perf_counter() - t0


def _sizes(quick: bool) -> dict:
    """The start-up benchmark's sweep: few trials, so the first trial on each slot is well represented."""
    return {"n_train": 800 if quick else 2000, "num_samples": 4 if quick else 8, "epochs": 3 if quick else 4}


def _sweep_sizes(quick: bool) -> dict:
    """The ASHA-vs-FIFO sweep: many trials x many cheap epochs, the shape in which early stopping pays off (with
    8 trials x 4 epochs ASHA can cut little: an earlier run trained 69% of FIFO's epochs). n_train is the size of
    the Fashion-MNIST subset before the 25% validation hold-out; grace 1 and reduction factor 3 give rungs at
    epochs 1 and 3 below max_t."""
    if quick:
        return {"n_train": 600, "num_samples": 9, "epochs": 4, "grace_period": 1, "reduction_factor": 2}
    return {"n_train": 1200, "num_samples": 18, "epochs": 9, "grace_period": 1, "reduction_factor": 3}


def _fifo(root: Path, quick: bool, log) -> dict:
    key = (str(root), quick)
    if key not in _FIFO_CACHE:
        from richkd.tune.spec import spec_from_mapping

        sz = _sizes(quick)
        data = make_assets(root, sz["n_train"])
        ray_init_s = _ensure_ray(log)
        log(f"  FIFO sweep: {sz['num_samples']} trials x {sz['epochs']} epochs, 2 concurrent, 1 CPU each")
        spec = spec_from_mapping(spec_mapping(root, data, f"bench_fifo_{int(time.time())}", "fifo",
                                              sz["num_samples"], sz["epochs"]))
        _FIFO_CACHE[key] = {"ray_init_s": ray_init_s, "sizes": sz, "run": run_sweep_timed(spec, log), "data": data,
                            "base_config": spec.base_config.to_dict()}
    return _FIFO_CACHE[key]


def _shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _fresh_process_breakdown(base_config: dict, log) -> dict:
    """worker.py startup in a new process with one CPU thread (what a trial gets): imports, Run build, epochs."""
    import json
    import subprocess
    import sys

    log("  start-up breakdown of a fresh trial-like process")
    cfg = dict(base_config, train={**base_config["train"], "threads": 1})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "worker.py"), "startup",
                           "--config", json.dumps(cfg)], capture_output=True, text=True, timeout=600, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": proc.stderr[-2000:]}


# ----- the two benchmarks ----------------------------------------------------------------------------------------

def startup(root: Path, quick: bool = False, log: Callable = print) -> dict:
    """Per-trial start-up overhead: driver-measured time from trial start to its first report, minus a steady
    epoch (the wall time between later reports). Split into the part before the trainable's clock starts (actor
    launch, imports) and the first-iteration excess inside it (data, caches, model build)."""
    fifo = _fifo(root, quick, log)
    rows = []
    for t in fifo["run"]["trials"]:
        res = t["timing"]["results"]
        if t["timing"]["start"] is None or not res:
            continue
        first = res[0]["t"] - t["timing"]["start"]
        gaps = [b["t"] - a["t"] for a, b in zip(res, res[1:])]
        steady = statistics.median(gaps) if gaps else float("nan")
        inner_first = res[0]["time_this_iter_s"] or float("nan")
        inner_steady = statistics.median([r["time_this_iter_s"] for r in res[1:]]) if len(res) > 1 else float("nan")
        rows.append({"trial": t["trial_id"], "first_report_s": round(first, 2), "steady_epoch_wall_s": round(steady, 2),
                     "startup_overhead_s": round(first - steady, 2),
                     "before_trainable_s": round(first - inner_first, 2),
                     "inside_first_iter_excess_s": round(inner_first - inner_steady, 2),
                     "train_epoch_s": round(statistics.median([r["epoch_time_s"] for r in res]), 2)})
    med = lambda key: round(statistics.median([r[key] for r in rows]), 2) if rows else None  # noqa: E731
    run = fifo["run"]
    # scheduling gap: from the moment a slot frees (a trial ends) to the next trial's start in it
    recs = sorted((t["timing"] for t in run["trials"] if t["timing"]["start"] is not None), key=lambda r: r["start"])
    ends = sorted(r["end"] for r in recs if r["end"] is not None)
    gaps = []
    for r in recs[2:]:
        freed = [e for e in ends if e <= r["start"]]
        if freed:
            gaps.append(r["start"] - freed[-1])
    busy = sum(r["epoch_time_s"] or 0 for t in run["trials"] for r in t["timing"]["results"])
    breakdown = _fresh_process_breakdown(fifo["base_config"], log)
    return {
        "fresh_process_breakdown_s": breakdown,
        "settings": {**fifo["sizes"], "max_concurrent": 2, "cpu_per_trial": 1, "scheduler": "fifo",
                     "search": "random (seeded)", "mlflow": "sqlite, parent + child runs", "student": "resnet8",
                     "teaching": "cached (RichKD-L)"},
        "rows": rows,
        "ratios": {"median startup overhead per trial (s)": med("startup_overhead_s"),
                   "median before trainable clock (s)": med("before_trainable_s"),
                   "median first-iteration excess inside trainable (s)": med("inside_first_iter_excess_s"),
                   "median training epoch (s)": med("train_epoch_s"),
                   "first trial start after fit() (s)": round(recs[0]["start"], 2) if recs else None,
                   "median gap from a trial's end to the next start (s)":
                       round(statistics.median(gaps), 2) if gaps else None,
                   "ray init (s)": round(fifo["ray_init_s"], 2),
                   "cache prepare on driver (s)": round(run["cache_prepare_s"], 2),
                   "sweep fit wall (s)": round(run["fit_s"], 1),
                   "share of slot-time spent in train epochs": round(busy / (2 * run["fit_s"]), 3)},
    }


def _summarise(run: dict, epochs: int) -> dict:
    done = [t for t in run["trials"] if t["epochs"] >= epochs and t["val_top1"] is not None]
    return {"wall": run["fit_s"], "epochs": sum(t["epochs"] for t in run["trials"]),
            "best": max(done, key=lambda t: t["val_top1"]) if done else None}


def _key(config: dict) -> tuple:
    return tuple(sorted((k, round(float(v), 12)) for k, v in config.items()))


def asha_vs_fifo(root: Path, quick: bool = False, log: Callable = print) -> dict:
    """The same seeded random configurations swept with FIFO (every trial runs max_t epochs) and with ASHA
    (grace 1, reduction factor 3): wall time, epochs trained, and the best completed val_top1 each finds.

    Trials are deterministic (same data, seed and config), so FIFO's final val_top1 of every configuration is
    the ground truth against which ASHA's pick is ranked."""
    from richkd.tune.spec import spec_from_mapping

    sz = _sweep_sizes(quick)
    data = make_assets(root, sz["n_train"])
    ray_init_s = _ensure_ray(log)
    runs = {}
    try:
        for sched in ("fifo", "asha"):
            log(f"  {sched.upper()} sweep: {sz['num_samples']} trials x {sz['epochs']} epochs, 2 concurrent, "
                f"1 CPU each" + (f", grace {sz['grace_period']}, rf {sz['reduction_factor']}" if sched == "asha"
                                 else ""))
            spec = spec_from_mapping(spec_mapping(root, data, f"bench_sweep_{sched}_{int(time.time())}", sched,
                                                  sz["num_samples"], sz["epochs"],
                                                  reduction_factor=sz["reduction_factor"]))
            runs[sched] = run_sweep_timed(spec, log)
    finally:
        _shutdown()
    rows = []
    summary = {}
    for label, run in runs.items():
        summary[label] = s = _summarise(run, sz["epochs"])
        best = s["best"]
        rows.append({"scheduler": label, "trials": len(run["trials"]), "epochs_trained": s["epochs"],
                     "epochs_share_of_fifo": None,
                     "stopped_early": sum(1 for t in run["trials"] if t["epochs"] < sz["epochs"]),
                     "fit_wall_s": round(run["fit_s"], 1),
                     "best_val_top1": round(best["val_top1"], 2) if best else None,
                     "best_lr": round(best["config"].get("optim.lr", float("nan")), 5) if best else None,
                     "best_alpha": round(best["config"].get("loss.fusion_alpha", float("nan")), 3) if best else None})
    f, a = summary["fifo"], summary["asha"]
    for row in rows:
        row["epochs_share_of_fifo"] = round(row["epochs_trained"] / max(f["epochs"], 1), 3)
    fifo_final = sorted(((t["val_top1"], _key(t["config"])) for t in runs["fifo"]["trials"]
                         if t["val_top1"] is not None), reverse=True)
    same_configs = ({_key(t["config"]) for t in runs["fifo"]["trials"]}
                    == {_key(t["config"]) for t in runs["asha"]["trials"]})
    asha_pick_rank = asha_pick_fifo_value = None
    if a["best"]:
        k = _key(a["best"]["config"])
        values = {key: v for v, key in fifo_final}
        if k in values:  # rank 1 + the number of configurations FIFO finished strictly better (ties share a rank)
            asha_pick_rank = 1 + sum(1 for v, _ in fifo_final if v > values[k])
            asha_pick_fifo_value = round(values[k], 2)
    share = a["epochs"] / max(f["epochs"], 1)
    return {"settings": {**sz, "max_concurrent": 2, "cpu_per_trial": 1, "search": "random (seed 0), lr loguniform "
                         "[1e-4, 0.3], fusion_alpha uniform [0.3, 1]", "student": "resnet8", "teacher":
                         "random-init resnet8 (cached)", "clip": "tiny (cached)", "schedule": "cosine over max_t",
                         "ray_init_s": round(ray_init_s, 2)},
            "rows": rows,
            "ratios": {"asha epochs / fifo epochs": round(share, 3),
                       "epochs fifo/asha": round(f["epochs"] / max(a["epochs"], 1), 2),
                       "wall fifo/asha": round(f["wall"] / a["wall"], 2),
                       "both sweeps sampled the same configurations": same_configs,
                       "asha found fifo's best config": bool(f["best"] and a["best"] and
                                                            _key(f["best"]["config"]) == _key(a["best"]["config"])),
                       "rank of asha's pick in fifo's final leaderboard": asha_pick_rank,
                       "fifo's final val_top1 of asha's pick": asha_pick_fifo_value},
            "goals": [{"goal": "ASHA trains <= 40% of the epochs of the same sweep without early stopping",
                       "value": round(share, 3), "met": share <= 0.40}],
            "trials": {k: v["trials"] for k, v in runs.items()}}
