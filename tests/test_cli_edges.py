"""The edges a user touches first (issue 21): numbers as YAML writes them, empty files, outputs below a file, a
sweep spec given to `train`, counts of 0, a busy port, an address where no Ray listens, CLIP weights missing
offline, the teacher a config names, and the exit code a sweep's outcome gives. Each is one line on stderr and
exit code 2 before any work (or the exit code the README lists). The slow checks with real signals and a real
cluster going away are in tests/reliability/test_sweep_signals.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from richkd.cli import main

from tests.factories import ENV, REPO, base_spec, make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def one_error_line(err: str, prog: str = "richkd") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def richkd(*argv: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    """The real command; the timeout only guards against a hang (no timing is asserted)."""
    return subprocess.run([sys.executable, "-m", "richkd", *argv], capture_output=True, text=True, timeout=120,
                          cwd=cwd or REPO, env={**os.environ, **ENV, **(env or {})})


def spec_file(assets: Path, tmp_path: Path, **changes) -> Path:
    raw = base_spec(assets, tmp_path / "work")
    for key, value in changes.items():
        raw[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ----- numbers, empty files, misplaced keys ---------------------------------------------------------------------

def test_float_fields_take_any_float_literal_from_yaml_and_set(tmp_path):
    """PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string: every YAML richkd reads takes it as a number."""
    from richkd.cli.common import load_config
    from richkd.schema import parse_override, read_yaml

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("optim: {lr: 1e-3, weight_decay: 5e-4}\nloss: {method: supervised}\n")
    cfg = load_config(str(cfg_file), ["optim.momentum=9E-1", "loss.temperature=+4e0"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.loss.temperature) == (1e-3, 5e-4, 0.9, 4.0)
    assert parse_override("optim.lr=1e-3") == ("optim.lr", 1e-3)
    assert read_yaml("[1e3, 1.5e-2, .5e1, 1_000, 0x10, 1e, e5, 1.2.3]") == [1000.0, 0.015, 5.0, 1000, 16, "1e", "e5",
                                                                           "1.2.3"]
    assert yaml.safe_load(cfg.to_yaml())["optim"]["lr"] == 1e-3          # written back as a number, too


def test_a_sweep_reads_float_literals_in_its_space_and_set(assets, tmp_path, capsys):
    path = spec_file(assets, tmp_path, space={"optim.lr": {"sampler": "loguniform", "low": 1e-4, "high": 1e-1}})
    path.write_text(path.read_text().replace("0.0001", "1e-4"))          # as a person writes it
    assert main(["sweep", str(path), "--check", "--set", "config.optim.weight_decay=5e-4"]) == 0
    assert "is valid" in capsys.readouterr().out


def test_an_empty_config_or_spec_file_is_named(tmp_path, capsys):
    for text in ("", "# nothing but a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        assert main(["train", "--config", str(path)]) == 2
        assert one_error_line(capsys.readouterr().err) == (f"richkd: error: {path} is empty; write its sections there "
                                                           "(examples: configs/, search_spaces/)")
        assert main(["sweep", str(path), "--check"]) == 2
        assert one_error_line(capsys.readouterr().err, "richkd sweep").endswith(f"{path} is empty; write its "
                                                                                 "sections there (examples: "
                                                                                 "configs/, search_spaces/)")


def test_config_keys_in_a_spec_point_to_the_config_section(assets, tmp_path, capsys):
    path = spec_file(assets, tmp_path)
    assert main(["sweep", str(path), "--check", "--set", "clip.model=ViT-B-32"]) == 2
    assert one_error_line(capsys.readouterr().err, "richkd sweep") == (
        "richkd sweep: error: --set clip.model: unknown spec section 'clip'; a config key takes the config. prefix: "
        "--set config.clip.model=ViT-B-32")
    assert main(["sweep", str(path), "--check", "--set", "tnue.num_samples=2"]) == 2     # a typo: nearest section
    assert "did you mean 'tune'?" in one_error_line(capsys.readouterr().err, "richkd sweep")
    misplaced = spec_file(assets, tmp_path, optim={"lr": 0.1})
    assert main(["sweep", str(misplaced), "--check"]) == 2
    assert "unknown spec key 'optim': config sections go under `config:`" in capsys.readouterr().err


def test_a_sweep_spec_given_to_train_says_so(assets, tmp_path, capsys):
    path = spec_file(assets, tmp_path)
    assert main(["train", "--config", str(path)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"richkd: error: {path} is a sweep spec (it has space: / tune:), not a run config; run it with "
        f"`richkd sweep {path}`, or pass a run config (configs/ has examples)")


def test_the_demo_specs_say_how_to_get_the_demo_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                  # no tune_runs/demo here
    monkeypatch.delenv("RICHKD_DEMO_DIR", raising=False)
    assert main(["sweep", str(REPO / "search_spaces" / "smoke.yaml"), "--check"]) == 2
    line = one_error_line(capsys.readouterr().err, "richkd sweep")
    assert "base: config file 'tune_runs/demo/configs/richkd.yaml' does not exist" in line
    assert line.endswith("`richkd demo` writes it: run that first, or set RICHKD_DEMO_DIR to the folder a demo ran "
                         "in (its --out)")


# ----- counts ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, prog, flag", [
    (["models", "--num-classes", "0"], "richkd", "--num-classes 0"),
    (["sweep", "--resume", "x", "--num-cpus", "0"], "richkd sweep", "--num-cpus 0"),
    (["sweep", "--resume", "x", "--num-samples", "-2"], "richkd sweep", "--num-samples -2"),
    (["finalize", "x", "--top", "0"], "richkd finalize", "--top 0"),
    (["finalize", "x", "--seeds", "0"], "richkd finalize", "--seeds 0"),
    (["cache", "--config", "x.yaml", "--plan", "--images", "0"], "richkd", "--images 0"),
    (["evaluate", "x.pt", "--max-samples", "0"], "richkd evaluate", "--max-samples 0"),
    (["evaluate", "x.pt", "--batch-size", "-1"], "richkd evaluate", "--batch-size -1"),
])
def test_counts_of_zero_are_refused_before_any_work(argv, prog, flag, capsys):
    """`finalize --top 0` used to mean "the spec's default" and trained; every count is 1 or more."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert one_error_line(captured.err, prog) == f"{prog}: error: {flag}: must be 1 or more"
    assert captured.out == ""                                    # nothing printed before the error either


