"""Security basics that would silently regress: YAML is only ever safe-loaded, torch.load of anything a user hands
us uses weights_only=True (a pickle-bearing file is refused, its code never runs), and servers we start bind to
127.0.0.1. Source-level checks cover every call site; behavioural checks prove the refusals are clear errors.
(`richkd ui` on 127.0.0.1: tests/tune/test_runner.py; the cluster's MLflow server: tests/tune/test_cluster_yaml.py;
a pickle-bearing teacher checkpoint: tests/test_models.py.)"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("richkd", "benchmarks") for p in (REPO / d).rglob("*.py"))


def _calls(name: str):
    """(file, line, ast.Call) for every call of `<something>.<name>(...)` or `name(...)` in our sources."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path.relative_to(REPO), node.lineno, node


def test_yaml_is_only_safe_loaded_everywhere():
    """Every yaml.load names richkd.schema's YamlLoader, a SafeLoader subclass (plain data only); no other loader."""
    import yaml

    from richkd.schema import YamlLoader

    calls = [(f, line, call) for name in ("load", "load_all", "unsafe_load", "full_load", "full_load_all", "safe_load")
             for f, line, call in _calls(name)
             if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "yaml"]
    assert calls                                              # the scan does see our YAML reads
    unsafe = [f"{f}:{line}" for f, line, call in calls
              if call.func.attr != "safe_load"
              and not any(k.arg == "Loader" and getattr(k.value, "id", "") == "YamlLoader" for k in call.keywords)]
    assert unsafe == [], f"read YAML with richkd.schema.read_yaml (or yaml.safe_load): {unsafe}"
    assert issubclass(YamlLoader, yaml.SafeLoader)


def test_every_torch_load_passes_weights_only_true():
    calls = [(f, line, call) for f, line, call in _calls("load")
             if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "torch"]
    assert len(calls) >= 3                                     # teacher, train state, evaluate header
    bad = [f"{f}:{line}" for f, line, call in calls
           if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                      for k in call.keywords)]
    assert bad == [], f"torch.load without weights_only=True: {bad}"


def test_no_server_binds_to_all_interfaces_by_default():
    wide = [f"{p.relative_to(REPO)}" for p in SOURCES if "0.0.0.0" in p.read_text()]
    assert wide == [], f"bind to 127.0.0.1 unless told otherwise: {wide}"
    from richkd.cli.sweep import ui_command

    cmd = ui_command("sqlite:////tmp/x.db", 5000)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


# ----- behaviour: hostile YAML and pickles are refused with a clear error, and their code never runs ---------

class Exploit:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint would do with torch.load(weights_only=False)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


HOSTILE_YAML = "data:\n  root: !!python/object/apply:os.system ['touch {marker}']\n"


def test_yaml_with_python_tags_is_rejected_by_every_loader(tmp_path):
    from richkd.clip import load_prompt_set
    from richkd.config import Config, ConfigError
    from richkd.tune.errors import SpecError
    from richkd.tune.spec import load_spec

    marker = tmp_path / "PWNED"
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(HOSTILE_YAML.format(marker=marker))
    with pytest.raises(ConfigError, match="not valid YAML.*python/object"):
        Config.from_yaml(hostile)
    with pytest.raises(SpecError, match="not valid YAML.*python/object"):
        load_spec(hostile)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(f"name: x\ntemplates: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_prompt_set(str(prompts))
    assert not marker.exists()


def test_pickle_bearing_checkpoints_are_refused_everywhere_we_load_one(tmp_path, capsys):
    from richkd.cli import main
    from richkd.models import CheckpointError
    from richkd.robustness.evaluate import _checkpoint_header
    from richkd.trainer import load_train_state
    from richkd.tune.trainable import STATE_FILE, load_checkpoint_state

    marker = tmp_path / "PWNED"
    bad = tmp_path / STATE_FILE
    torch.save({"epoch": 1, "config": {}, "student": {"w": torch.ones(1)}, "extra": Exploit(marker)}, bad)
    with pytest.raises(ValueError, match="not a readable richkd training checkpoint.*(Unpickl|weights_only)"):
        load_train_state(bad)
    with pytest.raises(ValueError, match="not a readable richkd training checkpoint"):
        load_checkpoint_state(tmp_path)                       # a trial restoring from a planted checkpoint
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        _checkpoint_header(bad)                                # `richkd evaluate CHECKPOINT`
    assert main(["train", "--resume", str(bad)]) == 2          # one line, no traceback
    assert "not a readable richkd training checkpoint" in capsys.readouterr().err
    assert not marker.exists()                                 # the payload never ran


def test_pickle_bearing_clip_weights_are_refused(tmp_path):
    from richkd.clip import load_clip

    marker = tmp_path / "PWNED"
    bad = tmp_path / "clip.pt"
    torch.save({"state_dict": {}, "x": Exploit(marker)}, bad)
    with pytest.raises(Exception) as info:
        load_clip("richkd-tiny", str(bad))
    assert "weights_only" in str(info.value) or "Unpickl" in str(info.value) or "unpickl" in str(info.value)
    assert not marker.exists()
