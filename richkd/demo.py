"""The offline quickstart on real Fashion-MNIST: teacher, tiny CLIP, caches, KD and RichKD students, a sweep.

Everything is embedded here so `make demo` needs no files but Debian's dataset; the configs it uses are
written next to its outputs so a user can re-run or edit any stage with `richkd train --config ...`.
Re-running reuses the teacher, the tiny CLIP and the caches (unless --fresh) and starts a new sweep.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from richkd.config import Config
from richkd.io import atomic_write_text

# Sizes chosen so the whole pipeline fits in about 10 minutes on 2 CPU cores; --quick is for tests.
FULL = {"teacher_samples": 40000, "teacher_epochs": 3, "student_samples": 4000, "student_epochs": 4,
        "eval_samples": 2000, "sweep_samples": 8, "nce_k": 1024}
QUICK = {"teacher_samples": 384, "teacher_epochs": 1, "student_samples": 256, "student_epochs": 2,
         "eval_samples": 128, "sweep_samples": 3, "nce_k": 64}

REAL_CLIP_HINT = ("the demo's CLIP is a tiny open_clip model with RANDOM weights (no downloads offline), so its "
                  "zero-shot accuracy is chance level. With real weights use e.g. "
                  "--set clip.model=ViT-B-32 --set clip.pretrained=openai (or a local file path).")


def base_dict(out_root: Path, sizes: dict) -> dict:
    return {
        "seed": 0, "device": "auto",
        # Native 28 px and no augmentation: cheapest on CPU, and the cached clean view is then exactly the
        # student's view (consistent teaching, see ecosystem.md §7.1).
        "data": {"dataset": "fashion_mnist", "image_size": 28, "augment": "none",
                 "max_train_samples": sizes["student_samples"],
                 "max_eval_samples": sizes["eval_samples"], "batch_size": 64, "eval_batch_size": 256},
        "teacher": {"arch": "resnet8", "checkpoint": str(out_root / "teacher" / "student.pt")},
        "student": {"arch": "resnet8"},
        "clip": {"model": "richkd-tiny", "pretrained": str(out_root / "tiny_clip.pt"), "prompt_set": "simple"},
        "teaching": {"mode": "cached", "cache_dir": str(out_root / "cache")},
        "optim": {"lr": 0.05, "schedule": "cosine", "milestones": []},
        "train": {"epochs": sizes["student_epochs"]},
    }


def demo_configs(out_root: Path, quick: bool = False) -> dict[str, Config]:
    """The demo's stage configs: teacher (supervised), KD student, RichKD-L+F student."""
    sizes = QUICK if quick else FULL
    base = Config.from_dict(base_dict(out_root, sizes))
    teacher = base.with_overrides({
        "name": "demo_teacher", "student.arch": "resnet8", "loss.method": "supervised",
        "data.max_train_samples": sizes["teacher_samples"], "train.epochs": sizes["teacher_epochs"],
        "optim.lr": 0.1, "data.batch_size": 128, "teacher.arch": None, "teacher.checkpoint": None,
    })
    kd = base.with_overrides({"name": "demo_kd", "loss.method": "kd", "loss.ce_weight": 1.0,
                              "loss.logit_weight": 1.0, "loss.temperature": 4.0})
    richkd = base.with_overrides({"name": "demo_richkd", "loss.method": "richkd", "loss.nce_k": sizes["nce_k"]})
    return {"teacher": teacher, "kd": kd, "richkd": richkd}


class Stages:
    """Prints one line per stage with its wall time; the times go into the summary."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Optional[str]]):
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        result = fn()
        self.times[name] = time.perf_counter() - started
        print(f"   {result or 'done'}  [{self.times[name]:.0f}s]", flush=True)
        return result


def _train(cfg: Config, out_dir: Path):
    from richkd.cache import prepare_caches
    from richkd.models import save_model_checkpoint
    from richkd.trainer import Run

    prepare_caches(cfg)
    run = Run(cfg)
    result = run.train(on_epoch=lambda r: print(
        f"   epoch {r.epoch}/{cfg.train.epochs}: train loss {r.metrics['train_loss']:.3f}, "
        f"val top-1 {r.metrics['val_top1']:.2f}%", flush=True), final=True)
    save_model_checkpoint(run.student, out_dir / "student.pt", arch=cfg.student.arch,
                          num_classes=run.data.num_classes)
    atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    atomic_write_text(out_dir / "result.json", json.dumps(
        {"config": cfg.to_dict(), "metrics": result.metrics, "test_metrics": result.test_metrics}, default=float))
    return result


def run_demo(out_root: Path = Path("tune_runs/demo"), quick: bool = False, fresh: bool = False,
             sweep: bool = True) -> int:
    from richkd.clip import init_tiny_clip
    from richkd.validate import check_resources

    out_root = Path(out_root)
    if fresh and out_root.exists():
        shutil.rmtree(out_root)
    configs = demo_configs(out_root, quick)
    for name, cfg in configs.items():
        atomic_write_text(out_root / "configs" / f"{name}.yaml", cfg.to_yaml())
    stages = Stages()
    summary: dict = {}

    def teacher_stage() -> str:
        cfg = configs["teacher"]
        done = out_root / "teacher" / "result.json"
        if done.is_file() and json.loads(done.read_text())["config"] == cfg.to_dict():
            res = json.loads(done.read_text())
            summary["teacher_test_top1"] = res["test_metrics"]["test_top1"]
            return f"reusing the trained teacher: test top-1 {summary['teacher_test_top1']:.2f}%"
        result = _train(cfg, out_root / "teacher")
        summary["teacher_test_top1"] = result.test_metrics["test_top1"]
        return f"teacher {cfg.student.arch}: test top-1 {summary['teacher_test_top1']:.2f}%"

    def clip_stage() -> str:
        path = out_root / "tiny_clip.pt"
        if not path.is_file():
            init_tiny_clip(path)
        return f"tiny CLIP at {path}. NOTE: {REAL_CLIP_HINT}"

    def student_stage(name: str) -> Callable[[], str]:
        def stage() -> str:
            cfg = configs[name]
            check_resources(cfg)
            result = _train(cfg, out_root / name)
            summary[f"{name}_test_top1"] = result.test_metrics["test_top1"]
            return f"{name} student {cfg.student.arch}: test top-1 {summary[f'{name}_test_top1']:.2f}%"
        return stage

    stages.run("1/4 train the conventional teacher (supervised)", teacher_stage)
    stages.run("2/4 create the offline tiny CLIP", clip_stage)
    stages.run("3/4 KD student (Hinton KD, cached teacher outputs)", student_stage("kd"))
    stages.run("4/4 RichKD-L+F student (teacher fused with CLIP)", student_stage("richkd"))
    summary["stage_seconds"] = stages.times
    atomic_write_text(out_root / "summary.json", json.dumps(summary, indent=1, default=float))
    print("\nsummary: " + ", ".join(f"{k} {v:.2f}%" for k, v in summary.items() if k.endswith("top1")))
    print(f"configs: {out_root / 'configs'}   (re-run any stage: richkd train --config {out_root}/configs/kd.yaml)")
    return 0
