"""What the command modules share: the exceptions a handler raises for `main` to report, and argument helpers.

Handlers never print an error or pick an exit code for one themselves: they raise, and `richkd.cli.app.main`
turns the exception into one line on stderr and an exit code. That keeps the wording, the exit codes and the
RICHKD_DEBUG escape hatch in one place for every command.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for a Ctrl-C


class UserError(Exception):
    """A problem the user can fix (a missing or conflicting argument); printed without a traceback."""


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C (or SIGTERM: `signum`) that comes with a next step for the user, e.g. how to resume: `main`
    prints it after "interrupted; " (a plain KeyboardInterrupt is reported as just "interrupted") and exits
    with 128 + signum."""

    def __init__(self, next_step: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(next_step)
        self.signum = signum


def at_least_one(**counts) -> None:
    """Counts from the command line (`--num-cpus 0`, `--images -5`): 1 or more, else one UserError before any
    work (argparse checks only that they are integers)."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be 1 or more")


def interactive() -> bool:
    """Progress bars only on a terminal, and not under CI, where they would fill the log."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def verbosity(args: argparse.Namespace) -> int:
    """Ray Tune's verbosity: 0 with --quiet, 2 with the top-level --verbose, else 1."""
    if getattr(args, "quiet", False):
        return 0
    return 2 if getattr(args, "verbose", False) else 1


def load_config(path: Optional[str], overrides: Sequence[str]):
    """The run config from a YAML file (or the defaults) with `--set KEY=VALUE` overrides applied."""
    from richkd.config import Config

    cfg = Config.from_yaml(path) if path else Config()
    return cfg.with_overrides(dict(parse_overrides(overrides))) if overrides else cfg


def parse_overrides(items: Sequence[str]) -> list:
    from richkd.config import parse_override

    return [parse_override(o) for o in items]


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, help="a run config YAML (see configs/)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key, e.g. --set optim.lr=0.01 (repeatable)")


def add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="the sweeps' storage folder or URI (default tune_runs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the sweep used)")
