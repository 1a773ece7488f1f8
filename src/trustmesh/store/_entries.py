"""Registration entries: which SPIFFE ID a node may hand to which local workloads.

An entry names the node (its own SPIFFE ID) whose agent holds the identity, and the
selectors (``unix:uid:1001``...) a caller of that agent must all match to receive it.
Selectors are kept as a JSON list, DNS names comma-separated, times in Unix seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from ._schema import registration_entries

__all__ = [
    "RegistrationEntry",
    "add_entry",
    "delete_entry",
    "find_entries",
    "get_entry",
]


@dataclass(frozen=True)
class RegistrationEntry:
    """One registration entry.

    Attributes:
        entry_id: Random UUID naming the entry.
        spiffe_id: The identity handed out.
        node_id: The SPIFFE ID of the node agent that may obtain it.
        selectors: ``type:key:value`` strings, all of which a caller must match.
        dns: DNS SANs put in each SVID.
        ttl: SVID lifetime in seconds (None: the profile's default).

    .. versionadded:: 0.1
    """

    entry_id: str
    spiffe_id: str
    node_id: str
    selectors: tuple[str, ...]
    dns: tuple[str, ...]
    ttl: int | None
    created_at: datetime
    created_by: str

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready mapping (times as RFC 3339)."""
        return {
            "entry_id": self.entry_id,
            "spiffe_id": self.spiffe_id,
            "node_id": self.node_id,
            "selectors": list(self.selectors),
            "dns": list(self.dns),
            "ttl": self.ttl,
            "created_at": self.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "created_by": self.created_by,
        }


def _entry(row: Any) -> RegistrationEntry:
    return RegistrationEntry(
        entry_id=row.entry_id,
        spiffe_id=row.spiffe_id,
        node_id=row.node_id,
        selectors=tuple(json.loads(row.selectors)),
        dns=tuple(filter(None, row.dns.split(","))),
        ttl=None if row.ttl is None else int(row.ttl),
        created_at=datetime.fromtimestamp(int(row.created_at), UTC),
        created_by=row.created_by,
    )


def add_entry(conn: Connection, entry: RegistrationEntry) -> None:
    """Insert an entry inside the caller's transaction."""
    conn.execute(
        insert(registration_entries).values(
            entry_id=entry.entry_id,
            spiffe_id=entry.spiffe_id,
            node_id=entry.node_id,
            selectors=json.dumps(list(entry.selectors)),
            dns=",".join(entry.dns),
            ttl=entry.ttl,
            created_at=int(entry.created_at.timestamp()),
            created_by=entry.created_by,
        )
    )


def get_entry(conn: Connection, entry_id: str) -> RegistrationEntry | None:
    """Return the entry with this id, or None."""
    row = conn.execute(
        select(registration_entries).where(registration_entries.c.entry_id == entry_id)
    ).first()
    return None if row is None else _entry(row)


def find_entries(
    conn: Connection, *, node_id: str | None = None, spiffe_id: str | None = None
) -> list[RegistrationEntry]:
    """Return entries matching the filters, oldest first."""
    query = select(registration_entries).order_by(
        registration_entries.c.created_at, registration_entries.c.entry_id
    )
    if node_id is not None:
        query = query.where(registration_entries.c.node_id == node_id)
    if spiffe_id is not None:
        query = query.where(registration_entries.c.spiffe_id == spiffe_id)
    return [_entry(row) for row in conn.execute(query)]


def delete_entry(conn: Connection, entry_id: str) -> bool:
    """Delete an entry; return whether it existed."""
    result = conn.execute(
        delete(registration_entries).where(registration_entries.c.entry_id == entry_id)
    )
    return bool(result.rowcount)
