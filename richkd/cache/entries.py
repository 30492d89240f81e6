"""Cache entries on disk: a folder per entry named by a hash of its inputs, a manifest, atomic writes, mmap reads.

An entry's folder name is a hash of everything that determines its content, and its manifest repeats those
fields: reading compares them, so a mismatch is an error, never a silent reuse. Arrays are written into a temp
folder that is renamed into place (readers never see half an entry) and read memory-mapped, so trial processes
share the pages (docs/architecture.md#caching).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from richkd.io import OutputError, ensure_writable, output_error, write_array_folder

CACHE_FORMAT_VERSION = 1


class CacheError(ValueError):
    """A cache is missing, stale, mismatched or damaged; the message names the folder and the fix."""


@dataclass(frozen=True)
class CacheEntry:
    kind: str
    fields: dict

    @property
    def key(self) -> str:
        blob = json.dumps({"kind": self.kind, **self.fields}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def path(self, cache_dir: str | os.PathLike) -> Path:
        return Path(cache_dir) / f"{self.kind}-{self.key}"


# ----- reading and writing entries ----------------------------------------------------------------

def write_entry(entry: CacheEntry, cache_dir: str | os.PathLike, arrays: dict[str, np.ndarray],
                extra: Optional[dict] = None) -> Path:
    """Write arrays + manifest into a temp folder, then rename it into place (atomic for readers)."""
    final = entry.path(cache_dir)
    manifest = {"format_version": CACHE_FORMAT_VERSION, "kind": entry.kind, "key": entry.key, "fields": entry.fields,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    try:
        return write_array_folder(final, arrays, manifest)
    except OSError as exc:
        raise _write_error(exc, final) from None


def _write_error(exc: OSError, final: Path) -> Exception:
    """A full disk or read-only cache folder as a CacheError naming the folder and the fix (else unchanged)."""
    converted = output_error(exc, final.parent, "teaching.cache_dir")
    if converted is exc:
        return exc
    return CacheError(f"{converted}; or set teaching.cache_dir to a writable folder with room for the cache")


def ensure_cache_writable(cache_dir: str | os.PathLike) -> None:
    """Fail before running a teacher over the dataset if its outputs could not be stored."""
    try:
        ensure_writable(cache_dir, "teaching.cache_dir")
    except OutputError as exc:
        raise CacheError(f"{exc}; or set teaching.cache_dir to a writable folder") from None


def read_entry(entry: CacheEntry, cache_dir: str | os.PathLike,
               expect_rows: Optional[dict[str, int]] = None) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of an entry after checking its manifest; several processes share the pages."""
    folder = entry.path(cache_dir)
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise CacheError(f"{entry.kind} cache {folder} is missing; build it with "
                         f"`richkd cache --config YOUR_CONFIG.yaml` (a sweep builds it before trials start)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError:
        raise CacheError(f"{manifest_file} is not valid JSON; delete {folder} and rebuild the cache") from None
    stored = json.loads(json.dumps(manifest.get("fields"), default=str))
    wanted = json.loads(json.dumps(entry.fields, default=str))
    if manifest.get("format_version") != CACHE_FORMAT_VERSION or stored != wanted:
        diff = sorted(k for k in set(stored or {}) | set(wanted) if (stored or {}).get(k) != wanted.get(k))
        raise CacheError(f"cache {folder} was built for different inputs (differs in: {', '.join(diff) or 'format'});"
                         f" delete the folder and rebuild with `richkd cache`")
    arrays = {}
    for name, meta in manifest["arrays"].items():
        try:
            arr = np.load(folder / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:   # EOFError: an empty (0-byte) file
            raise CacheError(f"cache file {folder / (name + '.npy')} is unreadable or truncated ({exc}); "
                             f"delete {folder} and rebuild with `richkd cache`") from None
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            raise CacheError(f"cache file {folder / (name + '.npy')} has shape {list(arr.shape)} {arr.dtype}, "
                             f"manifest says {meta['shape']} {meta['dtype']}; delete {folder} and rebuild")
        if expect_rows and name in expect_rows and arr.shape[0] != expect_rows[name]:
            raise CacheError(f"cache {folder} has {arr.shape[0]} rows but the dataset has {expect_rows[name]}; "
                             f"it was built for other data: delete it and rebuild")
        arrays[name] = arr
    return arrays


def entry_exists(entry: CacheEntry, cache_dir: str | os.PathLike) -> bool:
    return (entry.path(cache_dir) / "manifest.json").is_file()


def describe(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per cache entry (kind, key, size in MB, creation time) for `richkd cache --list`."""
    rows = []
    for folder in sorted(Path(cache_dir).glob("*-*")):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        meta = json.loads(manifest.read_text())
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())   # sharded entries: shard folders
        rows.append({"kind": meta["kind"], "key": meta["key"], "mb": round(size / 2**20, 2),
                     "created": meta.get("created"), "path": str(folder)})
    return rows
