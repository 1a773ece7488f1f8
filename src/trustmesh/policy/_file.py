"""A policy file that follows its changes on disk without a restart."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from ._model import Decision, PolicyConfigError, PolicyRequest
from ._policy import Policy

__all__ = ["DEFAULT_CHECK_INTERVAL", "PolicyFile"]

log = logging.getLogger("trustmesh.policy")

#: Seconds between two looks at the file's metadata.
DEFAULT_CHECK_INTERVAL = 1.0

# What identifies one version of the file: replaced (new inode), rewritten in
# place (mtime, ctime, size), or missing (the errno).
_Signature = tuple[int, int, int, int, int]


def _signature(path: Path) -> _Signature:
    st = os.stat(path)
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class PolicyFile:
    """A :class:`Policy` loaded from a file and reloaded when the file changes.

    :meth:`evaluate` looks at the file's metadata (one ``stat``) at most every
    ``check_interval`` seconds and reloads when it changed. A file that fails to
    load (bad YAML, a bad rule, missing) leaves the previous policy in force and
    logs an error naming the file and the problem, once per change;
    :attr:`last_error` keeps it until a good version loads. Safe to share
    between threads: one thread reloads while the others keep deciding with the
    current policy.

    Args:
        path: The YAML file.
        check_interval: Seconds between checks (0 checks on every call).

    Raises:
        PolicyConfigError: The file does not load the first time (a service
            must not start without its policy).

    .. versionadded:: 0.1
    """

    def __init__(
        self, path: str | os.PathLike[str], *, check_interval: float = DEFAULT_CHECK_INTERVAL
    ) -> None:
        if check_interval < 0:
            raise ValueError("check_interval must be >= 0")
        self.path = Path(path)
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._signature: _Signature | None = self._stat()
        self._policy = Policy.load(self.path)
        self.generation = 1
        self.last_error: PolicyConfigError | None = None
        self._next_check = time.monotonic() + check_interval

    def __repr__(self) -> str:
        return f"<PolicyFile {self.path} generation={self.generation}>"

    @property
    def policy(self) -> Policy:
        """The policy in force (checks the file first when a check is due)."""
        self._maybe_reload()
        return self._policy

    @property
    def mode(self) -> str:
        """The mode of the policy in force."""
        return self._policy.mode

    def evaluate(self, request: PolicyRequest) -> Decision:
        """Decide with the current policy, reloading it first if the file changed.

        Args:
            request: The request.

        Returns:
            The decision (see :meth:`Policy.evaluate`).
        """
        if time.monotonic() >= self._next_check:
            self._maybe_reload()
        return self._policy.evaluate(request)

    def reload(self) -> bool:
        """Load the file now, whether or not it changed (e.g. on SIGHUP).

        Returns:
            True when the new version is in force; False when it failed (the old
            policy stays, :attr:`last_error` says why, an error is logged).
        """
        with self._lock:
            self._next_check = time.monotonic() + self.check_interval
            return self._load(self._stat_or_none())

    def _maybe_reload(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another thread is checking; keep deciding with the current policy
        try:
            if time.monotonic() < self._next_check:
                return
            self._next_check = time.monotonic() + self.check_interval
            signature = self._stat_or_none()
            if signature != self._signature:
                self._load(signature)
        finally:
            self._lock.release()

    def _stat(self) -> _Signature:
        try:
            return _signature(self.path)
        except OSError as exc:
            raise PolicyConfigError(
                f"Cannot read policy file {self.path}: {exc.strerror or exc}. "
                f"Check the path and its permissions.",
                path=str(self.path),
            ) from None

    def _stat_or_none(self) -> _Signature | None:
        try:
            return self._stat()
        except PolicyConfigError:
            return None

    def _load(self, signature: _Signature | None) -> bool:
        # Remember the version even when it fails, so a broken file is reported
        # once, not every second; the next change is tried again.
        self._signature = signature
        try:
            policy = Policy.load(self.path)
        except PolicyConfigError as exc:
            self.last_error = exc
            log.error(
                "policy %s not reloaded, keeping generation %d: %s",
                self.path,
                self.generation,
                exc.message,
                extra={"policy_file": str(self.path), "generation": self.generation},
            )
            return False
        self._policy = policy
        self.generation += 1
        self.last_error = None
        log.info(
            "policy %s reloaded: generation %d, %d rules, mode %s",
            self.path,
            self.generation,
            len(policy.rules),
            policy.mode,
            extra={"policy_file": str(self.path), "generation": self.generation},
        )
        return True
