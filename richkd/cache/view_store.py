"""Sharded cache entries: fixed-size shards appended one at a time, a build that resumes, memory-mapped reads.

Why (docs/architecture.md#imagenet-scale): an ImageNet cache of V views is tens to hundreds of GB. Writing it
with one np.save needs it all in memory first, and a build killed after hours would lose everything. A sharded
entry is the same content-addressed folder as any other (docs/architecture.md#caching), filled in steps:

    <kind>-<key>/layout.json    what is being built: fields, rows, views, shard size, array shapes; written first
    <kind>-<key>/rows.npy       the cached dataset rows (sorted)
    <kind>-<key>/shard-00000/   NAME.npy of shape (rows in shard, V, ...) + manifest.json, written to a temp
                                folder and renamed, so a shard is either complete or absent
    <kind>-<key>/manifest.json  written last: the entry is complete (readers and node checks look for it)

A killed build leaves complete shards and maybe a temp folder; the next build checks layout.json, removes the
temp folders and writes only the missing shards. Readers open each shard with np.load(mmap_mode="r") when a
batch first touches it and copy only the batch's rows: memory stays flat however large the cache is.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from richkd.cache.entries import CACHE_FORMAT_VERSION, CacheEntry, CacheError, _write_error
from richkd.io import atomic_write_text, write_array_folder

SHARD_FORMAT = "sharded-v1"
SHARD_ROWS_ENV = "RICHKD_SHARD_ROWS"
DEFAULT_SHARD_ROWS = 4096      # ImageNet, V = 10: ~100 MB of fp16 logits per shard; 313 shards for 1.28M images


def default_shard_rows() -> int:
    """Rows per shard: $RICHKD_SHARD_ROWS, else DEFAULT_SHARD_ROWS (the layout, never the content)."""
    raw = os.environ.get(SHARD_ROWS_ENV, "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_SHARD_ROWS
    except ValueError:
        raise CacheError(f"${SHARD_ROWS_ENV}={raw!r} is not a positive integer") from None


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _plain(obj) -> object:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# ----- writing ----------------------------------------------------------------------------------------------

def begin_entry(entry: CacheEntry, cache_dir: str | os.PathLike, rows: np.ndarray, views: int,
                arrays: dict[str, tuple[tuple[int, ...], str]], shard_rows: int) -> Path:
    """Start (or continue) building an entry; arrays maps name -> (per-view shape, dtype). Returns the folder."""
    folder = entry.path(cache_dir)
    layout = _plain({"format": SHARD_FORMAT, "kind": entry.kind, "key": entry.key, "fields": entry.fields,
                     "n_rows": int(len(rows)), "views": int(views), "shard_rows": int(shard_rows),
                     "arrays": {n: {"tail": list(t), "dtype": d} for n, (t, d) in sorted(arrays.items())}})
    try:
        if (folder / "layout.json").is_file():
            try:
                existing = json.loads((folder / "layout.json").read_text())
                same_rows = np.array_equal(np.load(folder / "rows.npy"), rows)
            except (OSError, ValueError):
                existing, same_rows = None, False
            if existing != layout or not same_rows:
                raise CacheError(f"{folder} holds a partial build for other inputs or another shard size "
                                 f"(${SHARD_ROWS_ENV}); delete the folder and run `richkd cache` again")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / ".rows.tmp.npy"
            np.save(tmp, np.ascontiguousarray(rows, dtype=np.int64), allow_pickle=False)
            os.replace(tmp, folder / "rows.npy")
            atomic_write_text(folder / "layout.json", json.dumps(layout, indent=1, sort_keys=True))
        for stale in folder.glob(f".{_shard_name(0)[:6]}*"):   # temp folders of shards a killed build was writing
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as exc:
        raise _write_error(exc, folder) from None
    return folder


def missing_shards(folder: Path, n_shards: int) -> list[int]:
    return [i for i in range(n_shards) if not (folder / _shard_name(i) / "manifest.json").is_file()]


def write_shard(folder: Path, index: int, arrays: dict[str, np.ndarray]) -> Path:
    try:
        return write_array_folder(folder / _shard_name(index), arrays, {"shard": index, "format": SHARD_FORMAT})
    except OSError as exc:
        raise _write_error(exc, folder) from None


def finish_entry(entry: CacheEntry, cache_dir: str | os.PathLike, extra: Optional[dict] = None) -> Path:
    """Write the entry's manifest once every shard is there; the boxes' sha256 lets readers compare entries."""
    folder = entry.path(cache_dir)
    layout = json.loads((folder / "layout.json").read_text())
    n, sr, views = layout["n_rows"], layout["shard_rows"], layout["views"]
    n_shards = -(-n // sr)
    if missing_shards(folder, n_shards):
        raise CacheError(f"{folder}: shards {missing_shards(folder, n_shards)[:5]} are missing; run `richkd cache`")
    shards, boxes = [], hashlib.sha256()
    for i in range(n_shards):
        shards.append({"rows": min(sr, n - i * sr)})
        if "boxes" in layout["arrays"]:   # shards concatenate to the (n, V, 7) array: the hash ignores the shard size
            boxes.update(np.ascontiguousarray(np.load(folder / _shard_name(i) / "boxes.npy")).tobytes())
    if "boxes" in layout["arrays"]:
        extra = {**(extra or {}), "boxes_sha256": boxes.hexdigest()}
    arrays = {name: {"shape": [n * views, *spec["tail"]], "dtype": spec["dtype"]}
              for name, spec in layout["arrays"].items()}
    manifest = {"format_version": CACHE_FORMAT_VERSION, "kind": entry.kind, "key": entry.key, "fields": entry.fields,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "sharded": SHARD_FORMAT, "n_rows": n, "views": views,
                "shard_rows": sr, "arrays": arrays, "shards": shards, **(extra or {})}
    try:
        atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True, default=str))
    except OSError as exc:
        raise _write_error(exc, folder) from None
    return folder


# ----- reading ----------------------------------------------------------------------------------------------

def _advise_random(arr: np.ndarray) -> None:
    """Tell the kernel that rows are read in random order: without it every page fault reads ahead ~32 pages,
    so a trial's scattered batch rows would pull (and map) far more of a large cache than it reads."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            mm.madvise(mmap.MADV_RANDOM)
        except OSError:   # pragma: no cover - an unusual filesystem; reads still work, with read-ahead
            pass


