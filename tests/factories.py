"""Shared test factories: small real assets (Fashion-MNIST subset, teachers, the tiny CLIP), sweep specs and the
session's smoke sweep. Imported by test modules as `from tests.factories import ...` (pytest puts the repository
root on sys.path, see pyproject.toml)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.data_fixtures import write_idx


def write_fmnist_subset(folder: Path, n_train: int = 400, n_test: int = 100) -> Path:
    """The first rows of the real Fashion-MNIST (Debian package) as IDX files: real labels, tiny caches."""
    from richkd.data import read_idx
    from richkd.data.sources import DEBIAN_FASHION_MNIST_DIR as src

    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", read_idx(src / f"{prefix}-images-idx3-ubyte.gz")[:n])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", read_idx(src / f"{prefix}-labels-idx1-ubyte.gz")[:n])
    return folder


def make_assets(root: Path, clip: bool = True) -> Path:
    """Random-init resnet8 teacher, a Fashion-MNIST subset and (optionally) the tiny offline CLIP under root."""
    import torch

    from richkd.models import create_model, save_model_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "teacher.pth").is_file():
        torch.manual_seed(0)
        save_model_checkpoint(create_model("resnet8", 10), root / "teacher.pth", arch="resnet8", num_classes=10)
    if not (root / "fmnist").is_dir():
        write_fmnist_subset(root / "fmnist")
    if clip and not (root / "tiny_clip.pt").is_file():
        from richkd.clip import init_tiny_clip

        init_tiny_clip(root / "tiny_clip.pt")
    return root


def base_spec(assets: Path, work: Path, **sections) -> dict:
    spec = {
        "name": "unit",
        "config": {
            "device": "cpu",
            "data": {"dataset": "fashion_mnist", "root": str(assets / "fmnist"), "val_fraction": 0.25,
                     "batch_size": 64, "augment": "none"},
            "student": {"arch": "resnet8"},
            "teacher": {"arch": "resnet8", "checkpoint": str(assets / "teacher.pth")},
            "clip": {"model": "richkd-tiny", "pretrained": str(assets / "tiny_clip.pt"), "prompt_set": "simple"},
            "loss": {"method": "richkd", "feat_weight": 0.5, "nce_k": 64},
            "teaching": {"cache_dir": str(work / "cache")},
            "optim": {"lr": 0.05, "schedule": "cosine"},
            "train": {"epochs": 3},
        },
        "space": {
            "loss.fusion_alpha": {"sampler": "uniform", "low": 0.3, "high": 1.0},
            "loss.temperature": {"sampler": "choice", "values": [2.0, 4.0]},
        },
        "tune": {"num_samples": 4, "storage_path": str(work / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{work}/runs/mlflow.db"},
    }
    for key, value in sections.items():
        spec[key] = value
    return spec


REPO = Path(__file__).resolve().parents[1]
ENV = {"RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
       "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def nan_teacher(path: Path) -> Path:
    """A teacher checkpoint whose weights are NaN (a corrupted file): its logits make the KD loss NaN."""
    import torch

    from richkd.models import create_model, save_model_checkpoint

    if not path.is_file():
        model = create_model("resnet8", 10)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        save_model_checkpoint(model, path, arch="resnet8", num_classes=10)
    return path


def smoke_spec(assets: Path, work: Path) -> dict:
    good, bad = str(assets / "teacher.pth"), str(nan_teacher(assets / "nan_teacher.pth"))
    return {
        "name": "smoke_e2e",
        "config": {
            "device": "cpu",
            "data": {"dataset": "fashion_mnist", "root": str(assets / "fmnist"), "val_fraction": 0.25,
                     "batch_size": 64, "augment": "none"},
            "student": {"arch": "resnet8"},
            "teacher": {"arch": "resnet8", "checkpoint": good},
            "clip": {"model": "richkd-tiny", "pretrained": str(assets / "tiny_clip.pt"), "prompt_set": "simple"},
            "loss": {"method": "richkd", "nce_k": 64},
            "teaching": {"mode": "cached", "cache_dir": str(work / "cache")},
            "optim": {"lr": 0.05, "schedule": "cosine", "milestones": []},
            "train": {"epochs": 3},
        },
        "space": {
            "optim.lr": {"sampler": "loguniform", "low": 1e-5, "high": 0.2},
            "loss.fusion_alpha": {"sampler": "uniform", "low": 0.3, "high": 1.0},
            "loss.feat_weight": {"sampler": "choice", "values": [0.0, 0.5]},
            "loss.feat_lambda": {"sampler": "uniform", "low": 0.0, "high": 1.0,
                                 "when": {"loss.feat_weight": {"gt": 0}}},
            "teacher.checkpoint": {"sampler": "choice", "values": [good, bad]},
        },
        "points_to_evaluate": [
            # evaluated in this order (max_concurrent 1): a good config reaches max_t; a learning rate too small
            # to learn is then stopped by ASHA at the first rung; a corrupted teacher ends on a NaN loss
            {"optim.lr": 0.05, "loss.fusion_alpha": 0.7, "loss.feat_weight": 0.5, "loss.feat_lambda": 0.7,
             "teacher.checkpoint": good},
            {"optim.lr": 1e-5, "loss.fusion_alpha": 0.7, "loss.feat_weight": 0.0, "teacher.checkpoint": good},
            {"optim.lr": 0.05, "loss.fusion_alpha": 0.7, "loss.feat_weight": 0.0, "teacher.checkpoint": bad},
        ],
        "tune": {"metric": "val_loss", "mode": "min", "num_samples": 3, "max_concurrent": 1,
                 "search": {"algorithm": "optuna", "seed": 0, "n_startup_trials": 2},
                 "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                 "resources": {"cpu": 2}, "max_failures": 1, "storage_path": str(work / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{work}/runs/mlflow.db", "experiment": "smoke_e2e"},
    }


def shared_ray() -> None:
    """The test session's embedded 2-CPU Ray, started unless one is up, for tests that run sweeps, finalize or
    cache tasks in this process: richkd's init_ray then finds it up and leaves it running, so those tests share
    one start-up (not what they test; it costs seconds on 2 cores). A test that connects to a cluster of its own
    shuts it down first; the next test that calls this starts it again; tests/conftest.py stops it at the end."""
    from richkd.tune.session import init_ray

    init_ray(num_cpus=2)


def ensure_smoke_sweep(base: Path) -> dict:
    """Run the smoke sweep once per test session (test_export.py reuses it); returns what the tests need."""
    marker = base / "smoke_e2e" / "done.json"
    assets = make_assets(base / "tune_assets")
    work = base / "smoke_e2e"
    if marker.is_file():
        return json.loads(marker.read_text())
    from richkd.tune.runner import run_sweep
    from richkd.tune.spec import spec_from_mapping

    spec = spec_from_mapping(smoke_spec(assets, work))
    shared_ray()
    started = time.perf_counter()
    outcome = run_sweep(spec, num_cpus=2, verbose=0)
    info = {"work": str(work), "experiment_path": outcome.experiment_path, "name": spec.name,
            "storage": spec.tune.storage_path, "tracking_uri": spec.mlflow.tracking_uri,
            "parent_run_id": outcome.parent_run_id, "counts": outcome.counts, "num_trials": outcome.num_trials,
            "wall_s": time.perf_counter() - started, "raw": smoke_spec(assets, work)}
    marker.write_text(json.dumps(info))
    return info


def trial_results(experiment_path: str) -> dict:
    out = {}
    for f in sorted(Path(experiment_path).glob("trial_*/result.json")):
        out[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def find_study(obj, depth: int = 0):
    import optuna

    if isinstance(obj, optuna.Study):
        return obj
    if depth > 4:
        return None
    items = obj.values() if isinstance(obj, dict) else getattr(obj, "__dict__", {}).values()
    for value in items:
        found = find_study(value, depth + 1)
        if found is not None:
            return found
    return None


def make_imagenet_assets(root: Path, train_per_class: int = 4, val_per_class: int = 2, num_classes: int = 4,
                         teacher_arch: str = "resnet8") -> Path:
    """A tiny ImageNet-layout folder of real (Fashion-MNIST) photos, a random-init teacher for its classes and
    the tiny offline CLIP under root. The default teacher is the cheap CIFAR resnet8 (it takes any input size):
    the ImageNet architectures are tested on their own, and the data and cache paths are the same for any."""
    import torch

    from richkd.clip import init_tiny_clip
    from richkd.models import create_model, save_model_checkpoint
    from tests.data_fixtures import write_imagenet_tree

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "imagenet").is_dir():
        write_imagenet_tree(root / "imagenet", train_per_class, val_per_class, num_classes)
    ckpt = root / f"teacher_{teacher_arch}.pth"
    if not ckpt.is_file():
        torch.manual_seed(0)
        save_model_checkpoint(create_model(teacher_arch, num_classes), ckpt)
    if not (root / "tiny_clip.pt").is_file():
        init_tiny_clip(root / "tiny_clip.pt")
    return root


def imagenet_config(assets: Path, cache_dir: Path, teacher_arch: str = "resnet8", **overrides) -> "Config":
    """A RichKD-L+F config on make_imagenet_assets' folder with 3 cached views; dotted-key overrides."""
    from richkd.config import Config

    cfg = Config.from_dict({
        "device": "cpu", "seed": 0,
        "data": {"dataset": "imagenet", "root": str(assets / "imagenet"), "image_size": 224, "val_fraction": 0.25,
                 "batch_size": 4, "eval_batch_size": 8},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": teacher_arch, "checkpoint": str(assets / f"teacher_{teacher_arch}.pth")},
        "clip": {"model": "richkd-tiny", "pretrained": str(assets / "tiny_clip.pt"), "prompt_set": "simple"},
        "loss": {"method": "richkd", "feat_weight": 0.5, "nce_k": 8},
        "teaching": {"cache_dir": str(cache_dir), "views": 3, "view_seed": 7},
        "optim": {"lr": 0.02, "schedule": "cosine"},
        "train": {"epochs": 2},
    })
    return cfg.with_overrides(overrides) if overrides else cfg


