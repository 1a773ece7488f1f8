"""Hash-chained audit events.

Every event's hash covers its own content and the previous event's hash, so
editing or deleting any event breaks the chain from that point on. The store
keeps the events and a counter of how many were written; :func:`verify_chain`
walks them and reports the first broken link, including events missing at the
end. Pure functions only: the store persists, this module computes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["GENESIS", "AuditEvent", "AuditReport", "event_hash", "verify_chain"]

#: The "previous hash" of the first event.
GENESIS = "0" * 64

#: Detail values are plain JSON scalars or lists of strings.
Detail = str | int | bool | None | list[str]


@dataclass(frozen=True)
class AuditEvent:
    """One recorded action.

    Args:
        seq: Position in the chain, from 1.
        at: Unix time in seconds.
        actor: Who acted (``cli:user@host``, a SPIFFE ID, ...).
        action: ``issue``, ``sign``, ``revoke``, ``crl``, ``export``, ``init``...
        subject: What was acted on (a serial, a SPIFFE ID, a file).
        details: Further facts (profile, reason, not_after, ...).
        prev_hash: The previous event's hash (:data:`GENESIS` for the first).
        hash: This event's hash; empty until computed.
    """

    seq: int
    at: int
    actor: str
    action: str
    subject: str
    details: Mapping[str, Detail] = field(default_factory=dict)
    prev_hash: str = GENESIS
    hash: str = ""

    def canonical(self) -> bytes:
        """Return the bytes the hash covers: canonical JSON without ``hash``."""
        body = {
            "seq": self.seq,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def sealed(self) -> AuditEvent:
        """Return a copy with :attr:`hash` computed."""
        return AuditEvent(
            self.seq,
            self.at,
            self.actor,
            self.action,
            self.subject,
            self.details,
            self.prev_hash,
            event_hash(self),
        )


def event_hash(event: AuditEvent) -> str:
    """Return the SHA-256 hex digest of an event's canonical form."""
    return hashlib.sha256(event.canonical()).hexdigest()


@dataclass(frozen=True)
class AuditReport:
    """The result of checking a chain.

    Attributes:
        ok: True when every link holds and nothing is missing.
        checked: How many events were checked.
        broken_at: Sequence number of the first bad link, if any.
        problem: One line on what is wrong there.
    """

    ok: bool
    checked: int
    broken_at: int | None = None
    problem: str | None = None


def verify_chain(events: Iterable[AuditEvent], *, expected_count: int) -> AuditReport:
    """Check a chain of events in ``seq`` order.

    Args:
        events: The stored events, ordered by ``seq``.
        expected_count: How many events the store says were written (detects
            deletion at the end).

    Returns:
        The report; ``broken_at`` is the first event that was altered, is
        missing, or does not link to its predecessor.
    """
    prev = GENESIS
    expected_seq = 1
    checked = 0
    for event in events:
        if event.seq != expected_seq:
            return AuditReport(
                False,
                checked,
                expected_seq,
                f"event {expected_seq} is missing (next stored event is {event.seq})",
            )
        if event.prev_hash != prev:
            return AuditReport(
                False,
                checked,
                event.seq,
                f"event {event.seq} does not link to event {event.seq - 1}",
            )
        if event_hash(event) != event.hash:
            return AuditReport(
                False,
                checked,
                event.seq,
                f"event {event.seq} ({event.action} {event.subject}) was altered",
            )
        prev = event.hash
        expected_seq += 1
        checked += 1
    if checked < expected_count:
        return AuditReport(
            False,
            checked,
            checked + 1,
            f"events {checked + 1}..{expected_count} are missing from the end",
        )
    return AuditReport(True, checked)
