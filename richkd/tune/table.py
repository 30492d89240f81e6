"""Learning-curve tables (docs/search.md, "Learning-curve tables"): JSON lines, a header (format, the resolved spec,
provenance) and one row per (configuration, seed) with every epoch's validation top-1, loss and seconds (and the test
top-1, for final reporting only), appended as each training finishes so that a killed build resumes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from richkd.io import atomic_write_text, ensure_writable
from richkd.provenance import code_version
from richkd.tune.errors import SpecError
from richkd.tune.paths import PATH_KEYS
from richkd.tune.results import finite_value, load_sweep
from richkd.tune.spec import SweepSpec, spec_from_mapping

FORMAT = "richkd-table/1"
SEED_KEY = "seed"   # the extra entry a build adds to the space: the run's seed


class TableError(SpecError):
    """A table file or a table request a user can fix (exit code 2)."""


def config_id(sampled: Mapping[str, Any]) -> str:
    """A configuration's identity: its active space values (12 hex digits of their sha1)."""
    return hashlib.sha1(json.dumps(dict(sampled), sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class TableRow:
    config_id: str
    seed: int
    params: dict                    # the active space values (variant entries by name)
    val_top1: list                  # per epoch, None where not finite
    val_loss: list
    seconds: list                   # wall seconds of each epoch (training + validation): the replay's clock
    train_seconds: list
    test_top1: Optional[float] = None
    outcome: str = "completed"      # completed | nonfinite_loss
    extra: dict = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.val_top1)

    @property
    def final(self) -> Optional[float]:
        return self.val_top1[-1] if self.val_top1 else None

    def to_json(self) -> str:
        return json.dumps({**{k: v for k, v in asdict(self).items() if k != "extra"}, **self.extra}, default=str)

    @classmethod
    def from_json(cls, data: dict) -> "TableRow":
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: data[k] for k in known if k in data}, extra={k: v for k, v in data.items() if k not in known})


@dataclass
class Table:
    header: dict
    rows: list
    path: Optional[Path] = None

    @property
    def spec(self) -> SweepSpec:
        return SweepSpec.from_dict(self.header["spec"])

    def spec_with(self, overrides: list) -> SweepSpec:
        """The spec the table was built from with `--set` overrides, not checked against files on this machine."""
        return spec_from_mapping(self.header["spec"], overrides=overrides, check_resources=False, check_data=False)

    @property
    def max_t(self) -> int:
        return int(self.header["max_t"])

    @property
    def metric(self) -> str:
        return self.header["metric"]

    def configs(self) -> dict:
        """config_id -> its rows (one per seed), in file order."""
        out: dict = {}
        for row in self.rows:
            out.setdefault(row.config_id, []).append(row)
        return out

    def spreads(self) -> dict:
        """Final val top-1 spread across configurations (their seed means) and across seeds of one configuration
        (the root mean square of the per-configuration standard deviations): a table separates configurations
        only when the first is several times the second."""
        finals = {cid: [r.final for r in rows if r.final is not None] for cid, rows in self.configs().items()}
        means = [statistics.fmean(v) for v in finals.values() if v]
        seeded = [statistics.stdev(v) for v in finals.values() if len(v) > 1]
        across = statistics.stdev(means) if len(means) > 1 else float("nan")
        within = math.sqrt(statistics.fmean([s * s for s in seeded])) if seeded else float("nan")
        q = statistics.quantiles(means, n=4) if len(means) > 1 else [float("nan")] * 3
        return {"configs": len(means), "configs_std": across, "configs_iqr": q[2] - q[0],
                "seeded_configs": len(seeded), "seeds_std": within,
                "seeds_std_median": statistics.median(seeded) if seeded else float("nan"),
                "ratio": across / within if within and within > 0 else float("nan")}

    def describe(self) -> str:
        """What `richkd table info` prints."""
        h, configs = self.header, self.configs()
        seeds = sorted({len(rows) for rows in configs.values()})
        outcomes = Counter(r.outcome for r in self.rows)
        s = self.spreads()
        seconds = sum(sum(x for x in r.seconds if x) for r in self.rows)
        prov = h.get("provenance", {})
        lines = [
            f"table {self.path}: {len(configs)} configurations, {len(self.rows)} rows "
            f"({', '.join(f'{n} {k}' for k, n in sorted(outcomes.items()))}), {self.max_t} epochs each",
            f"  seeds per configuration: {', '.join(map(str, seeds))}"
            + (f" ({s['seeded_configs']} configurations with several seeds)" if s["seeded_configs"] else ""),
            f"  spec {h['spec']['name']!r}: space {', '.join(h['spec']['space'])}; metric {self.metric} "
            f"({h['mode']}); space hash {h['space_hash']}",
            f"  final {self.metric} spread: across configurations std {s['configs_std']:.2f} (IQR "
            f"{s['configs_iqr']:.2f}), across seeds of one configuration std {s['seeds_std']:.2f} (root mean "
            f"square; median {s['seeds_std_median']:.2f}); ratio {s['ratio']:.1f}" + ("" if not s["ratio"] < 3 else
                                   "  WARNING: configurations differ by less than 3x the seed noise; widen the space "
                                   "or the data"),
            f"  cost: {seconds / 3600:.2f} trial-hours ({sum(r.epochs for r in self.rows)} trial-epochs)"
            + (f"; built in {prov['build_seconds'] / 3600:.2f} h" if prov.get("build_seconds") else ""),
            "  test top-1 recorded: "
            + ("yes (final reporting only)" if any(r.test_top1 is not None for r in self.rows) else "no"),
        ]
        for key in ("source", "git_commit", "richkd_version", "data", "caches", "machine", "created"):
            if key in prov:
                shown = json.dumps(prov[key]) if isinstance(prov[key], (dict, list)) else prov[key]
                lines.append(f"  {key}: {shown}")
        return "\n".join(lines)


