"""Writing files atomically, with the right permissions from the start."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from trustmesh.errors import ConfigError

__all__ = ["atomic_write", "stage_file"]


def stage_file(path: Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to a temporary file next to ``path`` and return its name.

    The caller renames it into place with :func:`os.replace` (or deletes it):
    this lets several files be prepared before any of them becomes visible.

    Raises:
        ConfigError: The directory does not exist or is not writable.
    """
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ConfigError(
            f"Cannot write {path}: {exc.strerror}. Check that {directory} exists and is writable.",
            path=str(path),
        ) from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write a file so readers see either the old or the new content, never half.

    Args:
        path: Destination.
        data: Content.
        mode: Permission bits, set before any byte is written (0o600 for keys).
    """
    tmp = stage_file(path, data, mode=mode)
    os.replace(tmp, path)
