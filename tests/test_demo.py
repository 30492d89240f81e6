"""The README's main job (`richkd demo`) end to end in its --quick size, and its re-run behaviour."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import DEBIAN_FMNIST
from richkd.config import Config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").exists(),
                                 reason="needs Debian's dataset-fashion-mnist (make data)")]


def test_quick_demo_runs_the_whole_pipeline_and_reruns_reusing_work(tmp_path):
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
    assert (tmp_path / "mlflow.db").is_file()
    assert yaml.safe_load((out / "configs" / "kd.yaml").read_text())["loss"]["method"] == "kd"

    second = subprocess.run([sys.executable, "-m", "richkd", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the trained teacher" in second.stdout
    again = json.loads((out / "summary.json").read_text())
    assert again["sweep"] != summary["sweep"]                          # a new sweep, the old one kept
    assert (tmp_path / summary["sweep"] / "leaderboard.csv").is_file()
