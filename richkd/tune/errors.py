"""The sweep layer's user-facing errors: every spec, storage or sweep-folder problem a user can fix (SpecError,
exit code 2), and a Ray cluster that went away mid-run (ClusterLostError, exit code 4)."""
from __future__ import annotations

from richkd.schema import ConfigError


EXIT_CLUSTER_LOST = 4


class SpecError(ConfigError):
    """A sweep spec problem the user can fix; raised before Ray starts and before anything is written."""


class ClusterLostError(RuntimeError):
    """The Ray cluster went away while a sweep or finalize ran; the message says what is kept and how to go on.
    `richkd.cli.app.main` prints it as one line and exits with its `exit_code`."""

    exit_code = EXIT_CLUSTER_LOST
