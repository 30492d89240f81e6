"""What the command modules share: the exceptions a handler raises for `richkd.cli.app.main` to report (handlers
never print an error or pick its exit code themselves), and argument helpers."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable, Optional, Sequence

from richkd.config import Config
from richkd.schema import parse_override

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


def load_config(path: Optional[str], overrides: Sequence[str], base: Optional[Config] = None) -> Config:
    """The run config from a YAML file (else `base`, else the defaults) with `--set KEY=VALUE` overrides."""
    cfg = Config.from_yaml(path) if path else base or Config()
    return cfg.with_overrides(dict(parse_override(o) for o in overrides)) if overrides else cfg


def add_command(subparsers, name: str, help: str, epilog: str, func: Optional[Callable] = None):
    """A command's parser: its help line (also its description), its examples kept as written, its handler."""
    p = subparsers.add_parser(name, help=help, description=help, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    if func is not None:
        p.set_defaults(func=func)
    return p


def add_set_arg(p: argparse.ArgumentParser, what: str = "a dotted config key, e.g. --set optim.lr=0.01") -> None:
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override {what} (repeatable)")


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, help="a run config YAML (see configs/)")
    add_set_arg(p)


def add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="the sweeps' storage folder or URI (default tune_runs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the sweep used)")


def add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--address", help=f"connect to a running Ray cluster (e.g. auto or HEAD:6379); {what}; "
                                     "default: an embedded local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs for the embedded Ray (default: all of this machine's)")


def add_quiet_arg(p: argparse.ArgumentParser, what: str = "no Tune status tables") -> None:
    p.add_argument("--quiet", "-q", action="store_true", help=what)
