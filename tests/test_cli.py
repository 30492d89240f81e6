"""The `richkd` command: user errors are one line with exit code 2 and leave no files; train round trip."""
import json
import re
import subprocess
import sys

import pytest
import yaml

from richkd.cli import main


def write_cfg(tmp_path, data: dict):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def supervised(tmp_path, root, **extra):
    cfg = {"name": "cli", "device": "cpu",
           "data": {"dataset": "fashion_mnist", "root": str(root), "batch_size": 64, "max_train_samples": 128,
                    "max_eval_samples": 64},
           "student": {"arch": "resnet8"}, "loss": {"method": "supervised"}, "train": {"epochs": 1},
           "teaching": {"cache_dir": str(tmp_path / "cache")}}
    for dotted, value in extra.items():
        section, key = dotted.split(".")
        cfg.setdefault(section, {})[key] = value
    return cfg


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["student"].update(arch="resnet9"), "student.arch: unknown model 'resnet9'"),
    (lambda c: c["loss"].update(temprature=3), "did you mean 'loss.temperature'"),
    (lambda c: c["loss"].update(fusion_alpha=2.0), "loss.fusion_alpha: 2.0 is out of range"),
    (lambda c: c["data"].update(dataset="cifar100"), "cifar-100-python"),
    (lambda c: c.update(loss={"method": "kd"}, teacher={"arch": "resnet8", "checkpoint": "/no/such.pt"}),
     "teacher.checkpoint"),
])
def test_bad_input_one_line_exit_2_no_files(tmp_path, mini_fashion_root, capsys, mutate, message):
    cfg = supervised(tmp_path, mini_fashion_root)
    mutate(cfg)
    out = tmp_path / "out"
    code = main(["train", "--config", write_cfg(tmp_path, cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("richkd: error:") and len(err.splitlines()) == 1
    assert message in err
    assert not out.exists()


def test_wrong_checkpoint_is_a_clear_error(tmp_path, mini_fashion_root, mini_teacher, capsys):
    cfg = supervised(tmp_path, mini_fashion_root)
    cfg.update(loss={"method": "kd"}, teacher={"arch": "resnet20", "checkpoint": str(mini_teacher)})
    code = main(["train", "--config", write_cfg(tmp_path, cfg), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "missing" in err.lower() and "resnet20" in err
    assert not list((tmp_path / "cache").glob("teacher-*"))  # no partial cache left behind


def test_train_then_resume_and_reuse_as_teacher(tmp_path, mini_fashion_root, capsys):
    cfg = supervised(tmp_path, mini_fashion_root, **{"train.epochs": 2})
    out = tmp_path / "run"
    assert main(["train", "--config", write_cfg(tmp_path, cfg), "--out", str(out), "--quiet", "--final"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["epoch"] == 2 and "test_top1" in result["test_metrics"]
    assert (out / "last.pt").is_file() and (out / "student.pt").is_file()
    # resuming a finished run with more epochs continues from epoch 2, config taken from the checkpoint
    assert main(["train", "--resume", str(out / "last.pt"), "--set", "train.epochs=3", "--out", str(out),
                 "--quiet"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((out / "result.json").read_text())["metrics"]["epoch"] == 3
    # the saved student loads as a teacher with strict=True
    kd = supervised(tmp_path, mini_fashion_root)
    kd.update(loss={"method": "kd"}, teacher={"arch": "resnet8", "checkpoint": str(out / "student.pt")})
    assert main(["train", "--config", write_cfg(tmp_path, kd), "--out", str(tmp_path / "kd"), "--quiet"]) == 0


def test_import_richkd_is_light():
    code = ("import sys, richkd, richkd.config, richkd.data, richkd.models, richkd.clip, richkd.cli; "
            "heavy = [m for m in ('ray', 'open_clip', 'mlflow', 'optuna') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_commands_and_examples():
    out = subprocess.run([sys.executable, "-m", "richkd", "--help"], capture_output=True, text=True, check=True)
    for word in ("train", "models", "cache", "clip", "demo", "sweep", "export", "finalize", "examples:"):
        assert word in out.stdout
    # each command on its own line of the command list, with its one-line help (not just the word somewhere)
    listed = dict(re.findall(r"^    (\w+)\s+(\S.*)$", out.stdout.split("examples:")[0], re.MULTILINE))
    assert set(listed) == {"train", "models", "cache", "clip", "demo", "sweep", "export", "finalize", "ui",
                           "evaluate", "report", "table", "replay"}
    assert listed["train"].startswith("train one run") and listed["ui"].startswith("browse the sweeps' MLflow")
    examples = out.stdout.split("examples:\n")[1]
    assert examples.startswith("  richkd demo ") and "\n  richkd sweep search_spaces/smoke.yaml" in examples


def test_main_alone_turns_exceptions_into_one_line_and_an_exit_code(monkeypatch, capsys):
    """Handlers raise; `main` prints `richkd: error: ...` (2), `richkd: interrupted` (130), or re-raises the user
    error under RICHKD_DEBUG. A KeyError prints its message, not its quoted repr."""
    import richkd.cli.train as train_commands

    def raising(exc):
        def handler(args):
            raise exc
        return handler

    monkeypatch.delenv("RICHKD_DEBUG", raising=False)
    monkeypatch.setattr(train_commands, "cmd_models", raising(KeyError("no model named 'x'")))
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "richkd: error: no model named 'x'\n"
    monkeypatch.setattr(train_commands, "cmd_models", raising(KeyboardInterrupt()))
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "richkd: interrupted\n"
    monkeypatch.setattr(train_commands, "cmd_models", raising(ValueError("bad value")))
    monkeypatch.setenv("RICHKD_DEBUG", "1")
    with pytest.raises(ValueError, match="bad value"):
        main(["models"])
