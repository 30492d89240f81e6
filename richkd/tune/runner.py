"""Run a spec's trials on Ray Tune: a sweep (`run_sweep`, continued by `resume_sweep`) or the rows of a learning-curve
table (`build_table`, docs/search.md). Either way: checks before Ray starts, every node checked, caches built as Ray
tasks before any trial, then the sweep's own trainable through a Tuner (docs/architecture.md, "Data flow")."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search import BasicVariantGenerator
from ray.tune.trainable.metadata import _TrainingRunMetadata

from richkd.cache.signature import cache_signature
from richkd.io import atomic_write_text, ensure_writable
from richkd.provenance import code_version
from richkd.tracking import check_server, client_for
from richkd.tune.cache_tasks import build_caches
from richkd.tune.cluster import alive_nodes, check_trial_resources, preflight_nodes, say, storage_problem
from richkd.tune.errors import SpecError
from richkd.tune.mlflow_callback import sweep_callback
from richkd.tune.node_check import SweepNeeds, shared_markers, sweep_needs
from richkd.tune.outcome import SweepOutcome, sweep_outcome
from richkd.tune.params import Param, TrialPlan
from richkd.tune.paths import join_storage, remove_file, sweep_ref
from richkd.tune.results import SWEEP_RECORD, SweepRecord, read_sweep_record, sweep_record_exists, write_sweep_record
from richkd.tune.search import build_scheduler, build_search_alg, tune_param_space
from richkd.tune.session import ray_session
from richkd.tune.spec import SweepSpec
from richkd.tune.table import (SEED_KEY, Table, TableError, append_row, check_same_space, plan_rows, read_table,
                               row_from_history, table_header)
from richkd.tune.trainable import train_trial
from richkd.tune.warm_start import load_warm_start

log = logging.getLogger(__name__)

# Ray 2.60's state file names (TuneController, CallbackList, Searcher, SearchGenerator, BasicVariantGenerator).
EXPERIMENT_STATE = "experiment_state-*.json"
OPTIONAL_STATES = ("callback-states-*.pkl", "searcher-state-*.pkl", "search_gen_state-*.json",
                   "basic-variant-state-*.json")


# ----- before Ray, and once it runs ------------------------------------------------------------------------

def check_outputs(spec: SweepSpec) -> None:
    """Tune storage and a SQLite MLflow store's folder writable, an MLflow server answering: else one clear error
    before Ray starts, not a failure deep inside Tune after the caches were built."""
    if not spec.tune.storage_is_uri:
        ensure_writable(spec.tune.storage_path, "tune.storage_path")
    uri = spec.mlflow.tracking_uri if spec.mlflow.enabled else ""
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        ensure_writable(os.path.dirname(uri[len("sqlite:///"):]), "the folder of mlflow.tracking_uri")
    check_server(uri, "mlflow.tracking_uri", error=SpecError, fix="set mlflow.enabled: false")   # http(s) only


def check_cluster(spec: SweepSpec, embedded: bool) -> None:
    """What the connected Ray must offer: shared storage when it has several nodes, and (an embedded Ray, whose size
    is known) the trials' resources; otherwise Tune would fail later or wait forever."""
    if problem := storage_problem(spec.tune, len(alive_nodes())):
        raise SpecError(problem)
    if embedded:
        check_trial_resources(spec.tune)


@contextlib.contextmanager
def ray_for(spec: SweepSpec, address: Optional[str], num_cpus: Optional[int], verbose: int) -> Iterator[None]:
    resume = f"continue with `richkd sweep --resume {sweep_ref(spec.name, spec.experiment_path)}` once a cluster is up"
    with ray_session(address, num_cpus, verbose=verbose >= 2, next_step=resume):
        check_cluster(spec, embedded=address is None)
        yield


def prepare_nodes(spec: SweepSpec, progress: bool = False, splits: tuple = ("train",)) -> tuple[list, SweepNeeds]:
    """Every node checked (data, weights, the driver's folders, versions, GPUs), every cache a trial can read built
    as Ray tasks, every node checked to see them. Returns the caches (for the record) and the needs trials check."""
    configs, storage = spec.cache_probe_configs, spec.tune.storage_path
    folders = [("teaching.cache_dir", d) for d in sorted({c.teaching.cache_dir for c in configs
                                                          if c.teaching.cache_dir})]
    with shared_markers(folders + [("tune.storage_path", storage)]) as markers:
        preflight_nodes(sweep_needs(configs, [], storage, shared=markers, gpu=spec.tune.gpu))
    built = build_caches(configs, cpu=spec.tune.cpu, gpu=spec.tune.gpu, progress=progress, nodes=alive_nodes(),
                         splits=splits)
    caches = [{"signature": cache_signature(cfg), "dir": cfg.teaching.cache_dir,
               "entries": [Path(e).name for e in entries]} for cfg, entries in zip(configs, built.paths)]
    needs = sweep_needs(configs, [Path(c["dir"]) / e for c in caches for e in c["entries"]], storage)
    preflight_nodes(needs)
    return caches, needs


