"""User-facing errors: the CLI prints these as one clear message instead of a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the field and the fix."""
