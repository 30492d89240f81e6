"""ImageNet-scale data path and caches (data.dataset: imagenet), measured with the product's own code:

  decode   decoded images/s per core (one thread, one process) for each decode path, PIL vs
           torchvision.io.decode_jpeg: decode only, + the training crop (RandomResizedCrop 224 + flip), + the
           evaluation crop (Resize 256 + CenterCrop 224), + 10 view crops (what a cache build does per image)
  build    cache build images/s: richkd.cache.prepare_caches on an ImageNet-layout folder, V views, resnet34 teacher
           and a ViT-B-32 CLIP (random weights: the cost is the same), next to `--plan`'s estimate of that build
  trial    trial images/s, resnet34 -> resnet18 at 224 px (RichKD-L+F, ViT-B-32 CLIP): cached views vs both
           teachers online, through Run (the loader decodes and crops, then Run.step), interleaved rounds
  plan     `richkd cache --plan` for all of ImageNet-1k: 1,281,167 images x 10 views, 1000 classes, resnet34 + ViT-L-14
  memory   memory of a process reading random batches from a 4 GB sharded cache (sparse files): anonymous memory
           stays flat, only the touched file pages are mapped (shared with every trial on the node)

The photos are real: crops of matplotlib's sample photograph (grace_hopper.jpg) at ImageNet's typical sizes
(about 500 x 375), saved as JPEG quality 90, so decoding costs what ImageNet's files cost.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/imagenet_bench.py [--only decode,build,trial,plan,memory]
        [--rounds 3] [--threads 2] [--out benchmarks/results_imagenet.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchkit as bk  # noqa: E402  (offline environment, repository on sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402

WNIDS = ("n03595614", "n03594734", "n04370456", "n03450230")     # T-shirt, jeans, sweatshirt, gown
SIZES = ((500, 375), (375, 500), (500, 333), (400, 400), (500, 400))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_photos(root: Path, per_class: int, val_per_class: int = 1, seed: int = 0) -> list[Path]:
    """root/{train,val}/<wnid>/*.JPEG: random crops of a real photograph at ImageNet-like sizes."""
    from matplotlib import cbook
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        photo = im.convert("RGB")
    paths = []
    for c, wnid in enumerate(WNIDS):
        for k in range(per_class + val_per_class):
            split = "train" if k < per_class else "val"
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out = photo.crop((x, y, x + cw, y + ch)).resize(SIZES[(c + k) % len(SIZES)], Image.BICUBIC)
            out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.3, 1.7)))
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            paths.append(d / f"{wnid}_{k}.JPEG")
            out.save(paths[-1], quality=90)
    return paths


# ----- decode ---------------------------------------------------------------------------------------------

def bench_decode(work: Path, rounds: int) -> dict:
    from richkd.data.photos import crop_box, decode_image, eval_crop, image_hw, rrc_box, view_box

    paths = [str(p) for p in write_photos(work / "decode", per_class=12, val_per_class=0)]
    kb = statistics.mean(os.path.getsize(p) for p in paths) / 1024

    def modes(decoder: str) -> dict:
        def decode(p, i):
            return decode_image(p, decoder)

        def train(p, i):
            im = decode_image(p, decoder)
            return crop_box(im, rrc_box(*image_hw(im), i), 224)

        def evaluate(p, i):
            return eval_crop(decode_image(p, decoder), 224)

        def views10(p, i):
            im = decode_image(p, decoder)
            h, w = image_hw(im)
            return [crop_box(im, view_box(0, i, v, h, w), 224) for v in range(10)]
        return {"decode": decode, "decode+train crop": train, "decode+eval crop": evaluate,
                "decode+10 view crops": views10}

    fns = {f"{dec}/{mode}": fn for dec in ("pil", "torchvision") for mode, fn in modes(dec).items()}
    for fn in fns.values():                      # warm-up
        fn(paths[0], 0)
    per_round = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for i, p in enumerate(paths):
                fn(p, i)
            per_round[name].append(len(paths) / (time.perf_counter() - t))
        log(f"  decode round {r + 1}/{rounds}")
    out = {name: {"images_per_s_per_core": statistics.median(v), "rounds": [round(x, 1) for x in v]}
           for name, v in per_round.items()}
    out["_files"] = {"count": len(paths), "mean_kb": round(kb, 1), "sizes": [list(s) for s in SIZES]}
    return out


# ----- shared assets for build / trial ---------------------------------------------------------------------

def assets(work: Path, per_class: int) -> dict:
    import open_clip

    from richkd.models import create_model, save_model_checkpoint

    root = work / "imagenet"
    if not root.is_dir():
        write_photos(root, per_class=per_class, val_per_class=1)
    torch.manual_seed(0)
    teacher = work / "resnet34.pth"
    if not teacher.is_file():
        save_model_checkpoint(create_model("resnet34", len(WNIDS)), teacher)
    clip = work / "vit_b_32_random.pt"
    if not clip.is_file():
        torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), clip)
    return {"root": root, "teacher": teacher, "clip": clip}


def config(a: dict, work: Path, **over):
    from richkd.config import Config

    cfg = Config.from_dict({
        "device": "cpu", "seed": 0,
        "data": {"dataset": "imagenet", "root": str(a["root"]), "image_size": 224, "val_fraction": 0.1,
                 "batch_size": 16, "eval_batch_size": 16},
        "student": {"arch": "resnet18"},
        "teacher": {"arch": "resnet34", "checkpoint": str(a["teacher"])},
        "clip": {"model": "ViT-B-32", "pretrained": str(a["clip"]), "prompt_set": "simple", "batch_size": 16},
        "loss": {"method": "richkd", "feat_weight": 0.8, "nce_k": 16},
        "teaching": {"cache_dir": str(work / "cache"), "views": 4},
        "optim": {"lr": 0.1}, "train": {"epochs": 100}})
    return cfg.with_overrides(over) if over else cfg


def bench_build(work: Path, per_class: int) -> dict:
    from richkd.cache import prepare_caches
    from richkd.cache.identity import cached_rows
    from richkd.cache.estimate import estimate_caches
    from richkd.data import build_data

    a = assets(work, per_class)
    cfg = config(a, work)
    n = len(cached_rows(build_data(cfg.data), "train"))
    plan = estimate_caches(cfg)
    started = time.perf_counter()
    prepare_caches(cfg)
    seconds = time.perf_counter() - started
    return {"images": n, "views": cfg.teaching.views, "seconds": seconds, "images_per_s": n / seconds,
            "views_per_s": n * cfg.teaching.views / seconds, "plan_estimate_s": plan.estimate_s,
            "plan_rates": plan.rates, "plan_bytes": plan.total_bytes}


def bench_trial(work: Path, per_class: int, rounds: int, batches: int) -> dict:
    from richkd.cache import prepare_caches
    from richkd.data import make_loader
    from richkd.trainer import Run

    a = assets(work, per_class)
    cached_cfg = config(a, work)
    prepare_caches(cached_cfg)
    runs = {"cached views (V=4)": Run(cached_cfg),
            "online teachers": Run(config(a, work, **{"teaching.mode": "online", "teaching.views": 1}))}

    def epoch_part(run, seed: int) -> tuple[float, float]:
        loader = make_loader(run.train_set, run.cfg.data.batch_size, shuffle=True, seed=seed)
        n, data_s, started = 0, 0.0, time.perf_counter()
        it = iter(loader)
        for _ in range(batches):
            t = time.perf_counter()
            batch = next(it)
            data_s += time.perf_counter() - t
            run.step(batch)
            n += len(batch)
        return n / (time.perf_counter() - started), n / data_s

    for run in runs.values():
        epoch_part(run, 0)                           # warm-up
    res = {name: {"train": [], "data": []} for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            train, data = epoch_part(run, r + 1)
            res[name]["train"].append(train)
            res[name]["data"].append(data)
        log(f"  trial round {r + 1}/{rounds}: " + ", ".join(f"{k}={v['train'][-1]:.1f}" for k, v in res.items()))
    out = {name: {"images_per_s": statistics.median(v["train"]), "loader_images_per_s": statistics.median(v["data"]),
                  "rounds": [round(x, 2) for x in v["train"]]} for name, v in res.items()}
    out["cached/online"] = out["cached views (V=4)"]["images_per_s"] / out["online teachers"]["images_per_s"]
    return out


def bench_plan(work: Path) -> dict:
    from richkd.cache.entries import default_shard_rows
    from richkd.cache.estimate import estimate_caches, format_estimate

    a = assets(work, per_class=2)
    cfg = config(a, work, **{"clip.model": "ViT-L-14", "teaching.views": 10, "data.num_workers": 16})
    plan = estimate_caches(cfg, images=1_281_167, num_classes=1000)
    text = format_estimate(plan, cfg, default_shard_rows())
    print(text)
    topk = estimate_caches(cfg.with_overrides({"teaching.logit_topk": 10}), images=1_281_167, num_classes=1000,
                       calibrate=False)
    return {"text": text, "total_gb": plan.total_bytes / 1e9, "entries_gb": {k: plan.entry_bytes(k) / 1e9
            for k in plan.entries}, "topk10_total_gb": topk.total_bytes / 1e9, "estimate_h": plan.estimate_s / 3600,
            "seconds": plan.seconds, "rates": plan.rates}


def bench_memory(work: Path, batches: int) -> dict:
    from richkd.cache.entries import ShardedArray

    folder = work / "sparse"
    n_shards, rows, views, classes = 50, 4096, 10, 1000
    for i in range(n_shards):
        d = folder / f"shard-{i:05d}"
        d.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(d / "logits.npy", mode="w+", dtype=np.float16, shape=(rows, views, classes))
        del arr                                    # a sparse file: nothing written but the header
    logits = ShardedArray(folder, "logits", n_shards * rows, views, rows, (classes,), "float16")
    rng = np.random.default_rng(0)
    before = _status()
    for _ in range(batches):
        flat = np.sort(rng.integers(0, logits.shape[0], 512))
        np.asarray(logits[flat], dtype=np.float32)
    after = _status()
    return {"cache_gb": logits.shape[0] * classes * 2 / 1e9, "batches": batches, "batch": 512, "before_mb": before,
            "after_mb": after}


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="decode,build,trial,plan,memory")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads for build / trial / plan (decode uses 1)")
    p.add_argument("--per-class", type=int, default=8, help="training photos per class for build and trial")
    p.add_argument("--batches", type=int, default=2, help="trial batches (of 16) per round")
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=str(HERE / "results_imagenet.json"))
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="richkd-imagenet-bench-"))
    os.environ.setdefault("RICHKD_DECODED_CACHE", str(work / "decoded"))
    out: dict = {"machine": bk.machine_info("cpu"), "load_avg_start": os.getloadavg()}
    only = a.only.split(",")

    def save() -> None:
        from richkd.io import atomic_write_text

        atomic_write_text(a.out, json.dumps(out, indent=1, default=str))

    if "decode" in only:
        torch.set_num_threads(1)
        log("decode ...")
        out["decode"] = bench_decode(work, a.rounds)
        print("decoded images/s per core (1 thread), median of rounds:")
        for k, v in out["decode"].items():
            if not k.startswith("_"):
                print(f"  {k:36s} {v['images_per_s_per_core']:7.1f}")
        save()
    torch.set_num_threads(a.threads)
    if "build" in only:
        log("build ...")
        out["build"] = r = bench_build(work, a.per_class)
        print(f"cache build: {r['images']} images x {r['views']} views in {r['seconds']:.1f} s = "
              f"{r['images_per_s']:.2f} images/s ({r['views_per_s']:.2f} views/s); --plan estimated "
              f"{r['plan_estimate_s']:.1f} s")
        save()
    if "trial" in only:
        log("trial ...")
        out["trial"] = r = bench_trial(work, a.per_class, a.rounds, a.batches)
        print("trial images/s, resnet34 -> resnet18 at 224 px, RichKD-L+F, ViT-B-32, batch 16:")
        for k, v in r.items():
            if isinstance(v, dict):
                print(f"  {k:22s} {v['images_per_s']:6.2f} (loader alone {v['loader_images_per_s']:.1f})")
        print(f"  cached/online          {r['cached/online']:.2f}x")
        save()
    if "plan" in only:
        log("plan ...")
        out["plan"] = bench_plan(work)
        save()
    if "memory" in only:
        log("memory ...")
        out["memory"] = r = bench_memory(work, batches=200)
        print(f"memory reading {r['batches']} random batches of 512 from a {r['cache_gb']:.1f} GB sharded cache: "
              f"before {r['before_mb']}, after {r['after_mb']} (MB)")
    out["load_avg_end"] = os.getloadavg()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