def read_table(path: str | os.PathLike, repair: bool = False) -> Table:
    """Read a table file. A last line cut short by a kill is dropped (and, with `repair`, removed from the file
    so that appends continue cleanly); anything else malformed is one TableError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise TableError(f"table {str(p)!r} does not exist (build one with `richkd table build SPEC --out FILE`)")
    lines = p.read_text().splitlines(keepends=True)
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != FORMAT:
        raise TableError(f"{p} is not a richkd learning-curve table (its first line is not a {FORMAT} header)")
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            rows.append(TableRow.from_json(json.loads(line)))
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            if i == len(lines) and not line.endswith("\n"):      # cut short by a kill while appending
                if repair:
                    atomic_write_text(p, "".join(lines[:-1]))
                break
            raise TableError(f"{p}, line {i}: not a table row ({exc}); the file is damaged") from None
    return Table(header=header, rows=rows, path=p)


def append_row(path: Path, row: TableRow) -> None:
    """One row, one line, flushed to disk: a kill loses at most the row being written."""
    with open(path, "a") as f:
        f.write(row.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def row_from_history(history: list, sampled: dict, seed: int, metric: str, extra: Optional[dict] = None) -> TableRow:
    """A table row from a trial's per-epoch results (Tune's result dicts, in epoch order)."""
    last = history[-1] if history else {}
    nonfinite = bool(last.get("nonfinite_loss"))
    return TableRow(
        config_id=config_id(sampled), seed=int(seed), params=dict(sampled),
        val_top1=[finite_value(r.get(metric)) for r in history],
        val_loss=[finite_value(r.get("val_loss")) for r in history],
        seconds=[finite_value(r.get("time_this_iter_s")) for r in history],
        train_seconds=[finite_value(r.get("epoch_time_s")) for r in history],
        test_top1=finite_value(last.get("test_top1")), outcome="nonfinite_loss" if nonfinite else "completed",
        extra=dict(extra or {}))


def table_header(spec: SweepSpec, **provenance: Any) -> dict:
    d = spec.base_config.data
    return {"format": FORMAT, "spec": spec.to_dict(), "space_hash": spec.space_hash(), "metric": spec.tune.metric,
            "mode": spec.tune.mode, "max_t": spec.max_t,
            "provenance": {**code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "data": {"dataset": d.dataset, "max_train_samples": d.max_train_samples,
                                    "max_eval_samples": d.max_eval_samples, "val_fraction": d.val_fraction},
                           "machine": {"system": platform.system(), "machine": platform.machine(),
                                       "cpus": os.cpu_count()},
                           **provenance}}


def check_same_space(table: Table, spec: SweepSpec, what: str) -> None:
    """A table answers only the space it was drawn from, at its schedule and metric: one TableError naming what
    differs otherwise."""
    theirs = table.header["spec"]["space"]
    ours = {p.key: p.to_entry() for p in spec.params}
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    # the base config too, but for paths (another checkout or machine) and the run's name
    a, b = table.spec.base_config.to_flat_dict(), spec.base_config.to_flat_dict()   # keys added since: defaults
    config = sorted(k for k in set(a) | set(b) if k not in PATH_KEYS + ("name",) and a.get(k) != b.get(k))
    problems = [text for bad, text in (
        (differ, f"space entries {', '.join(differ)} differ"),
        (config, f"the base configs differ in {', '.join(config[:5])}" + (", ..." if len(config) > 5 else "")),
        (table.max_t != spec.max_t, f"the table has {table.max_t} epochs, the spec's train.epochs is {spec.max_t}"),
        (table.metric != spec.tune.metric, f"the table records {table.metric}, the spec optimises {spec.tune.metric}"),
    ) if bad]
    if problems:
        raise TableError(f"{what}: table {table.path} was built from another space ({'; '.join(problems)}); "
                         f"use a table of spec {spec.name!r}'s space or build one with `richkd table build`")


@dataclass(frozen=True)
class RowJob:
    config_id: str
    sampled: dict
    seed: int


def plan_rows(spec: SweepSpec, n_configs: int, seeds: int = 1, seeds_for: Optional[int] = None) -> list[RowJob]:
    """The rows of a table: the spec's points_to_evaluate, then `n_configs` seeded draws of the space (respecting
    `when:`; a prefix of a larger table's draws); the first `seeds_for` configurations with `seeds` seeds each,
    the others with the base config's seed."""
    if n_configs < 1 or seeds < 1:
        raise TableError("table build: --configs and --seeds must be >= 1")
    if any(SEED_KEY in p.config_keys for p in spec.params):
        raise TableError(f"table build: the space searches {SEED_KEY}; a table varies the seed itself (--seeds), "
                         "drop it from the space")
    seeds_for = n_configs if seeds_for is None else seeds_for
    base, jobs, seen = spec.base_config.seed, [], set()
    plan = spec.plan()
    points = [plan.active_sampled(p) for p in spec.points] + spec.random_points(n_configs, seed=spec.tune.search.seed)
    for sampled in points:
        cid = config_id(sampled)
        if cid in seen:   # a finite space drew it again
            continue
        jobs.extend(RowJob(cid, sampled, base + j) for j in range(seeds if len(seen) < seeds_for else 1))
        seen.add(cid)
    return jobs


