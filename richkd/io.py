"""Atomic file writes: a temp file in the same folder, fsync, then rename, so no partial file is ever seen.
Also the one-line wording of a torch checkpoint that cannot be read (`load_problem`), and progress output that
works without a terminal (`progress_bar`)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm


def default_mode(full: int = 0o666) -> int:
    """The mode a plainly created file (0o666) or folder (0o777) gets under the process umask: mkstemp/mkdtemp's
    0600/0700, renamed into place, would hide exports and caches on shared storage from everyone else."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


class OutputError(ValueError):
    """An output cannot be written (read-only or missing permission, disk or quota full); the message names the
    path, the reason and the fix. Raised after removing any partial file, so nothing half-written is left."""


# errnos that mean "this place cannot take the file" (a user fix), not a bug in the writer
_NO_ROOM_OR_RIGHTS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def output_error(exc: OSError, path: str | os.PathLike, what: str = "output") -> OutputError | OSError:
    """OutputError for a full / read-only / forbidden destination, or one below a file; any other OSError is
    returned unchanged."""
    # numpy's tofile reports a short write on a full disk as OSError("N requested and M written"), errno None
    short_write = exc.errno is None and "requested and" in str(exc) and "written" in str(exc)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        target = Path(path).absolute()
        blocker = next((p for p in (target, *target.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir() and blocker != target:
            return OutputError(f"cannot write {what} {str(path)!r}: {blocker} is a file, not a folder; choose "
                               "another path")
    if exc.errno not in _NO_ROOM_OR_RIGHTS and not short_write:
        return exc
    reason = f"the disk is full ({exc})" if short_write else (exc.strerror or os.strerror(exc.errno))
    if short_write or exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space there (or write elsewhere) and run again"
    else:
        fix = "make the folder writable, or choose another folder"
    return OutputError(f"cannot write {what} {str(path)!r}: {reason}; {fix} (nothing partial was left behind)")


def ensure_writable(folder: str | os.PathLike, what: str, create: bool = True) -> Path:
    """Prove a file can be created in `folder` before any expensive work. create=False leaves no trace: the
    nearest existing ancestor is probed instead (a command that fails later must not leave empty folders).
    Any failure is one OutputError naming `folder` (never the probe file), the reason and the fix."""
    target = Path(folder).expanduser()
    probe_dir = target
    if not create:
        probe_dir = target.absolute()
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
    try:
        if create:
            target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=".richkd-write-probe.", dir=probe_dir):
            pass
    except OSError as exc:
        converted = output_error(exc, target, what)
        if converted is exc:   # any other reason the probe failed is still the folder's, e.g. it is a file
            reason = "it is a file, not a folder" if target.is_file() else exc.strerror or str(exc)
            converted = OutputError(f"cannot write {what} {str(target)!r}: {reason}; choose another folder")
        raise converted from None
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    A full disk or an unwritable folder becomes one OutputError naming `path` (the temp file is gone by then).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise output_error(exc, target) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, default_mode())
        os.replace(tmp_path, target)
    except OSError as exc:
        converted = output_error(exc, target)
        if converted is exc:
            raise
        raise converted from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically. Serialised in memory first: torch's own file writer reports a full disk as an
    obscure RuntimeError ("unexpected pos ..."); a plain write raises ENOSPC, which becomes an OutputError."""
    import torch   # here, not at the top: the sweep commands that never train read and write files through here

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def write_array_folder(final: str | os.PathLike, arrays: dict, manifest: dict) -> Path:
    """`arrays` as NAME.npy plus manifest.json (`manifest` + each array's shape and dtype) in a temp folder next
    to `final`, then one rename: readers never see a partial folder. Content-addressed callers write identical
    content for the same `final`, so a folder already there (or put there by a concurrent writer) is kept.
    Files get the umask's plain permissions (mkdtemp's 0700 would hide shared caches from other users)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        shapes = {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in arrays.items()}
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "arrays": shapes}, indent=1, sort_keys=True,
                                                      default=str))
        if final.exists():
            return final
        for f in tmp.iterdir():
            os.chmod(f, default_mode())
        os.chmod(tmp, default_mode(0o777))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not a concurrent writer finishing first: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def quiet_torch_load() -> Iterator[None]:
    """torch.load(weights_only=True) warns about the pickle protocol of a foreign file before refusing it; the
    refusal itself (see `load_problem`) is the one message the user should see."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        yield


def load_problem(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, on one line. torch's own text for a pickle-bearing file spans
    a dozen lines and suggests weights_only=False, which would run the file's code."""
    text = str(exc)
    if "Weights only load failed" in text or type(exc).__name__ == "UnpicklingError":
        return ("it holds pickled Python objects, refused by torch.load(weights_only=True), which reads only "
                "tensors and plain containers so that no file can run code")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


PROGRESS_EVERY_S = 10.0


def progress_bar(total: int, desc: str, unit: str = "batch", disable: bool = False):
    """A tqdm bar on a terminal; elsewhere (CI, nohup, a log file) a line on stderr when it starts, one every
    PROGRESS_EVERY_S seconds and one when it ends, so a long build is never silent. disable: a silent bar."""
    if disable or sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=disable)
    return _ProgressLines(total, desc, unit)


class _ProgressLines:
    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self.started = self.last = time.monotonic()
        print(f"{desc}: {total} {unit}(es) to go", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.last = time.monotonic()
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(f"{self.desc}: done in {time.monotonic() - self.started:.1f} s", file=sys.stderr, flush=True)
