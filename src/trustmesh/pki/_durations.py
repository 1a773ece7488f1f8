"""Durations as written in config files and on the command line (``15m``, ``24h``, ``7d``)."""

from __future__ import annotations

import re
from datetime import timedelta

from trustmesh.errors import ConfigError

__all__ = ["format_duration", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)([smhdw])")


def parse_duration(value: str, *, field: str = "duration") -> timedelta:
    """Parse a duration such as ``90s``, ``15m``, ``24h``, ``7d`` or ``1h30m``.

    Args:
        value: The text.
        field: What to call the value in error messages (an option name).

    Returns:
        The positive duration.

    Raises:
        ConfigError: The text is not a positive duration.
    """
    text = value.strip().lower()
    pos = 0
    seconds = 0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        seconds += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text) or seconds <= 0:
        raise ConfigError(
            f"Invalid {field} {value!r}: expected a positive duration such as "
            f"'90s', '15m', '24h', '7d' or '1h30m'.",
            field=field,
        )
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """Format a duration compactly, e.g. ``timedelta(hours=36)`` as ``1d12h``."""
    seconds = int(delta.total_seconds())
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
