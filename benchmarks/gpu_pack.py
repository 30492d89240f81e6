"""GPU checks: packed trials on one GPU (k concurrent processes, each capped at 1/k of its memory) and CPU-vs-GPU
agreement of the loss terms on the same seed and batches.

    python benchmarks/gpu_pack.py [--device cuda] [--ks 1,2,4] [--specs L/cached/tiny,LF/cached/tiny]
                                  [--seconds 15] [--agree-steps 3] [--out FILE.json]

Packing: every trial is `benchmarks/worker.py pack` (the same train step as run.py's throughput benchmark), started
together, warmed up, then timed for --seconds after a common GO; the total images/s of k packed trials is compared
with one trial alone (goal: >= 2.5x for k = 4, i.e. a 4-trial sweep per GPU finishes >= 2.5x sooner than a serial
one). Each process takes 1/k of the GPU the way a trial with tune.resources.gpu 1/k does
(richkd.tune.cluster.claim_gpu: its PyTorch memory capped at 1/k of the GPU minus a CUDA context), and gets
cpu_count // k torch threads.

Agreement: the RichKD-L+F step (cached teachers, CRD with 16384 negatives) runs N steps on the CPU and on the GPU
from identical weights, batches and CRD negatives (the GPU run draws its negatives with the CPU generator so both
see the same rows); reported: max |difference| of each loss term, first step and over all steps, with cuDNN's
default TF32 convolutions, with TF32 off, and with bf16 autocast (train.amp).
With --device cpu everything runs on the CPU (a smoke test of this script: the agreement is then exact).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit as bk  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)



def packed_run(spec: bk.StepSpec, k: int, device: str, seconds: float, work: Path, warmup: int) -> dict:
    fraction = 1.0 / k
    threads = max(1, (os.cpu_count() or 1) // k)
    procs = [subprocess.Popen(
        [sys.executable, str(HERE / "worker.py"), "pack", "--spec", bk.spec_to_json(spec), "--cache",
         str(work / "cache"), "--work", str(work), "--device", device, "--fraction", str(fraction),
         "--seconds", str(seconds), "--warmup", str(warmup), "--seed", str(i), "--threads", str(threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bk.child_env())
        for i in range(k)]
    results = []
    try:
        bk.wait_ready(procs, "packed trial")
        for p in procs:  # GO to all at once
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=seconds + 300)
            hit = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if not hit:
                raise RuntimeError(f"packed trial failed: {err[-3000:]}")
            results.append(json.loads(hit[-1][len("RESULT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    total = sum(r["images_per_s"] for r in results)
    return {"spec": spec.name, "k": k, "memory_fraction": round(fraction, 3), "threads_per_trial": threads,
            "total_images_per_s": round(total, 1),
            "per_trial_images_per_s": [round(r["images_per_s"], 1) for r in results],
            "cuda_peak_mb_per_trial": [round(r.get("cuda_peak_mb", 0)) for r in results],
            "rss_mb_per_trial": [round(r["rss_mb"]) for r in results]}


def pack(specs: list[bk.StepSpec], ks: list[int], device: str, seconds: float, work: Path, warmup: int) -> dict:
    rows, goals = [], []
    for spec in specs:
        base = None
        for k in ks:
            log(f"pack: {spec.name} x {k}")
            r = packed_run(spec, k, device, seconds, work, warmup)
            base = r["total_images_per_s"] if k == 1 else base
            r["ratio_vs_1"] = round(r["total_images_per_s"] / base, 2) if base else None
            rows.append(r)
            if k == 4 and r["ratio_vs_1"] is not None:
                goals.append({"goal": f"{spec.name}: 4 packed trials >= 2.5x the images/s of 1 alone",
                              "value": r["ratio_vs_1"], "met": r["ratio_vs_1"] >= 2.5})
    return {"rows": rows, "goals": goals}


# ----- CPU vs GPU loss agreement ------------------------------------------------------------------------------

def _terms_run(device: torch.device, spec: bk.StepSpec, steps: int, dataset, caches, work: Path) -> list[dict]:
    bench = bk.TrainBench(spec, device, dataset, caches, work, seed=0)
    crd = bench.objective.crd
    if crd is not None and device.type != "cpu":
        # same negatives as the CPU run: sample with the product's own sampler on a CPU twin of the class tables
        twin = copy.deepcopy(crd.contrast).to("cpu")
        crd.contrast.sample = lambda index: twin.sample(index.cpu()).to(index.device)
    out = []
    for i in range(steps):
        torch.manual_seed(1000 + i)  # the CPU generator the CRD sampler draws from
        terms = bench.step()
        out.append({k: float(v.detach().float().cpu()) for k, v in terms.items()})
    return out


def agreement(device: str, steps: int, work: Path) -> dict:
    dev = torch.device(device)
    dataset = bk.synthetic_train_set(4096)
    caches = bk.write_synthetic_caches(work / "cache")
    spec = bk.StepSpec("LF", "cached", "tiny", 64)
    log("agreement: CPU reference")
    ref = _terms_run(torch.device("cpu"), spec, steps, dataset, caches, work)
    variants = {}
    settings = [("default (cuDNN TF32 convs)", dict(cudnn_tf32=True, matmul_tf32=False, amp=False)),
                ("TF32 off", dict(cudnn_tf32=False, matmul_tf32=False, amp=False)),
                ("bf16 autocast (train.amp)", dict(cudnn_tf32=True, matmul_tf32=False, amp=True))]
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        for label, s in settings:
            log(f"agreement: {device} {label}")
            torch.backends.cudnn.allow_tf32 = s["cudnn_tf32"]
            torch.backends.cuda.matmul.allow_tf32 = s["matmul_tf32"]
            run_spec = bk.StepSpec("LF", "cached", "tiny", 64, amp=s["amp"])
            got = _terms_run(dev, run_spec, steps, dataset, caches, work)
            first = {k: abs(got[0][k] - ref[0][k]) for k in ref[0]}
            worst = {k: max(abs(g[k] - r[k]) for g, r in zip(got, ref)) for k in ref[0]}
            variants[label] = {"step1_max_abs_diff": max(first.values()), "all_steps_max_abs_diff": max(worst.values()),
                               "step1_per_term": first, "all_steps_per_term": worst, "terms": got}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    rows = [{"setting": k, "step1_max_abs_diff": f"{v['step1_max_abs_diff']:.2e}",
             "all_steps_max_abs_diff": f"{v['all_steps_max_abs_diff']:.2e}",
             "worst_term_step1": max(v["step1_per_term"], key=v["step1_per_term"].get)} for k, v in variants.items()]
    off = variants["TF32 off"]["step1_max_abs_diff"]
    scale = max(1.0, max(abs(x) for x in ref[0].values()))
    return {"settings": {"spec": spec.name, "steps": steps, "batch_size": 64, "reference": "CPU fp32"},
            "reference_terms": ref, "variants": variants, "rows": rows,
            "goals": [{"goal": "fp32 (TF32 off) step-1 loss terms agree with the CPU to 1e-4 (relative to the "
                               "largest term)", "value": off / scale, "met": off / scale < 1e-4}]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--ks", default="1,2,4")
    p.add_argument("--specs", default="L/cached/tiny,LF/cached/tiny")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--agree-steps", type=int, default=3)
    p.add_argument("--skip", default="", help="comma-separated: pack, agreement")
    p.add_argument("--out", default=str(HERE / "gpu_pack.json"), help="the JSON file (rewritten after each part)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (use --device cpu for a smoke test)")
    skip = {s for s in args.skip.split(",") if s}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": bk.machine_info(args.device)}
    failed = False
    with tempfile.TemporaryDirectory(prefix="richkd-gpu-") as tmp:
        work = Path(tmp)
        bk.write_synthetic_caches(work / "cache")  # once, before the trials read it
        for name, fn in (("pack", lambda: pack([bk.spec_from_name(s) for s in args.specs.split(",")],
                                               [int(k) for k in args.ks.split(",")], args.device, args.seconds,
                                               work, args.warmup)),
                         ("agreement", lambda: agreement(args.device, args.agree_steps, work))):
            if name in skip:
                continue
            t0 = time.perf_counter()
            try:
                payload[name] = fn()
            except Exception as exc:
                import traceback

                failed = True
                payload[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            payload[name]["wall_s"] = round(time.perf_counter() - t0, 1)
            _print(name, payload[name])
            _write(out, payload)
    payload["goals"] = [g for k in ("pack", "agreement") for g in payload.get(k, {}).get("goals", [])]
    _write(out, payload)
    print(f"wrote {out}")
    return 1 if failed else 0


def _print(name: str, res: dict) -> None:
    from run import format_table

    print(f"\n== {name} ({res.get('wall_s', 0):.0f}s) ==")
    if "error" in res:
        print(f"  ERROR: {res['error']}")
        return
    rows = res.get("rows", [])
    if name == "pack":
        rows = [{k: v for k, v in r.items() if k in ("spec", "k", "memory_fraction", "total_images_per_s",
                                                      "ratio_vs_1", "per_trial_images_per_s")} for r in rows]
    print(format_table(rows))
    for g in res.get("goals", []):
        print(f"  goal {'MET' if g['met'] else 'NOT MET'}: {g['goal']} (value {g['value']})")


def _write(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
