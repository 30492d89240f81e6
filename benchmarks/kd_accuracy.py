"""Accuracy of the teaching modes on real Fashion-MNIST: online teaching vs the official protocol vs cached multi-view
(FKD-style) teaching vs cached clean-view teaching, with the same student, teacher, CLIP, epochs and seeds.

Everything is the product's own code path: the teacher is trained with `richkd.trainer.Run` (supervised), the tiny
CLIP is written by `richkd.clip.init_tiny_clip` (what `richkd clip init-tiny` does), caches are built by
`richkd.cache.prepare_caches`, and every student is a `richkd.trainer.Run` on a `richkd.config.Config`. The four
modes differ only in `teaching.mode` / `teaching.views`; all use `data.augment: standard` (random crop with 4 px
zero padding + horizontal flip):

  online        teacher and CLIP run on the student's random crop+flip every step (consistent, slowest);
  official      the official RichKD protocol: the teacher runs on the student's crop+flip every step, CLIP's
                outputs of the un-augmented image are read from the cache;
  views<V>      cached multi-view teaching: V seeded crop+flip views per image (view 0 clean) cached once; each
                epoch a sample draws one of its V views, and the student sees exactly that view;
  clean         cached clean-view teaching: both teachers' outputs of the un-augmented image, while the student
                sees a random crop+flip (no teacher runs);
  supervised    the reference: the same student with CE only (no teacher), to show what the teacher adds at all.

Model selection and the comparison use the seeded validation split; test top-1 is read once, after the last
epoch, and reported only as a final number. Each seed runs in its own process (1 torch thread, what a 1-CPU trial
gets; the seeds run in parallel); the teacher and the caches are built in this process, with 1 torch thread too.
Inside a seed's process the modes are trained in interleaved epochs (epoch e of every mode before epoch e + 1
of any, the order rotating), so their images/s are measured side by side. Every Run seeds itself at construction,
so all modes of a seed start from identical student weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent

# Full: about 10-15 minutes on 2 loaded cores. Quick: a smoke test of the flow, about 2-3 minutes.
SIZES = {
    "full": {"n_train": 5000, "n_eval": 2000, "epochs": 5, "seeds": [0, 1], "views": 8,
             "teacher_arch": "resnet8", "teacher_train": 30000, "teacher_epochs": 3},
    "quick": {"n_train": 600, "n_eval": 300, "epochs": 2, "seeds": [0], "views": 4,
              "teacher_arch": "resnet8", "teacher_train": 1000, "teacher_epochs": 1},
}
STUDENT_ARCH = "resnet8"


def base_config(root: Path, sz: dict) -> dict:
    """The student run every mode shares: RichKD-L (alpha 0.7, T 3, w_L 3, w_CE 1; no CRD memory bank), resnet8 on
    native 28 px Fashion-MNIST, crop+flip, SGD 0.05 with a cosine schedule, batch 64, 1 torch thread."""
    return {
        "name": "kd_accuracy", "seed": 0, "device": "cpu",
        "data": {"dataset": "fashion_mnist", "image_size": 28, "augment": "standard", "val_fraction": 0.1,
                 "split_seed": 0, "max_train_samples": sz["n_train"], "max_eval_samples": sz["n_eval"],
                 "batch_size": 64, "eval_batch_size": 256},
        "student": {"arch": STUDENT_ARCH},
        "teacher": {"arch": sz["teacher_arch"], "checkpoint": str(root / "teacher" / "student.pt")},
        "clip": {"model": "richkd-tiny", "pretrained": str(root / "tiny_clip.pt"), "prompt_set": "simple"},
        "loss": {"method": "richkd", "ce_weight": 1.0, "logit_weight": 3.0, "temperature": 3.0,
                 "fusion_alpha": 0.7, "clip_logit_scale": 1.0, "feat_weight": 0.0},
        "teaching": {"mode": "cached", "cache_dir": str(root / "cache"), "views": 1, "view_seed": 0},
        "optim": {"lr": 0.05, "schedule": "cosine", "milestones": []},
        "train": {"epochs": sz["epochs"], "eval_every": 1, "threads": 1},
    }


def mode_configs(root: Path, sz: dict) -> dict[str, dict]:
    """{mode name: Config dict} for the three teaching modes, plus the no-teacher reference `supervised` (CE only,
    same augmentation), which shows how much the teacher adds at all (seed 0; the worker sets each seed)."""
    base = base_config(root, sz)
    teaching = {"online": {"mode": "online", "views": 1},
                "official": {"mode": "official", "views": 1},
                f"views{sz['views']}": {"mode": "cached", "views": sz["views"]},
                "clean": {"mode": "cached", "views": 1}}
    out = {}
    for name, t in teaching.items():
        cfg = json.loads(json.dumps(base))
        cfg["name"] = f"kd_accuracy_{name}"
        cfg["teaching"].update(t)
        out[name] = cfg
    ref = json.loads(json.dumps(base))
    ref["name"] = "kd_accuracy_supervised"
    ref["loss"] = {"method": "supervised"}
    out["supervised"] = ref
    return out


def teacher_config(root: Path, sz: dict) -> dict:
    """The conventional teacher: supervised, same validation split (split_seed, val_fraction) as the students, so
    it never trains on their validation rows; 6x the students' rows, with crop+flip (as CIFAR teachers are)."""
    cfg = base_config(root, sz)
    cfg.update(name="kd_accuracy_teacher", student={"arch": sz["teacher_arch"]},
               teacher={"arch": None, "checkpoint": None})
    cfg["data"].update(max_train_samples=sz["teacher_train"], batch_size=128)
    cfg["loss"] = {"method": "supervised"}
    cfg["optim"] = {"lr": 0.1, "schedule": "cosine", "milestones": []}
    cfg["train"] = {"epochs": sz["teacher_epochs"], "threads": 1}
    return cfg


