"""End-to-end sweeps on CPU with Ray, Optuna, ASHA and MLflow: a smoke sweep (killed sweeps: tests/reliability/).

Tiny on purpose (2 cores in CI): resnet8 students on 300 real Fashion-MNIST images for 3 epochs, a random-init
resnet8 teacher, the offline tiny CLIP, caches built once by the driver.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from mlflow.entities import ViewType

from tests.factories import ensure_smoke_sweep, find_study, trial_results

@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return ensure_smoke_sweep(tmp_path_factory.getbasetemp())


@pytest.mark.slow
def test_smoke_sweep_asha_stops_trials_and_mlflow_has_parent_and_children(smoke):
    from richkd.tracking import OUTCOME_TAG, PARENT_TAG, TRIAL_TAG, client_for

    assert smoke["num_trials"] == 3
    counts = smoke["counts"]
    assert counts.get("stopped_early", 0) >= 1, counts          # ASHA stopped the lr=1e-5 trial at rung 1
    assert counts.get("nonfinite_loss", 0) >= 1, counts         # the corrupted teacher ended its trial
    assert counts.get("completed", 0) >= 1, counts
    results = trial_results(smoke["experiment_path"])
    assert len(results) == 3
    for rows in results.values():                                # one report per epoch: iteration == epoch
        assert [r["training_iteration"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(r["epoch"] == r["training_iteration"] for r in rows)
    stopped = [rows for rows in results.values() if len(rows) < 3 and rows[-1]["nonfinite_loss"] == 0]
    assert stopped and all(rows[-1]["training_iteration"] in (1, 2) for rows in stopped)
    nan_rows = [rows for rows in results.values() if rows[-1]["nonfinite_loss"] == 1]
    assert nan_rows and math.isnan(nan_rows[0][-1]["val_loss"]) and "non-finite" in nan_rows[0][-1]["stop_reason"]

    client = client_for(smoke["tracking_uri"])
    parent = client.get_run(smoke["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["richkd.kind"] == "sweep"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and "
                                                f"tags.`richkd.kind` = 'trial'",   # finalize adds other kinds
                                  run_view_type=ViewType.ALL)
    assert len(children) == 3 and len({c.data.tags[TRIAL_TAG] for c in children}) == 3
    assert {c.data.tags[TRIAL_TAG] for c in children} == {k.replace("trial_", "") for k in results}
    for child in children:
        assert child.info.status in ("FINISHED", "FAILED") and child.info.lifecycle_stage == "active"
        assert child.data.params["loss.method"] == "richkd" and len(child.data.params) > 40
        assert "epochs_run" in child.data.metrics
    outcomes = sorted(c.data.tags[OUTCOME_TAG] for c in children)
    assert "stopped_early" in outcomes and "nonfinite_loss" in outcomes
    done = [c for c in children if c.data.tags[OUTCOME_TAG] == "completed"][0]
    history = client.get_metric_history(done.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert done.data.metrics["best_val_loss"] == min(m.value for m in history)
    print(f"\nsmoke sweep: {smoke['num_trials']} trials in {smoke['wall_s']:.1f}s; {smoke['counts']}")
    for name, rows in results.items():
        first = rows[0]
        print(f"  {name}: {len(rows)} epochs, first report {first['time_this_iter_s']:.1f}s after the trial "
              f"started (the epoch itself {first.get('epoch_time_s', float('nan')):.1f}s)")


@pytest.mark.slow
def test_optuna_study_records_pruned_and_failed_trials(smoke):
    """The searcher checkpoint holds the Optuna study: ASHA-stopped -> PRUNED, NaN -> FAIL, survivors COMPLETE."""
    import pickle

    from optuna.trial import TrialState

    states = None
    for f in Path(smoke["experiment_path"]).glob("searcher-state-*.pkl"):
        saved = pickle.loads(f.read_bytes())
        searcher = saved["searcher"] if isinstance(saved, dict) and "searcher" in saved else saved
        study = find_study(searcher)
        states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states is not None
    assert TrialState.PRUNED in states and TrialState.FAIL in states and TrialState.COMPLETE in states


# Killed trial workers and drivers (SIGKILL, then --resume): tests/reliability/test_sweep_kills.py


@pytest.mark.slow
def test_richkd_ui_opens_on_the_sweeps_runs_table_in_a_browser(smoke, tmp_path):
    """`richkd ui` on the smoke sweep's store, and headless Chromium at the link it prints: the MLflow UI's runs table
    (model training, not MLflow 3's GenAI overview) with the sweep's trial runs, sorted by its objective."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from html import unescape

    from tests.cluster_fixtures import free_port
    from tests.factories import ENV

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "richkd", "ui", "--storage", smoke["storage"], "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                            env={**os.environ, **ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        header, line = proc.stdout.readline(), proc.stdout.readline()     # printed before it becomes the server
        assert header.startswith(f"MLflow UI for {smoke['tracking_uri']} at http://127.0.0.1:{port}"), header
        name, _, link = line.strip().partition("'s runs: ")
        assert name == "smoke_e2e" and "/runs?workflowType=machine_learning" in link, line
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, "richkd ui exited"
                time.sleep(1)
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000",
                              "--window-size=1600,1200", "--dump-dom", link],
                             capture_output=True, text=True, timeout=180).stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    text = unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)))
    trials = sorted(p.name for p in Path(smoke["experiment_path"]).glob("trial_*"))
    assert len(trials) == 3 and all(t in text for t in trials), text[:3000]     # each trial's run, by its name
    assert "Sort: val_loss" in text, text[:3000]                               # the objective (smoke: val_loss)
    assert "Model training" in text and "matching runs" in text, text[:3000]  # the runs table, not GenAI's