def table_from_sweep(sweep: str, out: str | os.PathLike, storage: Optional[str] = None) -> Table:
    """A finished sweep without early stopping as a table (no test top-1: sweeps never read the test split)."""
    spec, path, record, rows = load_sweep(sweep, storage)
    stopped = [r for r in rows if r.outcome == "stopped_early"]
    unfinished = [r for r in rows if r.outcome in ("unfinished", "error")]
    if stopped:
        raise TableError(f"sweep {spec.name!r}: {len(stopped)} trial(s) were stopped early by ASHA, so their learning "
                         "curves end early; a table needs every configuration trained to the end (run the sweep "
                         "with tune.scheduler: fifo)")
    if unfinished:
        raise TableError(f"sweep {spec.name!r}: {len(unfinished)} trial(s) did not finish; resume it first "
                         f"(`richkd sweep --resume {spec.name}`)")
    out = Path(out)
    ensure_writable(out.parent, "the table's folder")
    header = table_header(spec, source=f"sweep {spec.name} at {path}", git_commit=record.git_commit,
                          caches=[c["entries"] for c in record.caches])
    atomic_write_text(out, "".join([json.dumps(header) + "\n"] + [row_from_history(
        r.history, dict(r.sampled), r.config.seed, spec.tune.metric, {"trial_id": r.trial_id}).to_json() + "\n"
        for r in rows]))
    return read_table(out)
