"""Paper-fidelity evidence on real Fashion-MNIST: KD, RichKD-L in every teaching mode, RichKD+DKD and RichKD with
logit standardisation, with the same student, teacher, CLIP, data, epochs and seeds; and the per-step cost of the
two CRD negative samplers (loss.nce_sampling).

    PYTHONPATH=$PWD python benchmarks/fidelity.py [--work DIR] [--epochs 3] [--seeds 0,1,2] [--out FILE]
    PYTHONPATH=$PWD python benchmarks/fidelity.py --only speed,sampling   (after accuracy: it reuses its teacher)

Everything runs through the product: the teacher and the tiny CLIP come from benchmarks/kd_accuracy.py (a resnet8
trained by richkd.trainer.Run on 30 000 rows, and richkd.clip.init_tiny_clip), caches from
richkd.cache.prepare_caches, and each student is a richkd.trainer.Run; every seed trains all arms in its own process
with interleaved epochs (kd_accuracy.train_interleaved), so images/s are measured side by side.

**The CLIP has random weights** (offline: no real CLIP can be downloaded), so its cosines carry no knowledge of the
classes: any difference between RichKD and KD here comes from the fusion's softening of the teacher (alpha), the
loss form or the teaching protocol, never from CLIP (docs/method.md#logit-fusion).

Arms (RichKD-L: alpha 0.7, T 3, w_L 3, w_CE 1, no CRD term; resnet8 student on 5 000 rows, crop + flip):
  kd                Hinton KD on the teacher alone, same T and weights (loss.method kd), official protocol
  L/online          RichKD-L, teacher and CLIP online on the student's view
  L/official        RichKD-L, the official protocol: teacher online, CLIP of the clean image from the cache
  L/cached          RichKD-L, both teachers of the clean image from the cache
  L/views4          RichKD-L, 4 cached views per image (FKD-style)
  L+DKD/official    the fused teacher distilled with DKD: mdistiller's alpha 1, beta 8, T 4, w 1; the warm-up is
                    scaled with the schedule (mdistiller: 20 of 240 epochs, here 1 of E epochs, i.e. none)
  L+LS/official     RichKD-L with logit standardisation (loss.logit_stand), everything else as L/official
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kd_accuracy  # noqa: E402  (benchmarks/ is not a package)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def arm_configs(root: Path, sz: dict) -> dict[str, dict]:
    """{arm: Config dict} sharing kd_accuracy's base run (student, data, optimiser, threads)."""
    base = kd_accuracy.base_config(root, sz)

    def arm(name: str, teaching: dict, **loss) -> dict:
        cfg = json.loads(json.dumps(base))
        cfg["name"] = f"fidelity_{name.replace('/', '_').replace('+', 'p')}"
        cfg["teaching"].update(teaching)
        cfg["loss"].update(loss)
        return cfg

    official = {"mode": "official", "views": 1}
    return {
        "kd": arm("kd", official, method="kd"),
        "L/online": arm("L/online", {"mode": "online", "views": 1}),
        "L/official": arm("L/official", official),
        "L/cached": arm("L/cached", {"mode": "cached", "views": 1}),
        "L/views4": arm("L/views4", {"mode": "cached", "views": 4}),   # 4 views: a cheaper cache than 8
        "L+DKD/official": arm("L+DKD/official", official, kd_form="dkd", dkd_alpha=1.0, dkd_beta=8.0,
                              temperature=4.0, logit_weight=1.0,
                              dkd_warmup_epochs=max(1, round(20 * sz["epochs"] / 240))),
        "L+LS/official": arm("L+LS/official", official, logit_stand=True),
    }


def accuracy(work: Path, epochs: int, seeds: list[int]) -> dict:
    sz = dict(kd_accuracy.SIZES["full"], epochs=epochs, seeds=seeds, views=4)
    t0 = time.perf_counter()
    teacher = kd_accuracy.prepare_teacher(work, sz, log)
    configs = arm_configs(work, sz)
    caches = kd_accuracy.build_caches(configs, log)
    log(f"training {len(configs)} arms x seeds {seeds}: {sz['n_train']} rows x {epochs} epochs, one process per seed")
    t1 = time.perf_counter()
    procs = {s: kd_accuracy._launch(configs, s, work) for s in seeds}
    per_seed = {}
    try:
        for s, p in procs.items():
            per_seed[s] = kd_accuracy._collect(p, timeout=4 * 3600)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    rows = []
    for name in configs:
        rs = [per_seed[s][name] for s in seeds]
        val = [r["val_top1"] for r in rs]
        rows.append({
            "arm": name, "val_top1_mean": round(statistics.fmean(val), 2),
            "val_top1_std": round(statistics.stdev(val), 2) if len(val) > 1 else 0.0,
            "val_top1_per_seed": " / ".join(f"{v:.2f}" for v in val),
            "train_images_per_s": round(statistics.fmean(r["train_images_per_s"] for r in rs), 1),
            "teacher_val_top1": rs[0]["teacher_val_top1"], "fused_val_top1": rs[0]["fused_val_top1"],
        })
    # speed relative to L/official as the median over (seed, epoch) of per-epoch ratios (same load level)
    for row in rows:
        row["speed_vs_official"] = round(statistics.median(
            b / a for s in seeds for a, b in zip(per_seed[s][row["arm"]]["epoch_time_s"],
                                                 per_seed[s]["L/official"]["epoch_time_s"])), 2)
    return {"settings": {**sz, "student": kd_accuracy.STUDENT_ARCH,
                         "clip": "richkd-tiny with RANDOM weights: its cosines carry no class knowledge",
                         "selection": "last-epoch val top-1 on the seeded validation split (2 000 rows)"},
            "teacher": teacher, "caches": caches, "rows": rows, "per_seed": per_seed,
            "teacher_and_caches_s": round(t1 - t0, 1), "students_wall_s": round(time.perf_counter() - t1, 1)}


