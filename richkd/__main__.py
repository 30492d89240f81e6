"""`python -m richkd` is the `richkd` command."""
import sys

from richkd.cli import main

sys.exit(main())
