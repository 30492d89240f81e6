"""How good is the search: the real searchers and schedulers replayed against the shipped learning-curve table.

For each strategy, `--seeds` replays (searcher seeds 0..N-1) of `richkd.tune.replay.replay` on the table, each
stopped once it has spent the budget of random search with the spec's num_samples trained to the end (B trial-
epochs); random search at 2B shows what twice the budget buys (Li et al.'s lesson for Bayesian optimisation).
Strategies: random; random + ASHA; TPE; TPE + ASHA (the spec's settings, which are the product's defaults); TPE +
asynchronous Hyperband (ASHA with 3 brackets); Egele et al.'s one-epoch baseline (train n random configurations one
epoch, finish the k best); TPE + ASHA warm-started from a random half of the table's configurations. A grid over
n_startup_trials, grace_period and reduction_factor shows which TPE + ASHA settings reach random search's result
soonest. Writes benchmarks/results_search.json (median and quartiles per budget, the ratios) and a PNG.

  python benchmarks/search_quality.py                      # ~10-20 min on 2 cores
  python benchmarks/search_quality.py --seeds 5 --no-grid  # a quick look
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

for _k, _v in (("RAY_AUTH_MODE", "disabled"), ("MLFLOW_DISABLE_TELEMETRY", "true"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_k, _v)
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import optuna  # noqa: E402

from richkd.io import atomic_write_text  # noqa: E402
from richkd.tune.replay import TableIndex, one_epoch_top_k, quartiles, replay  # noqa: E402
from richkd.tune.settings import SchedulerSettings, SearchSettings  # noqa: E402
from richkd.tune.spec import SweepSpec  # noqa: E402
from richkd.tune.table import read_table  # noqa: E402
from richkd.tune.warm_start import load_warm_start  # noqa: E402

TABLE = REPO / "benchmarks" / "tables" / "fmnist_table.jsonl"


def variant(spec: SweepSpec, algorithm: str, scheduler: str, num_samples: int, **kw) -> SweepSpec:
    """The table's spec with the product's default search settings (SearchSettings(), SchedulerSettings(): what a
    spec that leaves them out gets), the given algorithm and scheduler, and any setting overridden by `kw`."""
    t = spec.tune
    search = replace(SearchSettings(), algorithm=algorithm,
                     **{k: kw[k] for k in ("n_startup_trials",) if k in kw})
    sched = replace(SchedulerSettings(), type=scheduler, **{k: kw[k] for k in ("grace_period", "reduction_factor",
                                                                                  "brackets") if k in kw})
    sched = sched.for_epochs(spec.max_t)              # the default grace period, as the spec loader resolves it
    return replace(spec, tune=replace(t, search=search, scheduler=sched, num_samples=num_samples,
                                      warm_start=tuple(kw.get("warm_start", ()))))


def curve_stats(results: list, grid: list) -> dict:
    """Median and quartiles of best val (and the chosen configuration's test top-1) at each budget of `grid`."""
    out = {"budget": grid, "val": [], "test": []}
    for b in grid:
        vals, tests = [], []
        for r in results:
            best = [(v, t) for e, _, v, t in r.curve if e <= b]
            vals.append(best[-1][0] if best else math.nan)
            tests.append(best[-1][1] if best else math.nan)
        out["val"].append(quartiles(vals))
        out["test"].append(quartiles(tests))
    return out


def budget_to_reach(stats: dict, target: float, budget: int) -> "float | None":
    """The first budget at which the median best val reaches `target`, as a fraction of `budget` (None: never)."""
    for b, (_, median, _) in zip(stats["budget"], stats["val"]):
        if not math.isnan(median) and median >= target - 1e-9:
            return b / budget
    return None


def run(spec, table, name, seeds, budget, index, warm=None, **kw) -> dict:
    started = time.perf_counter()
    results = [replay(spec, table, seed=s, index=index, budget=budget, warm=warm) for s in range(seeds)]
    print(f"  {name}: {time.perf_counter() - started:.1f} s for {seeds} replays", flush=True)
    return {"results": results, "seconds": time.perf_counter() - started}


def half_table(table, seed: int, folder: Path) -> Path:
    """A random half of the table's configurations, as a table file (the warm start's source)."""
    configs = list(table.configs())
    keep = set(random.Random(seed).sample(configs, len(configs) // 2))
    path = folder / "half.jsonl"
    path.write_text("".join([json.dumps(table.header) + "\n"] +
                            [r.to_json() + "\n" for r in table.rows if r.config_id in keep]))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=str(TABLE))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--num-samples", type=int, help="random search's trials (default: the table spec's)")
    ap.add_argument("--no-grid", action="store_true", help="skip the n_startup / grace / reduction-factor grid")
    ap.add_argument("--grid-seeds", type=int, default=10, help="replays per grid setting (default 10)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results_search.json"))
    ap.add_argument("--png", default=str(REPO / "benchmarks" / "search_quality.png"))
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = read_table(args.table)
    spec = table.spec
    n = args.num_samples or spec.tune.num_samples
    budget = n * spec.max_t
    index = TableIndex(table, spec)
    grid = sorted({int(round(budget * f / 40)) for f in range(1, 81)} | {budget})
    print(f"table {args.table}: {len(table.configs())} configurations, {len(table.rows)} rows; budget B = {n} x "
          f"{spec.max_t} = {budget} trial-epochs; {args.seeds} seeds per strategy", flush=True)
    many = 8 * n   # enough trials for any strategy to spend the budget
    strategies = {
        "random": variant(spec, "random", "fifo", 2 * n),
        "random_asha": variant(spec, "random", "asha", many),
        "tpe": variant(spec, "optuna", "fifo", 2 * n),
        "tpe_asha": variant(spec, "optuna", "asha", many),                            # the defaults
        "tpe_asha_grace1": variant(spec, "optuna", "asha", many, grace_period=1),     # the defaults until now
        "tpe_hyperband": variant(spec, "optuna", "asha", many, brackets=3),
    }
    runs = {}
    for name, v in strategies.items():
        runs[name] = run(v, table, name, args.seeds, 2 * budget if name == "random" else budget, index)
    started = time.perf_counter()
    k = max(2, n // 8)
    runs["one_epoch_top_k"] = {"results": [one_epoch_top_k(spec, table, n=budget - k * (spec.max_t - 1), k=k, seed=s,
                                                           index=index) for s in range(args.seeds)],
                               "seconds": time.perf_counter() - started, "n": budget - k * (spec.max_t - 1), "k": k}
    with tempfile.TemporaryDirectory() as tmp:
        warm_spec = variant(spec, "optuna", "asha", many, warm_start=[str(half_table(table, 0, Path(tmp)))])
        warm = load_warm_start(warm_spec)
        runs["tpe_asha_warm_half"] = run(warm_spec, table, "tpe_asha_warm_half", args.seeds, budget, index, warm)
        runs["tpe_asha_warm_half"]["imported"] = {"completed": warm.completed, "pruned": warm.pruned}

    stats = {name: curve_stats(r["results"], grid if name == "random" else [b for b in grid if b <= budget])
             for name, r in runs.items()}                                 # only random search ran to 2B
    at = grid.index(budget)                                           # the grid runs to 2B; B is in it
    random_final = stats["random"]["val"][at][1]                      # random's median best at B
    random_test = stats["random"]["test"][at][1]
    noise = table.spreads()["seeds_std_median"]                      # one run's typical seed noise
    summary = {}
    for name, st in stats.items():
        at_b = st["val"][at]
        summary[name] = {"median_best_val_at_B": at_b[1], "quartiles_at_B": [at_b[0], at_b[2]],
                         "median_test_at_B": st["test"][at][1],
                         "budget_to_reach_random_at_B": budget_to_reach(st, random_final, budget),
                         "budget_to_reach_random_at_B_within_seed_noise":
                             budget_to_reach(st, random_final - noise, budget),
                         "median_trials": sorted(r.trials for r in runs[name]["results"])[args.seeds // 2],
                         "median_distinct_table_configs": statistics.median(len(set(r.answered))
                                                                            for r in runs[name]["results"]),
                         "replay_seconds": runs[name]["seconds"]}
    cold_final = stats["tpe_asha"]["val"][at][1]
    warm_ratio = budget_to_reach(stats["tpe_asha_warm_half"], cold_final, budget)
    distances = [d for r in runs["tpe_asha"]["results"] for d in r.distances]

    grid_results = []
    if not args.no_grid:
        print("grid over n_startup_trials x grace_period x reduction_factor (TPE + ASHA):", flush=True)
        for n_startup in (5, 10, 20):
            for grace in (1, 2, 3):
                for rf in (2, 3, 4):
                    v = variant(spec, "optuna", "asha", many, n_startup_trials=n_startup, grace_period=grace,
                                reduction_factor=rf)
                    r = run(v, table, f"n_startup {n_startup}, grace {grace}, rf {rf}", args.grid_seeds, budget,
                            index)
                    st = curve_stats(r["results"], grid)
                    grid_results.append({"n_startup_trials": n_startup, "grace_period": grace, "reduction_factor": rf,
                                         "budget_ratio": budget_to_reach(st, random_final, budget),
                                         "budget_ratio_within_seed_noise":
                                             budget_to_reach(st, random_final - noise, budget),
                                         "median_best_val_at_B": st["val"][at][1], "median_test_at_B": st["test"][at][1]})

    out = {
        "table": os.path.relpath(args.table, REPO), "configurations": len(table.configs()), "rows": len(table.rows),
        "spreads": table.spreads(), "seeds": args.seeds, "grid_seeds": args.grid_seeds, "num_samples": n,
        "max_t": spec.max_t, "budget_B": budget,
        "defaults": {k: getattr(strategies["tpe_asha"].tune.search, k) for k in ("algorithm", "n_startup_trials")}
        | {k: getattr(strategies["tpe_asha"].tune.scheduler, k) for k in ("type", "grace_period", "reduction_factor",
                                                                           "brackets")},
        "seed_noise": noise,
        "random_median_best_val_at_B": random_final, "random_median_test_at_B": random_test,
        "random_median_best_val_at_2B": stats["random"]["val"][-1][1],
        "default_vs_random_budget_ratio": summary["tpe_asha"]["budget_to_reach_random_at_B"],
        "default_vs_random_budget_ratio_within_seed_noise":
            summary["tpe_asha"]["budget_to_reach_random_at_B_within_seed_noise"],
        "default_test_no_worse_than_random": summary["tpe_asha"]["median_test_at_B"] >= random_test - 1e-9,
        "warm_start_budget_ratio": warm_ratio,
        "warm_start_imported": runs["tpe_asha_warm_half"]["imported"],
        "one_epoch_top_k": {"n": runs["one_epoch_top_k"]["n"], "k": runs["one_epoch_top_k"]["k"]},
        "nearest_row_distance": {"median": sorted(distances)[len(distances) // 2], "max": max(distances),
                                 "exact_share": sum(1 for d in distances if d == 0) / len(distances)},
        "strategies": summary, "curves": stats, "grid": grid_results,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(args.out, json.dumps(out, indent=1, default=float))
    plot(stats, budget, random_final, args.png)
    print(json.dumps({k: out[k] for k in ("default_vs_random_budget_ratio", "default_vs_random_budget_ratio_within"
                                          "_seed_noise", "default_test_no_worse_than_random", "warm_start_budget_ratio",
                                          "random_median_best_val_at_B", "seed_noise")}, default=float))
    for name, row in summary.items():
        print(f"  {name:<20} median best val at B {row['median_best_val_at_B']:.2f}, test {row['median_test_at_B']:.2f}, "
              f"reaches random's at {row['budget_to_reach_random_at_B']} B, within the seed noise at "
              f"{row['budget_to_reach_random_at_B_within_seed_noise']} B; {row['median_distinct_table_configs']:.0f} "
              f"distinct table configurations")
    for g in sorted(grid_results, key=lambda g: -g["median_best_val_at_B"])[:5]:
        print(f"  grid: {g}")
    return 0


def plot(stats: dict, budget: int, target: float, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, st in stats.items():
        b = [x / budget for x in st["budget"]]
        for ax, key in zip(axes, ("val", "test")):
            lo, med, hi = zip(*st[key])
            line, = ax.plot(b, med, label=name)
            ax.fill_between(b, lo, hi, color=line.get_color(), alpha=0.12)
    axes[0].axhline(target, color="grey", ls=":", lw=1)
    for ax, title in zip(axes, ("best val top-1 found (median, quartiles)", "test top-1 of the chosen config")):
        ax.set_xlabel("budget (multiples of B = random search's trial-epochs)")
        ax.set_title(title)
        ax.set_xlim(0, 2)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
