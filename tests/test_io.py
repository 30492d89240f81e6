"""Atomic writes: all or nothing, and readable by others like a plainly created file (shared storage)."""
import os
import stat

import pytest

from richkd.io import atomic_path, atomic_write_text, default_mode


def test_atomic_write_replaces_whole_file_with_plain_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert stat.S_IMODE(os.stat(target).st_mode) == default_mode()
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
