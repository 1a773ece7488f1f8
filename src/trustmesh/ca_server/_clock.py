"""Watching for clock skew between the CA and the hosts that enroll and renew.

The only clock of a peer the CA can see is the ``Date`` header of its request (RFC 9110
section 6.6.1); the trustmesh client and agent send one on every call, curl does not.
Join tokens and client certificates carry only times the CA itself wrote, so they say
nothing about the peer's clock. A skew beyond :data:`CLOCK_SKEW_WARNING` is logged at
WARNING (``event`` ``clock_skew``) and shown by ``/readyz`` for :data:`SKEW_MEMORY`.
When the CA is ahead by more than its back-dating, the certificates it issues are not
yet valid at that peer, and the log line says so.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from trustmesh.pki import format_duration

__all__ = ["CLOCK_SKEW_WARNING", "SKEW_MEMORY", "ClockWatch"]

log = logging.getLogger("trustmesh.ca_server")

#: A peer clock this far from the CA's is worth a warning (``Date`` has 1 s resolution,
#: plus the request's transit time).
CLOCK_SKEW_WARNING = timedelta(seconds=30)
#: ``/readyz`` reports the last skew seen for this long.
SKEW_MEMORY = timedelta(minutes=15)


@dataclass(frozen=True)
class _Skew:
    seen: datetime
    peer: str
    route: str
    seconds: int


class ClockWatch:
    """Compares the ``Date`` header of requests with the CA's clock.

    Args:
        backdate: The CA's back-dating of ``notBefore`` (from ``config.toml``).
    """

    def __init__(self, backdate: timedelta) -> None:
        self.backdate = backdate
        self._lock = threading.Lock()
        self._last: _Skew | None = None

    def observe(
        self, date_header: str | None, *, peer: str, route: str, now: datetime | None = None
    ) -> int | None:
        """Check one request's ``Date``; return the skew in seconds (CA minus peer).

        Returns None when there is no usable ``Date`` header. A skew beyond
        :data:`CLOCK_SKEW_WARNING` is logged and remembered for ``/readyz``.
        """
        if not date_header:
            return None
        try:
            sent = parsedate_to_datetime(date_header)
        except (TypeError, ValueError, IndexError):
            return None
        if sent.tzinfo is None:  # "-0000": RFC 5322's unknown zone; HTTP dates are GMT
            sent = sent.replace(tzinfo=UTC)
        current = now or datetime.now(UTC)
        skew = round((current - sent).total_seconds())
        if abs(skew) <= CLOCK_SKEW_WARNING.total_seconds():
            return skew
        with self._lock:
            self._last = _Skew(current, peer, route, skew)
        if skew > self.backdate.total_seconds():
            effect = (
                f"certificates issued to it are not yet valid there for up to "
                f"{skew - int(self.backdate.total_seconds())} s (back-dating is "
                f"{format_duration(self.backdate)})"
            )
        elif skew > 0:
            effect = "the back-dating still covers it"
        else:
            effect = "its certificates expire early by its clock"
        log.warning(
            "clock skew: %s (%s) is %d s %s the CA's clock; %s. Sync both clocks with NTP.",
            peer,
            route,
            abs(skew),
            "behind" if skew > 0 else "ahead of",
            effect,
            extra={"event": "clock_skew", "peer": peer, "route": route, "skew_seconds": skew},
        )
        return skew

    def recent(self, now: datetime | None = None) -> dict[str, Any] | None:
        """The last skew beyond the warning level, if seen within :data:`SKEW_MEMORY`."""
        with self._lock:
            last = self._last
        current = now or datetime.now(UTC)
        if last is None or current - last.seen > SKEW_MEMORY:
            return None
        return {
            "peer": last.peer,
            "route": last.route,
            "skew_seconds": last.seconds,
            "seen": last.seen.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "warning": (
                f"a peer's clock was {abs(last.seconds)} s "
                f"{'behind' if last.seconds > 0 else 'ahead of'} the CA's: sync clocks with NTP"
            ),
        }
