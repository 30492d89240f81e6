"""Which code produced a result: the package version and the git commit, recorded with sweeps and exports."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

import richkd


def git_commit(start: Optional[Path] = None) -> str:
    """The source tree's commit (with `+dirty` when it has local changes), or "unknown" outside git."""
    where = start or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_version() -> dict:
    return {"richkd_version": richkd.__version__, "git_commit": git_commit()}
