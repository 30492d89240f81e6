"""Bad input through the `richkd` command: one line on stderr, exit code 2, before any expensive work; a closed
pipe ends quietly. Several checks run `python -m richkd` in a subprocess: warnings and the interpreter's own
exit-time errors only show there."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from richkd.cli import main
from richkd.cli.app import error_message

from tests.factories import ENV, REPO


def richkd(*argv: str, cwd=None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "richkd", *argv], capture_output=True, text=True, timeout=300,
                          cwd=cwd or REPO, env={**os.environ, **ENV})


def one_error_line(err: str, prog: str = "richkd") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_error_message_joins_lines_into_one():
    assert error_message(ValueError("first\n  second\nFix: do this")) == "first second Fix: do this"
    assert error_message(ValueError("2 problems:\n  - a is wrong\n  - b is missing")) == \
        "2 problems: a is wrong; b is missing"
    assert error_message(KeyError("no model named 'x'")) == "no model named 'x'"
    assert error_message(ValueError("")) == "ValueError"


class Exploit:
    def __reduce__(self):
        return (os.system, ("true",))


def test_pickled_checkpoint_is_one_line_without_warnings(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "x": Exploit()}, bad)
    done = richkd("train", "--resume", str(bad))
    assert done.returncode == 2
    line = one_error_line(done.stderr)               # no UserWarning about the pickle protocol either
    assert line == (f"richkd: error: {bad} is not a readable richkd training checkpoint (it holds pickled Python "
                    "objects, refused by torch.load(weights_only=True), which reads only tensors and plain "
                    "containers so that no file can run code)")


def test_python_tagged_yaml_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: !!python/object/apply:os.system ['true']\n")
    assert main(["train", "--config", str(cfg)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"richkd: error: {cfg}: not valid YAML at line 1, column 7: python tags are refused")
    cfg.write_text("data: [1, 2\nloss: {}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert one_error_line(capsys.readouterr().err) == (f"richkd: error: {cfg}: not valid YAML at line 2, column 5: "
                                                      "expected ',' or ']', but got ':'")


def test_missing_fashion_mnist_is_one_line_naming_the_fix(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "none")}, "loss": {"method": "supervised"}}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    none = tmp_path / "none"
    assert f"were not found in any of {none}/FashionMNIST/raw, {none}. Fix: `sudo apt-get install " in line
    assert not (tmp_path / "out").exists()


def test_cache_list_of_a_missing_folder_is_an_error(tmp_path, capsys):
    assert main(["cache", "--list", "--cache-dir", str(tmp_path / "nonexistent")]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"richkd: error: cache folder {str(tmp_path / 'nonexistent')!r} does not exist; pass the folder of an "
        "existing cache (--cache-dir DIR, or --config FILE for its teaching.cache_dir)")
    assert main(["cache", "--list", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"no cache entries in {tmp_path} (build them with `richkd cache --config FILE`)\n"


def test_a_closed_pipe_ends_quietly():
    """`richkd models | head -1`: the reader goes away; no BrokenPipeError traceback, exit code 141 (SIGPIPE)."""
    proc = subprocess.Popen([sys.executable, "-m", "richkd", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env={**os.environ, **ENV})
    proc.stdout.close()                              # like `head` exiting before richkd writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert err == ""


def test_small_subset_vs_nce_k_fails_before_any_cache_is_built(richkd_cfg, tmp_path, monkeypatch, capsys):
    """data.max_train_samples=60 leaves at most 59 rows of other classes, fewer than loss.nce_k=64 negatives."""
    import richkd.cache

    cfg = richkd_cfg.with_overrides({"data.max_train_samples": 60, "loss.feat_weight": 0.8})
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    monkeypatch.setattr(richkd.cache, "prepare_caches", lambda *a, **k: pytest.fail("caches built before the check"))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "loss.nce_k=64 exceeds the" in line and "lower loss.nce_k below" in line and "max_train_samples" in line
    assert not Path(cfg.teaching.cache_dir).exists() and not (tmp_path / "out").exists()
    # without CRD (feat_weight 0) the same subset is fine for the check
    from richkd.validate import check_data_fit

    check_data_fit(cfg.with_overrides({"loss.feat_weight": 0.0}))


def test_uses_crd_matches_the_objective(richkd_cfg):
    """LossConfig.uses_crd (what the data-fit checks read) says exactly when DistillationObjective builds CRD
    memory banks, and uses_teacher when it needs teacher outputs."""
    from richkd.objective import DistillationObjective

    targets = torch.arange(200) % 10
    for method, feat_weight in (("richkd", 0.8), ("richkd", 0.0), ("kd", 0.8), ("supervised", 0.0)):
        cfg = richkd_cfg.with_overrides({"loss.method": method, "loss.feat_weight": feat_weight})
        objective = DistillationObjective(cfg.loss, student_dim=8, teacher_dim=8, clip_dim=8,
                                          train_targets=targets, train_rows=torch.arange(200))
        assert cfg.loss.uses_crd == (objective.crd is not None), (method, feat_weight)
        assert cfg.loss.uses_teacher == objective.needs_teacher == (method != "supervised"), method


def test_train_progress_line_skips_val_on_epochs_without_evaluation(tmp_path, mini_fashion_root, capsys):
    cfg = {"name": "ev", "device": "cpu",
           "data": {"dataset": "fashion_mnist", "root": str(mini_fashion_root), "batch_size": 64,
                    "max_train_samples": 128, "max_eval_samples": 64},
           "student": {"arch": "resnet8"}, "loss": {"method": "supervised"},
           "train": {"epochs": 3, "eval_every": 2}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3 and "nan" not in "".join(lines)
    assert "val: not evaluated (train.eval_every=2)" in lines[0]
    assert "val top-1 " in lines[1] and "val top-1 " in lines[2]        # epoch 2 (every 2) and the last
