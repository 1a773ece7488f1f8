"""Workload selectors of registration entries: ``unix:uid:1001``, ``unix:path:/usr/bin/app``.

A selector is ``TYPE:KEY:VALUE``. The node agent derives a caller's selectors from the
kernel (the Unix socket peer's credentials and ``/proc``), never from what the caller
says; an entry applies to a caller whose selectors include every one of the entry's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from trustmesh.errors import ConfigError

__all__ = ["SELECTOR_KEYS", "Selector", "parse_selector", "selectors_match"]

#: Every selector the node agent can attest, with what its value is.
SELECTOR_KEYS: dict[str, str] = {
    "unix:uid": "the caller's user id (a number), from SO_PEERCRED",
    "unix:gid": "the caller's primary group id (a number), from SO_PEERCRED",
    "unix:path": "the absolute path of the caller's executable (/proc/PID/exe)",
    "unix:sha256": "the SHA-256 (64 lower-case hex digits) of the caller's executable",
}
_ID_MAX = 2**32 - 2  # (uid_t)-1 means "no id"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _fail(text: str, problem: str) -> ConfigError:
    kinds = ", ".join(f"{k}:..." for k in SELECTOR_KEYS)
    return ConfigError(
        f"Selector {text!r} {problem}: use one of {kinds}, e.g. --selector unix:uid:1001.",
        field="selector",
    )


@dataclass(frozen=True, order=True, slots=True)
class Selector:
    """One ``TYPE:KEY:VALUE`` selector (build it with :func:`parse_selector`).

    .. versionadded:: 0.1
    """

    type: str
    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.type}:{self.key}:{self.value}"


def parse_selector(text: str) -> Selector:
    """Parse and validate a selector such as ``unix:uid:1001``.

    Raises:
        ConfigError: Unknown type or key, or a value of the wrong form.

    .. versionadded:: 0.1
    """
    parts = text.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise _fail(text, "is not TYPE:KEY:VALUE")
    kind, key, value = parts
    if f"{kind}:{key}" not in SELECTOR_KEYS:
        raise _fail(text, f"has an unknown type {kind + ':' + key!r}")
    if key in ("uid", "gid"):
        if not value.isdigit() or not value.isascii() or int(value) > _ID_MAX:
            raise _fail(text, f"needs a numeric {key} (0 to {_ID_MAX}), got {value!r}")
        value = str(int(value))
    elif key == "path":
        if not value.startswith("/") or "\x00" in value:
            raise _fail(text, f"needs an absolute path, got {value!r}")
    elif not _HEX64.fullmatch(value.lower()):
        raise _fail(text, "needs 64 hex digits (sha256sum of the executable)")
    else:
        value = value.lower()
    return Selector(kind, key, value)


def selectors_match(required: Iterable[Selector | str], have: Iterable[Selector | str]) -> bool:
    """Return True when every selector in ``required`` (non-empty) is among ``have``.

    .. versionadded:: 0.1
    """
    needed = {str(s) for s in required}
    return bool(needed) and needed <= {str(s) for s in have}
