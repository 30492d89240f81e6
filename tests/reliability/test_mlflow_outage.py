"""The MLflow tracking server stopped during a sweep: training goes on, writes are buffered and retried with
back-off, and caught up when the server returns (or, if it never does, the failure is reported once). A real
`mlflow server` on 127.0.0.1 and real `richkd sweep` subprocesses; the Outbox's policy is also unit-tested."""
from __future__ import annotations

import logging
import time

import pytest
import yaml

from richkd.outbox import Outbox

from .helpers import MlflowServer, start_sweep, stop_group, tiny_spec, trial_results, wait_for

from tests.factories import make_assets


# ----- the outbox policy, without a server -------------------------------------------------------------------

class Store:
    """A stand-in for the MLflow store the outbox writes to: up or down, and some writes it always rejects. It
    counts the write attempts and probes that reach it."""

    def __init__(self) -> None:
        self.up, self.rejects, self.got, self.flaky = True, set(), [], 0
        self.attempts = self.probes = 0

    def apply(self, op):
        self.attempts += 1
        if not self.up:
            raise ConnectionError("connection refused")
        if self.flaky:   # a server half-way through a restart: refuses a write, then answers the probe
            self.flaky -= 1
            raise ConnectionError("connection refused")
        if op[1] in self.rejects:
            raise ValueError(f"run of {op[1]} was deleted")
        self.got.append(op)

    def reachable(self):
        self.probes += 1
        return self.up