def synthetic_table(spec, path: Path, n_configs: int = 12, seeds: int = 1, seeds_for=None) -> Path:
    """A learning-curve table of `spec`'s space with made-up curves instead of training (replay and warm-start
    tests): each configuration's curve rises to its own plateau at its own speed, so curves cross and ASHA's
    decisions matter; a few configurations end on a non-finite loss. Seeds move the plateau by a little."""
    import math
    import random

    from richkd.tune.table import TableRow, plan_rows, table_header

    lines = [json.dumps(table_header(spec))]
    for job in plan_rows(spec, n_configs, seeds, seeds_for):
        h = int(job.config_id, 16)
        plateau = 40 + h % 50 + random.Random(job.seed * 7919 + h).gauss(0, 0.3)
        tau = 0.3 + (h >> 8) % 7 * 0.5
        epochs = spec.max_t if h % 11 else max(1, spec.max_t // 2)    # about 1 in 11 diverges half-way
        curve = [plateau * (1 - math.exp(-e / tau)) for e in range(1, epochs + 1)]
        if epochs < spec.max_t:
            curve[-1] = None
        lines.append(TableRow(job.config_id, job.seed, job.sampled, val_top1=curve,
                              val_loss=[None if v is None else 100 - v for v in curve],
                              seconds=[1.0 + h % 3] * epochs, train_seconds=[1.0] * epochs,
                              test_top1=None if epochs < spec.max_t else plateau - 1.0,
                              outcome="completed" if epochs == spec.max_t else "nonfinite_loss").to_json())
    path.write_text("\n".join(lines) + "\n")
    return path
