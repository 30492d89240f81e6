"""The sweep layer's user-facing error: every spec, storage or sweep-folder problem a user can fix."""
from __future__ import annotations

from richkd.schema import ConfigError


class SpecError(ConfigError):
    """A sweep spec problem the user can fix; raised before Ray starts and before anything is written."""
