"""Where a sweep reads and writes: path-valued config keys, storage paths and URIs, tracking URIs, shared disks. Every
path a sweep ships is made absolute on the driver first: trials run in their own working directory, possibly on other
machines (docs/architecture.md, "Sweep storage")."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from richkd.io import atomic_write_text
from richkd.tracking import STORE_SCHEMES
from richkd.tune.errors import SpecError

DEFAULT_STORAGE = "tune_runs"
# Config keys holding paths: made absolute (against the current directory) before trials change directory.
PATH_KEYS = ("data.root", "teacher.checkpoint", "clip.pretrained", "clip.prompt_set", "teaching.cache_dir",
             "train.checkpoint_dir")
SHARED_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs",
                   "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs",
                   "fuse.mountpoint-s3", "fuse.rclone", "9p", "virtiofs", "wekafs", "panfs")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def has_scheme(path: str) -> bool:   # s3://bucket/prefix (Tune storage through pyarrow), not a local path
    return bool(_SCHEME.match(path))


def absolute_storage(path: str) -> str:   # `~` expanded and made absolute; URIs unchanged
    return path if has_scheme(path) else os.path.abspath(os.path.expanduser(path))


def absolutize(key: str, value: Any) -> Any:
    """Make a path-valued config value absolute; names that are not paths (an open_clip tag such as `openai`,
    a built-in prompt set) and URIs are returned unchanged."""
    if key not in PATH_KEYS or not isinstance(value, str) or not value:
        return value
    if key == "clip.pretrained":
        from richkd.clip.loading import parse_pretrained   # lazy: it loads torch, which `richkd ui` never needs

        return parse_pretrained(value).absolute()
    if key == "clip.prompt_set" and not ("/" in value or value.endswith((".yaml", ".yml"))):
        return value      # a built-in prompt set name
    return absolute_storage(value)


def join_storage(storage: str, name: str) -> str:
    return storage.rstrip("/") + "/" + name if has_scheme(storage) else str(Path(storage) / name)


def resolve_tracking_uri(uri: Optional[str], storage_path: str) -> str:
    """Absolute tracking URI (default sqlite:///<storage>/mlflow.db); the ./mlruns file store, which MLflow 3.13+
    raises on unless MLFLOW_ALLOW_FILE_STORE=true, is refused."""
    if not uri:
        root = storage_path if not has_scheme(storage_path) else os.path.abspath(DEFAULT_STORAGE)
        return "sqlite:///" + os.path.join(os.path.abspath(root), "mlflow.db")
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path.startswith("/") or path == ":memory:":
            return uri
        return "sqlite:///" + os.path.abspath(os.path.expanduser(path))
    if ":" in uri and uri.split(":", 1)[0].lower().split("+", 1)[0] in STORE_SCHEMES:   # scheme, before "+driver"
        return uri
    raise SpecError(f"mlflow.tracking_uri: {uri!r} is a file store (like ./mlruns), which MLflow 3 refuses; "
                    "use sqlite:///PATH/mlflow.db, an http://HOST:5000 server, or postgresql://...")


def storage_of(experiment_path: str) -> Optional[str]:   # None when it is the default ./tune_runs
    storage = experiment_path.rsplit("/", 1)[0] if has_scheme(experiment_path) else str(Path(experiment_path).parent)
    return None if storage.rstrip("/") == absolute_storage(DEFAULT_STORAGE).rstrip("/") else storage


def sweep_ref(name: str, experiment_path: str) -> str:
    """How later commands name this sweep: `NAME`, plus `--storage DIR` when it is not under ./tune_runs (the
    default those commands look in), so a printed `richkd sweep --resume ...` or `richkd export ...` works."""
    storage = storage_of(experiment_path)
    return f"{name} --storage {storage}" if storage else name


def is_shared_filesystem(path: str | os.PathLike, mounts_text: Optional[str] = None) -> bool:
    """True when `path` lies on a network/cluster file system according to /proc/mounts (NFS, Lustre, ...)."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return False
    target = os.path.abspath(path)
    mounts = [(p[1].replace("\\040", " "), p[2]) for p in map(str.split, mounts_text.splitlines()) if len(p) >= 3]
    under = [(m, fs) for m, fs in reversed(mounts) if target == m or target.startswith(m.rstrip("/") + "/")]
    return max(under, key=lambda m: len(m[0]), default=("", ""))[1].lower() in SHARED_FS_TYPES   # the last, deepest


# ----- files in storage (local or a pyarrow URI) ----------------------------------------------------

def _fs_and_path(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))


def write_text(path: str, text: str) -> None:
    if "://" not in path:
        atomic_write_text(path, text)
        return
    fs, p = _fs_and_path(path)
    fs.create_dir(os.path.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def remove_file(path: str) -> None:
    fs, p = _fs_and_path(path)
    fs.delete_file(p)


def read_text(path: str) -> Optional[str]:
    import pyarrow.fs

    fs, p = _fs_and_path(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.readall().decode()
