"""What a node must see to run a sweep's trials, checked where it runs (richkd.tune.node_check), the settings the
job ships to workers (richkd.tune.cluster) and the MLflow service checks (richkd.tracking)."""
from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest

from richkd.tune.cluster import shipped_env
from richkd.tune.errors import SpecError
from richkd.tune.node_check import Need, NodeCheckError, SweepNeeds, check_needs, raise_if_unmet, sweep_needs
from richkd.tune.spec import spec_from_mapping
from tests.factories import base_spec, make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def test_a_sweeps_needs_name_every_file_it_reads(assets, tmp_path):
    spec = spec_from_mapping(base_spec(assets, tmp_path))
    Path(spec.tune.storage_path).mkdir(parents=True)          # the driver creates it before the check
    cache = tmp_path / "cache" / "teacher-0123456789abcdef"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text('{"key": "0123456789abcdef"}')
    needs = sweep_needs(spec.cache_probe_configs, [cache], spec.tune.storage_path)
    by_what = {n.what: n for n in needs.needs}
    assert by_what["data.root"] == Need("data.root", str(assets / "fmnist"), "folder",
                                        tuple(sorted(p.name for p in (assets / "fmnist").iterdir())))
    assert by_what["teacher.checkpoint"].path == str(assets / "teacher.pth")
    assert by_what["clip.pretrained"] == Need("clip.pretrained", str(assets / "tiny_clip.pt"), "file")
    assert by_what["teaching.cache_dir"] == Need("teaching.cache_dir", str(cache), "cache", ("0123456789abcdef",))
    assert by_what["tune.storage_path"].kind == "writable"
    assert set(needs.versions) == {"richkd-tune", "torch", "ray"} and needs.versions["torch"]
    assert check_needs(needs) == []          # this machine built them: nothing is missing