def prepare_teacher(root: Path, sz: dict, log: Callable) -> dict:
    """Train (or reuse, when its config is unchanged) the teacher and write the tiny CLIP."""
    from richkd.clip import init_tiny_clip
    from richkd.config import Config
    from richkd.trainer import Run

    root.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    if not (root / "tiny_clip.pt").is_file():
        init_tiny_clip(root / "tiny_clip.pt")
    cfg = Config.from_dict(teacher_config(root, sz))
    done = root / "teacher" / "result.json"
    if done.is_file() and json.loads(done.read_text())["config"] == cfg.to_dict():
        res = json.loads(done.read_text())
        log(f"  reusing the trained teacher in {done.parent}")
        info.update(reused=True, train_wall_s=res.get("train_wall_s"))
    else:
        log(f"  training the teacher: {cfg.student.arch}, {sz['teacher_train']} rows x {sz['teacher_epochs']} epochs")
        t0 = time.perf_counter()
        run = Run(cfg)
        result = run.train(final=True)  # the teacher's test top-1 is a final number, never used for selection
        wall = time.perf_counter() - t0
        run.save_outputs(result, root / "teacher")
        res = json.loads(done.read_text())
        res["train_wall_s"] = wall
        from richkd.io import atomic_write_text

        atomic_write_text(done, json.dumps(res, indent=1, default=float))
        info.update(reused=False, train_wall_s=wall)
    info.update(arch=cfg.student.arch, train_rows=sz["teacher_train"], epochs=sz["teacher_epochs"],
                val_top1=res["metrics"]["val_top1"], test_top1_final=res["test_metrics"]["test_top1"])
    return info


def build_caches(configs: dict[str, dict], log: Callable) -> dict:
    """Build each cached mode's teacher + CLIP caches and the official mode's CLIP cache (one-off, shared by
    every seed and trial; official and clean share the clean CLIP cache, built by whichever comes first); time each.

    With 1 torch thread: on these 2 shared cores, 2 threads built the same cache 5.7x slower (7.6 s vs 43.9 s
    at load 5-7), the oversubscription the README's throughput section describes."""
    import torch

    from richkd.cache import prepare_caches
    from richkd.config import Config

    torch.set_num_threads(1)
    out = {}
    for name, raw in configs.items():
        cfg = Config.from_dict(raw)
        if cfg.teaching.mode == "online" or not cfg.loss.uses_teacher:
            continue
        log(f"  building the {name} caches ({cfg.teaching.views} view(s) per image)")
        t0 = time.perf_counter()
        paths = prepare_caches(cfg)
        out[name] = {"build_s": round(time.perf_counter() - t0, 1), "views": cfg.teaching.views,
                     "mb": round(sum(f.stat().st_size for p in paths for f in Path(p).iterdir()) / 2**20, 2)}
    return out


