"""The `richkd` parser and `main`, the one place where an exception becomes a message and an exit code: a user
error one line and 2, an error with its own `exit_code` (a Ray cluster that went away: 4) one line and that code,
Ctrl-C 130 (SIGTERM 143), a closed pipe (`richkd models | head`) quietly 141, anything else (a bug) its traceback.
RICHKD_DEBUG=1 shows the traceback of user errors too."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from richkd.cli import demo, evaluate, report, search, sweep, train
from richkd.cli.common import EXIT_INTERRUPTED, EXIT_USER_ERROR, Interrupted, UserError

EPILOG = """examples:
  richkd demo                                   # offline end-to-end pipeline on Fashion-MNIST
  richkd train --config tune_runs/demo/configs/kd.yaml --set train.epochs=3     # configs the demo wrote
  richkd train --config configs/cifar100_resnet32x4_resnet8x4_richkd.yaml --set loss.fusion_alpha=0.8
  richkd sweep search_spaces/smoke.yaml && richkd export smoke && richkd report smoke
  richkd evaluate tune_runs/demo/kd/student.pt --suite robustness            # the demo's KD student

`richkd COMMAND --help` shows each command's options and examples.
"""

# Errors of these commands name the command (`richkd sweep: error: ...`); those of the single-run commands
# (train, cache, clip, models, demo) read `richkd: error: ...`. Scripts and tests match both prefixes.
NAMED_COMMANDS = frozenset({"sweep", "export", "finalize", "ui", "report", "evaluate", "table", "replay"})

# Problems the user can fix: every error class of the library is a ValueError (ConfigError, SpecError,
# CheckpointError, ...); a KeyError is a missing name in a lookup (its message is args[0], not the quoted repr).
USER_ERRORS = (UserError, ValueError, KeyError, FileNotFoundError, NotADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="richkd", description="RichKD-Tune: tune CLIP-fused knowledge "
                                     "distillation with Ray Tune, Optuna and MLflow.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", "-v", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, demo, sweep, search, evaluate, report):
        module.add_commands(sub)
    return parser


EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def error_message(exc: BaseException) -> str:
    """The text after "error: " on ONE line: the exception's whole message (some end in a "Fix: ..." part), its
    lines joined; a list of "- item" lines becomes "item; item"."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    out = lines[0]
    for line in lines[1:]:
        if line.startswith("- "):
            out += (" " if out.endswith(":") else "; ") + line[2:]
        else:
            out += " " + line
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    prog = f"richkd {args.command}" if args.command in NAMED_COMMANDS else "richkd"
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()   # a closed pipe shows up here (output is block-buffered), not at interpreter exit
        return code
    except USER_ERRORS as exc:
        if os.environ.get("RICHKD_DEBUG"):
            raise
        print(f"{prog}: error: {error_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # stdout to /dev/null, so that the interpreter's final flush does not raise again (the recipe of Python's
        # signal documentation); a stdout without a file descriptor (captured in tests) is left alone
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as exc:
        next_step = f"; {exc}" if isinstance(exc, Interrupted) and str(exc) else ""
        print(f"{prog}: interrupted{next_step}", file=sys.stderr)
        signum = getattr(exc, "signum", signal.SIGINT)
        return EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum
    except Exception as exc:
        code = getattr(exc, "exit_code", None)   # e.g. richkd.tune.errors.ClusterLostError (4)
        if not isinstance(code, int) or os.environ.get("RICHKD_DEBUG"):
            raise
        print(f"{prog}: error: {error_message(exc)}", file=sys.stderr)
        return code
