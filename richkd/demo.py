"""The offline quickstart on real Fashion-MNIST: teacher, tiny CLIP, caches, KD and RichKD students, a sweep.

Everything is embedded here so `make demo` needs no files but Debian's dataset; the configs it uses are
written next to its outputs so a user can re-run or edit any stage with `richkd train --config ...`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from richkd.cache import prepare_caches
from richkd.clip import init_tiny_clip
from richkd.config import Config
from richkd.io import atomic_write_text, ensure_writable
from richkd.report import build_report
from richkd.tracking import experiment_url, local_ui
from richkd.trainer import Run
from richkd.tune.export import export_sweep
from richkd.tune.runner import run_sweep
from richkd.tune.spec import load_spec
from richkd.validate import check_resources

# Sizes chosen so the whole pipeline fits in about 10 minutes on 2 CPU cores; --quick is for tests.
FULL = {"teacher_samples": 30000, "teacher_epochs": 3, "student_samples": 4000, "student_epochs": 4,
        "eval_samples": 2000, "nce_k": 1024, "sweep": ["tune.num_samples=8"]}
QUICK = {"teacher_samples": 384, "teacher_epochs": 1, "student_samples": 256, "student_epochs": 2,
         "eval_samples": 128, "nce_k": 64,
         "sweep": ["tune.num_samples=3", "config.train.epochs=2", "config.data.max_train_samples=256",
                   "config.data.max_eval_samples=128", "tune.scheduler.grace_period=1", "tune.max_concurrent=2"]}
DEMO_SPEC = Path(__file__).resolve().parents[1] / "search_spaces" / "fmnist_demo.yaml"

REAL_CLIP_HINT = ("the demo's CLIP is a tiny open_clip model with RANDOM weights (no downloads offline), so its "
                  "zero-shot accuracy is chance level. For real weights, run the configs it writes with "
                  "`richkd train --config {configs}/richkd.yaml --set clip.model=ViT-B-32 "
                  "--set clip.pretrained=openai` (or a local weights file; in `richkd sweep`, "
                  "--set config.clip.model=...).")


def demo_configs(out_root: Path, quick: bool = False) -> dict[str, Config]:
    """The demo's stage configs: teacher (supervised), KD student, RichKD-L+F student. Their paths are absolute
    (`out_root` resolved against the current folder), so the written configs work from any folder."""
    sizes = QUICK if quick else FULL
    out_root = Path(out_root).resolve()
    base = Config.from_dict({
        "seed": 0, "device": "auto",
        # Native 28 px and no augmentation: cheapest on CPU, and the cached clean view is then exactly the
        # student's view (consistent teaching, docs/method.md "Teaching protocol").
        "data": {"dataset": "fashion_mnist", "image_size": 28, "augment": "none",
                 "max_train_samples": sizes["student_samples"],
                 "max_eval_samples": sizes["eval_samples"], "batch_size": 64, "eval_batch_size": 256},
        "teacher": {"arch": "resnet8", "checkpoint": str(out_root / "teacher" / "student.pt")},
        "student": {"arch": "resnet8"},
        "clip": {"model": "richkd-tiny", "pretrained": str(out_root / "tiny_clip.pt"), "prompt_set": "simple"},
        "teaching": {"mode": "cached", "cache_dir": str(out_root / "cache")},
        "optim": {"lr": 0.05, "schedule": "cosine", "milestones": []},
        "train": {"epochs": sizes["student_epochs"]},
    })
    teacher = base.with_overrides({
        "name": "demo_teacher", "student.arch": "resnet8", "loss.method": "supervised",
        "data.max_train_samples": sizes["teacher_samples"], "train.epochs": sizes["teacher_epochs"],
        "optim.lr": 0.1, "data.batch_size": 128, "teacher.arch": None, "teacher.checkpoint": None,
    })
    kd = base.with_overrides({"name": "demo_kd", "loss.method": "kd", "loss.ce_weight": 1.0,
                              "loss.logit_weight": 1.0, "loss.temperature": 4.0})
    richkd = base.with_overrides({"name": "demo_richkd", "loss.method": "richkd", "loss.nce_k": sizes["nce_k"]})
    return {"teacher": teacher, "kd": kd, "richkd": richkd}


def _train(cfg: Config, out_dir: Path):
    prepare_caches(cfg, splits=("train", "test"))   # final=True: the test split's teacher analysis too
    run = Run(cfg)
    result = run.train(on_epoch=lambda r: print(
        f"   epoch {r.epoch}/{cfg.train.epochs}: train loss {r.metrics['train_loss']:.3f}, "
        f"val top-1 {r.metrics['val_top1']:.2f}%", flush=True), final=True)
    run.save_outputs(result, out_dir)
    return result


def demo_sweep_spec(out_root: Path, sizes: dict, name: str, check: bool = True):
    """The demo's sweep spec: search_spaces/fmnist_demo.yaml on the configs under `out_root`, with the sweep
    folder and (unless $MLFLOW_TRACKING_URI is set) the MLflow store `out_root`/mlflow.db inside `out_root`, so
    `--out DIR` keeps everything the demo writes under DIR."""
    if not DEMO_SPEC.is_file():
        raise FileNotFoundError(f"{DEMO_SPEC} is missing: run the demo from a checkout of the repository")
    storage = out_root.resolve()
    os.environ["RICHKD_DEMO_DIR"] = str(storage)   # the spec builds on the demo's configs
    return load_spec(DEMO_SPEC, [f"name={name}", f"tune.storage_path={storage}", *sizes["sweep"]],
                     check_resources=check, check_data=check)


def run_sweep_stage(out_root: Path, sizes: dict, summary: dict) -> str:
    """A real Optuna + ASHA sweep (search_spaces/fmnist_demo.yaml) on the demo's teacher, CLIP and caches."""
    name = f"demo_{time.strftime('%Y%m%d_%H%M%S')}"           # every re-run is a new sweep
    spec = demo_sweep_spec(out_root, sizes, name)
    storage = spec.tune.storage_path
    outcome = run_sweep(spec, verbose=1)
    if outcome.interrupted:   # Ctrl-C stopped the sweep (Tune returns): the demo stops too, with exit code 130
        raise KeyboardInterrupt
    exported = export_sweep(name, storage=str(storage))
    best = exported.best
    summary.update({"sweep": name, "sweep_dir": str(exported.out_dir), "best_config": str(exported.best_config),
                    "leaderboard": str(exported.leaderboard), "tracking_uri": spec.mlflow.tracking_uri,
                    "mlflow_link": experiment_url(local_ui(), outcome.experiment_id, spec.tune.metric, spec.tune.mode),
                    "best_trial": best.trial_id, "best_val_top1": best.value, "best_params": dict(best.sampled),
                    "sweep_trials": len(exported.rows), "sweep_outcomes": outcome.counts,
                    "sweep_epochs": sum(r.epochs for r in exported.rows), "sweep_wall_s": outcome.wall_s,
                    "report": str(build_report(name, storage=str(storage)).index)})
    counts = ", ".join(f"{n} {k}" for k, n in sorted(outcome.counts.items()))
    return f"sweep {name}: {len(exported.rows)} trials ({counts}), {summary['sweep_epochs']} epochs trained"


