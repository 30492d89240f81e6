"""`richkd table build | from-sweep | info` and `richkd replay`: measuring the search itself (docs/search.md)."""
from __future__ import annotations

import argparse

from richkd import tune
from richkd.cli.common import (add_command, add_quiet_arg, add_ray_args, add_set_arg, at_least_one, interactive,
                               verbosity)
from richkd.cli.sweep import stoppable

BUILD_EXAMPLES = """\
  richkd table build search_spaces/fmnist_table.yaml --configs 200 --seeds 3 --seeds-for 30 --out t.jsonl
  richkd table build SPEC --configs 8 --out t.jsonl --set config.train.epochs=3     # a small one
"""
INFO_EXAMPLE = "  richkd table info benchmarks/tables/fmnist_table.jsonl\n"
FROM_SWEEP_EXAMPLE = "  richkd table from-sweep my_fifo_sweep --out my_sweep.jsonl\n"
TABLE_NOTE = """
A build trains every configuration to the end (no early stopping) through Ray like a sweep and appends each row
when it finishes: run the same command again after a kill and only the missing rows are trained.
"""

REPLAY_EPILOG = """examples:
  richkd replay --table benchmarks/tables/fmnist_table.jsonl              # the spec the table was built from
  richkd replay --table benchmarks/tables/fmnist_table.jsonl --set tune.search.algorithm=random
  richkd replay SPEC --table t.jsonl --seeds 20 --set tune.scheduler.type=fifo --set tune.num_samples=32
"""


def cmd_table_build(args: argparse.Namespace) -> int:
    at_least_one(configs=args.configs, seeds=args.seeds, num_cpus=args.num_cpus)
    spec = tune.load_spec(args.spec, args.set + ([f"tune.storage_path={args.storage}"] if args.storage else []))
    table = stoppable(lambda: tune.build_table(spec, args.out, configs=args.configs, seeds=args.seeds,
                                          seeds_for=args.seeds_for, address=args.address, num_cpus=args.num_cpus,
                                          verbose=verbosity(args), progress=True),
                      lambda: f"finished rows are in {args.out}; run the same command again to train the rest")
    print(table.describe())
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    table = tune.read_table(args.table)
    # the spec given, or the one the table was built from, with --set applied
    spec = tune.load_spec(args.spec, args.set) if args.spec else table.spec_with(args.set)
    warm = tune.load_warm_start(spec)
    if warm is not None:
        print(warm.describe())
    print(tune.describe_replays(tune.replay_many(spec, table, seeds=args.seeds, progress=interactive(), warm=warm),
                                spec))
    return 0


def add_commands(subparsers) -> None:
    p = add_command(subparsers, "table", "learning-curve tables of real trials (build, from-sweep, info)",
                    "examples:\n" + BUILD_EXAMPLES + INFO_EXAMPLE + FROM_SWEEP_EXAMPLE + TABLE_NOTE)
    sub = p.add_subparsers(dest="table_command", required=True, metavar="SUBCOMMAND")
    b = add_command(sub, "build", "train N configurations of a spec's space to the end, every epoch recorded",
                    "examples:\n" + BUILD_EXAMPLES + TABLE_NOTE, cmd_table_build)
    b.add_argument("spec", help="search-space YAML whose space, base config and resources the table uses")
    b.add_argument("--configs", type=int, required=True, help="how many seeded draws of the space")
    b.add_argument("--seeds", type=int, default=1, help="seeds per configuration (default 1)")
    b.add_argument("--seeds-for", type=int, metavar="M", help="give --seeds only to the first M configurations "
                                                             "(the others get one; default: all)")
    b.add_argument("--out", required=True, help="the table file (JSON lines); an existing one is continued")
    add_set_arg(b, "a spec key")
    add_ray_args(b, "the table's trainings run as Ray work")
    add_quiet_arg(b)
    b.add_argument("--storage", help="where the build's Tune experiment goes (default: the spec's storage_path)")
    f = add_command(sub, "from-sweep", "a finished sweep without early stopping as a table",
                    "example:\n" + FROM_SWEEP_EXAMPLE,
                    lambda a: print(tune.table_from_sweep(a.sweep, a.out, storage=a.storage).describe()))
    f.add_argument("sweep", help="sweep name (under --storage) or its folder")
    f.add_argument("--out", required=True, help="the table file to write (JSON lines)")
    f.add_argument("--storage", help="the sweeps' storage folder or URI (default tune_runs)")
    i = add_command(sub, "info", "what a table holds: configurations, epochs, seeds, spreads, provenance",
                    "example:\n" + INFO_EXAMPLE, lambda a: print(tune.read_table(a.file).describe()))
    i.add_argument("file", help="a table file")

    p = add_command(subparsers, "replay", "replay a spec's searcher and scheduler against a table (seconds)",
                    REPLAY_EPILOG, cmd_replay)
    p.add_argument("spec", nargs="?", help="search-space YAML: its searcher, scheduler, num_samples and "
                                           "max_concurrent (default: the spec the table was built from)")
    p.add_argument("--table", required=True, help="a learning-curve table of the same space")
    p.add_argument("--seeds", type=int, default=20, help="replays with searcher seeds 0..N-1 (default 20)")
    add_set_arg(p, "a spec key")