# ----- output paths ---------------------------------------------------------------------------------------------

def test_outputs_below_a_file_are_one_line_naming_the_output_not_a_probe(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("loss: {method: supervised}\n")
    cases = [(["train", "--config", str(cfg), "--out", str(blocker / "out")],
              f"cannot write the run's output folder (--out) '{blocker / 'out'}': {blocker} is a file, not a folder"),
             (["train", "--config", str(cfg), "--out", str(blocker)],
              f"cannot write the run's output folder (--out) '{blocker}': it is a file, not a folder"),
             (["clip", "init-tiny", str(blocker / "tiny.pt")],
              f"cannot write the folder of PATH '{blocker}': it is a file, not a folder"),
             (["demo", "--quick", "--out", str(blocker / "demo")],
              f"cannot write the demo's output folder (--out) '{blocker / 'demo'}': {blocker} is a file, not a folder")]
    for argv, problem in cases:
        assert main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"richkd: error: {problem}; choose another"), line
        assert ".richkd-write-probe" not in line
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file",
                                                                                                      "run.yaml"]


def test_a_tilde_in_out_is_the_home_folder(tmp_path, monkeypatch):
    """`--out=~/runs/x` reaches richkd unexpanded (bash expands ~ only at the start of a word)."""
    from richkd.io import ensure_writable

    monkeypatch.setenv("HOME", str(tmp_path))
    assert ensure_writable("~/runs/x", "out", create=False) == tmp_path / "runs" / "x"


