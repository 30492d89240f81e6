"""A flat cache entry computed in row blocks (by several processes or machines) and assembled into the same entry,
as docs/architecture.md#building-on-the-workers describes. Plain functions: richkd.tune.cache_tasks decides where
they run."""
from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from richkd.cache.build import EntryJob, entry_outputs, rows_dataset
from richkd.cache.entries import CacheError, json_plain, write_entry
from richkd.config import Config
from richkd.data import build_data
from richkd.device import resolve_device
from richkd.io import write_array_folder

BLOCK_PREFIX = "rows-"
SHARED_FIX = ("teaching.cache_dir must be storage every node mounts at the same path (e.g. NFS): cache row blocks "
              "written on one node are assembled on another")


def block_ranges(n_rows: int, batch_size: int, n_blocks: int) -> list[tuple[int, int]]:
    """At most n_blocks contiguous [start, stop) row ranges covering n_rows, split on batch boundaries as evenly
    as whole batches allow (never an empty block; fewer blocks than asked when there are fewer batches)."""
    n_batches = math.ceil(n_rows / batch_size)
    if n_batches <= 0:
        return []
    return [(int(b[0]) * batch_size, min((int(b[-1]) + 1) * batch_size, n_rows))
            for b in np.array_split(np.arange(n_batches), min(n_blocks, n_batches))]


def block_root(job: EntryJob, token: Optional[str] = None) -> Path:
    """A fresh temporary folder for job's row blocks, beside the entries (a dot name: not an entry)."""
    return Path(job.cache_dir) / f".{job.name}.blocks-{token or uuid.uuid4().hex[:12]}"


def compute_block(job: EntryJob, start: int, stop: int, root: str | Path, device=None) -> dict:
    """Compute rows [start, stop) of job's entry (all views) and write them as one folder under root.

    Returns what the assembly needs: the folder, the range and the manifest extras the computation produced.
    Writing is atomic and idempotent, so a retried block task is harmless.
    """
    cfg = Config.from_dict(job.config)
    data = build_data(cfg.data)
    dataset = rows_dataset(data, job.split, start, stop)
    if len(dataset) != stop - start:
        raise CacheError(f"cache {job.name}: this node's dataset has {start + len(dataset)} rows where the driver "
                         f"planned {job.n_rows}; every node must see the same data (data.root)")
    arrays, extra = entry_outputs(job, cfg, data, dataset, resolve_device(device or cfg.device))
    folder = write_array_folder(Path(root) / f"{BLOCK_PREFIX}{start:010d}-{stop:010d}", arrays,
                                {"entry": job.name, "start": start, "stop": stop, "extra": extra})
    return {"folder": str(folder), "start": start, "stop": stop, "extra": extra}


def assemble_entry(job: EntryJob, blocks: Iterable[dict], root: Optional[str | Path] = None) -> Path:
    """Concatenate job's row blocks (the dicts compute_block returned) into its entry, written atomically; then
    delete the block folders. A block this process cannot see (cache folder not shared) is one CacheError."""
    blocks = sorted(blocks, key=lambda b: b["start"])
    covered = [(b["start"], b["stop"]) for b in blocks]
    if not blocks or covered[0][0] != 0 or covered[-1][1] != job.n_rows or \
            any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise CacheError(f"cache {job.name}: row blocks {covered} do not cover rows [0, {job.n_rows}) (internal error)")
    parts = []
    for b in blocks:
        folder = Path(b["folder"])
        if not (folder / "manifest.json").is_file():
            where = f" (written on node {b['node_id']})" if b.get("node_id") else ""
            raise CacheError(f"cache {job.name}: row block {folder}{where} is not visible here; {SHARED_FIX}")
        names = json.loads((folder / "manifest.json").read_text())["arrays"]
        parts.append({name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names})
    extras = [b["extra"] for b in blocks]
    if any(json_plain(e) != json_plain(extras[0]) for e in extras):
        raise CacheError(f"cache {job.name}: row blocks disagree on {sorted(extras[0])} ({extras}); every node must "
                         "run the same richkd and CLIP versions")
    sizes, views = [b["stop"] - b["start"] for b in blocks], int(job.config["teaching"]["views"])
    arrays = {}
    for name in parts[0]:   # `rows` is per dataset row; the outputs hold row v * n + i for view v of row i
        pieces = [p[name] for p in parts]
        if name == "rows" or views == 1:
            arrays[name] = np.concatenate(pieces)
        else:
            whole = np.concatenate([p.reshape(views, n, *p.shape[1:]) for p, n in zip(pieces, sizes)], axis=1)
            arrays[name] = whole.reshape(views * sum(sizes), *whole.shape[2:])
    path = write_entry(job.entry, job.cache_dir, arrays, extra=extras[0] or None)
    remove_blocks(root if root is not None else Path(blocks[0]["folder"]).parent)
    return path


def remove_blocks(root: str | Path) -> None:
    """Delete a row blocks folder (after assembly, or after a failed build)."""
    root = Path(root)
    if root.name.startswith(".") and ".blocks-" in root.name:   # never anything but a row blocks folder
        shutil.rmtree(root, ignore_errors=True)
