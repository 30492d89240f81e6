"""Sweeps on a real multi-node Ray cluster (two `ray start` nodes on this machine, the worker in its own mount
namespace where a folder must be missing) and against a real `mlflow server`: the preflight refuses a node
that cannot see what trials read, a healthy sweep spreads over both nodes and says where each trial ran, a
node that dies mid-sweep loses only its trial's current epoch, and the exit codes say what happened."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster_fixtures import hiding_unsupported, make_ray_cluster, mlflow_server  # noqa: F401
from tests.factories import make_assets
from tests.reliability.helpers import free_port, tiny_spec, trial_results, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.getbasetemp() / "cluster_assets", clip=False)


def write_spec(work: Path, spec: dict) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_cli(args: list, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "richkd", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_node_that_cannot_see_the_files_is_refused_before_any_trial(make_ray_cluster, assets, tmp_path):
    reason = hiding_unsupported()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    spec = tiny_spec(assets, work, "hidden")
    spec["tune"]["shared_storage"] = True            # the user says it is shared; the nodes say otherwise
    path = write_spec(work, spec)
    cluster = make_ray_cluster(workers=[{"hide": [assets, work]}])
    started = time.perf_counter()
    done = run_cli(["sweep", str(path), "--address", cluster.address, "-q"], cluster.driver_env(), tmp_path)
    wall = time.perf_counter() - started
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "Traceback" not in text
    worker = cluster.workers[0].node_id[:12]
    for needle in (f"node {worker}", f"teacher.checkpoint: file {assets / 'teacher.pth'} does not exist",
                   f"data.root: folder {assets / 'fmnist'}", f"teaching.cache_dir: {work / 'cache'} on this node is "
                   "not the driver's folder", f"tune.storage_path: {work / 'runs'} on this node is not the driver's"):
        assert needle in text, needle
    assert f"node {cluster.head.node_id[:12]}" not in text            # the head sees everything
    assert not list((work / "cache").glob("*-*"))                      # refused before any cache was built
    assert not list((work / "runs" / "hidden").glob("trial_*"))        # and before any trial
    print(f"refused in {wall:.1f} s (driver start and preflight)")


def test_a_healthy_sweep_spreads_over_both_nodes_and_a_node_lost_mid_sweep_costs_one_epoch(
        make_ray_cluster, mlflow_server, assets, tmp_path):
    """Two sweeps on one head + worker cluster (its start-up is not what is tested here): a healthy one, then one
    that loses the worker mid-sweep."""
    cluster = make_ray_cluster(workers=[{}])
    worker = cluster.workers[0]

    # ----- a healthy sweep spreads over both nodes and says where each trial ran (MLflow server as the store)
    work = tmp_path / "spread"
    spec = tiny_spec(assets, work, "spread", tracking_uri=mlflow_server.uri, num_samples=2, epochs=2)
    spec["tune"]["shared_storage"] = True            # one machine: every node sees the same disk
    path = write_spec(work, spec)
    done = run_cli(["sweep", str(path), "--address", cluster.address, "-q"], cluster.driver_env(), tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    results = trial_results(str(work / "runs" / "spread"))
    nodes = {rows[-1]["node_id"] for rows in results.values()}
    assert len(results) == 2 and nodes == {cluster.head.node_id, worker.node_id}
    assert "per node:" in text
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("spread")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`richkd.kind` = 'trial'")
    assert {r.data.tags["richkd.node_id"] for r in runs} == nodes

    # ----- a node lost mid-sweep costs its trial one epoch, and no duplicate runs
    work = tmp_path / "lose"
    spec = tiny_spec(assets, work, "lose", num_samples=2, epochs=6)
    spec["tune"].update(shared_storage=True, max_failures=2)
    path = write_spec(work, spec)
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "richkd", "sweep", str(path), "--address", cluster.address,
                                   "-q"], cwd=tmp_path, env=cluster.driver_env(), stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    exp = work / "runs" / "lose"

    def worker_trial_reported():
        for name, rows in trial_results(str(exp)).items():
            if rows and rows[-1].get("node_id") == worker.node_id and rows[-1]["training_iteration"] >= 2:
                return name
        return None

    moved = wait_for(worker_trial_reported, "a trial on the worker to finish 2 epochs", driver, log_path)
    trial_pid = trial_results(str(exp))[moved][-1]["pid"]
    worker.stop()                                   # the machine is gone: raylet, workers and all; Ray's worker
    try:                                            # processes live in their own session, so end the trial's too
        os.kill(trial_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        driver.wait(timeout=420)
    finally:
        if driver.poll() is None:
            driver.kill()
    text = log_path.read_text()
    assert driver.returncode == 0, text
    rows = trial_results(str(exp))[moved]
    iters = [r["training_iteration"] for r in rows]
    assert rows[-1]["node_id"] == cluster.head.node_id and iters[-1] == 6
    first_on_head = next(r["training_iteration"] for r in rows if r["node_id"] == cluster.head.node_id)
    assert first_on_head >= 3 and iters.count(1) == 1   # resumed from its checkpoint, not from epoch 1
    client = MlflowClient(tracking_uri=spec["mlflow"]["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("lose").experiment_id],
                              filter_string="tags.`richkd.kind` = 'trial'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def test_errored_trials_give_exit_code_3(assets, tmp_path):
    from tests.factories import ENV

    work = tmp_path / "work"
    broken = work / "broken_teacher.pth"
    work.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    spec = tiny_spec(assets, work, "errs", num_samples=2, epochs=1)
    spec["config"]["teaching"]["mode"] = "online"        # the teacher loads inside the trial, and fails there
    spec["space"]["teacher.checkpoint"] = {"sampler": "choice", "values": [str(broken)]}
    spec["tune"]["max_failures"] = 0
    path = write_spec(work, spec)
    done = run_cli(["sweep", str(path), "--num-cpus", "2", "-q"], {**os.environ, **ENV}, tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 3, text
    assert "2 trial(s) ended in error (exit code 3)" in text and "error.txt" in text
    assert "View detailed results" not in text and "tensorboard" not in text.lower()     # -q is quiet


def test_mlflow_server_down_at_start_is_exit_2_before_ray(assets, tmp_path):
    from tests.factories import ENV

    work = tmp_path / "work"
    port = free_port()
    path = write_spec(work, tiny_spec(assets, work, "nomlflow", tracking_uri=f"http://127.0.0.1:{port}"))
    done = run_cli(["sweep", str(path), "--num-cpus", "1", "-q"], {**os.environ, **ENV}, tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert f"the MLflow server at http://127.0.0.1:{port} does not answer" in text and "Traceback" not in text
    assert not (work / "runs" / "nomlflow").exists() and not (work / "cache").exists()   # nothing started