class Clock:
    """The outbox's clock (its module's `time`), advanced by hand: back-off is checked by counting attempts at
    given times, not by measuring how long a loop took."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_outbox_buffers_while_down_backs_off_and_catches_up_in_order(caplog, monkeypatch):
    import richkd.outbox as outbox_module

    clock = Clock()
    monkeypatch.setattr(outbox_module, "time", clock)
    store, box = Store(), Outbox("http://127.0.0.1:1", first_delay_s=1.0, max_delay_s=2.0)
    caplog.set_level(logging.WARNING, logger="richkd.outbox")
    box.put(("open", "t1"))
    assert box.flush(store.apply, store.reachable) and store.got == [("open", "t1")]
    assert (store.attempts, store.probes) == (1, 0)
    store.up = False
    for step in range(1, 6):
        box.put(("metrics", "t1", step))
        assert box.flush(store.apply, store.reachable) is False     # never raises while the store is down
    assert (store.attempts, store.probes) == (2, 1)                 # one failed write + probe, then backing off
    clock.sleep(0.99)
    assert box.flush(store.apply, store.reachable) is False and store.attempts == 2   # within the 1 s delay
    clock.sleep(0.01)
    assert box.flush(store.apply, store.reachable) is False and store.attempts == 3   # retried after 1 s ...
    clock.sleep(1.5)
    assert box.flush(store.apply, store.reachable) is False and store.attempts == 3   # ... then after 2 s (doubled)
    clock.sleep(0.5)
    assert box.flush(store.apply, store.reachable) is False and store.attempts == 4
    clock.sleep(2.0)                                                 # capped at max_delay_s = 2 s
    assert box.flush(store.apply, store.reachable) is False and store.attempts == 5
    assert len(box) == 5 and box.is_down
    assert sum("is unreachable" in r.getMessage() for r in caplog.records) == 1   # warned once, not per write
    store.up = True
    assert box.flush(store.apply, store.reachable) is False          # still inside the back-off delay
    assert store.attempts == 5
    assert box.drain(store.apply, store.reachable, wait_s=5)
    assert [op[2] for op in store.got[1:]] == [1, 2, 3, 4, 5]        # caught up, in order, nothing lost
    assert any("caught up 5 buffered writes" in r.getMessage() for r in caplog.records)


def test_outbox_skips_a_rejected_write_and_bounds_its_size(caplog):
    store, box = Store(), Outbox("sqlite:///x.db", max_ops=4, first_delay_s=0.05)
    store.rejects.add("gone")
    box.put(("metrics", "gone", 1))
    box.put(("metrics", "t1", 1))
    assert box.flush(store.apply, store.reachable) is False          # retried first: it may be a transient failure
    assert store.got == [] and box.skipped == 0
    assert box.drain(store.apply, store.reachable, wait_s=5)         # the bad write does not block the queue
    assert store.got == [("metrics", "t1", 1)] and box.skipped == 1
    store.up = False
    box.put(("open", "t2"))
    for step in range(1, 8):
        box.put(("metrics", "t2", step))
    box.put(("close", "t2"))
    assert len(box) == 4 and box.dropped == 5                        # oldest metric records given up first
    assert box.ops[0] == ("open", "t2") and box.ops[-1] == ("close", "t2")   # run creation and summary kept
    assert not box.drain(store.apply, store.reachable, wait_s=0.3)   # bounded wait, then the caller reports


def test_a_write_refused_while_the_probe_answers_is_retried_not_lost():
    """Seen with a real server coming back: the write is refused, the probe a moment later succeeds."""
    store, box = Store(), Outbox("http://127.0.0.1:1", first_delay_s=0.05)
    store.flaky = 2
    for step in (1, 2):
        box.put(("metrics", "t1", step))
    assert box.drain(store.apply, store.reachable, wait_s=5)
    assert store.got == [("metrics", "t1", 1), ("metrics", "t1", 2)] and box.skipped == 0


def test_outbox_state_survives_a_driver_restart():
    box = Outbox("http://127.0.0.1:1")
    box.put(("open", "t1", {"loss.temperature": 2.0}, "trial_t1"))
    box.put(("metrics", "t1", 1, {"val_top1": 10.0}, 123))
    again = Outbox("http://127.0.0.1:1")
    again.restore(yaml.safe_load(yaml.safe_dump(box.export())))     # plain data: safe in Tune's snapshots
    assert list(again.ops) == list(box.ops)


# ----- a real server stopped during a real sweep ---------------------------------------------------------------

def _rows(exp) -> int:
    return sum(len(r) for r in trial_results(str(exp)).values())


@pytest.mark.slow
def test_mlflow_server_stopped_mid_sweep_training_continues_and_logging_catches_up(tmp_path_factory, tmp_path):
    from mlflow.tracking import MlflowClient

    from richkd.tracking import OUTCOME_TAG, PARENT_TAG, TRIAL_TAG

    assets = make_assets(tmp_path_factory.getbasetemp() / "tune_assets", clip=False)
    server = MlflowServer(tmp_path / "mlflow").start()
    work, name, epochs = tmp_path / "work", "outage", 4
    spec_file = tmp_path / "outage.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(assets, work, name, tracking_uri=server.uri, epochs=epochs)))
    exp = work / "runs" / name
    log = tmp_path / "driver.log"
    try:
        # the end of the sweep may wait for the server to come back (its restart takes long on a busy machine)
        driver = start_sweep([str(spec_file)], tmp_path, log, RICHKD_MLFLOW_FINAL_WAIT_S="300")
        try:
            wait_for(lambda: _rows(exp) >= 1, "the first epoch report", driver, log)
            server.stop()
            stopped_at, stopped_t = _rows(exp), time.monotonic()
            wait_for(lambda: _rows(exp) >= stopped_at + 3, "3 more epochs while MLflow is down", driver, log)
            down_rows, down_s = _rows(exp) - stopped_at, time.monotonic() - stopped_t
            server.start()
            driver.wait(timeout=420)
        finally:
            stop_group(driver)
        text = log.read_text()
        assert driver.returncode == 0, text
        assert text.count("is unreachable") == 1, text              # reported once, not per write
        assert "reachable again" in text and "caught up" in text, text
        assert "Traceback" not in text, text
        print(f"\n{down_rows} epoch reports in the first {down_s:.1f}s of the outage; driver log:\n{text}")

        results = trial_results(str(exp))                           # Tune's own results: nothing lost
        assert len(results) == 3 and all([r["training_iteration"] for r in rows] == list(range(1, epochs + 1))
                                         for rows in results.values())
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name(name)
        parents = client.search_runs([experiment.experiment_id], filter_string="tags.`richkd.kind` = 'sweep'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        kids = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parents[0].info.run_id}'")
        assert sorted(k.data.tags[TRIAL_TAG] for k in kids) == sorted(k.replace("trial_", "") for k in results)
        for kid in kids:                                             # caught up: every epoch, in MLflow too
            rows = results["trial_" + kid.data.tags[TRIAL_TAG]]
            history = client.get_metric_history(kid.info.run_id, "val_top1")
            assert [(m.step, m.value) for m in history] == [(r["training_iteration"], r["val_top1"]) for r in rows]
            assert kid.info.status == "FINISHED" and kid.data.tags[OUTCOME_TAG] == "completed"
            assert kid.data.metrics["best_val_top1"] == max(r["val_top1"] for r in rows)
    finally:
        server.stop()


@pytest.mark.slow
def test_mlflow_server_that_never_returns_is_reported_once_and_the_sweep_still_completes(tmp_path_factory,
                                                                                          tmp_path):
    assets = make_assets(tmp_path_factory.getbasetemp() / "tune_assets", clip=False)
    server = MlflowServer(tmp_path / "mlflow").start()
    work, name = tmp_path / "work", "gone"
    spec_file = tmp_path / "gone.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(assets, work, name, tracking_uri=server.uri, num_samples=2,
                                                  epochs=2)))
    exp = work / "runs" / name
    log = tmp_path / "driver.log"
    driver = start_sweep([str(spec_file)], tmp_path, log, RICHKD_MLFLOW_FINAL_WAIT_S="3")
    try:
        wait_for(lambda: _rows(exp) >= 1, "the first epoch report", driver, log)
        server.stop()
        started = time.monotonic()
        driver.wait(timeout=300)
        after_stop_s = time.monotonic() - started
    finally:
        stop_group(driver)
        server.stop()
    text = log.read_text()
    assert driver.returncode == 0, text
    assert text.count("is unreachable") == 1 and text.count("stayed unreachable") == 1, text
    assert "result.json" in text and "Traceback" not in text, text
    results = trial_results(str(exp))
    assert len(results) == 2 and all(len(rows) == 2 for rows in results.values())
    print(f"\nsweep finished {after_stop_s:.1f}s after the MLflow server was stopped")