# ----- teachers and CLIP weights --------------------------------------------------------------------------------

def test_a_missing_teacher_points_to_the_weights_of_its_family(capsys):
    """`cache --plan` for the ImageNet recipe before its teacher exists: torchvision's weights, not mdistiller's
    CIFAR teachers; the CIFAR recipe keeps mdistiller's."""
    assert main(["cache", "--config", str(REPO / "configs" / "imagenet_resnet34_resnet18_richkd.yaml"), "--plan",
                 "--no-timing"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "teacher.checkpoint: file" in line and "does not exist" in line
    assert "save torchvision's ImageNet weights of resnet34" in line and "cifar_teachers" not in line
    assert main(["cache", "--config", str(REPO / "configs" / "cifar100_resnet32x4_resnet8x4_richkd.yaml")]) == 2
    assert "download mdistiller's cifar_teachers.tar (resnet32x4_vanilla/ckpt_epoch_240.pth)" in \
        one_error_line(capsys.readouterr().err)


def test_sweep_check_finds_clip_weights_missing_offline(assets, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))     # a cache miss for sure
    monkeypatch.setenv("HOME", str(tmp_path))                          # and no ~/.cache/clip file
    raw = base_spec(assets, tmp_path / "work")
    raw["config"]["clip"] = {"model": "ViT-B-32", "pretrained": "openai", "prompt_set": "simple"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path), "--check"]) == 2
    line = one_error_line(capsys.readouterr().err, "richkd sweep")
    assert "CLIP weights ViT-B-32/openai are not in the local cache and cannot be downloaded (HF_HUB_OFFLINE=1)" \
        in line
    # a file of these weights is built as clip.model names it: the message says to name QuickGELU, as the README
    assert "set clip.model: 'ViT-B-32-quickgelu', as these weights need QuickGELU" in line
    assert not (tmp_path / "work").exists()


# ----- ports and addresses --------------------------------------------------------------------------------------

def test_ui_on_a_busy_port_is_one_line_and_exit_2(tmp_path):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"")
    with socket.socket() as busy:                                 # a real listener holds the port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = richkd("ui", "--port", str(port), "--tracking-uri", f"sqlite:///{store}")
    assert done.returncode == 2
    assert done.stdout == ""                                      # no URL printed for a server that never starts
    assert one_error_line(done.stderr, "richkd ui") == (
        f"richkd ui: error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use; another "
        f"`richkd ui` or MLflow server?); pick a free one, e.g. --port {port + 1}")


def test_an_address_where_no_ray_listens_is_one_line_not_gcs_retries(assets, tmp_path):
    from tests.cluster_fixtures import free_port

    port = free_port()                                            # bound, then closed: nothing listens there
    path = spec_file(assets, tmp_path)
    for address, expect in ((f"127.0.0.1:{port}", f"--address 127.0.0.1:{port}: no Ray cluster answers there "
                                                  "(Connection refused); check the address, or start one with "
                                                  "`ray start --head`"),
                            ("127.0.0.1:port", "--address 127.0.0.1:port: expected HOST:PORT (e.g. 10.0.0.1:6379), "
                                               "ray://HOST:PORT or auto")):
        done = richkd("sweep", str(path), "--address", address)
        assert done.returncode == 2, done.stderr
        assert one_error_line(done.stderr, "richkd sweep").startswith(f"richkd sweep: error: {expect}")
    assert not (tmp_path / "work" / "runs" / "unit").exists()      # nothing was started or written


# ----- the exit code of a sweep that ran ------------------------------------------------------------------------

