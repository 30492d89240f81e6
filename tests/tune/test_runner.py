"""Runner guards (cluster storage, existing sweeps, resume of unknown sweeps) and `richkd ui`."""
from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from richkd.tune.runner import storage_problem
from richkd.tune.settings import TuneSettings
from tests.cluster_fixtures import group_pids
from tests.factories import base_spec, make_assets

MOUNTS = "/dev/sda1 / ext4 rw 0 0\nfs-1.efs.aws:/ /mnt/richkd nfs4 rw 0 0\n"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def test_local_storage_is_refused_on_a_multi_node_cluster():
    local = TuneSettings(storage_path="/home/me/tune_runs")
    msg = storage_problem(local, 3, MOUNTS)
    assert msg and "3 nodes" in msg and "s3://" in msg and "shared_storage" in msg
    assert storage_problem(local, 1, MOUNTS) is None                          # one node: fine
    assert storage_problem(TuneSettings(storage_path="s3://b/p"), 3, MOUNTS) is None
    assert storage_problem(TuneSettings(storage_path="/mnt/richkd/tune_runs"), 3, MOUNTS) is None   # NFS
    declared = dataclasses.replace(local, shared_storage=True)
    assert storage_problem(declared, 3, MOUNTS) is None


def test_starting_an_existing_sweep_again_is_refused(assets, tmp_path, capsys):
    from richkd.cli import main

    work = tmp_path / "work"
    raw = base_spec(assets, work)
    (work / "runs" / "unit").mkdir(parents=True)
    (work / "runs" / "unit" / "richkd_sweep.json").write_text("{}")
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(spec_file)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume unit" in err
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["unit"]   # nothing else was written


def test_resume_of_an_unknown_sweep_is_a_user_error(tmp_path, capsys):
    from richkd.cli import main

    assert main(["sweep", "--resume", "ghost", "--storage", str(tmp_path)]) == 2
    assert "no sweep named 'ghost'" in capsys.readouterr().err
    assert main(["sweep"]) == 2
    assert "needs a SPEC" in capsys.readouterr().err


def test_interrupted_sweep_says_how_to_resume(assets, tmp_path, capsys, monkeypatch):
    import richkd.tune.runner as runner
    from richkd.cli import main
    from richkd.tune.results import SweepRecord, write_sweep_record

    def ctrl_c(spec, **kwargs):
        if not isinstance(spec, str):   # run_sweep: stopped once the sweep record was written
            write_sweep_record(SweepRecord(spec=spec))
        raise KeyboardInterrupt

    def before_anything(*args, **kwargs):
        raise KeyboardInterrupt

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(base_spec(assets, tmp_path / "work")))
    monkeypatch.setattr(runner, "run_sweep", before_anything)
    assert main(["sweep", str(spec_file)]) == 130      # nothing written yet: the same command starts it
    assert capsys.readouterr().err == "richkd sweep: interrupted; no trial had started; run the same command again\n"
    monkeypatch.setattr(runner, "run_sweep", ctrl_c)
    monkeypatch.setattr(runner, "resume_sweep", ctrl_c)
    # storage outside ./tune_runs: the printed command names it, so it works as printed
    assert main(["sweep", str(spec_file)]) == 130
    assert capsys.readouterr().err == ("richkd sweep: interrupted; continue with `richkd sweep --resume unit "
                                       f"--storage {tmp_path / 'work' / 'runs'}`\n")
    assert main(["sweep", "--resume", "unit", "--storage", str(tmp_path)]) == 130
    assert capsys.readouterr().err == ("richkd sweep: interrupted; continue with `richkd sweep --resume unit "
                                       f"--storage {tmp_path}`\n")
    # the default storage (./tune_runs of the current folder): just the name
    raw = base_spec(assets, tmp_path / "work")
    del raw["tune"]["storage_path"]
    spec_file.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(spec_file)]) == 130
    assert capsys.readouterr().err == "richkd sweep: interrupted; continue with `richkd sweep --resume unit`\n"
    assert main(["sweep", "--resume", "unit"]) == 130
    assert capsys.readouterr().err == "richkd sweep: interrupted; continue with `richkd sweep --resume unit`\n"


def test_ui_command_binds_to_localhost_on_the_sweep_store(tmp_path, monkeypatch):
    from richkd.cli.sweep import resolve_ui_store, ui_command
    from richkd.tune.errors import SpecError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    with pytest.raises(SpecError, match="no MLflow store"):
        resolve_ui_store(None, str(tmp_path))
    (tmp_path / "mlflow.db").write_bytes(b"")
    uri = resolve_ui_store(None, str(tmp_path))
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    cmd = ui_command(uri, 5123)
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri
    assert resolve_ui_store("http://head:5000", None) == "http://head:5000"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_becomes_the_server_and_leaves_no_orphan(tmp_path):
    """`richkd ui` really serves the store on 127.0.0.1, as the same process (exec): a SIGTERM to it stops the
    server and frees the port."""
    import os
    import signal

    from richkd.tracking import client_for, ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ensure_experiment(client_for(uri), "ui-check")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "richkd", "ui", "--tracking-uri", uri, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, body = time.time() + 90, ""
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    body = resp.read().decode()
                    break
            except OSError:
                time.sleep(1)
        assert body.strip().upper() == "OK", f"richkd ui did not answer (exit code {proc.poll()})"
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().split(b"\0")
        assert b"mlflow" in cmdline and b"richkd" not in cmdline      # the richkd process became the server
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.time() + 15
        while group_pids(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert group_pids(proc.pid) == []                                 # no server child left behind
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # anything left in its group would be an orphan: gone now
            except ProcessLookupError:
                pass


def test_ui_on_a_tracking_server_prints_its_address(capsys):
    from richkd.cli import main

    assert main(["ui", "--tracking-uri", "http://mlflow.example:5000"]) == 0
    assert "open http://mlflow.example:5000 in a browser" in capsys.readouterr().out


def test_ui_handler_execs_mlflow_on_the_sweep_store(tmp_path, monkeypatch, capsys):
    """`richkd ui` replaces itself with `mlflow ui` on the store under --storage (the slow test above runs it)."""
    import os

    from richkd.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").write_bytes(b"")
    execs = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: execs.append((path, argv, env)))
    assert main(["ui", "--storage", str(tmp_path), "--port", "5123"]) == 0
    ((path, argv, env),) = execs
    assert path == sys.executable and argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5123"
    assert env["MLFLOW_DISABLE_TELEMETRY"]
    assert capsys.readouterr().out == (f"MLflow UI for sqlite:///{tmp_path}/mlflow.db at http://127.0.0.1:5123 "
                                       "(Ctrl-C to stop)\n")          # no experiment of a sweep there: no link
    assert main(["ui", "--storage", str(tmp_path / "none")]) == 2          # no store there: one line, no exec
    assert len(execs) == 1 and "no MLflow store at" in capsys.readouterr().err
