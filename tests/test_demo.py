"""The README's main job (`richkd demo`) end to end in its --quick size, its re-run behaviour, and where it writes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DEBIAN_FMNIST
from richkd.config import Config
from tests.factories import shared_ray

needs_fmnist = pytest.mark.skipif(not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").exists(),
                                  reason="needs Debian's dataset-fashion-mnist (make data)")


def test_the_demo_sweep_and_its_mlflow_store_go_under_out(tmp_path, monkeypatch):
    """`richkd demo --out DIR` used to put the sweep folder and mlflow.db in DIR's parent."""
    from richkd.demo import QUICK, demo_configs, demo_sweep_spec
    from richkd.io import atomic_write_text

    for var in ("MLFLOW_TRACKING_URI", "RICHKD_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RICHKD_DEMO_DIR", "restored-after-the-test")   # demo_sweep_spec sets it
    monkeypatch.chdir(tmp_path)
    out = tmp_path.resolve() / "runs" / "mydemo"
    for name, cfg in demo_configs(out.relative_to(tmp_path.resolve()), quick=True).items():
        atomic_write_text(out / "configs" / f"{name}.yaml", cfg.to_yaml())

    spec = demo_sweep_spec(out.relative_to(tmp_path.resolve()), QUICK, "demo_x", check=False)  # --out runs/mydemo
    assert spec.name == "demo_x"
    assert spec.tune.storage_path == str(out)                     # the sweep: runs/mydemo/demo_x/
    assert spec.mlflow.tracking_uri == f"sqlite:///{out}/mlflow.db"
    assert spec.tune.num_samples == 3                              # the --quick sizes reached the spec


@pytest.mark.slow
@needs_fmnist
def test_quick_demo_runs_the_whole_pipeline_and_reruns_reusing_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    first = subprocess.run([sys.executable, "-m", "richkd", "demo", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("teacher_test_top1", "kd_test_top1", "richkd_test_top1", "best_val_top1"):
        assert 0 <= summary[key] <= 100
    assert summary["sweep_trials"] == 3 and summary["sweep_outcomes"].get("completed", 0) >= 1
    # the exported best config is a complete, loadable config that names the demo's teacher and CLIP
    best = Config.from_yaml(summary["best_config"])
    assert best.teacher.checkpoint == str((out / "teacher" / "student.pt").resolve())
    assert best.clip.model == "richkd-tiny"
    assert "RANDOM weights" in first.stdout and "richkd ui --tracking-uri" in first.stdout
    assert (out / "mlflow.db").is_file() and (out / summary["sweep"]).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]    # nothing written next to --out
    assert yaml.safe_load((out / "configs" / "kd.yaml").read_text())["loss"]["method"] == "kd"

    # the re-run through the same command handler in this process, on the session's Ray (its second start-up in a
    # fresh interpreter is not what is tested: the first run above is the user's whole command)
    from richkd.cli import main

    monkeypatch.chdir(tmp_path)
    shared_ray()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert "reusing the trained teacher" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())
    assert again["sweep"] != summary["sweep"]                          # a new sweep, the old one kept
    assert (out / summary["sweep"] / "leaderboard.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]    # run from tmp_path: nothing next to --out


def test_demo_configs_hold_absolute_paths_and_work_from_any_folder(tmp_path, monkeypatch):
    """The configs the demo writes under <out>/configs/ name the teacher, CLIP and cache by absolute path:
    `richkd train --config tune_runs/demo/configs/kd.yaml` must not depend on the folder it is run from."""
    from richkd.demo import QUICK, demo_configs

    monkeypatch.chdir(tmp_path)
    configs = demo_configs(Path("tune_runs/demo"), quick=True)
    out = tmp_path.resolve() / "tune_runs" / "demo"
    for name, cfg in configs.items():
        assert cfg.teaching.cache_dir == str(out / "cache"), name
        assert cfg.clip.pretrained == str(out / "tiny_clip.pt"), name
    assert configs["kd"].teacher.checkpoint == str(out / "teacher" / "student.pt")
    assert configs["richkd"].loss.nce_k == QUICK["nce_k"]
    # read back from another folder, the written YAML still points at the same files
    (out / "configs").mkdir(parents=True)
    (out / "configs" / "kd.yaml").write_text(configs["kd"].to_yaml())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = Config.from_yaml(out / "configs" / "kd.yaml")
    assert again.teacher.checkpoint == str(out / "teacher" / "student.pt")
