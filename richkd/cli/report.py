"""`richkd report SWEEP` (richkd.report does the work)."""
from __future__ import annotations

import argparse

from richkd import tune
from richkd.cli.common import add_command, add_storage_args

REPORT_EPILOG = """examples:
  richkd report smoke                          # tune_runs/smoke/report/index.html (+ PNGs)
  richkd report tune_runs/smoke                # the same, by folder
  richkd report fm4 --storage /data/sweeps --out /tmp/fm4_report --no-mlflow

Open the index.html in any browser (no server needed).
"""


def add_commands(subparsers) -> None:
    p = add_command(subparsers, "report", "static HTML report of a sweep: learning curves, searched values vs "
                    "metric, parameter importances, leaderboard", REPORT_EPILOG, cmd_report)
    p.add_argument("sweep", metavar="SWEEP", help="sweep name (under --storage) or its folder")
    add_storage_args(p)
    p.add_argument("--out", "-o", metavar="DIR", help="output folder (default: <sweep folder>/report)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to the sweep's MLflow parent run")


def cmd_report(args: argparse.Namespace) -> int:
    from richkd.report import build_report

    found = tune.read_group(args.sweep, args.storage)
    if found is not None:      # the arms of a fair comparison: each arm's report, and one page over them
        group = found[0]
        reports = {arm: str(build_report(sweep, storage=group.storage, log_mlflow=not args.no_mlflow).index)
                   for arm, sweep in group.sweeps.items()}
        print(f"arms of {group.name}: {tune.write_group_page(group, reports)}")
        for arm, path in reports.items():
            print(f"  {arm}: {path}")
        return 0

    result = build_report(args.sweep, storage=args.storage, tracking_uri=args.tracking_uri, out_dir=args.out,
                          log_mlflow=not args.no_mlflow)
    print(f"report of {result.n_trials} trials: {result.index}")
    for path in result.images:
        print(f"  {path}")
    imp = result.importances
    if imp.values:
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(imp.values.items())[:3])
        print(f"  importances ({imp.evaluator}, {imp.n_trials} trials at epoch {imp.epoch}): {top}")
    elif imp.notes:
        print(f"  importances: {imp.notes[0]}")
    for note in result.notes:
        print(f"  {note}")
    return 0
