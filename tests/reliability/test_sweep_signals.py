"""Stopping a real `richkd sweep` process (issue 21): a real Ctrl-C (SIGINT to its process group, as a terminal
sends it) exits 130 and a real SIGTERM to the driver alone (what `ray job stop`, Kubernetes and Slurm send) 143,
both with one resume hint and none of Ray's own; the export of the stopped sweep says how many trials are missing;
the resumed sweep finishes every trial with every epoch once; and no embedded Ray session folder is left behind.
A Ray cluster whose head goes away mid-sweep is one line and exit code 4."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from .helpers import env, stop_group, tiny_spec, trial_results, wait_for

from tests.cluster_fixtures import make_ray_cluster  # noqa: F401 - the fixture
from tests.factories import make_assets

EPOCHS = 2


def start(args: list, cwd: Path, log: Path, **extra_env: str) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "richkd", "sweep", *args, "--num-cpus", "2", "-q"], cwd=cwd,
                                env=env(**extra_env), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def finished(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        pytest.fail(f"the sweep did not stop:\n{log.read_text()[-4000:]}")
    return code, log.read_text()


@pytest.fixture()
def ray_tmp():
    """Ray's temp dir for this test's embedded clusters (short: Ray's socket paths must stay under 107 chars)."""
    folder = Path(tempfile.mkdtemp(prefix="rk-sig-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_a_sweep_with_their_exit_codes_and_it_resumes(tmp_path_factory, tmp_path, ray_tmp):
    assets = make_assets(tmp_path_factory.getbasetemp() / "tune_assets", clip=False)
    work, name = tmp_path / "work", "stopme"
    raw = tiny_spec(assets, work, name, num_samples=3, epochs=EPOCHS)
    raw["config"]["seed"] = 7              # not the default: the exported config must keep it
    raw["tune"]["max_concurrent"] = 1      # one trial at a time: a clear "finished / running / not started" split
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    exp, storage = work / "runs" / name, work / "runs"
    ray_env = {"RAY_TMPDIR": str(ray_tmp)}

    # Ctrl-C once the first trial finished and the second reported an epoch
    log = tmp_path / "sigint.log"
    proc = start([str(spec_file)], tmp_path, log, **ray_env)
    wait_for(lambda: sorted(len(r) for r in trial_results(str(exp)).values()) == [1, EPOCHS], "trial 2's epoch 1",
             proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = finished(proc, log)
    assert code == 130, out
    resume = f"richkd sweep --resume {name} --storage {storage}"
    assert "  stopped by SIGINT (exit code 130)\n" in out and f"interrupted: continue with `{resume}`" in out
    assert "Tuner.restore" not in out and "tensorboard" not in out.lower()     # Ray's hints do not compete
    assert not list(exp.glob("trial_*/events.out.tfevents*"))
    assert not list((ray_tmp / "ray").glob("session_2*"))                      # the embedded Ray's folder is gone

    exported = subprocess.run([sys.executable, "-m", "richkd", "export", name, "--storage", str(storage)],
                              capture_output=True, text=True, cwd=tmp_path, env=env(), timeout=240)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith("note: the sweep is unfinished: 2 of its 3 trials have not finished; "
                                      f"exported from the trials that have (continue with `{resume}`, then export "
                                      "again)\n"), exported.stdout

    # SIGTERM to the driver alone, in the resumed sweep, once the running trial reported again
    before = sum(len(r) for r in trial_results(str(exp)).values())
    log = tmp_path / "sigterm.log"
    proc = start(["--resume", name, "--storage", str(storage)], tmp_path, log, **ray_env)
    wait_for(lambda: sum(len(r) for r in trial_results(str(exp)).values()) > before, "a report after the resume",
             proc, log)
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finished(proc, log)
    assert code == 143, out
    assert "  stopped by SIGTERM (exit code 143)" in out and f"interrupted: continue with `{resume}`" in out
    assert "SIGTERM received" not in out and "Traceback" not in out          # not Ray's C++ handler, no crash

    log = tmp_path / "final.log"
    code, out = finished(start(["--resume", name, "--storage", str(storage)], tmp_path, log, **ray_env), log)
    assert code == 0, out
    assert f"sweep {name}: 3 trials (3 completed)" in out
    assert "per node" not in out        # three embedded Rays (three node ids), one machine: nothing to split
    for trial, rows in trial_results(str(exp)).items():       # every epoch reported, once each after resumes
        assert sorted({r["training_iteration"] for r in rows}) == list(range(1, EPOCHS + 1)), trial
    assert not list((ray_tmp / "ray").glob("session_2*"))

    exported = subprocess.run([sys.executable, "-m", "richkd", "export", name, "--storage", str(storage)],
                              capture_output=True, text=True, cwd=tmp_path, env=env(), timeout=240)
    assert exported.returncode == 0 and "unfinished" not in exported.stdout, exported.stdout + exported.stderr
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    assert best["seed"] == 7


@pytest.mark.slow
def test_a_cluster_whose_head_goes_away_is_one_line_and_exit_4(tmp_path_factory, tmp_path, make_ray_cluster):
    assets = make_assets(tmp_path_factory.getbasetemp() / "tune_assets", clip=False)
    work, name = tmp_path / "work", "lost"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(assets, work, name, num_samples=2, epochs=4)))
    cluster = make_ray_cluster(workers=[], head={"num_cpus": 2})
    log = tmp_path / "driver.log"
    with open(log, "w") as fh:
        # `auto` here is $RAY_ADDRESS (as under `ray job submit`). Ray ends a driver whose head stays away for
        # RAY_gcs_rpc_server_reconnect_timeout_s (default 60 s) with exit code 1; richkd says so at 3/4 of it
        proc = subprocess.Popen([sys.executable, "-m", "richkd", "sweep", str(spec_file), "--address", "auto", "-q"],
                                cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env=cluster.driver_env(RAY_gcs_rpc_server_reconnect_timeout_s="20"))
    try:
        wait_for(lambda: trial_results(str(work / "runs" / name)), "a trial's first epoch", proc, log)
        cluster.head.stop()
        code, out = finished(proc, log)
    finally:
        stop_group(proc)
    assert code == 4, out
    first = out.splitlines()[0]            # which cluster `auto` found, before any work
    found = re.fullmatch(rf"connected to the Ray cluster at (\S+:{cluster.port}) \(--address auto\): 1 node\(s\), "
                         r"2 CPUs, started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", first)
    assert found, out
    gcs = found.group(1)
    (error,) = [line for line in out.splitlines() if "error" in line.lower()]
    assert error == (f"richkd: error: the Ray cluster at {gcs} went away (its head stopped answering); finished "
                     f"trials and checkpoints are kept: continue with `richkd sweep --resume {name} --storage "
                     f"{work / 'runs'}` once a cluster is up"), out
    assert "Traceback" not in out
