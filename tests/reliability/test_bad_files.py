"""Disk and file faults: a full disk (a real tiny tmpfs when this machine can mount one, else ENOSPC injected at
the write), a read-only output folder, damaged checkpoints, truncated cache files and a NaN loss. Each gives one
clear error (or a clean trial failure) before expensive work where possible, and never leaves a partial file."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from richkd.cache import CacheEntry, CacheError, prepare_caches, read_entry, write_entry
from richkd.io import OutputError, atomic_torch_save, atomic_write_text

from tests.factories import base_spec, make_assets, nan_teacher


def _mount_tmpfs(where: Path, options: str) -> bool:
    """Mount a tmpfs (needs root / CAP_SYS_ADMIN); False where this machine does not allow it."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a real ENOSPC for anything bigger."""
    where = tmp_path / "full"
    if not _mount_tmpfs(where, "size=64k"):
        pytest.skip("cannot mount a tmpfs here (not root); ENOSPC is injected in the *_injected_enospc tests")
    yield where
    _umount(where)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody can write: chmod 555 for a normal user; root ignores modes, so a read-only tmpfs then."""
    where = tmp_path / "readonly"
    if os.geteuid() != 0:
        where.mkdir()
        where.chmod(0o555)
        yield where
        where.chmod(0o755)
        return
    if not _mount_tmpfs(where, "ro,size=64k"):
        pytest.skip("running as root without mount: no way to make a folder unwritable")
    yield where
    _umount(where)


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# ----- a full disk ---------------------------------------------------------------------------------------------

def test_full_disk_checkpoint_is_one_clear_error_and_no_partial_file(full_disk):
    with pytest.raises(OutputError, match="No space left on device.*free some space") as info:
        atomic_torch_save({"w": torch.zeros(200_000)}, full_disk / "student.pt")   # 800 kB into 64 kB
    assert str(full_disk / "student.pt") in str(info.value)
    assert _leftovers(full_disk) == []                         # no student.pt, no .student.pt.*.tmp
    atomic_write_text(full_disk / "small.txt", "fits")          # the disk still works for what fits
    assert (full_disk / "small.txt").read_text() == "fits"


def test_full_disk_cache_entry_is_a_cache_error_and_no_partial_folder(full_disk):
    entry = CacheEntry("teacher", {"k": 1})
    with pytest.raises(CacheError, match="(No space left on device|the disk is full).*teaching.cache_dir"):
        write_entry(entry, full_disk, {"logits": np.zeros((1000, 100), np.float16)})
    assert _leftovers(full_disk) == []                          # neither the entry nor its temp folder


def test_injected_enospc_while_writing_leaves_nothing(tmp_path, monkeypatch):
    """The same guarantees on machines that cannot mount a tmpfs: ENOSPC injected at the low-level write."""
    real_open = open

    class FullFile:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def full_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return FullFile(fh) if "w" in mode and str(tmp_path) in str(file) else fh

    monkeypatch.setattr("builtins.open", full_open)
    monkeypatch.setattr("io.open", full_open)          # pathlib's write_text opens through io.open
    with pytest.raises(OutputError, match="No space left on device"):
        atomic_torch_save({"w": torch.zeros(10)}, tmp_path / "out" / "state.pt")
    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write_text(tmp_path / "out" / "best_config.yaml", "a: 1\n")
    monkeypatch.undo()
    assert _leftovers(tmp_path / "out") == []

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", no_room)
    with pytest.raises(CacheError, match="No space left on device"):
        write_entry(CacheEntry("teacher", {"k": 2}), tmp_path / "cache", {"logits": np.zeros((4, 3), np.float16)})
    assert _leftovers(tmp_path / "cache") == []


# ----- a read-only output folder -------------------------------------------------------------------------------

def test_train_into_a_read_only_folder_fails_before_training(readonly_dir, mini_fashion_root, tmp_path, capsys):
    from richkd.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"device": "cpu", "data": {"root": str(mini_fashion_root)},
                                   "student": {"arch": "resnet8"}, "loss": {"method": "supervised"},
                                   "train": {"epochs": 1}}))
    assert main(["train", "--config", str(cfg), "--out", str(readonly_dir / "run")]) == 2
    out = capsys.readouterr()
    assert "cannot write the run's output folder" in out.err and "writable" in out.err, out.err
    assert "epoch" not in out.out                                # refused before any training


def test_evaluate_into_a_read_only_folder_fails_before_evaluating(readonly_dir, mini_fashion_root, tmp_path,
                                                                 monkeypatch, capsys):
    import richkd.robustness.evaluate as evaluate
    from richkd.cli import main
    from richkd.models import create_model, save_model_checkpoint

    run = tmp_path / "run"
    save_model_checkpoint(create_model("resnet8", 10), run / "student.pt", arch="resnet8", num_classes=10)
    (run / "config.yaml").write_text(yaml.safe_dump({"device": "cpu", "data": {"root": str(mini_fashion_root)},
                                                     "student": {"arch": "resnet8"},
                                                     "loss": {"method": "supervised"}}))
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before the check"))
    assert main(["evaluate", str(run / "student.pt"), "--out", str(readonly_dir / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("richkd evaluate: error: cannot write the evaluation's output "
                                               f"folder (--out) {str(readonly_dir / 'eval')!r}"), err
    assert _leftovers(readonly_dir) == []


def test_sweep_into_a_read_only_storage_fails_before_ray(readonly_dir, tmp_path_factory, tmp_path, capsys):
    from richkd.cli import EXIT_USER_ERROR, main

    assets = make_assets(tmp_path_factory.getbasetemp() / "tune_assets")
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(base_spec(assets, tmp_path)))
    assert main(["sweep", str(spec), "--storage", str(readonly_dir / "runs")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "tune.storage_path" in err and "writable" in err, err


def test_cache_into_a_read_only_folder_fails_before_the_teacher_runs(readonly_dir, richkd_cfg, monkeypatch):
    import richkd.models

    cfg = richkd_cfg.with_overrides({"teaching.cache_dir": str(readonly_dir / "cache")})
    monkeypatch.setattr(richkd.models, "load_teacher", lambda *a, **k: pytest.fail("teacher ran before the check"))
    with pytest.raises(CacheError, match="teaching.cache_dir.*writable"):
        prepare_caches(cfg)


# ----- damaged checkpoints and caches --------------------------------------------------------------------------

def _train_state(tmp_path) -> Path:
    path = tmp_path / "state.pt"
    atomic_torch_save({"epoch": 1, "student": {"w": torch.ones(3)}, "config": {}}, path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_trial_checkpoint_is_a_clear_error(tmp_path, damage):
    from richkd.tune.trainable import STATE_FILE, load_checkpoint_state

    path = _train_state(tmp_path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    os.replace(path, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match=f"{tmp_path / STATE_FILE}.* not a readable richkd training checkpoint"):
        load_checkpoint_state(tmp_path)


def test_resume_from_a_truncated_checkpoint_is_one_cli_error(tmp_path, capsys):
    from richkd.cli import main

    path = _train_state(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    assert main(["train", "--resume", str(path)]) == 2
    assert "not a readable richkd training checkpoint" in capsys.readouterr().err


def test_truncated_teacher_checkpoint_is_a_checkpoint_error(tmp_path):
    from richkd.models import CheckpointError, create_model, load_teacher, save_model_checkpoint

    path = tmp_path / "teacher.pth"
    save_model_checkpoint(create_model("resnet8", 10), path, arch="resnet8", num_classes=10)
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="truncated"):
        load_teacher("resnet8", path, 10)


@pytest.mark.parametrize("keep", [0, 50, 200])
def test_truncated_cache_file_names_the_file_and_the_fix(tmp_path, keep):
    """0 bytes (EOFError in numpy), a cut header (ValueError) and cut data (mmap too short): one CacheError.
    (tests/test_cache.py covers the same through Run on a real teacher cache.)"""
    entry = CacheEntry("teacher", {"k": keep})
    folder = write_entry(entry, tmp_path, {"logits": np.zeros((100, 10), np.float16)})
    npy = folder / "logits.npy"
    npy.write_bytes(npy.read_bytes()[:keep])
    with pytest.raises(CacheError) as info:
        read_entry(entry, tmp_path)
    assert str(npy) in str(info.value) and f"delete {folder}" in str(info.value)


def test_truncated_cache_manifest_is_a_cache_error(tmp_path):
    entry = CacheEntry("teacher", {"k": "m"})
    folder = write_entry(entry, tmp_path, {"logits": np.zeros((4, 3), np.float16)})
    manifest = folder / "manifest.json"
    manifest.write_text(manifest.read_text()[:30])
    with pytest.raises(CacheError, match=f"not valid JSON; delete {folder}"):
        read_entry(entry, tmp_path)


# ----- NaN loss -------------------------------------------------------------------------------------------------

def test_nan_loss_stops_with_a_clear_error_and_saves_no_nan_checkpoint(tmp_path_factory, tmp_path, capsys):
    """A corrupted (NaN) teacher makes the KD loss NaN in epoch 1: `richkd train` says so (exit 2), and no
    checkpoint of the diverged student is written. In a sweep the same ends only that trial (nonfinite_loss;
    tests/tune/test_e2e.py's smoke sweep)."""
    from richkd.cli import main

    assets = make_assets(tmp_path_factory.getbasetemp() / "tune_assets", clip=False)
    bad = nan_teacher(assets / "nan_teacher.pth")
    cfg = tmp_path / "nan.yaml"
    cfg.write_text(yaml.safe_dump({
        "device": "cpu", "data": {"root": str(assets / "fmnist"), "augment": "none"},
        "student": {"arch": "resnet8"}, "teacher": {"arch": "resnet8", "checkpoint": str(bad)},
        "loss": {"method": "kd"}, "teaching": {"cache_dir": str(tmp_path / "cache")}, "train": {"epochs": 2}}))
    out_dir = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert "training loss became nan in epoch 1" in err, err
    assert _leftovers(out_dir) == []                            # no last.pt, no student.pt, no temp file


def test_cut_short_tune_state_files_are_set_aside_for_resume(tmp_path):
    """Ray copies its driver state into storage_path file by file; a kill mid-copy leaves a truncated file that
    would break Tuner.restore. The newest unreadable file of each kind is renamed, older readable ones stay."""
    import pickle

    from richkd.tune.runner import set_aside_unreadable
    from richkd.tune.errors import SpecError

    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trials": []}')
    (tmp_path / "experiment_state-2026-01-02_00-00-00.json").write_text('{"tri')          # truncated JSON
    (tmp_path / "callback-states-2026-01-01_00-00-00.pkl").write_bytes(pickle.dumps({"runs": 1}))
    (tmp_path / "callback-states-2026-01-02_00-00-00.pkl").write_bytes(b"")              # the 0-byte case
    good_searcher = tmp_path / "searcher-state-2026-01-02_00-00-00.pkl"
    good_searcher.write_bytes(pickle.dumps([1, 2, 3]))
    pickled_json = tmp_path / "search_gen_state-2026-01-02_00-00-00.json"   # Ray pickles this ".json" file
    pickled_json.write_bytes(pickle.dumps({"counter": 3}))
    moved = set_aside_unreadable(tmp_path)
    assert sorted(p.name for p in moved) == ["callback-states-2026-01-02_00-00-00.pkl.unreadable",
                                             "experiment_state-2026-01-02_00-00-00.json.unreadable"]
    assert max(p.name for p in tmp_path.glob("experiment_state-*.json")) == "experiment_state-2026-01-01_00-00-00.json"
    assert [p.name for p in tmp_path.glob("callback-states-*.pkl")] == ["callback-states-2026-01-01_00-00-00.pkl"]
    assert good_searcher.exists() and pickled_json.exists()
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_bytes(b"")
    with pytest.raises(SpecError, match="no readable Tune experiment state"):
        set_aside_unreadable(tmp_path)
