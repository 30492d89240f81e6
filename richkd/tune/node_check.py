"""What every node must see before a trial can run there (docs/architecture.md, "Running on a cluster"): the driver
lists the needs once (`sweep_needs`); `check_needs` runs on each node before any trial (richkd.tune.cluster) and at
the start of every trial, which covers nodes that join later. Plain Python, no Ray import."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator, Optional

from richkd.tune.errors import SpecError

VERSIONED_PACKAGES = ("richkd-tune", "torch", "ray")
GPU_PROBE_TIMEOUT_S = 120.0
SHARE_FIX = ("put it on storage every node mounts at the same path (e.g. NFS), or point the spec at such a path "
             "(an environment variable in the spec, ${VAR}, is expanded on the driver)")


class NodeCheckError(SpecError):   # a node cannot run the sweep's trials (a path it cannot see, another version)
    pass


@dataclass(frozen=True)
class Need:   # one thing a trial reads or writes
    what: str                          # its name for the user (usually the config key)
    path: str
    kind: str                          # file | folder | cache | writable | shared
    expect: tuple = ()                 # folder: entry names it must hold; cache: (manifest key,); shared: (marker,)


@dataclass(frozen=True)
class SweepNeeds:
    needs: tuple = ()
    versions: dict = field(default_factory=dict)     # package -> version on the driver
    gpu: float = 0.0                                 # tune.resources.gpu: GPU nodes must be able to use their GPUs

    def __bool__(self) -> bool:
        return bool(self.needs or self.versions)


def package_versions() -> dict:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sweep_needs(configs: Iterable, cache_folders: Iterable[str | os.PathLike], storage_path: Optional[str],
                max_listed: int = 16, shared: Iterable[tuple] = (), gpu: float = 0.0) -> SweepNeeds:
    """The needs of every config a sweep can run (its cache probe configs) and their caches. A folder's need lists up
    to `max_listed` of its entries, so an empty folder on a node (a missing mount) is caught."""
    from richkd.clip.loading import parse_pretrained

    needs: dict = {}

    def add(need: Need) -> None:
        needs.setdefault((need.kind, need.path), need)

    for cfg in configs:
        if cfg.data.root:
            add(_folder_need("data.root", cfg.data.root, max_listed))
        if cfg.loss.uses_teacher and cfg.teacher.checkpoint:
            add(Need("teacher.checkpoint", str(cfg.teacher.checkpoint), "file"))
        if cfg.uses_clip:
            ref = parse_pretrained(cfg.clip.pretrained)
            if ref.kind == "file":
                add(Need("clip.pretrained", str(ref.path), "file"))
            elif ref.kind == "dir":
                add(_folder_need("clip.pretrained", str(ref.path), max_listed))
            prompt_set = str(cfg.clip.prompt_set)
            if "/" in prompt_set or prompt_set.endswith((".yaml", ".yml")):
                add(Need("clip.prompt_set", prompt_set, "file"))
    for folder in cache_folders:
        manifest = Path(folder) / "manifest.json"
        key = json.loads(manifest.read_text()).get("key", "") if manifest.is_file() else ""
        add(Need("teaching.cache_dir", str(folder), "cache", (key,)))
    if storage_path and "://" not in storage_path:
        add(Need("tune.storage_path", storage_path, "writable"))
    for what, marker in shared:                       # (config key, a file the driver just wrote in that folder)
        add(Need(what, str(Path(marker).parent), "shared", (Path(marker).name,)))
    return SweepNeeds(needs=tuple(needs.values()), versions=package_versions(), gpu=gpu)


@contextlib.contextmanager
def shared_markers(folders: Iterable[tuple]) -> Iterator[list]:
    """[(config key, marker file)] — an empty file the driver writes into each local (config key, folder),
    creating the folder if need be, and removes afterwards. A node that sees the marker sees the driver's folder."""
    markers = []
    try:
        for what, folder in folders:
            if folder and "://" not in str(folder):
                Path(folder).mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix=".richkd-shared-check-", dir=folder)
                os.close(fd)
                markers.append((what, name))
        yield markers
    finally:
        for _, name in markers:
            Path(name).unlink(missing_ok=True)


