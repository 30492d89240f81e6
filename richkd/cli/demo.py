"""`richkd demo`: the offline end-to-end pipeline on Fashion-MNIST (richkd.demo does the work)."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from richkd.demo import run_demo

    return run_demo(out_root=Path(args.out), quick=args.quick, fresh=args.fresh)


def add_commands(subparsers) -> None:
    """Register `demo` on the `richkd` parser's subparsers."""
    p = subparsers.add_parser("demo", help="run the offline end-to-end pipeline on Fashion-MNIST")
    p.add_argument("--out", default="tune_runs/demo", help="output folder (default tune_runs/demo)")
    p.add_argument("--quick", action="store_true", help="a much smaller run (used by the tests)")
    p.add_argument("--fresh", action="store_true", help="retrain the teacher and rebuild caches")
    p.set_defaults(func=cmd_demo)
