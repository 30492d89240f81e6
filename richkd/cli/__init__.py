"""The `richkd` command line: `main` (app.py, the one error path) and one module per command family. Importing it
loads argparse and the config only; each handler imports the library it runs (docs/architecture.md, Layers)."""
from richkd.cli.app import build_parser, main
from richkd.cli.common import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, load_config

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "UserError", "build_parser", "load_config", "main"]
