"""User-facing errors of the CLIP package: bad weights/architecture (ClipLoadError) and bad prompt sets."""
from __future__ import annotations


class ClipLoadError(ValueError):
    """CLIP cannot be built or its weights cannot be found; the message says how to provide them."""


class PromptSetError(ValueError):
    """A prompt set is unknown or malformed; the message names the set or file and the fix."""
