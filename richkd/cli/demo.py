"""`richkd demo`: the offline end-to-end pipeline on Fashion-MNIST (richkd.demo does the work)."""
from __future__ import annotations

import argparse
from pathlib import Path

from richkd.cli.common import add_command

DEMO_EPILOG = """examples:
  richkd demo                         # ~10 min on 2 CPUs: teacher, tiny CLIP, caches, KD + RichKD, sweep, report
  richkd demo --quick --out /tmp/d    # every stage at a much smaller size (what the tests run)
  richkd demo --fresh                 # delete tune_runs/demo and start over

Needs Debian's dataset-fashion-mnist (`make demo` installs it); README.md, "What `make demo` does", lists its outputs.
"""


def cmd_demo(args: argparse.Namespace) -> int:
    from richkd.demo import run_demo

    return run_demo(out_root=Path(args.out), quick=args.quick, fresh=args.fresh)


def add_commands(subparsers) -> None:
    p = add_command(subparsers, "demo", "run the offline end-to-end pipeline on Fashion-MNIST", DEMO_EPILOG, cmd_demo)
    p.add_argument("--out", default="tune_runs/demo", help="output folder (default tune_runs/demo)")
    p.add_argument("--quick", action="store_true", help="a much smaller run (used by the tests)")
    p.add_argument("--fresh", action="store_true", help="retrain the teacher and rebuild caches")
