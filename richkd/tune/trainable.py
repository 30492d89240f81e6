"""The Tune trial function: sampled dict -> typed Config -> run_training, one tune.report + checkpoint per epoch."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

import ray
import torch
from ray import tune

from richkd.trainer import NonFiniteLossError, load_train_state, run_training
from richkd.tune.cluster import claim_gpu, current_node_id, this_node, threads_for
from richkd.tune.node_check import SweepNeeds, raise_if_unmet
from richkd.tune.params import TrialPlan

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
NONFINITE_KEY = "nonfinite_loss"   # reported as 1.0 by a trial that ended on a NaN/inf loss
NODE_KEY = "node_id"               # the Ray node the trial ran on, in every report (and an MLflow tag)
NODE_IP_KEY = "node_ip"            # and its IP (the end-of-sweep summary counts trials per machine)
STOP_REASON_KEY = "stop_reason"


def trial_threads_config(cfg, cpu: float):
    """`cfg` with train.threads set to what a trial granted `cpu` CPUs runs with (when the config leaves it
    open): CPU results depend on the thread count (the order of float sums), so an exported config must pin it
    for `richkd train --config best_config.yaml` to reproduce the trial's numbers."""
    return cfg if cfg.train.threads is not None else cfg.with_overrides({"train.threads": threads_for(cpu)})


def load_checkpoint_state(directory: str | os.PathLike) -> dict:
    """Our own TrainState (tensors and plain values), read with weights_only=True; a damaged or foreign file is
    one ValueError naming it (the trial then fails cleanly, and Tune's FailureConfig decides what happens)."""
    return load_train_state(Path(directory) / STATE_FILE)


def train_trial(config: dict, plan: TrialPlan, needs: Optional[SweepNeeds] = None) -> None:
    """Run one trial from Tune's sampled `config`; a node that joined after the driver's checks and cannot see the
    sweep's files fails here, before any work. Resumes from the trial's latest checkpoint; a NaN/inf loss ends the
    trial with one last report (metric NaN, nonfinite_loss=1) instead of an error, so FailureConfig does not retry it
    and the searcher records it as FAIL."""
    node_id = current_node_id() or ""
    where = {NODE_KEY: node_id, NODE_IP_KEY: ray.util.get_node_ip_address()}
    raise_if_unmet(needs, where=f"node {node_id[:12] or '?'}")
    cfg = plan.trial_config(config)
    if cfg.train.threads is None:   # the whole CPUs Ray granted: more torch threads only fight the other trials
        try:
            cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
        except Exception:  # not inside a Tune trial (direct call in a test)
            cpus = os.cpu_count() or 1
        torch.set_num_threads(threads_for(cpus))
    claim_gpu(plan.gpu, f"the trial on {this_node()}")

    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume_state = load_checkpoint_state(directory)
        log.info("trial resumes after epoch %s", resume_state.get("epoch"))
    last_epoch = [int(resume_state["epoch"]) if resume_state else 0]

    def on_epoch(report) -> None:
        metrics = {**{k: float(v) for k, v in report.metrics.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}, NONFINITE_KEY: 0.0, **where}
        with tempfile.TemporaryDirectory(prefix="richkd-ckpt-") as directory:
            torch.save(report.state(), Path(directory) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        last_epoch[0] = report.epoch

    try:
        run_training(cfg, on_epoch=on_epoch, resume_state=resume_state, final=plan.final)
    except NonFiniteLossError as exc:
        reason = f"non-finite loss: {exc}"
        log.warning("trial stops: %s", reason)
        # every objective, not only the first: Tune checks that each searcher metric is in every report
        tune.report({**{m: float("nan") for m in plan.metrics}, "epoch": float(last_epoch[0] + 1),
                     NONFINITE_KEY: 1.0, STOP_REASON_KEY: reason, **where})
