"""Child processes of the benchmark suite: one training configuration (peak RSS), a cache reader (shared memory),
and a packed GPU trial. Each prints one JSON line prefixed with "RESULT " (and "READY " at a barrier).

    python benchmarks/worker.py train --spec JSON --cache DIR --work DIR [--device cpu] [--warmup 1] [--steps 2]
    python benchmarks/worker.py mem --cache DIR --mode mmap|copy [--train-steps 2]
    python benchmarks/worker.py pack --spec JSON --cache DIR --work DIR --device cuda --fraction F --seconds S
    python benchmarks/worker.py startup --config CONFIG_JSON
    python benchmarks/worker.py accuracy --plan PLAN_JSON_FILE   (kd_accuracy: one seed, every teaching mode)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def proc_status_mb() -> dict:
    from benchkit import proc_status_mb as status  # imports torch: kept out of module import for `startup`

    return status()


def emit(tag: str, payload: dict) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


def wait_for_go() -> str:
    line = sys.stdin.readline()
    return line.strip()


def cmd_train(args) -> None:
    import torch

    import benchkit as bk

    base = proc_status_mb()
    device = torch.device(args.device)
    spec = bk.spec_from_json(args.spec)
    dataset = bk.synthetic_train_set()
    caches = bk.write_synthetic_caches(args.cache)
    bench = bk.TrainBench(spec, device, dataset, caches, args.work)
    built = proc_status_mb()
    bench.run(args.warmup)
    dt = bench.run(args.steps)
    after = proc_status_mb()
    out = {"spec": spec.name, "rss_after_import_mb": base["rss_mb"], "rss_after_build_mb": built["rss_mb"],
           "peak_rss_mb": after["peak_rss_mb"], "images_per_s": args.steps * spec.batch_size / dt}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    emit("RESULT", out)


def cmd_mem(args) -> None:
    """Open the cache (memory-mapped, or copied into private memory as the control), touch every row through
    CachedTeachers over one shuffled epoch, optionally train a few steps from it, then hold still at a barrier
    while the parent reads /proc/PID/smaps."""
    import numpy as np
    import torch

    import benchkit as bk
    from richkd.data.batch import Batch
    from richkd.teachers import CachedTeachers

    torch.set_num_threads(1)
    caches = bk.write_synthetic_caches(args.cache)
    teacher, clip = caches["teacher"], caches["clip512"]
    logits, feat, clip_feat = teacher["logits"], teacher["feat"], clip["feat"]
    if args.mode == "copy":  # the control: private copies, and the file mappings dropped
        import gc

        logits, feat, clip_feat = np.array(logits), np.array(feat), np.array(clip_feat)
        del caches, teacher, clip
        gc.collect()
    device = torch.device("cpu")
    source = CachedTeachers(logits, feat, clip_feat, bk.class_embeddings(512), device, num_rows=bk.N_TRAIN)
    order = torch.randperm(bk.N_TRAIN, generator=torch.Generator().manual_seed(0))
    dummy = torch.zeros(1)
    started = time.perf_counter()
    for start in range(0, bk.N_TRAIN, 64):
        index = order[start:start + 64]
        source(Batch(dummy, index, index), dummy)
    lookup_s = time.perf_counter() - started
    steps = 0
    if args.train_steps:
        # a few real steps of resnet8x4 RichKD-L+F trained from these caches (random images; the cache reads are
        # what matter here, and a 150 MB synthetic dataset per process would hide them)
        from richkd.config import LossConfig
        from richkd.models import create_model
        from richkd.objective import DistillationObjective
        from richkd.trainer import train_step

        student = create_model(bk.STUDENT_ARCH, bk.NUM_CLASSES)
        targets = torch.arange(bk.N_TRAIN) % bk.NUM_CLASSES
        objective = DistillationObjective(LossConfig(method="richkd", feat_weight=0.8), student_dim=student.feat_dim,
                                          teacher_dim=source.teacher_dim, clip_dim=source.clip_dim,
                                          train_targets=targets, train_rows=torch.arange(bk.N_TRAIN))
        opt = torch.optim.SGD(list(student.parameters()) + list(objective.parameters()), lr=0.05, momentum=0.9)
        for s in range(args.train_steps):
            index = order[s * 64:(s + 1) * 64]
            images = torch.rand(64, 3, 32, 32)
            train_step(Batch(images, targets[index], index), forward_student=student, teachers=source,
                       objective=objective, optimizer=opt, device=device, mean=bk.CIFAR100_MEAN, std=bk.CIFAR100_STD)
            steps += 1
    emit("READY", {"lookup_epoch_s": lookup_s, "train_steps": steps, **proc_status_mb()})
    wait_for_go()


def cmd_pack(args) -> None:
    """One packed trial on a shared GPU: memory-capped, warmed up, then timed for --seconds after the parent's GO."""
    import torch

    import benchkit as bk

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":   # what a trial given `fraction` of a GPU does: check CUDA, cap at share - context
        from richkd.tune.cluster import claim_gpu

        claim_gpu(args.fraction, "a packed trial")
    spec = bk.spec_from_json(args.spec)
    dataset = bk.synthetic_train_set()
    caches = bk.write_synthetic_caches(args.cache)
    bench = bk.TrainBench(spec, device, dataset, caches, args.work, seed=args.seed)
    bench.run(args.warmup)
    emit("READY", {"spec": spec.name})
    wait_for_go()
    bk.sync(device)
    t0 = time.perf_counter()
    steps = 0
    while time.perf_counter() - t0 < args.seconds:
        bench.run(args.chunk)
        steps += args.chunk
    elapsed = time.perf_counter() - t0
    out = {"spec": spec.name, "steps": steps, "elapsed_s": elapsed,
           "images_per_s": steps * spec.batch_size / elapsed, **proc_status_mb()}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    emit("RESULT", out)