# ----- one seed, in its own process (benchmarks/worker.py accuracy) ------------------------------------------------

def train_interleaved(configs: dict[str, dict], seed: int) -> dict:
    """Train every mode's student for one seed, epoch by epoch in rotating order; per mode: the val curve, train
    and eval wall time, train images/s, and the final test top-1 (read once, after the last epoch)."""
    import torch

    from richkd.config import Config
    from richkd.trainer import Run

    names = list(configs)
    cfgs = {n: Config.from_dict(dict(raw, seed=seed)) for n, raw in configs.items()}
    epochs = {c.train.epochs for c in cfgs.values()}
    assert len(epochs) == 1, "every mode must train the same number of epochs"
    epochs = epochs.pop()
    if cfgs[names[0]].train.threads:
        torch.set_num_threads(cfgs[names[0]].train.threads)
    runs, build_s = {}, {}
    for n in names:
        t0 = time.perf_counter()
        runs[n] = Run(cfgs[n])
        build_s[n] = time.perf_counter() - t0
    wall = {n: 0.0 for n in names}
    for e in range(1, epochs + 1):
        k = (e - 1) % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            runs[n].train(stop_after_epoch=e)
            wall[n] += time.perf_counter() - t0
    out = {}
    for n in names:
        run = runs[n]
        hist = run.history
        train_s = sum(h["epoch_time_s"] for h in hist)
        images = len(run.train_set) * len(hist)
        test = run.evaluate("test")  # final number only
        last = hist[-1]
        out[n] = {
            "seed": seed, "n_train": len(run.train_set), "n_val": len(run.data.val), "n_test": len(run.data.test),
            "val_top1": last["val_top1"], "best_val_top1": run.best_val_top1,
            "val_top1_curve": [round(h["val_top1"], 2) for h in hist],
            "train_loss_curve": [round(h["train_loss"], 4) for h in hist],
            "test_top1_final": test["test_top1"],
            "teacher_val_top1": last.get("teacher_val_top1"), "fused_val_top1": last.get("fused_val_top1"),
            "train_s": train_s, "train_images_per_s": images / train_s, "wall_s": wall[n], "build_s": build_s[n],
            "epoch_time_s": [round(h["epoch_time_s"], 2) for h in hist],
        }
    return out


