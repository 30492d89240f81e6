"""Shared by the reliability tests: tiny sweep specs, a real `mlflow server` they can stop and restart, and
polling helpers that watch a running `richkd sweep` subprocess through its experiment folder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests.cluster_fixtures import MlflowService as MlflowServer  # a real server the test can stop and restart
from tests.cluster_fixtures import free_port
from tests.factories import ENV, base_spec, trial_results

__all__ = ["ENV", "trial_results", "tiny_spec", "env", "start_sweep", "wait_for", "stop_group", "MlflowServer",
           "free_port"]


def tiny_spec(assets: Path, work: Path, name: str, tracking_uri: Optional[str] = None, num_samples: int = 3,
              epochs: int = 3) -> dict:
    """A KD sweep (no CLIP) that is as cheap as a real sweep gets: resnet8 on 300 images, FIFO, 1 CPU per trial."""
    spec = base_spec(
        assets, work, name=name,
        space={"loss.temperature": {"sampler": "uniform", "low": 1.0, "high": 6.0},
               "loss.logit_weight": {"sampler": "choice", "values": [1.0, 3.0]}},
        tune={"num_samples": num_samples, "max_concurrent": 2, "scheduler": "fifo", "resources": {"cpu": 1},
              "storage_path": str(work / "runs")},
        mlflow={"tracking_uri": tracking_uri or f"sqlite:///{work}/runs/mlflow.db", "experiment": name})
    config = spec["config"]
    del config["clip"]
    config.update(loss={"method": "kd"}, teaching={"mode": "cached", "cache_dir": str(work / "cache")},
                  train={"epochs": epochs})
    config["optim"]["milestones"] = []
    return spec


def env(**extra: str) -> dict:
    return {**os.environ, **ENV, **extra}


def start_sweep(args: list, cwd: Path, log_path: Path, **extra_env: str) -> subprocess.Popen:
    """`richkd sweep ARGS` in its own process group (so the test can SIGKILL the driver and what it started)."""
    log = open(log_path, "w")
    try:
        return subprocess.Popen([sys.executable, "-m", "richkd", "sweep", *args, "--num-cpus", "2", "-q"], cwd=cwd,
                                env=env(**extra_env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()   # the child keeps its own descriptor


def wait_for(condition: Callable[[], object], what: str, proc: Optional[subprocess.Popen] = None,
             log_path: Optional[Path] = None, timeout: float = 240.0, poll: float = 0.2):
    """Poll until condition() is truthy (returned); fail with the driver log if the driver exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            found = condition()
            if found:
                return found
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before {what}:\n{_tail(log_path)}")
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n{_tail(log_path)}")


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
    """Signal the process group this test started (never anything else), then reap the leader."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(log_path: Optional[Path], n: int = 6000) -> str:
    if log_path is None or not Path(log_path).is_file():
        return ""
    return Path(log_path).read_text(errors="replace")[-n:]
