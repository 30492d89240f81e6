"""Per-trial data path: Run() start-up with/without the decoded-array cache, and resident vs host-loader throughput.

Real Fashion-MNIST (Debian's dataset-fashion-mnist), resnet8, batch 64, measured side by side in one run:

  startup     Run() construction in fresh processes (imports done before the clock starts), decoded-array cache
              off / cold (decode + write) / warm (memory-mapped), interleaved rounds, median.
  throughput  images/s of (a) the data path alone (iterating the loader) and (b) Run.train_one_epoch, for
              data.resident false (host BatchLoader) vs true (rows resident on the device), at 32 px (resized
              from 28, the default) and 28 px (native), interleaved rounds, median.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/data_path.py [--device cpu|cuda] [--rounds 5] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

_STARTUP = r'''
import time, torch, torch._dynamo  # torch.optim imports dynamo on first use: keep imports out of the clock
from richkd.config import Config
from richkd.trainer import Run
import richkd.data, richkd.models, richkd.objective, richkd.teachers
cfg = Config.from_dict({"device": "cpu", "data": {"dataset": "fashion_mnist"}, "student": {"arch": "resnet8"},
                        "loss": {"method": "supervised"}, "train": {"epochs": 1}})
t = time.perf_counter(); Run(cfg); print(time.perf_counter() - t)
'''


def bench_startup(rounds: int) -> dict:
    cache = tempfile.mkdtemp(prefix="richkd-decoded-bench-")

    def once(setting: str) -> float:
        env = dict(os.environ, RICHKD_DECODED_CACHE=setting, OMP_NUM_THREADS="1",
                   PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", _STARTUP], env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"start-up probe failed (RICHKD_DECODED_CACHE={setting}):\n{out.stderr[-3000:]}")
        return float(out.stdout.strip().splitlines()[-1])

    times = {"cold (decode + write)": [once(cache)], "off (decode)": [], "warm (mmap)": []}
    for _ in range(rounds):
        times["off (decode)"].append(once("off"))
        times["warm (mmap)"].append(once(cache))
    return {k: {"median_s": statistics.median(v), "rounds_s": v} for k, v in times.items()}


def bench_throughput(device: str, rounds: int, train_rows: int) -> dict:
    import torch

    from richkd.config import Config
    from richkd.data import make_loader
    from richkd.trainer import Run

    runs = {}
    for size in (32, 28):
        for resident in (False, True):
            cfg = Config.from_dict({
                "device": device, "seed": 0,
                "data": {"dataset": "fashion_mnist", "image_size": size, "batch_size": 64, "resident": resident,
                         "max_train_samples": train_rows},
                "student": {"arch": "resnet8"}, "loss": {"method": "supervised"},
                "optim": {"schedule": "cosine"}, "train": {"epochs": 100}})
            runs[f"{'resident' if resident else 'loader'}/{size}px"] = Run(cfg)

    def data_only(run) -> float:
        ds = run.train_set if run.resident_train is None else run.resident_train
        n, t = 0, time.perf_counter()
        for b in make_loader(ds, 64, shuffle=True, seed=0):
            n += len(b)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    def train(run, epoch: int) -> float:
        t = time.perf_counter()
        run.train_one_epoch(epoch)   # ends with a float() of the loss: synchronised
        return len(run.train_set) / (time.perf_counter() - t)

    for run in runs.values():        # warm-up: first-touch allocations, kernel selection
        data_only(run)
        train(run, 1)
    res = {k: {"data_img_s": [], "train_img_s": []} for k in runs}
    for r in range(rounds):
        for name, run in runs.items():
            res[name]["data_img_s"].append(data_only(run))
            res[name]["train_img_s"].append(train(run, r + 2))
    return {k: {m: statistics.median(v) for m, v in d.items()} | {"rounds": d} for k, d in res.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a CPU trial gets its Ray grant, often 1)")
    p.add_argument("--train-rows", type=int, default=2048, help="training rows per timed epoch")
    p.add_argument("--only", default="startup,throughput")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    out: dict = {"device": a.device, "threads": a.threads, "load_avg_start": os.getloadavg()}
    if "startup" in a.only:
        out["startup"] = bench_startup(a.rounds)
        print("Run() construction (fresh process, imports excluded), median of rounds:")
        for k, v in out["startup"].items():
            print(f"  {k:24s} {v['median_s']:.3f} s   rounds {', '.join(f'{x:.2f}' for x in v['rounds_s'])}")
    if "throughput" in a.only:
        out["throughput"] = bench_throughput(a.device, a.rounds, a.train_rows)
        print(f"images/s on {a.device}, resnet8, batch 64, {a.threads} thread(s), median of {a.rounds} rounds:")
        print(f"  {'mode':16s} {'data path':>10s} {'train epoch':>12s}")
        for k, v in out["throughput"].items():
            print(f"  {k:16s} {v['data_img_s']:10.0f} {v['train_img_s']:12.0f}")
    out["load_avg_end"] = os.getloadavg()
    if a.out:
        from richkd.io import atomic_write_text

        atomic_write_text(a.out, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