def run_demo(out_root: Path = Path("tune_runs/demo"), quick: bool = False, fresh: bool = False) -> int:
    out_root = ensure_writable(out_root, "the demo's output folder (--out)", create=False)
    if fresh and out_root.exists():
        shutil.rmtree(out_root)
    configs = demo_configs(out_root, quick)
    for name, cfg in configs.items():
        atomic_write_text(out_root / "configs" / f"{name}.yaml", cfg.to_yaml())
    summary: dict = {"stage_seconds": {}}

    def run_stage(name: str, fn: Callable[[], str]) -> None:
        """One line per stage with its result and wall time; the times go into the summary."""
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        result = fn()
        summary["stage_seconds"][name] = seconds = time.perf_counter() - started
        print(f"   {result}  [{seconds:.0f}s]", flush=True)

    def teacher_stage() -> str:
        cfg = configs["teacher"]
        done = out_root / "teacher" / "result.json"
        res = json.loads(done.read_text()) if done.is_file() else {}
        if res.get("config") == cfg.to_dict():
            summary["teacher_test_top1"] = res["test_metrics"]["test_top1"]
            return f"reusing the trained teacher: test top-1 {summary['teacher_test_top1']:.2f}%"
        result = _train(cfg, out_root / "teacher")
        summary["teacher_test_top1"] = result.test_metrics["test_top1"]
        return f"teacher {cfg.student.arch}: test top-1 {summary['teacher_test_top1']:.2f}%"

    def clip_stage() -> str:
        path = out_root / "tiny_clip.pt"
        if not path.is_file():
            init_tiny_clip(path)
        return f"tiny CLIP at {path}. NOTE: {REAL_CLIP_HINT.format(configs=out_root / 'configs')}"

    def student_stage(name: str) -> str:
        cfg = configs[name]
        check_resources(cfg)
        summary[f"{name}_test_top1"] = _train(cfg, out_root / name).test_metrics["test_top1"]
        return f"{name} student {cfg.student.arch}: test top-1 {summary[f'{name}_test_top1']:.2f}%"

    run_stage("1/5 train the conventional teacher (supervised)", teacher_stage)
    run_stage("2/5 create the offline tiny CLIP", clip_stage)
    run_stage("3/5 KD student (Hinton KD, cached teacher outputs)", lambda: student_stage("kd"))
    run_stage("4/5 RichKD-L+F student (teacher fused with CLIP)", lambda: student_stage("richkd"))
    run_stage("5/5 Optuna + ASHA sweep over alpha, T, CLIP scale, prompts, loss weights; export",
              lambda: run_sweep_stage(out_root, QUICK if quick else FULL, summary))
    atomic_write_text(out_root / "summary.json", json.dumps(summary, indent=1, default=float))
    print_summary(out_root, summary)
    return 0


def shown_uri(uri: str) -> str:
    """A SQLite store under the current folder as a relative URI (sqlite:///tune_runs/demo/mlflow.db), as the
    README shows it; any other URI as it is."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if path.is_relative_to(Path.cwd()):
            return "sqlite:///" + str(path.relative_to(Path.cwd()))
    return uri


def print_summary(out_root: Path, summary: dict) -> None:
    print("\n== summary")
    for key in ("teacher", "kd", "richkd"):
        print(f"   {key:<8} test top-1 {summary[f'{key}_test_top1']:.2f}%")
    print(f"   sweep    {summary['sweep']}: {summary['sweep_trials']} trials; best trial {summary['best_trial']} "
          f"val top-1 {summary['best_val_top1']:.2f}%")
    for key, value in sorted(summary["best_params"].items()):
        print(f"            {key} = {value}")
    print(f"   best config   {summary['best_config']}  (reproduce: richkd train --config {summary['best_config']})")
    print(f"   leaderboard   {summary['leaderboard']}")
    print(f"   report        {summary['report']}")
    uri = shown_uri(summary["tracking_uri"])
    print(f"   MLflow store  {uri}")
    print(f"   open the UI:  richkd ui --tracking-uri {uri}, then {summary['mlflow_link']}")
    print(f"   configs       {out_root / 'configs'}   (e.g. richkd train --config {out_root}/configs/kd.yaml)")
    print(f"   NOTE: {REAL_CLIP_HINT.format(configs=out_root / 'configs')}")
