"""Join tokens: random, stored as SHA-256 hashes, bound to an ID pattern, counted, expiring."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, insert, select, update

from ._schema import join_tokens

__all__ = ["JoinToken", "add_join_token", "consume_join_token", "token_hash"]


def token_hash(token: str) -> str:
    """Return the SHA-256 hex digest under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class JoinToken:
    """What the store knows of a token (never the token itself)."""

    token_hash: str
    spiffe_pattern: str
    uses_left: int
    expires_at: datetime
    #: DNS patterns and IP ranges an enrollment may claim as SANs (empty: none).
    dns_patterns: tuple[str, ...] = ()
    ip_ranges: tuple[str, ...] = ()


def add_join_token(
    conn: Connection,
    *,
    token: str,
    spiffe_pattern: str,
    uses: int,
    expires_at: datetime,
    created_at: datetime,
    created_by: str,
    dns_patterns: tuple[str, ...] = (),
    ip_ranges: tuple[str, ...] = (),
) -> JoinToken:
    """Record a new token (hashed) and the SANs it allows."""
    digest = token_hash(token)
    conn.execute(
        insert(join_tokens).values(
            token_hash=digest,
            spiffe_pattern=spiffe_pattern,
            uses_left=uses,
            expires_at=int(expires_at.timestamp()),
            created_at=int(created_at.timestamp()),
            created_by=created_by,
            dns_patterns=",".join(dns_patterns),
            ip_ranges=",".join(ip_ranges),
        )
    )
    return JoinToken(digest, spiffe_pattern, uses, expires_at, dns_patterns, ip_ranges)


def consume_join_token(conn: Connection, token: str, *, now: datetime) -> JoinToken | str:
    """Use up one use of a token inside the caller's transaction.

    The decrement is a single conditional ``UPDATE``, so two concurrent
    enrollments can never both spend a token's last use. When the caller's
    transaction rolls back (the enrollment failed), the use is given back.

    Returns:
        The token as it was before this use, or a reason it cannot be used:
        ``unknown``, ``used`` or ``expired``.
    """
    digest = token_hash(token)
    row = conn.execute(select(join_tokens).where(join_tokens.c.token_hash == digest)).first()
    if row is None:
        return "unknown"
    if row.expires_at <= int(now.timestamp()):
        return "expired"
    result = conn.execute(
        update(join_tokens)
        .where(join_tokens.c.token_hash == digest)
        .where(join_tokens.c.uses_left > 0)
        .values(uses_left=join_tokens.c.uses_left - 1)
    )
    if result.rowcount != 1:
        return "used"
    return JoinToken(
        digest,
        row.spiffe_pattern,
        int(row.uses_left),
        datetime.fromtimestamp(row.expires_at, UTC),
        tuple(filter(None, row.dns_patterns.split(","))),
        tuple(filter(None, row.ip_ranges.split(","))),
    )
