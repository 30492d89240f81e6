"""The `richkd` command line: `main` (the console script) and one module per command family.

app (the parser, `main` and its error handling), common (what handlers share), train (train, cache, clip,
models), demo, sweep (sweep, export, finalize, ui), search (table, replay), evaluate, report. Importing this
package loads argparse and the config only; each handler imports torch, richkd.tune (and so ray) or mlflow when
it runs, so `richkd --help` is fast.
"""
from richkd.cli.app import build_parser, main
from richkd.cli.common import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, load_config

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "UserError", "build_parser", "load_config", "main"]
