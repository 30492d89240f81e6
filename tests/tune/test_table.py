"""Learning-curve tables (richkd.tune.table): planning rows, reading and repairing files, spreads, building through
Ray (killed and resumed) and from a finished sweep."""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import yaml

from richkd.tune.spec import spec_from_mapping
from richkd.tune.table import TableError, append_row, config_id, plan_rows, read_table

from tests.factories import ENV, base_spec, ensure_smoke_sweep, make_assets, synthetic_table


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def _raw(assets, work, epochs=2):
    raw = base_spec(assets, work)
    raw["points_to_evaluate"] = [{"loss.fusion_alpha": 0.7, "loss.temperature": 4.0}]
    raw["config"]["train"] = {"epochs": epochs}
    raw["config"]["data"]["max_train_samples"] = 160
    raw["config"]["loss"] = {"method": "richkd", "feat_weight": 0.0}
    raw["tune"].update(max_concurrent=1, resources={"cpu": 1}, max_failures=0)
    return raw


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "richkd", *args], capture_output=True, text=True,
                          env={**os.environ, **ENV}, timeout=600, **kw)


def test_rows_start_with_the_points_then_a_seeded_prefix_of_draws(assets, tmp_path):
    spec = spec_from_mapping(_raw(assets, tmp_path), check_resources=False, check_data=False)
    small, large = plan_rows(spec, 3, seeds=2, seeds_for=2), plan_rows(spec, 6, seeds=2, seeds_for=2)
    assert small[0].sampled == {"loss.fusion_alpha": 0.7, "loss.temperature": 4.0}
    assert [(j.config_id, j.seed) for j in small] == [(j.config_id, j.seed) for j in large[:len(small)]]
    seeds = {}
    for j in large:
        seeds.setdefault(j.config_id, []).append(j.seed)
    assert list(seeds.values()) == [[0, 1], [0, 1]] + [[0]] * (len(seeds) - 2)
    assert all(j.config_id == config_id(j.sampled) for j in large)
    with pytest.raises(TableError, match="--configs and --seeds"):
        plan_rows(spec, 0)


def test_spreads_and_a_cut_short_last_line(assets, tmp_path):
    spec = spec_from_mapping(_raw(assets, tmp_path), check_resources=False, check_data=False)
    path = synthetic_table(spec, tmp_path / "t.jsonl", n_configs=8, seeds=3, seeds_for=3)
    table = read_table(path)
    finals = {}
    for r in table.rows:
        if r.final is not None:
            finals.setdefault(r.config_id, []).append(r.final)
    s = table.spreads()
    assert s["configs_std"] == pytest.approx(statistics.stdev([statistics.fmean(v) for v in finals.values()]))
    seeded = [statistics.stdev(v) for v in finals.values() if len(v) > 1]
    assert s["seeds_std"] == pytest.approx((sum(x * x for x in seeded) / len(seeded)) ** 0.5)
    assert "across seeds of one configuration" in table.describe()
    # a kill while appending leaves half a line: reading drops it, repairing removes it, appends continue
    n = len(table.rows)
    with open(path, "a") as f:
        f.write('{"config_id": "abc", "seed"')
    assert len(read_table(path).rows) == n
    append_row(path, read_table(path, repair=True).rows[0])
    assert len(read_table(path).rows) == n + 1
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ["not json"] + lines[2:]) + "\n")
    with pytest.raises(TableError, match="line 3: not a table row"):
        read_table(path)
    (tmp_path / "other.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(TableError, match="not a richkd learning-curve table"):
        read_table(tmp_path / "other.jsonl")


def test_from_sweep_of_a_missing_sweep_is_one_line(tmp_path):
    p = _run(["table", "from-sweep", "nosuch", "--storage", str(tmp_path), "--out", str(tmp_path / "t.jsonl")])
    assert p.returncode == 2 and "no sweep named 'nosuch'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.jsonl").exists()


def test_from_sweep_refuses_a_sweep_with_early_stopped_trials(tmp_path_factory, tmp_path):
    info = ensure_smoke_sweep(tmp_path_factory.getbasetemp())
    assert info["counts"].get("stopped_early"), info["counts"]
    p = _run(["table", "from-sweep", info["name"], "--storage", info["storage"], "--out", str(tmp_path / "t.jsonl")])
    assert p.returncode == 2 and "stopped early by ASHA" in p.stderr and "tune.scheduler: fifo" in p.stderr, p.stderr
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.slow
def test_a_killed_build_resumes_and_trains_no_row_twice(assets, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_raw(assets, tmp_path)))
    out = tmp_path / "table.jsonl"
    args = ["table", "build", str(spec_file), "--configs", "2", "--seeds", "2", "--seeds-for", "1", "--out", str(out),
            "--num-cpus", "1", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "richkd", *args], env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.is_file() and len(out.read_text().splitlines()) >= 2:     # the header and one row
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        os.killpg(proc.pid, signal.SIGKILL)                                # as losing the machine would
    finally:
        proc.wait(timeout=60)
    first = out.read_text().splitlines()[1]
    assert 1 <= len(read_table(out).rows) < 4
    done = len(read_table(out).rows)
    p = _run(args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{4 - done} of 4 rows to train ({done} already there)" in p.stderr   # the point + 2 draws, one with 2 seeds
    table = read_table(out)
    assert out.read_text().splitlines()[1] == first                         # the finished row was not retrained
    keys = [(r.config_id, r.seed) for r in table.rows]
    assert len(keys) == len(set(keys)) == 4
    assert all(r.epochs == 2 and r.test_top1 is not None and all(s > 0 for s in r.seconds) for r in table.rows)
    assert table.header["provenance"]["caches"] and table.header["provenance"]["build_seconds"] > 0
    info = _run(["table", "info", str(out)])
    assert info.returncode == 0 and "3 configurations, 4 rows" in info.stdout
    again = _run(args)
    assert again.returncode == 0 and "nothing to train" in again.stderr      # progress lines: stderr, as a sweep's