# ----- the Tuner -------------------------------------------------------------------------------------------

def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_trainable(spec: SweepSpec, needs: Optional[SweepNeeds] = None, plan: Optional[TrialPlan] = None):
    return tune.with_resources(tune.with_parameters(train_trial, plan=plan or spec.plan(), needs=needs),
                               {"cpu": spec.tune.cpu, "gpu": spec.tune.gpu})


def build_tuner(spec: SweepSpec, callbacks: list, verbose: int = 1, needs: Optional[SweepNeeds] = None, warm=None):
    t = spec.tune
    return _tuner(spec, build_trainable(spec, needs), {} if t.search.algorithm == "optuna" else tune_param_space(spec),
                  spec.name, [*callbacks, CSVLoggerCallback(), JsonLoggerCallback()],   # not TensorBoard's (init_ray)
                  verbose, t.checkpoint_num_to_keep, search_alg=build_search_alg(spec, warm),
                  scheduler=build_scheduler(spec), num_samples=t.num_samples, time_budget_s=t.time_budget_s,
                  trial_name_creator=trial_name, trial_dirname_creator=trial_name)


def _tuner(spec: SweepSpec, trainable, param_space: dict, name: str, callbacks: list, verbose: int, keep: int,
           **tune_config):
    t = spec.tune
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune.TuneConfig(
        metric=t.metric, mode=t.mode, reuse_actors=t.resolved_reuse_actors, **tune_config), run_config=tune.RunConfig(
        name=name, storage_path=t.storage_path, verbose=verbose, callbacks=callbacks,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
        failure_config=tune.FailureConfig(max_failures=t.max_failures)))


def fit_quietly(tuner, verbose: int):
    """Tuner.fit(); with verbose 0 (`-q`) also without the lines Tune prints at every verbosity (not errors)."""
    with contextlib.redirect_stdout(io.StringIO()) if verbose <= 0 else contextlib.nullcontext():
        return tuner.fit()


# ----- sweeps --------------------------------------------------------------------------------------------

def run_sweep(spec: SweepSpec, *, address: Optional[str] = None, num_cpus: Optional[int] = None,
              verbose: int = 1, progress: bool = False) -> SweepOutcome:
    """Run a validated sweep to completion (or until interrupted; then `resume_sweep` continues it)."""
    started_at = time.perf_counter()
    path = spec.experiment_path
    if sweep_record_exists(path) or tune.Tuner.can_restore(path):
        raise SpecError(f"a sweep named {spec.name!r} already exists at {path}; continue it with "
                        f"`richkd sweep --resume {spec.name}`, or pick a new name with --name")
    warm = load_warm_start(spec)
    if warm is not None:
        print(warm.describe(), flush=True)
    check_outputs(spec)
    with ray_for(spec, address, num_cpus, verbose):
        caches, needs = prepare_nodes(spec, progress)
        callback = sweep_callback(spec) if spec.mlflow.enabled else None
        record = SweepRecord(spec=spec, tracking_uri=callback and spec.mlflow.tracking_uri,
                             experiment_id=callback and callback.experiment_id,
                             parent_run_id=callback and callback.parent_run_id, caches=tuple(caches), **code_version(),
                             path=path)
        write_sweep_record(record)
        try:
            tuner = build_tuner(spec, [callback] if callback else [], verbose=verbose, needs=needs, warm=warm)
            return fit_and_summarise(tuner, record, verbose, started_at)
        except KeyboardInterrupt:
            if not tune.Tuner.can_restore(path):   # stopped before Tune's first snapshot: nothing to resume, and
                remove_file(join_storage(path, SWEEP_RECORD))   # the same command may start it again
            raise


