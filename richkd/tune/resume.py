"""Resume an interrupted sweep, repairing first the Ray state files a killed driver left cut short.

`--resume` keeps finished trials, resumes unfinished ones from their checkpoints and continues the searcher and
scheduler from their saved state (Tuner.restore). The repair: Ray writes its driver state (experiment_state,
searcher, search generator and callback states) atomically in a staging folder but copies it into
`storage_path` file by file; a driver killed during that copy leaves a truncated file there (seen: a 0-byte
`callback-states-*.pkl`). `Tuner.restore` then fails half-way (EOFError, followed by an AssertionError from the
half-restored searcher). Ray reads only the newest file of each kind, so an unreadable newest file is renamed
to `*.unreadable` (kept for inspection, nothing deleted) and Ray falls back to the previous session's file, or
to no state for that part: the MLflow callback finds its trials' runs by tag, the searcher and generator
restart their bookkeeping. Only a missing experiment state is fatal.
"""
from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path
from typing import Optional

from richkd.tune.errors import SpecError
from richkd.tune.runner import (SweepOutcome, build_trainable, check_nodes, check_nodes_share, check_outputs,
                                 check_tracking, fit_and_summarise, prepare_sweep_caches, ray_for)
from richkd.tune.sweep_record import read_sweep_record

log = logging.getLogger(__name__)

# Ray 2.60's file name patterns (TuneController, CallbackList, Searcher, SearchGenerator, BasicVariantGenerator).
EXPERIMENT_STATE = "experiment_state-*.json"
OPTIONAL_STATES = ("callback-states-*.pkl", "searcher-state-*.pkl", "search_gen_state-*.json",
                   "basic-variant-state-*.json")
SET_ASIDE_SUFFIX = ".unreadable"


def readable(path: Path) -> bool:
    """True when the whole file parses as JSON or as a pickle (Ray pickles some `.json` files, e.g.
    search_gen_state; the pickles hold only Ray's and our own classes, and Ray itself loads them next)."""
    data = path.read_bytes()
    try:
        json.loads(data)
        return True
    except ValueError:
        pass
    try:
        pickle.loads(data)  # noqa: S301 - Ray's own state file in the user's sweep folder, as Ray loads it
        return True
    except Exception:
        return False


def set_aside_unreadable(experiment_dir: str | Path) -> list[Path]:
    """Rename each kind's unreadable newest files until a readable one is newest. Returns the renamed files.

    Raises SpecError when no readable experiment state is left (the sweep cannot be resumed).
    """
    folder = Path(experiment_dir)
    moved: list[Path] = []
    for pattern in (EXPERIMENT_STATE, *OPTIONAL_STATES):
        for path in sorted(folder.glob(pattern), reverse=True):   # Ray picks max(name): newest session first
            if readable(path):
                break
            target = path.with_name(path.name + SET_ASIDE_SUFFIX)
            path.replace(target)
            moved.append(target)
            log.warning("%s is unreadable (cut short when a driver was killed while Ray copied it); set aside as "
                        "%s, resuming from the previous state of that part", path.name, target.name)
    if not any(folder.glob(EXPERIMENT_STATE)):
        raise SpecError(f"sweep folder {folder} has no readable Tune experiment state (the driver was killed "
                        "while writing its first snapshot); delete the folder and start the sweep again")
    return moved


def resume_sweep(sweep: str, *, storage: Optional[str] = None, address: Optional[str] = None,
                 num_cpus: Optional[int] = None, verbose: int = 1, progress: bool = False) -> SweepOutcome:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones resume from their checkpoints,
    the searcher and scheduler continue from their saved state, and the total reaches num_samples."""
    from ray import tune

    started_at = time.perf_counter()
    record = read_sweep_record(sweep, storage, check=True)
    spec, path = record.spec, record.path
    if not tune.Tuner.can_restore(path):
        raise SpecError(f"sweep {spec.name!r} at {path} has no Tune experiment state (it was stopped before its first "
                        "snapshot); delete the folder and start it again")
    check_outputs(spec)
    check_tracking(spec)
    if not spec.tune.storage_is_uri:
        set_aside_unreadable(path)
    with ray_for(spec, address, num_cpus, verbose):
        check_nodes_share(spec)
        needs = check_nodes(spec, prepare_sweep_caches(spec, progress=progress))
        tuner = tune.Tuner.restore(path, trainable=build_trainable(spec, needs), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        return fit_and_summarise(tuner, record, verbose, started_at)
