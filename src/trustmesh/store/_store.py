"""The certificate and audit store: SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any, NamedTuple

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    NoResultFound,
    OperationalError,
    SQLAlchemyError,
)

from trustmesh.audit import GENESIS, AuditEvent
from trustmesh.errors import ConfigError, ConflictError, NotFoundError, StoreError

from ._schema import audit_events, certificates, counters

__all__ = [
    "REVOCATION_CHANNEL",
    "CertificateRecord",
    "RevocationEvent",
    "Store",
    "normalize_url",
    "open_store",
]


#: Connections each store keeps open for reuse (``ca serve`` runs this many threads).
POOL_SIZE = 16


# The issuance hot path (add_certificate, next_counter, append_audit) runs these on
# the driver's cursor (see _execute): building, compiling and executing Core
# statements cost several times more than the database work itself (see
# bench/issuance.py and bench/RESULTS.md). Table and column names match
# _schema.py. Written with SQLite's "?" placeholders.
@dataclass(frozen=True)
class _HotSQL:
    insert_certificate: str
    next_counter: str
    audit_hash: str
    insert_audit: str
    select_certificate: str

    def for_postgresql(self) -> _HotSQL:
        """psycopg placeholders; a duplicate serial returns no row instead of aborting
        the transaction (what a savepoint around a plain INSERT did, in one round trip).
        """
        return _HotSQL(
            insert_certificate=self.insert_certificate.replace("?", "%s")
            + " ON CONFLICT (issuer, serial) DO NOTHING RETURNING id",
            next_counter=self.next_counter.replace("?", "%s"),
            audit_hash=self.audit_hash.replace("?", "%s"),
            insert_audit=self.insert_audit.replace("?", "%s"),
            select_certificate=self.select_certificate.replace("?", "%s"),
        )


_SQLITE_SQL = _HotSQL(
    insert_certificate=(
        "INSERT INTO certificates (issuer, serial, spiffe_id, dns, ips, profile, key_type, "
        "fingerprint, not_before, not_after, issued_at, pem, allowed_dns, allowed_ips) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    next_counter="UPDATE counters SET value = value + 1 WHERE name = ? RETURNING value",
    audit_hash="SELECT hash FROM audit_events WHERE seq = ?",
    insert_audit=(
        "INSERT INTO audit_events (seq, at, actor, action, subject, details, prev_hash, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    # What get_certificate selects (ix_certificates_serial), in _CERTIFICATE_COLUMNS order.
    select_certificate=(
        "SELECT issuer, serial, spiffe_id, dns, ips, profile, key_type, fingerprint, "
        "not_before, not_after, issued_at, pem, revoked_at, revocation_reason, "
        "allowed_dns, allowed_ips FROM certificates WHERE serial = ? ORDER BY id DESC LIMIT 1"
    ),
)
_HOT_SQL = {"sqlite": _SQLITE_SQL, "postgresql": _SQLITE_SQL.for_postgresql()}


def _execute(conn: Connection, sql: str, params: tuple[Any, ...]) -> Any:
    """Run one hot-path statement on ``conn``'s driver cursor and return the cursor.

    The statement runs in the connection's transaction (begun here if none is).
    Driver errors are raised as the SQLAlchemy exceptions ``conn.execute`` would
    raise (``IntegrityError``, ``OperationalError``, ...), so callers and
    :meth:`Store.transaction` handle them the same way.
    """
    if not conn.in_transaction():
        conn.begin()  # what conn.execute would do (autobegin; BEGIN IMMEDIATE on SQLite)
    dbapi_error = conn.dialect.loaded_dbapi.Error
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, params)
    except dbapi_error as exc:
        cursor.close()
        raise DBAPIError.instance(sql, params, exc, dbapi_error, dialect=conn.dialect) from exc
    return cursor


def _execute_one(conn: Connection, sql: str, params: tuple[Any, ...]) -> Any:
    """Run a statement returning at most one row; return that row (or None)."""
    cursor = _execute(conn, sql, params)
    try:
        rows = cursor.fetchall()
    finally:
        cursor.close()
    return rows[0] if rows else None


def _ts(value: datetime) -> int:
    return int(value.timestamp())


def _dt(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True)
class CertificateRecord:
    """One certificate as the store knows it.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``allowed_dns`` and ``allowed_ips``: the SANs its renewals may claim.
    """

    issuer: str
    serial: str
    spiffe_id: str
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    profile: str
    key_type: str
    fingerprint: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    pem: str
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    #: DNS patterns and IP ranges renewals of this certificate may claim.
    allowed_dns: tuple[str, ...] = ()
    allowed_ips: tuple[str, ...] = ()

    def status(self, now: datetime | None = None) -> str:
        """Return ``revoked``, ``expired`` or ``valid``."""
        if self.revoked_at is not None:
            return "revoked"
        if (now or datetime.now(UTC)) > self.not_after:
            return "expired"
        return "valid"

    def to_json(self, now: datetime | None = None) -> dict[str, Any]:
        """Return a JSON-ready mapping (times as RFC 3339)."""

        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")

        return {
            "serial": self.serial,
            "spiffe_id": self.spiffe_id,
            "status": self.status(now),
            "dns": list(self.dns),
            "ips": list(self.ips),
            "profile": self.profile,
            "key_type": self.key_type,
            "fingerprint": self.fingerprint,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "issued_at": iso(self.issued_at),
            "revoked_at": iso(self.revoked_at),
            "revocation_reason": self.revocation_reason,
            "issuer": self.issuer,
            "allowed_dns": list(self.allowed_dns),
            "allowed_ips": list(self.allowed_ips),
        }


#: PostgreSQL NOTIFY channel carrying the cursor of each new revocation.
REVOCATION_CHANNEL = "trustmesh_revocations"


@dataclass(frozen=True)
class RevocationEvent:
    """One entry of the revocation feed; ``cursor`` increases monotonically."""

    cursor: int
    serial: str
    spiffe_id: str
    reason: str
    revoked_at: datetime

    def to_json(self) -> dict[str, Any]:
        """Return the feed's JSON form."""
        return {
            "cursor": self.cursor,
            "serial": self.serial,
            "spiffe_id": self.spiffe_id,
            "reason": self.reason,
            "revoked_at": self.revoked_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def _certificate_filters(
    spiffe_id: str | None,
    revoked: bool | None,
    expiring_before: datetime | None,
    valid_at: datetime | None,
) -> list[ColumnElement[bool]]:
    """The WHERE clauses shared by find_certificates and count_certificates."""
    clauses: list[ColumnElement[bool]] = []
    if spiffe_id is not None:
        clauses.append(certificates.c.spiffe_id == spiffe_id)
    if revoked is True:
        clauses.append(certificates.c.revoked_at.is_not(None))
    elif revoked is False:
        clauses.append(certificates.c.revoked_at.is_(None))
    if expiring_before is not None:
        clauses.append(certificates.c.not_after < _ts(expiring_before))
    if valid_at is not None:
        clauses.append(certificates.c.not_after >= _ts(valid_at))
    return clauses


class _CertificateRow(NamedTuple):
    """The columns of :attr:`_HotSQL.select_certificate`, by name (as a Core row has)."""

    issuer: str
    serial: str
    spiffe_id: str
    dns: str
    ips: str
    profile: str
    key_type: str
    fingerprint: str
    not_before: int
    not_after: int
    issued_at: int
    pem: str
    revoked_at: int | None
    revocation_reason: str | None
    allowed_dns: str
    allowed_ips: str


def _record(row: Any) -> CertificateRecord:
    return CertificateRecord(
        issuer=row.issuer,
        serial=row.serial,
        spiffe_id=row.spiffe_id,
        dns=tuple(filter(None, row.dns.split(","))),
        ips=tuple(filter(None, row.ips.split(","))),
        profile=row.profile,
        key_type=row.key_type,
        fingerprint=row.fingerprint,
        not_before=_dt(row.not_before) or datetime.min,
        not_after=_dt(row.not_after) or datetime.min,
        issued_at=_dt(row.issued_at) or datetime.min,
        pem=row.pem,
        revoked_at=_dt(row.revoked_at),
        revocation_reason=row.revocation_reason,
        allowed_dns=tuple(filter(None, row.allowed_dns.split(","))),
        allowed_ips=tuple(filter(None, row.allowed_ips.split(","))),
    )


def normalize_url(url: str) -> str:
    """Map ``postgresql://`` and ``postgres://`` to the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"


def _migration_config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option(
        "script_location", str(resources.files("trustmesh.store").joinpath("migrations"))
    )
    cfg.attributes["connection"] = connection
    return cfg


#: At most this many records go into one group commit.
_MAX_GROUP = 64


@dataclass
class _Pending:
    """One record waiting for a group commit, and what became of it."""

    record: CertificateRecord
    audit: dict[str, Any]
    done: bool = False
    event: AuditEvent | None = None
    error: BaseException | None = None
    #: Held until this item's thread is woken (its record committed, or its turn to
    #: lead): one wake-up per waiter, not every waiter on every commit.
    wake: Any = field(default_factory=threading.Lock)


class _Depth(threading.local):
    """Whether this thread is inside a write transaction already (nested: no relock)."""

    value = 0


class Store:
    """Certificates, counters and audit events in one database.

    Open one with :func:`open_store`. Writes happen inside :meth:`transaction`,
    which on SQLite takes the write lock at ``BEGIN`` (so read-then-write
    sequences such as appending to the audit chain are serialized) and on
    PostgreSQL relies on row locks of the ``counters`` table.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        self.dialect = engine.dialect.name
        self._lock = threading.Lock()
        # SQLite has one writer at a time, and a writer that finds the database locked
        # sleeps in SQLite's busy handler (1, 2, 5 ... 100 ms steps) before it tries
        # again: under concurrent writes that, not the work, sets the latency. So
        # writers queue here instead: one thread of this process at a time, and one
        # process at a time by flock() on a file beside the database, which wakes the
        # next writer as soon as the lock is released. BEGIN IMMEDIATE and busy_timeout
        # stay for writers that do not take it.
        self._write_lock = threading.Lock()
        self._write_depth = _Depth()
        self._group = threading.Lock()
        self._waiting: list[_Pending] = []
        self._leading = False
        database = engine.url.database if self.dialect == "sqlite" else None
        self._lock_path = f"{database}.writelock" if database and database != ":memory:" else None
        self._lock_fd: int | None = None
        self._lock_pid = 0

    def _file_lock(self) -> int | None:
        """The open lock file (reopened in a forked child: flock locks are per open file);
        None where it cannot be opened (a read-only home: BEGIN IMMEDIATE still holds)."""
        if self._lock_path is None:
            return None
        if self._lock_fd is None or self._lock_pid != os.getpid():
            try:
                self._lock_fd = os.open(
                    self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            except OSError:
                self._lock_path = None
                return None
            self._lock_pid = os.getpid()
        return self._lock_fd

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        if self.dialect != "sqlite" or self._write_depth.value:
            yield
            return
        with self._write_lock:
            fd = self._file_lock()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._write_depth.value = 1
            try:
                yield
            finally:
                self._write_depth.value = 0
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Release all connections."""
        self.engine.dispose()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A connection for reads; database failures become :class:`StoreError`."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(
                f"The database at {self.url} failed: {getattr(exc, 'orig', exc)}"
            ) from exc

    def reader(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection for reads only (no write lock on SQLite); failures become StoreError."""
        return self._connect()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """Run a block in one transaction; commit on success, roll back on error.

        Raises:
            StoreError: The database failed.
        """
        try:
            with self._writer(), self.engine.begin() as conn:
                yield conn
        except IntegrityError as exc:
            raise ConflictError(
                f"The database refused a duplicate record: {exc.orig}", reason="duplicate"
            ) from exc
        except SQLAlchemyError as exc:
            raise StoreError(
                f"The database at {self.url} failed: {getattr(exc, 'orig', exc)}"
            ) from exc

    # -- counters -------------------------------------------------------------------

    def next_counter(self, conn: Connection, name: str) -> int:
        """Increment a counter and return its new value (row-locked until commit)."""
        row = _execute_one(conn, _HOT_SQL[self.dialect].next_counter, (name,))
        if row is None:
            raise NoResultFound("No row was found when one was required")  # as scalar_one()
        return int(row[0])

    def counter(self, name: str) -> int:
        """Return a counter's current value."""
        with self._connect() as conn:
            return int(
                conn.execute(select(counters.c.value).where(counters.c.name == name)).scalar_one()
            )

    # -- certificates ---------------------------------------------------------------

    def add_certificate(self, conn: Connection, record: CertificateRecord) -> None:
        """Insert a certificate record.

        Raises:
            ConflictError: (on commit) the issuer already has this serial.
        """
        sql = _HOT_SQL[self.dialect].insert_certificate
        params = (
            record.issuer,
            record.serial,
            record.spiffe_id,
            ",".join(record.dns),
            ",".join(record.ips),
            record.profile,
            record.key_type,
            record.fingerprint,
            _ts(record.not_before),
            _ts(record.not_after),
            _ts(record.issued_at),
            record.pem,
            ",".join(record.allowed_dns),
            ",".join(record.allowed_ips),
        )
        try:
            cursor = _execute(conn, sql, params)
        except IntegrityError as exc:
            raise self._duplicate(record) from exc
        try:
            # PostgreSQL's ON CONFLICT DO NOTHING RETURNING gives no row for a duplicate.
            inserted = cursor.fetchone() is not None if self.dialect == "postgresql" else True
        finally:
            cursor.close()
        if not inserted:
            raise self._duplicate(record)

    @staticmethod
    def _duplicate(record: CertificateRecord) -> ConflictError:
        return ConflictError(
            f"Serial {record.serial} already exists for issuer {record.issuer}.",
            serial=record.serial,
            reason="duplicate_serial",
        )

    def get_certificate(self, serial: str, conn: Connection | None = None) -> CertificateRecord:
        """Return the certificate with this serial (any issuer; newest first).

        Raises:
            NotFoundError: No such serial.
        """
        query = (
            select(certificates)
            .where(certificates.c.serial == serial.lower().lstrip("0"))
            .order_by(certificates.c.id.desc())
            .limit(1)
        )
        with contextlib.ExitStack() as stack:
            c = conn or stack.enter_context(self._connect())
            row = c.execute(query).first()
        if row is None:
            raise NotFoundError(
                f"No certificate with serial {serial} was issued by this CA; check it with "
                f"'trustmesh list'.",
                serial=serial,
            )
        return _record(row)

    def lookup_certificate(self, serial: str) -> CertificateRecord | None:
        """Return the certificate with this serial (newest first), or None: what
        :meth:`get_certificate` returns, on the driver's cursor of a pooled connection.

        The hot path of every mTLS request (the caller's revocation status, the
        renewed record): a Core SELECT through ``Connection.execute`` costs several
        times the lookup itself (bench/RESULTS.md, issue 18). Outside any transaction:
        it never takes SQLite's write lock.

        Raises:
            StoreError: The database failed.
        """
        sql = _HOT_SQL[self.dialect].select_certificate
        try:
            dbapi_conn = self.engine.raw_connection()
        except (SQLAlchemyError, self.engine.dialect.loaded_dbapi.Error) as exc:
            # The pool hands the driver's own error through when a new connection fails
            # (PostgreSQL down): both are a failed database, 503 at the API.
            raise StoreError(
                f"The database at {self.url} failed: {getattr(exc, 'orig', exc)}"
            ) from exc
        try:
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute(sql, (serial.lower().lstrip("0"),))
                row = cursor.fetchone()
            finally:
                cursor.close()
            if self.dialect == "postgresql":
                dbapi_conn.commit()  # end the read's transaction here, not at check-in
        except self.engine.dialect.loaded_dbapi.Error as exc:
            dbapi_conn.invalidate(exc)
            raise StoreError(f"The database at {self.url} failed: {exc}") from exc
        finally:
            dbapi_conn.close()
        return None if row is None else _record(_CertificateRow._make(row))

    def find_certificates(
        self,
        *,
        spiffe_id: str | None = None,
        revoked: bool | None = None,
        expiring_before: datetime | None = None,
        valid_at: datetime | None = None,
        limit: int | None = None,
    ) -> list[CertificateRecord]:
        """Return certificates matching all given filters, newest first.

        Args:
            spiffe_id: Exact SPIFFE ID.
            revoked: Only revoked (True) or only unrevoked (False).
            expiring_before: ``not_after`` earlier than this.
            valid_at: Not expired at this time.
            limit: At most this many.
        """
        query = select(certificates).order_by(certificates.c.id.desc())
        query = query.where(*_certificate_filters(spiffe_id, revoked, expiring_before, valid_at))
        if limit is not None:
            query = query.limit(limit)
        with self._connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def iter_certificates(self, batch: int = 5000) -> Iterator[CertificateRecord]:
        """Yield every certificate, newest first, without loading all at once."""
        with self._connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=batch).execute(
                select(certificates).order_by(certificates.c.id.desc())
            )
            for row in result:
                yield _record(row)

    def mark_revoked(
        self, conn: Connection, serial: str, *, at: datetime, reason: str
    ) -> CertificateRecord:
        """Mark a certificate revoked (idempotent: a second call changes nothing).

        Raises:
            NotFoundError: No such serial.
        """
        record = self.get_certificate(serial, conn)
        if record.revoked_at is None:
            conn.execute(
                update(certificates)
                .where(certificates.c.issuer == record.issuer)
                .where(certificates.c.serial == record.serial)
                .values(revoked_at=_ts(at), revocation_reason=reason)
            )
        return self.get_certificate(serial, conn)

    def revoked_entries(
        self, *, now: datetime, issuer: str | None = None
    ) -> list[tuple[str, int, str]]:
        """Return ``(serial_hex, revoked_at, reason)`` of revoked, unexpired certificates
        (of one issuer, by SKI hex, when ``issuer`` is given)."""
        query = (
            select(
                certificates.c.serial,
                certificates.c.revoked_at,
                certificates.c.revocation_reason,
            )
            .where(certificates.c.revoked_at.is_not(None))
            .where(certificates.c.not_after >= _ts(now))
        )
        if issuer is not None:
            query = query.where(certificates.c.issuer == issuer)
        with self._connect() as conn:
            return [(r[0], int(r[1]), r[2] or "unspecified") for r in conn.execute(query)]

    def revocation_state(self) -> tuple[int, int]:
        """Return ``(number of revoked certificates, latest revocation time)``.

        Cheap to poll: it changes whenever anything is revoked, so a cached CRL
        can be reused while it stays the same.
        """
        query = select(func.count(), func.coalesce(func.max(certificates.c.revoked_at), 0)).where(
            certificates.c.revoked_at.is_not(None)
        )
        with self._connect() as conn:
            count, latest = conn.execute(query).one()
        return int(count), int(latest)

    def count_certificates(
        self,
        *,
        spiffe_id: str | None = None,
        revoked: bool | None = None,
        expiring_before: datetime | None = None,
        valid_at: datetime | None = None,
    ) -> int:
        """Return how many certificates are recorded, or match the filters (which
        mean what they mean for :meth:`find_certificates`, so a cut list can say its
        total)."""
        query = (
            select(func.count())
            .select_from(certificates)
            .where(*_certificate_filters(spiffe_id, revoked, expiring_before, valid_at))
        )
        with self._connect() as conn:
            return int(conn.execute(query).scalar_one())

    def record_issued(
        self,
        record: CertificateRecord,
        *,
        at: datetime,
        actor: str,
        action: str,
        details: dict[str, Any],
    ) -> AuditEvent:
        """Insert a certificate record and its audit event (subject: the serial), durably,
        committed together with the other threads' records that arrive meanwhile.

        Group commit: the first thread in leads, taking every record waiting, in one
        transaction; threads arriving while it commits wait, and the first of them leads
        the next. Each caller returns only after the transaction holding its own record
        and event has committed. The events are appended to the hash chain in the order
        they are written, under the same lock as every other write (one chain across
        processes). A transaction that fails is retried one record at a time, so one bad
        record (a duplicate serial) fails only its own caller.

        Raises:
            ConflictError: The issuer already has this serial.
            StoreError: The database failed.

        .. versionadded:: 0.3
        """
        item = _Pending(record, {"at": at, "actor": actor, "action": action, "details": details})
        item.wake.acquire()
        with self._group:
            self._waiting.append(item)
            lead = not self._leading
            self._leading = True
        if not lead:
            item.wake.acquire()  # released once: committed, or this thread leads next
        while not item.done:
            with self._group:
                batch, self._waiting = self._waiting[:_MAX_GROUP], self._waiting[_MAX_GROUP:]
            successor = None
            try:
                self._commit_group(batch)
            finally:
                for other in batch:
                    if other is not item:
                        other.wake.release()
                if item.done:
                    with self._group:
                        if self._waiting:
                            successor = self._waiting[0]  # stays leading: it takes over
                        else:
                            self._leading = False
                    if successor is not None:
                        successor.wake.release()
        if item.error is not None:
            raise item.error
        assert item.event is not None  # noqa: S101 - set with done when error is None
        return item.event

    def _commit_group(self, batch: list[_Pending]) -> None:
        """Commit ``batch`` in one transaction, or each alone if that fails; mark all done."""
        try:
            try:
                events = self._write_group(batch)
            except (ConflictError, StoreError):
                if len(batch) == 1:
                    raise
                for item in batch:
                    self._commit_group([item])
                return
            for item, event in zip(batch, events, strict=True):
                item.event = event
        except BaseException as exc:  # every waiter must hear, whatever happened
            for item in batch:
                if not item.done:
                    item.error = exc
                    item.done = True
            if not isinstance(exc, Exception):
                raise
            return
        for item in batch:
            item.done = True

    def _write_group(self, batch: list[_Pending]) -> list[AuditEvent]:
        with self.transaction() as conn:
            events = []
            for item in batch:
                self.add_certificate(conn, item.record)
                events.append(self.append_audit(conn, subject=item.record.serial, **item.audit))
            return events

    # -- audit ----------------------------------------------------------------------

    def append_audit(
        self,
        conn: Connection,
        *,
        at: datetime,
        actor: str,
        action: str,
        subject: str,
        details: dict[str, Any] | None = None,
    ) -> AuditEvent:
        """Append an event to the hash chain inside the caller's transaction."""
        sql = _HOT_SQL[self.dialect]
        seq = self.next_counter(conn, "audit_seq")
        prev = GENESIS
        if seq > 1:
            prev_row = _execute_one(conn, sql.audit_hash, (seq - 1,))
            prev = (prev_row[0] if prev_row else None) or GENESIS
        sealed = AuditEvent(
            seq=seq,
            at=_ts(at),
            actor=actor,
            action=action,
            subject=subject,
            details=dict(details or {}),
            prev_hash=prev,
        ).sealed()
        _execute(
            conn,
            sql.insert_audit,
            (
                sealed.seq,
                sealed.at,
                sealed.actor,
                sealed.action,
                sealed.subject,
                json.dumps(dict(sealed.details), sort_keys=True),
                sealed.prev_hash,
                sealed.hash,
            ),
        ).close()
        return sealed

    def notify_revocation(self, conn: Connection, cursor: int) -> None:
        """Tell listeners on other connections (other replicas) at commit time.

        PostgreSQL only (``NOTIFY`` on :data:`REVOCATION_CHANNEL`); SQLite
        subscribers poll :meth:`latest_revocation_cursor`.
        """
        if self.dialect == "postgresql":
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": REVOCATION_CHANNEL, "payload": str(cursor)},
            )

    def notify_bundle(self, conn: Connection, sequence: int) -> None:
        """Tell ``ca serve`` replicas at commit that the CA's issuers changed (PostgreSQL
        ``NOTIFY`` with payload ``bundle:SEQUENCE``; SQLite replicas poll the counter)."""
        if self.dialect == "postgresql":
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": REVOCATION_CHANNEL, "payload": f"bundle:{sequence}"},
            )

    def revocation_events(self, *, since: int, limit: int = 1000) -> list[RevocationEvent]:
        """Return revocations recorded after audit sequence ``since``, oldest first."""
        query = (
            select(
                audit_events.c.seq,
                audit_events.c.at,
                audit_events.c.subject,
                audit_events.c.details,
            )
            .where(audit_events.c.action == "revoke")
            .where(audit_events.c.seq > since)
            .order_by(audit_events.c.seq)
            .limit(limit)
        )
        with self._connect() as conn:
            events = []
            for seq, at, serial, details in conn.execute(query):
                facts = json.loads(details)
                events.append(
                    RevocationEvent(
                        cursor=int(seq),
                        serial=serial,
                        spiffe_id=str(facts.get("spiffe_id", "")),
                        reason=str(facts.get("reason", "unspecified")),
                        revoked_at=datetime.fromtimestamp(int(at), UTC),
                    )
                )
            return events

    def latest_revocation_cursor(self) -> int:
        """Return the cursor of the newest revocation (0 when none)."""
        query = select(func.coalesce(func.max(audit_events.c.seq), 0)).where(
            audit_events.c.action == "revoke"
        )
        with self._connect() as conn:
            return int(conn.execute(query).scalar_one())

    def audit_events(self, *, last: int | None = None) -> list[AuditEvent]:
        """Return audit events in order (only the last ``last`` ones when given)."""
        query = select(audit_events).order_by(audit_events.c.seq)
        if last is not None:
            query = query.where(audit_events.c.seq > self.counter("audit_seq") - last)
        with self._connect() as conn:
            return [
                AuditEvent(
                    seq=int(r.seq),
                    at=int(r.at),
                    actor=r.actor,
                    action=r.action,
                    subject=r.subject,
                    details=json.loads(r.details),
                    prev_hash=r.prev_hash,
                    hash=r.hash,
                )
                for r in conn.execute(query)
            ]


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _migrate(engine: Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # One process migrates at a time; the others wait, then find it done.
            conn.execute(text("SELECT pg_advisory_xact_lock(7219040221)"))
        current = MigrationContext.configure(conn).get_current_revision()
        cfg = _migration_config(conn)
        head = ScriptDirectory.from_config(cfg).get_current_head()
        if current != head:
            command.upgrade(cfg, "head")


def open_store(url: str, *, migrate: bool = True) -> Store:
    """Connect to the database at ``url`` and bring its schema up to date.

    Args:
        url: ``sqlite:///path`` or ``postgresql://user@host:port/db``.
        migrate: Apply pending migrations (Alembic) first.

    Raises:
        ConfigError: The URL is malformed or the database cannot be reached.
    """
    full = normalize_url(url)
    try:
        parsed = make_url(full)
    except ArgumentError:
        raise ConfigError(
            f"Database URL {url!r} is not valid: use sqlite:///PATH or "
            f"postgresql://USER@HOST:PORT/DB.",
            field="db",
        ) from None
    if parsed.get_backend_name() not in {"sqlite", "postgresql"}:
        raise ConfigError(
            f"Database URL {_redact(full)} uses {parsed.get_backend_name()!r}: trustmesh "
            f"supports sqlite:/// and postgresql:// URLs.",
            field="db",
        )
    # As many pooled connections as the CA server runs threads (POOL_SIZE): a
    # connection beyond the pool is closed when returned and opened anew later.
    kwargs: dict[str, Any] = {"pool_size": POOL_SIZE, "max_overflow": POOL_SIZE}
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 5}
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(
            f"Cannot use database URL {_redact(full)}: {exc}. For PostgreSQL install "
            f"the 'postgres' extra (psycopg).",
            field="db",
        ) from None
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    try:
        if migrate:
            _migrate(engine)
        else:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(
            f"Cannot reach the database at {_redact(full)}: {reason}. Check the URL "
            f"(--db or db in config.toml) and that the server is running.",
            field="db",
        ) from None
    return Store(engine)
