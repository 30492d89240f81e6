"""Test-wide environment (offline, no telemetry, no Ray auth, few threads) and shared small real fixtures."""
import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one thread here and in every process the tests start (Ray workers, subprocesses): CPU results depend on the thread
# count, and tests compare runs across processes that the design promises compute the same bytes
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# never write decoded datasets into the real ~/.cache/richkd; tests of that cache point it at tmp_path
os.environ.setdefault("RICHKD_DECODED_CACHE", "off")

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session", autouse=True)
def no_ray_left_running():
    """The embedded Ray that tests share (tests.factories.shared_ray) stops with the session."""
    yield
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(autouse=True)
def no_environment_leaks():
    """Each test leaves os.environ as it found it. Code under test writes to it: MLflow's set_tracking_uri and
    set_experiment (richkd evaluate --mlflow-uri) set MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID, which a later
    spec without mlflow.tracking_uri would read, and which Ray workers and subprocesses would inherit."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Back to one thread after each test: a config's train.threads sets it for the whole process (trainer.Run)."""
    yield
    import torch

    torch.set_num_threads(1)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4")
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


@pytest.fixture(scope="session")
def mini_fashion_root(tmp_path_factory) -> Path:
    """The first 600 train / 200 test images of the REAL Fashion-MNIST, as IDX files in a data.root folder.

    Small enough that building teacher and CLIP caches over the whole split takes a second.
    """
    from data_fixtures import write_idx

    if not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs Debian's dataset-fashion-mnist (make data)")
    root = tmp_path_factory.mktemp("mini_fashion")
    for prefix, n in (("train", 600), ("t10k", 200)):
        for kind in ("images-idx3", "labels-idx1"):
            arr = _read_idx(DEBIAN_FMNIST / f"{prefix}-{kind}-ubyte.gz")[:n]
            write_idx(root / f"{prefix}-{kind}-ubyte.gz", arr)
    return root


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> Path:
    from richkd.clip import init_tiny_clip

    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    init_tiny_clip(path)
    return path


@pytest.fixture(scope="session")
def mini_teacher(mini_fashion_root, tmp_path_factory) -> Path:
    """A resnet8 teacher trained for 2 epochs on the mini set (a real, if weak, checkpoint)."""
    from richkd.config import Config
    from richkd.models import save_model_checkpoint
    from richkd.trainer import Run

    cfg = Config.from_dict({
        "device": "cpu", "data": {"dataset": "fashion_mnist", "root": str(mini_fashion_root), "batch_size": 64},
        "student": {"arch": "resnet8"}, "loss": {"method": "supervised"},
        "optim": {"lr": 0.1, "schedule": "cosine"}, "train": {"epochs": 2},
    })
    run = Run(cfg)
    run.train()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_model_checkpoint(run.student, path)
    return path


@pytest.fixture()
def richkd_cfg(mini_fashion_root, mini_teacher, tiny_clip_path, tmp_path):
    """A small RichKD-L+F config on the mini set; override keys per test with .with_overrides."""
    from richkd.config import Config

    return Config.from_dict({
        "name": "test_richkd", "device": "cpu", "seed": 1,
        "data": {"dataset": "fashion_mnist", "root": str(mini_fashion_root), "batch_size": 64,
                 "eval_batch_size": 200},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": "resnet8", "checkpoint": str(mini_teacher)},
        "clip": {"model": "richkd-tiny", "pretrained": str(tiny_clip_path), "prompt_set": "simple"},
        "loss": {"method": "richkd", "nce_k": 64},
        "teaching": {"mode": "cached", "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": 1},
    })