def resume_sweep(sweep: str, *, storage: Optional[str] = None, address: Optional[str] = None,
                 num_cpus: Optional[int] = None, verbose: int = 1, progress: bool = False) -> SweepOutcome:
    """Continue an interrupted sweep (docs/architecture.md, "Sweep storage"); state files a killed driver left cut
    short are set aside first."""
    started_at = time.perf_counter()
    record = read_sweep_record(sweep, storage, check=True)
    spec, path = record.spec, record.path
    if not tune.Tuner.can_restore(path):
        raise SpecError(f"sweep {spec.name!r} at {path} has no Tune experiment state (it was stopped before its first "
                        "snapshot); delete the folder and start it again")
    check_outputs(spec)
    if not spec.tune.storage_is_uri:
        set_aside_unreadable(path)
        drop_missing_checkpoints(path)
    with ray_for(spec, address, num_cpus, verbose):
        _, needs = prepare_nodes(spec, progress)
        tuner = tune.Tuner.restore(path, trainable=build_trainable(spec, needs), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        return fit_and_summarise(tuner, record, verbose, started_at)


def fit_and_summarise(tuner, record: SweepRecord, verbose: int, started_at: float) -> SweepOutcome:
    """Run the Tuner and summarise what happened. The callback closes the MLflow parent run; if Tune raised first,
    it is marked KILLED here (`--resume` reopens it; a SIGKILLed driver's resume does this)."""
    try:
        fit_quietly(tuner, verbose)
    finally:
        try:
            client = client_for(record.tracking_uri) if record.has_mlflow_run else None
            if client and client.get_run(record.parent_run_id).info.status == "RUNNING":
                client.set_terminated(record.parent_run_id, status="KILLED")
        except Exception as exc:  # never mask the original error
            log.warning("could not close the MLflow parent run %s: %s", record.parent_run_id, exc)
    outcome = sweep_outcome(record, time.perf_counter() - started_at)
    if len(alive_nodes()) < 2:   # one machine (an embedded Ray, each resume a new node id): no split per node
        outcome.by_node = {}
    return outcome


def readable(path: Path) -> bool:
    """True when the whole file parses as JSON or as a pickle (Ray pickles some `.json` files, e.g.
    search_gen_state; the pickles hold only Ray's and our own classes, and Ray itself loads them next)."""
    data = path.read_bytes()
    for load in (json.loads, pickle.loads):
        with contextlib.suppress(Exception):
            load(data)  # noqa: S301 - Ray's own state file in the user's sweep folder, as Ray loads it
            return True
    return False


def set_aside_unreadable(experiment_dir: str | Path) -> list[Path]:
    """A driver killed while Ray copies its state file by file leaves a cut-short file (seen: a 0-byte
    callback-states-*.pkl) and Tuner.restore fails half-way. Ray reads the newest file of each kind, so unreadable
    newest files are renamed `*.unreadable` and Ray falls back to the previous one, or to no state for that part.
    Returns the renamed files; a SpecError when no experiment state is readable."""
    folder = Path(experiment_dir)
    moved: list[Path] = []
    for pattern in (EXPERIMENT_STATE, *OPTIONAL_STATES):
        for path in sorted(folder.glob(pattern), reverse=True):   # Ray picks max(name): newest session first
            if readable(path):
                break
            target = path.with_name(path.name + ".unreadable")
            path.replace(target)
            moved.append(target)
            log.warning("%s is unreadable (cut short when a driver was killed while Ray copied it); set aside as "
                        "%s, resuming from the previous state of that part", path.name, target.name)
    if not any(folder.glob(EXPERIMENT_STATE)):
        raise SpecError(f"sweep folder {folder} has no readable Tune experiment state (the driver was killed "
                        "while writing its first snapshot); delete the folder and start the sweep again")
    return moved


def drop_missing_checkpoints(experiment_dir: str | Path) -> list[str]:
    """A driver killed after Ray deleted a trial's older checkpoint (CheckpointConfig.num_to_keep) and before the
    snapshot naming the newer one reached storage leaves a snapshot whose checkpoint is gone: Tune would fail that
    trial on every retry ("Could not recover from checkpoint as it does not exist"). Such a trial is pointed at its
    newest checkpoint still on disk, or at none: it starts again from its first epoch (MLflow keeps each epoch once).
    Edits the newest experiment state through Ray's own (private) run-metadata class; returns the trial ids."""
    folder = Path(experiment_dir)
    state_file = max(folder.glob(EXPERIMENT_STATE))
    state = json.loads(state_file.read_text())
    on_disk = lambda result: (folder / Path(result.checkpoint.path).parent.name /   # noqa: E731
                              Path(result.checkpoint.path).name).is_dir()
    repaired = []
    for pair in state["trial_data"]:
        meta = _TrainingRunMetadata.from_json_state(pair[1])
        manager = meta.checkpoint_manager
        if manager is None or manager.latest_checkpoint_result is None or on_disk(manager.latest_checkpoint_result):
            continue
        manager._checkpoint_results = [r for r in manager._checkpoint_results if on_disk(r)]
        manager._latest_checkpoint_result = max(manager._checkpoint_results, default=None,
                                                key=lambda r: r.metrics.get("training_iteration", 0))
        meta.invalidate_cache()
        pair[1] = meta.get_json_state()
        repaired.append(json.loads(pair[0])["trial_id"])
        log.warning("trial_%s: its last checkpoint is gone (the driver was killed while Ray replaced it); it goes on "
                    "from %s", repaired[-1], "an older checkpoint" if manager._checkpoint_results else "epoch 1")
    if repaired:
        atomic_write_text(state_file, json.dumps(state))
    return repaired


# ----- learning-curve tables ------------------------------------------------------------------------------

def build_table(spec: SweepSpec, out: str | os.PathLike, *, configs: int, seeds: int = 1,
                seeds_for: Optional[int] = None, address: Optional[str] = None, num_cpus: Optional[int] = None,
                verbose: int = 1, progress: bool = True) -> Table:
    """Train every planned row not yet in `out` (richkd.tune.table.plan_rows) through Ray Tune: the sweep's
    trainable with the seed as one more entry and the test split evaluated at the end, FIFO, no early stopping;
    each finished row is appended to `out` at once, so a killed build continues where it stopped."""
    out = Path(out).resolve()
    jobs = plan_rows(spec, configs, seeds, seeds_for)
    existing = read_table(out, repair=True) if out.exists() else None
    if existing is not None:
        check_same_space(existing, spec, "table build")
    done = {(r.config_id, r.seed) for r in existing.rows} if existing else set()
    pending = [j for j in jobs if (j.config_id, j.seed) not in done]
    if not pending:
        say(f"table {out}: all {len(jobs)} planned rows are there; nothing to train", progress)
        return existing
    ensure_writable(out.parent, "the table's folder")
    check_outputs(spec)
    started = time.time()
    # the sweep's plan with the seed as one more entry and the test split evaluated after the last epoch
    seed = Param(SEED_KEY, "choice", values=tuple(sorted({j.seed for j in jobs})))
    plan = replace(spec.plan(), params=spec.params + (seed,), final=True)
    say(f"table {out}: {len(pending)} of {len(jobs)} rows to train ({len(done)} already there), "
        f"{spec.max_t} epochs each, {spec.tune.max_concurrent} at a time", progress)
    with ray_for(spec, address, num_cpus, verbose):
        caches, needs = prepare_nodes(spec, progress, splits=("train", "test"))
        if existing is None:
            atomic_write_text(out, json.dumps(table_header(
                spec, source=spec.source, caches=[c["entries"] for c in caches])) + "\n")
        space = {p.key: tune.choice(list(p.values)) if p.is_finite else p.tune_domain() for p in plan.params}
        points = [{**j.sampled, SEED_KEY: j.seed} for j in pending]
        name = f"table-{out.stem}-{time.strftime('%Y%m%d_%H%M%S')}"
        tuner = _tuner(spec, build_trainable(spec, needs, plan=plan), space, name,
                       [RowWriter(out, plan, len(pending), progress)], verbose, 1, num_samples=len(points),
                       search_alg=BasicVariantGenerator(points_to_evaluate=points,
                                                        max_concurrent=spec.tune.max_concurrent))
        grid = fit_quietly(tuner, verbose)
    table = read_table(out)
    table.header.setdefault("provenance", {})["build_seconds"] = (
        float(table.header["provenance"].get("build_seconds", 0.0)) + time.time() - started)
    atomic_write_text(out, "".join([json.dumps(table.header) + "\n"] + [r.to_json() + "\n" for r in table.rows]))
    missing = len({(j.config_id, j.seed) for j in jobs} - {(r.config_id, r.seed) for r in table.rows})
    if missing and not grid.errors:
        raise KeyboardInterrupt   # a signal stopped the build: the finished rows are kept
    if missing:
        raise TableError(f"table build: {missing} row(s) failed (see the trials' error.txt under "
                         f"{spec.tune.storage_path}/{name}); run the same command again to retry them")
    return table


class RowWriter(tune.Callback):   # appends each finished trial's learning curve to the table

    def __init__(self, out: Path, plan: TrialPlan, total: int, progress: bool) -> None:
        self.out, self.plan, self.total, self.progress = out, plan, total, progress
        self.history: dict = {}
        self.written = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epochs = self.history.setdefault(trial.trial_id, {})
        epochs[int(result.get("training_iteration", len(epochs) + 1))] = dict(result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        history = [r for _, r in sorted(self.history.pop(trial.trial_id, {}).items())]
        active = self.plan.active_sampled(trial.config)
        seed = active.pop(SEED_KEY)
        row = row_from_history(history, active, seed, self.plan.metric,
                               {"node_id": (history[-1].get("node_id") if history else None)})
        if row.epochs < self.plan.max_t and row.outcome == "completed":
            return   # interrupted: trained again on the next build
        append_row(self.out, row)
        self.written += 1
        say(f"  row {self.written}/{self.total}: config {row.config_id} seed {row.seed}: final {self.plan.metric} "
            f"{row.final if row.final is not None else float('nan'):.2f} ({row.outcome}, "
            f"{sum(s for s in row.seconds if s):.0f} s)", self.progress)