def _launch(configs: dict, seed: int, work: Path) -> subprocess.Popen:
    plan = work / f"accuracy-plan-seed{seed}.json"
    plan.write_text(json.dumps({"configs": configs, "seed": seed}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(HERE / "worker.py"), "accuracy", "--plan", str(plan)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _collect(proc: subprocess.Popen, timeout: float) -> dict:
    stdout, stderr = proc.communicate(timeout=timeout)
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"accuracy worker failed (rc {proc.returncode}):\n{stderr[-3000:]}")


def _mean(xs: list) -> float:
    return sum(xs) / len(xs)


def accuracy(root: Path, quick: bool = False, log: Callable = print, views: int | None = None,
             seeds: list[int] | None = None) -> dict:
    sz = dict(SIZES["quick" if quick else "full"])
    if views:
        sz["views"] = views
    if seeds:
        sz["seeds"] = seeds
    t0 = time.perf_counter()
    teacher = prepare_teacher(root, sz, log)
    teacher_s = time.perf_counter() - t0
    configs = mode_configs(root, sz)
    caches = build_caches(configs, log)
    log(f"  training {len(configs)} modes x seeds {sz['seeds']}: {sz['n_train']} rows x {sz['epochs']} epochs, "
        "one process per seed, modes interleaved by epoch")
    t1 = time.perf_counter()
    procs = {s: _launch(configs, s, root) for s in sz["seeds"]}
    per_seed = {}
    try:
        for s, p in procs.items():
            per_seed[s] = _collect(p, timeout=3600)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    train_wall = time.perf_counter() - t1
    rows, ratios = summarise(sz, per_seed, caches)
    return {
        "settings": {**sz, "student": STUDENT_ARCH, "dataset": "Fashion-MNIST (Debian package), 28 px, crop pad 4 + "
                     "flip", "loss": "RichKD-L: alpha 0.7, T 3, w_L 3, w_CE 1, clip_logit_scale 1",
                     "clip": "richkd-tiny, random weights (offline): its cosines are noise, so CLIP contributes "
                     "little; the conventional teacher carries the signal",
                     "optim": "SGD 0.05 momentum 0.9 wd 5e-4, cosine, batch 64", "torch_threads": 1,
                     "selection": "val split (seeded, 10% of train, capped); test read once after the last epoch"},
        "teacher": {**teacher, "wall_s": round(teacher_s, 1)},
        "caches": caches,
        "rows": rows, "ratios": ratios,
        "students_wall_s": round(train_wall, 1),
        "per_seed": per_seed,
    }


def _median(xs: list) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summarise(sz: dict, per_seed: dict, caches: dict) -> tuple[list[dict], dict]:
    """Table rows (means over seeds) and the side-by-side comparisons.

    Speed ratios are the median over (seed, epoch) of the per-epoch time ratio: epoch e of every mode runs within
    the same round, so a per-epoch ratio sees one load level, while whole-run means mix rounds whose load differed
    up to 3x on the shared machine."""
    per_seed = {int(k): v for k, v in per_seed.items()}
    names = list(per_seed[sz["seeds"][0]])
    rows = []
    for n in names:
        rs = [per_seed[s][n] for s in sz["seeds"]]
        val = [r["val_top1"] for r in rs]
        rows.append({
            "mode": n, "val_top1_mean": round(_mean(val), 2),
            "val_top1_per_seed": " / ".join(f"{v:.2f}" for v in val),
            "best_val_top1_mean": round(_mean([r["best_val_top1"] for r in rs]), 2),
            "train_images_per_s": round(_mean([r["train_images_per_s"] for r in rs]), 1),
            "train_s_per_seed": round(_mean([r["train_s"] for r in rs]), 1),
            "wall_s_per_seed": round(_mean([r["wall_s"] + r["build_s"] for r in rs]), 1),
            "cache_build_s": caches.get(n, {}).get("build_s", 0.0),
            "test_top1_final_mean": round(_mean([r["test_top1_final"] for r in rs]), 2),
        })
    ratios = {}
    vname = f"views{sz['views']}"
    for a, b in ((vname, "online"), ("clean", "online"), (vname, "clean"), ("official", "online"),
                 ("clean", "official")):
        ratios[f"images/s {a}/{b} (median of per-epoch ratios)"] = round(_median(
            [tb / ta for s in sz["seeds"]
             for ta, tb in zip(per_seed[s][a]["epoch_time_s"], per_seed[s][b]["epoch_time_s"])]), 2)
        ratios[f"images/s {a}/{b} (ratio of whole-run means)"] = round(_mean(
            [per_seed[s][a]["train_images_per_s"] / per_seed[s][b]["train_images_per_s"] for s in sz["seeds"]]), 2)
    for a, b in ((vname, "online"), ("clean", "online"), (vname, "clean"), ("official", "online"),
                 ("clean", "official"), ("online", "supervised")):
        diffs = [per_seed[s][a]["val_top1"] - per_seed[s][b]["val_top1"] for s in sz["seeds"]]
        ratios[f"val top-1 {a} - {b} (points; per seed)"] = (
            f"{_mean(diffs):+.2f} (" + ", ".join(f"{d:+.2f}" for d in diffs) + ")")
    if vname in caches:
        v_build = caches[vname]["build_s"]
        per_epoch_saving = (_mean([per_seed[s]["online"]["train_s"] - per_seed[s][vname]["train_s"]
                                   for s in sz["seeds"]]) / sz["epochs"])
        ratios[f"{vname} cache build (s, one-off)"] = v_build
        ratios[f"online - {vname} train time per epoch (s, per trial)"] = round(per_epoch_saving, 1)
    return rows, ratios