def cmd_startup(args) -> None:
    """Where a fresh trial process spends its start-up: imports, Run construction (data, caches, models), epochs."""
    import importlib

    marks = {}
    t = time.perf_counter()
    for mod in ("torch", "ray.tune", "richkd.tune.trainable", "richkd.trainer", "richkd.data", "richkd.models"):
        importlib.import_module(mod)
        now = time.perf_counter()
        marks[f"import {mod}"] = now - t
        t = now
    from richkd.config import Config
    from richkd.trainer import Run

    cfg = Config.from_dict(json.loads(args.config))
    run = Run(cfg)
    now = time.perf_counter()
    marks["Run(cfg): data, caches, models"] = now - t
    t = now
    for epoch in (1, 2):
        run.train(stop_after_epoch=epoch)
        now = time.perf_counter()
        marks[f"epoch {epoch} (train + eval)"] = now - t
        t = now
    emit("RESULT", {k: round(v, 3) for k, v in marks.items()})


def cmd_accuracy(args) -> None:
    """One seed of the teaching-mode accuracy comparison (kd_accuracy.train_interleaved)."""
    import kd_accuracy

    plan = json.loads(Path(args.plan).read_text())
    emit("RESULT", kd_accuracy.train_interleaved(plan["configs"], int(plan["seed"])))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    m = sub.add_parser("mem")
    k = sub.add_parser("pack")
    st = sub.add_parser("startup")
    st.add_argument("--config", required=True, help="Config.to_dict() as JSON")
    ac = sub.add_parser("accuracy")
    ac.add_argument("--plan", required=True, help="JSON file: {configs: {mode: Config dict}, seed: N}")
    for q in (t, k):
        q.add_argument("--spec", required=True)
        q.add_argument("--work", required=True)
        q.add_argument("--device", default="cpu")
        q.add_argument("--warmup", type=int, default=1)
    for q in (t, m, k):
        q.add_argument("--cache", required=True)
    t.add_argument("--steps", type=int, default=2)
    m.add_argument("--mode", choices=("mmap", "copy"), default="mmap")
    m.add_argument("--train-steps", type=int, default=2)
    k.add_argument("--fraction", type=float, default=1.0)
    k.add_argument("--seconds", type=float, default=20.0)
    k.add_argument("--chunk", type=int, default=5)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    {"train": cmd_train, "mem": cmd_mem, "pack": cmd_pack, "startup": cmd_startup,
     "accuracy": cmd_accuracy}[args.cmd](args)


if __name__ == "__main__":
    main()