def speed(work: Path, rounds: int = 16, steps: int = 4) -> dict:
    """Train images/s of every arm, measured side by side: one process, 1 torch thread, each round runs `steps`
    optimisation steps (richkd.trainer.Run.step) of every arm in turn; the median over rounds is reported.

    Epoch-level timings in `accuracy` mix load levels of a shared machine (the arms of a round run minutes
    apart); steps of one round run within seconds of each other. Needs the teacher and caches `accuracy` built.
    """
    import torch

    from richkd.config import Config
    from richkd.data import make_loader
    from richkd.trainer import Run

    torch.set_num_threads(1)
    sz = dict(kd_accuracy.SIZES["full"])
    runs, batches = {}, {}
    for name, raw in arm_configs(work, sz).items():
        run = Run(Config.from_dict(raw))
        run.student.train()
        run.objective.train()
        dataset = run.train_set if run.resident_train is None else run.resident_train
        batches[name] = iter(make_loader(dataset, run.cfg.data.batch_size, shuffle=True, seed=1))
        runs[name] = run
    per_round: dict = {n: [] for n in runs}
    for r in range(rounds + 1):   # round 0 warms up
        for name, run in runs.items():
            t0 = time.perf_counter()
            images = sum(run.step(next(batches[name])).batch_size for _ in range(steps))
            if r:
                per_round[name].append(images / (time.perf_counter() - t0))
        if r:
            log(f"  speed round {r}/{rounds}: " + ", ".join(f"{n}={v[-1]:.0f}" for n, v in per_round.items()))
    med = {n: statistics.median(v) for n, v in per_round.items()}
    return {"images_per_s": {n: round(v, 1) for n, v in med.items()},
            "vs_official": {n: round(v / med["L/official"], 2) for n, v in med.items()},
            "spread": {n: round((max(v) - min(v)) / med[n], 2) for n, v in per_round.items()},
            "rounds": rounds, "steps_per_round": steps, "batch_size": 64, "torch_threads": 1}


def sampling(rounds: int = 6, steps: int = 3) -> dict:
    """Images/s of a RichKD-L+F step (resnet32x4 -> resnet8x4 shapes, 50 000-row bank, K 16384, batch 64) with
    distinct (other_class) vs i.i.d. (uniform) negatives, interleaved (benchkit.interleaved)."""
    import tempfile

    import torch

    import benchkit as bk

    work = tempfile.mkdtemp(prefix="richkd-fidelity-")
    dataset = bk.synthetic_train_set()
    caches = bk.write_synthetic_caches(Path(work) / "cache", clip_dims=(64,))
    specs = [bk.StepSpec("LF", "cached", "tiny", 64), bk.StepSpec("LF", "cached", "tiny", 64, nce_sampling="uniform")]
    benches = {s.name: bk.TrainBench(s, torch.device("cpu"), dataset, caches, work, {}) for s in specs}
    timing = bk.interleaved(benches, {n: steps for n in benches}, rounds, 1, 64, log=log)
    a, b = (timing[s.name]["images_per_s"] for s in specs)
    per_round = [y / x for x, y in zip(timing[specs[0].name]["rounds"], timing[specs[1].name]["rounds"])]
    return {"images_per_s": {n: round(t["images_per_s"], 2) for n, t in timing.items()},
            "spread": {n: round(t["spread"], 3) for n, t in timing.items()},
            "step_time_other_class_over_uniform": round(b / a, 3),
            "per_round_step_time_ratio": [round(r, 3) for r in per_round],
            "machine": bk.machine_info("cpu")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="accuracy,speed,sampling")
    p.add_argument("--work", default="/tmp/richkd_fidelity", help="teacher, CLIP and caches (reused when present)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(HERE / "results_fidelity.json"))
    args = p.parse_args(argv)
    out: dict = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for part in args.only.split(","):
        if part == "accuracy":
            out["accuracy"] = accuracy(Path(args.work), args.epochs, [int(s) for s in args.seeds.split(",")])
            for row in out["accuracy"]["rows"]:
                log(json.dumps(row))
        elif part == "speed":
            out["speed"] = speed(Path(args.work))
            log(json.dumps(out["speed"]["images_per_s"]))
        elif part == "sampling":
            out["sampling"] = sampling()
            log(json.dumps({k: v for k, v in out["sampling"].items() if k != "machine"}))
        else:
            raise SystemExit(f"--only: unknown part {part!r} (accuracy, speed, sampling)")
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