def _folder_need(what: str, path: str, max_listed: int) -> Need:
    folder = Path(path)
    names = tuple(sorted(p.name for p in folder.iterdir())[:max_listed]) if folder.is_dir() else ()
    return Need(what, str(path), "folder", names)


def check_needs(needs: SweepNeeds, gpus: float = 0.0) -> list[str]:
    """Problems of this machine with `needs`, one readable line each (empty when everything is in place).
    `gpus`: the GPUs Ray counts on this node; with GPU trials (needs.gpu) torch must be able to use them."""
    here = package_versions()
    problems = [gpu_problem(needs.gpu) if needs.gpu > 0 and gpus > 0 else None, *map(_check, needs.needs)]
    problems += [f"{name} {here.get(name) or 'is not installed'} here, but the driver runs {version}; install the "
                 "same versions on every node (pip install -c constraints.txt ...)"
                 for name, version in (needs.versions or {}).items() if here.get(name) != version]
    return [p for p in problems if p]


def gpu_problem(gpu: float) -> Optional[str]:
    """richkd.device.cuda_problem as a trial on this node would meet it. The check runs in a fresh Python: Ray
    hides the GPUs from a zero-GPU task like the node check (CUDA_VISIBLE_DEVICES=""), and CUDA, once
    initialised, cannot be asked again."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    code = (f"from richkd.device import cuda_problem; "
            f"print(cuda_problem('a trial here (tune.resources.gpu: {gpu:g})') or '')")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=GPU_PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the GPU check did not finish ({exc})"
    if out.returncode != 0:
        return f"the GPU check failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:300]}"
    return (out.stdout.strip().splitlines() or [""])[-1] or None


def _check(need: Need) -> Optional[str]:
    path = Path(need.path)
    if need.kind == "file":
        if not path.is_file():
            return f"{need.what}: file {need.path} does not exist on this node; {SHARE_FIX}"
    elif need.kind == "folder":
        if not path.is_dir():
            return f"{need.what}: folder {need.path} does not exist on this node; {SHARE_FIX}"
        missing = [n for n in need.expect if not (path / n).exists()]
        if missing:
            return (f"{need.what}: folder {need.path} on this node lacks {', '.join(missing[:3])}"
                    f"{' ...' if len(missing) > 3 else ''} (the driver sees them); {SHARE_FIX}")
    elif need.kind == "cache":
        manifest = path / "manifest.json"
        if not manifest.is_file():
            return (f"teaching.cache_dir: cache {path.name} was built by the driver in {path.parent}, but this node "
                    f"does not see it; teaching.cache_dir must be storage every node mounts at the same path "
                    f"(running `richkd cache` on each node is not needed)")
        try:
            key = json.loads(manifest.read_text()).get("key", "")
        except (OSError, ValueError):
            key = None
        if need.expect and key != need.expect[0]:
            return (f"teaching.cache_dir: cache {path} on this node is not the one the driver built (manifest key "
                    f"{key!r}, expected {need.expect[0]!r}); every node must mount the same cache folder")
    elif need.kind == "writable":
        try:   # in the path, else its nearest existing parent (the storage path is absolute: "/" at the latest)
            with tempfile.NamedTemporaryFile(dir=next(p for p in (path, *path.parents) if p.is_dir()),
                                             prefix=".richkd-write-check-"):
                pass
        except OSError as exc:
            return (f"{need.what}: {need.path} is not writable on this node ({exc.strerror or exc}); trials save "
                    "their checkpoints there: use a folder every node can write, or an s3://... URI")
        if not path.is_dir():
            return (f"{need.what}: {need.path} does not exist on this node (the driver created it); the storage "
                    "path must be shared by every node")
    elif need.kind == "shared":
        if not (path / need.expect[0]).exists():
            return (f"{need.what}: {need.path} on this node is not the driver's folder (a file the driver just wrote "
                    f"there is missing); {SHARE_FIX}")
    return None


def raise_if_unmet(needs: Optional[SweepNeeds], where: str = "this node") -> None:   # the trial-start check
    problems = check_needs(needs) if needs else []
    if problems:
        raise NodeCheckError(f"{where} cannot run this sweep's trials:\n  - " + "\n  - ".join(problems))
