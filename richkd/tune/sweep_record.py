"""The sweep folder's own record (`richkd_sweep.json`, beside Tune's experiment state): the resolved spec, the
MLflow ids, the caches built for it and the code version. Written once when a sweep starts; read by
`--resume`, export, finalize and report, which therefore all see exactly the spec the sweep ran with.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from richkd.tune.errors import SpecError
from richkd.tune.paths import DEFAULT_STORAGE, join_storage, read_text, remove_file, write_text
from richkd.tune.spec import SweepSpec

SWEEP_RECORD = "richkd_sweep.json"


@dataclass(frozen=True)
class SweepRecord:
    spec: SweepSpec
    created: float = field(default_factory=time.time)
    tracking_uri: Optional[str] = None          # None when the sweep runs without MLflow
    experiment_id: Optional[str] = None
    parent_run_id: Optional[str] = None
    caches: tuple = ()                          # ({"signature": ..., "entries": [folder names]}, ...)
    richkd_version: Optional[str] = None
    git_commit: Optional[str] = None
    path: str = ""                              # the experiment folder/URI it was read from (not saved)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def has_mlflow_run(self) -> bool:
        return bool(self.tracking_uri and self.parent_run_id)

    def with_tracking_uri(self, tracking_uri: Optional[str]) -> "SweepRecord":
        """The record read through another address of the same MLflow store (e.g. a server instead of SQLite)."""
        return replace(self, tracking_uri=tracking_uri) if tracking_uri else self

    def cache_entries(self, signature: str) -> list[str]:
        """The cache entries the sweep built for configs of this cache signature."""
        for built in self.caches:
            if built.get("signature") == signature:
                return list(built.get("entries") or [])
        return []

    def to_json(self) -> str:
        return json.dumps({"name": self.spec.name, "source": self.spec.source, "spec": self.spec.to_dict(),
                           "created": self.created, "tracking_uri": self.tracking_uri,
                           "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id,
                           "caches": list(self.caches), "richkd_version": self.richkd_version,
                           "git_commit": self.git_commit}, indent=1, default=str)


def write_sweep_record(record: SweepRecord) -> None:
    write_text(join_storage(record.spec.experiment_path, SWEEP_RECORD), record.to_json())


def remove_sweep_record(experiment_path: str) -> None:
    remove_file(join_storage(experiment_path, SWEEP_RECORD))


def sweep_record_exists(experiment_path: str) -> bool:
    return read_text(join_storage(experiment_path, SWEEP_RECORD)) is not None


def locate_sweep(sweep: str, storage: Optional[str] = None) -> str:
    """A sweep name (under `storage`, default tune_runs) or an experiment folder/URI -> the experiment path."""
    if "://" in sweep or (os.path.isdir(sweep) and sweep_record_exists(sweep)):
        return sweep if "://" in sweep else os.path.abspath(sweep)
    root = storage or DEFAULT_STORAGE
    if "://" not in root:
        root = os.path.abspath(os.path.expanduser(root))
    return join_storage(root, sweep)


def read_sweep_record(sweep: str, storage: Optional[str] = None, check: bool = False) -> SweepRecord:
    """The record of a sweep name or folder; `check` re-runs the spec's file and data checks on this machine."""
    path = locate_sweep(sweep, storage)
    text = read_text(join_storage(path, SWEEP_RECORD))
    if text is None:
        raise SpecError(f"no sweep named {sweep!r} at {path} (no {SWEEP_RECORD}); pass the sweep's name as shown by "
                        f"`richkd sweep`, its folder, or --storage for a non-default storage path")
    try:
        data = json.loads(text)
        spec_data = data["spec"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"{join_storage(path, SWEEP_RECORD)} is not a readable sweep record ({exc}); it is written "
                        "by `richkd sweep` when a sweep starts") from None
    spec = SweepSpec.from_dict(spec_data, source=data.get("source"), check=check)
    return SweepRecord(spec=spec, created=data.get("created") or 0.0, tracking_uri=data.get("tracking_uri"),
                       experiment_id=data.get("experiment_id"), parent_run_id=data.get("parent_run_id"),
                       caches=tuple(data.get("caches") or ()), richkd_version=data.get("richkd_version"),
                       git_commit=data.get("git_commit"), path=path)