@pytest.mark.parametrize("counts, stopped_by, code", [
    ({"completed": 3}, None, 0),
    ({"completed": 1, "stopped_early": 1, "nonfinite_loss": 1}, None, 0),   # a NaN trial is a result, not an error
    ({"completed": 2, "error": 1}, None, 3),
    ({"completed": 1, "unfinished": 2}, signal.SIGINT, 130),
    ({"completed": 1, "error": 1, "unfinished": 1}, signal.SIGTERM, 143),   # the stop wins over the errors
    ({"completed": 3}, signal.SIGINT, 130),                                  # stopped after the last trial
])
def test_the_outcome_to_exit_code_rule(counts, stopped_by, code):
    from richkd.tune.outcome import SweepOutcome

    assert SweepOutcome(name="s", experiment_path="/x/s", num_trials=3, counts=counts,
                        stopped_by=stopped_by).exit_code == code


def test_a_trial_that_failed_once_without_retries_was_not_restarted():
    """`max_failures: 0`: Tune's num_failures counts the final failure of an errored trial; the summary's
    "retried" counts restarts only."""
    from richkd.tune.outcome import SweepOutcome, describe_outcome
    from richkd.tune.results import TrialRow

    def row(outcome, failures):
        return TrialRow(trial_id="t", trial_name="t", status="ERROR" if outcome == "error" else "TERMINATED",
                        outcome=outcome, epochs=1, value=None, best_value=None, metrics={}, sampled={}, config=None,
                        failures=failures)

    assert [row("error", 1).restarts, row("error", 3).restarts, row("completed", 1).restarts] == [0, 2, 1]
    text = describe_outcome(SweepOutcome(name="s", experiment_path="/x/s", num_trials=2,
                                         counts={"error": 2}, retried=0), "val_top1")
    assert "retried" not in text and "2 trial(s) ended in error (exit code 3)" in text


# ----- single runs ------------------------------------------------------------------------------------------------

def test_a_resumed_run_stays_in_its_folder_and_builds_caches_with_progress_lines(assets, tmp_path):
    """Without a terminal (here: pipes) the cache build prints its progress; `--resume RUN/last.pt` writes every
    file of the resumed run next to that checkpoint, not to tune_runs/runs/<name>."""
    raw = base_spec(assets, tmp_path)["config"]
    raw.pop("clip")
    raw.update(name="resumable", loss={"method": "kd"}, train={"epochs": 1})
    raw["data"]["max_train_samples"] = 128
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    first = richkd("train", "--config", str(cfg), "--out", str(run), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    progress = [line for line in first.stderr.splitlines() if line.startswith("cache teacher train: ")]
    assert progress[0].endswith(" batch(es) to go") and progress[-1].startswith("cache teacher train: done in ")
    resumed = richkd("train", "--resume", str(run / "last.pt"), "--set", "train.epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 1" in resumed.stdout and f"model {run / 'student.pt'}" in resumed.stdout
    assert not (tmp_path / "tune_runs").exists()
    import torch

    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2


def test_the_demo_names_its_store_as_the_readme_does(tmp_path, monkeypatch):
    from richkd.demo import shown_uri

    monkeypatch.chdir(tmp_path)
    assert shown_uri(f"sqlite:///{tmp_path}/tune_runs/demo/mlflow.db") == "sqlite:///tune_runs/demo/mlflow.db"
    assert shown_uri("sqlite:////elsewhere/mlflow.db") == "sqlite:////elsewhere/mlflow.db"
    assert shown_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_evaluate_refuses_a_tracking_store_it_cannot_log_to_before_evaluating():
    """`richkd evaluate --mlflow-uri` logs after the evaluation: an unknown scheme or a server that does not
    answer is checked first (it used to be a traceback once the work was done)."""
    from richkd.robustness.report import check_tracking_uri
    from tests.cluster_fixtures import free_port

    with pytest.raises(ValueError, match="'bogus://x': not a tracking store MLflow opens"):
        check_tracking_uri("bogus://x")
    port = free_port()
    with pytest.raises(ValueError, match=rf"--mlflow-uri: the MLflow server at http://127.0.0.1:{port} does not "
                                         r"answer \(.*refused\)"):
        check_tracking_uri(f"http://127.0.0.1:{port}")
    assert check_tracking_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"   # not probed
