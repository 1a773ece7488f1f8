"""The CA's own issuers (``ca_issuers``): which root and intermediate sign, which are
published, which are retired; and the ``ca_state`` counter that versions them.

Every change goes through :func:`advance_state` in the same transaction as the rows
and the audit event: a compare-and-set on the counter, so two replicas (or a replica
and the CLI) that both try to move the same rotation on cannot both succeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from trustmesh.errors import ConflictError

from ._schema import ca_issuers, certificates, counters

__all__ = [
    "CA_STATE_COUNTER",
    "IssuerRow",
    "LiveCertificates",
    "advance_state",
    "insert_issuer",
    "live_certificates",
    "load_issuers",
    "read_state",
    "update_issuer",
]

#: The counter that grows with every change of the CA's issuers (the bundle sequence).
CA_STATE_COUNTER = "ca_state"


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def _dt(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(int(value), UTC)


@dataclass(frozen=True)
class IssuerRow:
    """One CA certificate of this CA and its rotation state."""

    ski: str
    role: str
    generation: int
    state: str
    parent: str | None
    certificate_pem: str
    key_ref: str
    prepared_at: datetime
    not_after: datetime
    cross_pem: str | None = None
    key_pem: str | None = field(default=None, repr=False)
    activated_at: datetime | None = None
    superseded_at: datetime | None = None
    retired_at: datetime | None = None


def _row(r: Any) -> IssuerRow:
    return IssuerRow(
        ski=r.ski,
        role=r.role,
        generation=int(r.generation),
        state=r.state,
        parent=r.parent,
        certificate_pem=r.certificate_pem,
        key_ref=r.key_ref,
        prepared_at=datetime.fromtimestamp(int(r.prepared_at), UTC),
        not_after=datetime.fromtimestamp(int(r.not_after), UTC),
        cross_pem=r.cross_pem,
        key_pem=r.key_pem,
        activated_at=_dt(r.activated_at),
        superseded_at=_dt(r.superseded_at),
        retired_at=_dt(r.retired_at),
    )


def load_issuers(conn: Connection) -> list[IssuerRow]:
    """Return every issuer row, oldest generation first (roots before intermediates)."""
    query = select(ca_issuers).order_by(ca_issuers.c.role.desc(), ca_issuers.c.generation)
    return [_row(r) for r in conn.execute(query)]


def insert_issuer(conn: Connection, row: IssuerRow) -> None:
    """Insert an issuer row."""
    conn.execute(
        insert(ca_issuers).values(
            ski=row.ski,
            role=row.role,
            generation=row.generation,
            state=row.state,
            parent=row.parent,
            certificate_pem=row.certificate_pem,
            cross_pem=row.cross_pem,
            key_ref=row.key_ref,
            key_pem=row.key_pem,
            not_after=_ts(row.not_after),
            prepared_at=_ts(row.prepared_at),
            activated_at=_ts(row.activated_at),
            superseded_at=_ts(row.superseded_at),
            retired_at=_ts(row.retired_at),
        )
    )


def update_issuer(conn: Connection, ski: str, **values: object) -> None:
    """Set columns of one issuer row (datetimes are stored as Unix seconds)."""
    stored = {k: _ts(v) if isinstance(v, datetime) else v for k, v in values.items()}
    conn.execute(update(ca_issuers).where(ca_issuers.c.ski == ski).values(**stored))


def read_state(conn: Connection) -> int:
    """Return the ``ca_state`` counter."""
    value = conn.execute(
        select(counters.c.value).where(counters.c.name == CA_STATE_COUNTER)
    ).scalar_one()
    return int(value)


def advance_state(conn: Connection, expected: int) -> int:
    """Move ``ca_state`` from ``expected`` to the next value and return it.

    Raises:
        ConflictError: Someone else changed the CA's issuers since ``expected`` was read.
    """
    done = conn.execute(
        update(counters)
        .where(counters.c.name == CA_STATE_COUNTER)
        .where(counters.c.value == expected)
        .values(value=expected + 1)
    )
    if done.rowcount != 1:
        raise ConflictError(
            "The CA's issuers changed while this step ran (another replica or command "
            "moved the rotation on): run 'trustmesh ca rotate ... status' and retry.",
            reason="ca_state_changed",
        )
    return expected + 1


@dataclass(frozen=True)
class LiveCertificates:
    """Unexpired certificates signed by some issuers."""

    count: int
    last_not_after: datetime | None
    serials: tuple[str, ...] = ()


def live_certificates(
    conn: Connection, issuers: Sequence[str], *, now: datetime, sample: int = 5
) -> LiveCertificates:
    """Count the unexpired certificates (revoked or not) signed by ``issuers``."""
    if not issuers:
        return LiveCertificates(0, None)
    where = (certificates.c.issuer.in_(list(issuers)), certificates.c.not_after > _ts(now))
    count, last = conn.execute(
        select(func.count(), func.max(certificates.c.not_after)).where(*where)
    ).one()
    serials = tuple(
        r[0]
        for r in conn.execute(
            select(certificates.c.serial)
            .where(*where)
            .order_by(certificates.c.not_after.desc())
            .limit(sample)
        )
    )
    return LiveCertificates(int(count), _dt(last), serials)