class ShardedArray:
    """A (n_rows * V, ...) array-like over shards: flat row v * n_rows + j is view v of cached row j (the layout
    richkd.teachers.CachedTeachers indexes). Shards are memory-mapped on first use; `arr[flat]` copies rows."""

    def __init__(self, folder: Path, name: str, n_rows: int, views: int, shard_rows: int, tail: tuple, dtype: str):
        self.folder, self.name = folder, name
        self.n_rows, self.views, self.shard_rows = n_rows, views, shard_rows
        self.tail, self.dtype = tuple(tail), np.dtype(dtype)
        self.shape = (n_rows * views, *self.tail)
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        """Pickled (e.g. into spawned DataLoader workers) without its maps: each process maps the shards itself."""
        return {**self.__dict__, "_maps": {}}

    def shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            path = self.folder / _shard_name(i) / f"{self.name}.npy"
            expected = (min(self.shard_rows, self.n_rows - i * self.shard_rows), self.views, *self.tail)
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as exc:
                raise CacheError(f"cache file {path} is unreadable or truncated ({exc}); delete {self.folder} and "
                                 "rebuild with `richkd cache`") from None
            if arr.shape != expected or arr.dtype != self.dtype:
                raise CacheError(f"cache file {path} has shape {arr.shape} {arr.dtype}, expected {expected} "
                                 f"{self.dtype}; delete {self.folder} and rebuild with `richkd cache`")
            _advise_random(arr)
            self._maps[i] = arr
        return self._maps[i]

    def __getitem__(self, flat) -> np.ndarray:
        flat = np.asarray(flat, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"{self.name}: rows out of range for a cache of {self.shape[0]} rows")
        view, row = np.divmod(flat, self.n_rows)
        shard, local = np.divmod(row, self.shard_rows)
        out = np.empty((flat.size, *self.tail), dtype=self.dtype)
        for i in np.unique(shard):
            sel = shard == i
            out[sel] = self.shard(int(i))[local[sel], view[sel]]
        return out


class ShardedEntry:
    """A complete sharded entry: its manifest, cached rows and one ShardedArray per stored array."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder, self.manifest = folder, manifest
        self.rows = np.load(folder / "rows.npy", mmap_mode="r")
        n, views, sr = manifest["n_rows"], manifest["views"], manifest["shard_rows"]
        self.arrays = {name: ShardedArray(folder, name, n, views, sr, tuple(meta["shape"][1:]), meta["dtype"])
                       for name, meta in manifest["arrays"].items()}

    def __getitem__(self, name: str) -> ShardedArray:
        return self.arrays[name]


def _near_miss(entry: CacheEntry, cache_dir: Path) -> str:
    """A hint naming an entry of the same kind and data built for other settings (e.g. another image size)."""
    best = None
    for manifest in cache_dir.glob(f"{entry.kind}-*/manifest.json"):
        try:
            fields = json.loads(manifest.read_text()).get("fields") or {}
        except (OSError, ValueError):
            continue
        if fields.get("dataset") != entry.fields.get("dataset"):
            continue
        diff = sorted(k for k in set(fields) | set(entry.fields)
                      if _plain(fields.get(k)) != _plain(entry.fields.get(k)))
        if best is None or len(diff) < len(best[1]):
            best = (manifest.parent, diff, fields)
    if best is None or len(best[1]) > 4:
        return ""
    folder, diff, fields = best
    detail = ", ".join(f"{k} {fields.get(k)!r} there vs {entry.fields.get(k)!r} here" for k in diff)
    return f" ({folder.name} holds this data built for other settings: {detail})"


def open_entry(entry: CacheEntry, cache_dir: str | os.PathLike, n_rows: Optional[int] = None,
               views: Optional[int] = None) -> ShardedEntry:
    """The complete entry, checked against its manifest; CacheError naming the folder and the fix otherwise."""
    cache_dir = Path(cache_dir)
    folder = entry.path(cache_dir)
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        started = (folder / "layout.json").is_file()
        partial = " (a build was started and stopped; run it again to continue)" if started else ""
        raise CacheError(f"{entry.kind} cache {folder} is missing{partial}{_near_miss(entry, cache_dir)}; build it "
                         "with `richkd cache --config YOUR_CONFIG.yaml` (a sweep builds it before trials start)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError:
        raise CacheError(f"{manifest_file} is not valid JSON; delete {folder} and rebuild the cache") from None
    stored, wanted = _plain(manifest.get("fields")) or {}, _plain(entry.fields)
    if manifest.get("format_version") != CACHE_FORMAT_VERSION or manifest.get("sharded") != SHARD_FORMAT \
            or stored != wanted:
        diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise CacheError(f"cache {folder} was built for different inputs (differs in: {', '.join(diff) or 'format'}); "
                         "delete the folder and rebuild with `richkd cache`")
    if (n_rows is not None and manifest["n_rows"] != n_rows) or (views is not None and manifest["views"] != views):
        raise CacheError(f"cache {folder} holds {manifest['n_rows']} rows x {manifest['views']} views but this run "
                         f"reads {n_rows} x {views}; it was built for other data: delete it and rebuild")
    return ShardedEntry(folder, manifest)