def test_each_missing_thing_is_one_line_naming_path_and_fix(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    cache = tmp_path / "cache" / "clip-image-feedfacefeedface"
    needs = SweepNeeds(needs=(
        Need("teacher.checkpoint", str(tmp_path / "t.pth"), "file"),
        Need("data.root", str(folder), "folder", ("train-images-idx3-ubyte.gz",)),   # an empty mount point
        Need("teaching.cache_dir", str(cache), "cache", ("feedfacefeedface",)),
        Need("tune.storage_path", str(tmp_path / "nope" / "runs"), "writable"),
    ), versions={"torch": "0.0.1"})
    problems = check_needs(needs)
    assert len(problems) == 5
    assert f"file {tmp_path / 't.pth'} does not exist on this node" in problems[0] and "same path" in problems[0]
    assert "lacks train-images-idx3-ubyte.gz" in problems[1]
    assert "built by the driver" in problems[2] and "`richkd cache` on each node is not needed" in problems[2]
    assert "tune.storage_path" in problems[3] and "shared by every node" in problems[3]
    assert problems[4].startswith("torch ") and "the driver runs 0.0.1" in problems[4]
    with pytest.raises(NodeCheckError, match="node abc cannot run this sweep's trials") as info:
        raise_if_unmet(needs, where="node abc")
    assert str(info.value).count("\n  - ") == 5
    raise_if_unmet(None)                       # a plan pickled before needs existed checks nothing


def test_a_cache_from_another_build_is_refused(tmp_path):
    cache = tmp_path / "teacher-aaaa"
    cache.mkdir()
    (cache / "manifest.json").write_text('{"key": "bbbb"}')
    [problem] = check_needs(SweepNeeds(needs=(Need("teaching.cache_dir", str(cache), "cache", ("aaaa",)),)))
    assert "not the one the driver built" in problem and "'bbbb'" in problem


def test_workers_get_the_drivers_settings(monkeypatch, tmp_path):
    environ = {"RICHKD_CACHE": "/mnt/c", "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": "http://h:5000",
               "OMP_NUM_THREADS": "2", "HOME": "/root", "PATH": "/bin", "SECRET_TOKEN": "x"}
    monkeypatch.setenv("RICHKD_DATA", str(tmp_path))
    env = shipped_env(environ)
    assert env == {"RICHKD_CACHE": "/mnt/c", "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": "http://h:5000",
                   "OMP_NUM_THREADS": "2", "RICHKD_DATA": str(tmp_path)}   # data.root: null resolved here
    assert shipped_env({"RICHKD_DATA": "/data"})["RICHKD_DATA"] == "/data"


# ----- MLflow as a service ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_tracking_server_is_checked_before_anything_starts():
    from functools import partial

    from richkd.tracking import check_server

    check_tracking_server = partial(check_server, key="mlflow.tracking_uri", error=SpecError)   # as the runner does
    port = _free_port()
    with pytest.raises(SpecError, match=rf"server at http://127.0.0.1:{port} does not answer"):
        check_tracking_server(f"http://127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(SpecError, match="is not a valid server URL"):
        check_tracking_server("http://:99999")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_server(f"http://127.0.0.1:{server.server_address[1]}/")     # answers: no error
    finally:
        server.shutdown()
    check_tracking_server("sqlite:////nonexistent/mlflow.db")      # a local store is not probed


def test_experiments_open_on_the_training_runs_table(tmp_path):
    from mlflow.tracking import MlflowClient

    from richkd.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, PRIMARY_METRIC_TAG, ensure_experiment,
                                 experiment_links)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    new = ensure_experiment(client, "fresh", primary_metric="val_loss")
    old = client.create_experiment("older")               # made before the tag existed
    assert ensure_experiment(client, "older") == old
    for exp_id in (new, old):
        assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    # the objective is what the UI's run charts show first (MLflow 3's experiment tag for it)
    assert client.get_experiment(new).tags[PRIMARY_METRIC_TAG] == "val_loss"
    client.create_experiment("someone else's")           # not made by richkd: no link
    # `richkd ui`'s links: the runs table (model-training view), best objective first (val_loss: ascending)
    assert experiment_links(uri, "http://127.0.0.1:5001") == [
        ("fresh", f"http://127.0.0.1:5001/#/experiments/{new}/runs?workflowType=machine_learning"
                  "&orderByKey=metrics.%60val_loss%60&orderByAsc=true"),
        ("older", f"http://127.0.0.1:5001/#/experiments/{old}/runs?workflowType=machine_learning")]


def test_an_outage_warns_once_not_once_per_retry(caplog):
    import logging

    from richkd.tracking import quiet_http_retries

    quiet_http_retries()
    quiet_http_retries()                                  # installed once, however many clients are made
    pool = logging.getLogger("urllib3.connectionpool")
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        for attempt in range(5):
            pool.warning("Retrying (Retry(total=%d)) after connection broken by 'refused': /api", attempt)
        pool.warning("Connection pool is full, discarding connection: 127.0.0.1")
    assert [r.getMessage()[:8] for r in caplog.records] == ["Retrying", "Connecti"]


def test_a_trial_on_a_node_that_cannot_see_the_files_fails_first_with_the_nodes_message(tmp_path):
    """The trial-start check (what a node that joined after the preflight meets): one clear error before any
    training, not a cache or checkpoint error from deep inside the trainer."""
    from richkd.tune.params import TrialPlan
    from richkd.tune.trainable import train_trial

    needs = SweepNeeds(needs=(Need("teacher.checkpoint", str(tmp_path / "teacher.pth"), "file"),))
    plan = TrialPlan(base={}, params=(), metric="val_top1", mode="max", max_t=1)
    with pytest.raises(NodeCheckError, match=r"cannot run this sweep's trials:\n  - teacher.checkpoint: file "):
        train_trial({}, plan, needs=needs)


def test_a_folder_is_shared_only_if_the_node_sees_the_drivers_marker(tmp_path):
    from richkd.tune.node_check import shared_markers

    storage, elsewhere = tmp_path / "runs", tmp_path / "other"
    elsewhere.mkdir()
    with shared_markers([("tune.storage_path", str(storage))]) as markers:
        [(what, marker)] = markers
        assert what == "tune.storage_path" and Path(marker).parent == storage and Path(marker).is_file()
        here = sweep_needs([], [], None, shared=markers)
        assert check_needs(here) == []
        # the same folder name on a node whose disk is its own: the marker is not there
        moved = SweepNeeds(needs=(Need("tune.storage_path", str(elsewhere), "shared", (Path(marker).name,)),))
        [problem] = check_needs(moved)
        assert "is not the driver's folder" in problem and str(elsewhere) in problem
    assert not Path(marker).exists()                       # removed afterwards
