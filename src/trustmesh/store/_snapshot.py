"""Consistent snapshots of the whole database, and loading them into an empty one.

A snapshot is always a SQLite file holding every table of the schema at the
source's migration revision:

- from SQLite, it is made with SQLite's online backup API
  (:meth:`sqlite3.Connection.backup`): one read transaction copies every page,
  so writers keep going (WAL) and the copy is one point in time. A file copy of
  a WAL database is never consistent.
- from PostgreSQL, every table of the current schema is read inside one
  ``SERIALIZABLE READ ONLY DEFERRABLE`` transaction (a snapshot that cannot see
  half of a concurrent write and never aborts), into a SQLite file created by
  the same migrations. No ``pg_dump`` binary is needed, and the snapshot can be
  restored into either database.

Nothing here names a table: tables come from reflection, so a table added by a
new migration is included without a change here.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Connection,
    Engine,
    MetaData,
    Table,
    create_engine,
    delete,
    func,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from trustmesh.audit import GENESIS, AuditEvent, AuditReport, verify_chain
from trustmesh.errors import ConfigError, StoreError

from ._store import Store, _migration_config, _redact, normalize_url, open_store

__all__ = [
    "RestoredDatabase",
    "SnapshotInfo",
    "describe_snapshot",
    "restore_snapshot",
    "snapshot_database",
]

#: Tables the migrations tool keeps for itself; copied as the revision, not as rows.
_VERSION_TABLE = "alembic_version"
_BATCH = 1000


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot holds.

    Attributes:
        revision: The schema's migration revision.
        tables: Row count of every table (the migrations' own table excluded).
        audit_seq: Events in the audit chain.
        audit_head: Hash of the last audit event (:data:`GENESIS` when none).
        audit: The result of checking the chain.
    """

    revision: str
    tables: dict[str, int]
    audit_seq: int
    audit_head: str
    audit: AuditReport


@dataclass(frozen=True)
class RestoredDatabase:
    """Where a snapshot went and how many rows each table received."""

    url: str
    dialect: str
    tables: dict[str, int]


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise ConfigError(
            f"Cannot back up the in-memory database {url!r}: give the CA a file database."
        )
    return Path(database)


def _plain_sqlite(path: Path) -> Engine:
    """An engine on a snapshot file without the store's WAL/BEGIN IMMEDIATE settings."""
    return create_engine(f"sqlite:///{path}")


def _reflect(conn: Connection) -> MetaData:
    metadata = MetaData()
    metadata.reflect(conn)
    return metadata


def _revision(conn: Connection) -> str:
    try:
        row = conn.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).first()  # noqa: S608
    except SQLAlchemyError:
        row = None
    if row is None:
        raise StoreError("The database has no migration revision: it is not a trustmesh store.")
    return str(row[0])


def _known_revision(revision: str) -> None:
    with _plain_sqlite(Path(":memory:")).connect() as conn:
        scripts = ScriptDirectory.from_config(_migration_config(conn))
    if revision not in {s.revision for s in scripts.walk_revisions()}:
        raise ConfigError(
            f"The database is at schema revision {revision!r}, which this trustmesh does "
            f"not know (its newest is {scripts.get_current_head()!r}): use the trustmesh "
            f"version that wrote it."
        )


def _copy_tables(src: Connection, dst: Connection, *, create_missing: bool) -> dict[str, int]:
    """Copy every row of every table of ``src`` into the same tables of ``dst``.

    Rows already in ``dst`` (the counters the migrations seed) are deleted first.
    A table missing from ``dst`` is created with generic column types when
    ``create_missing`` (a table no migration knows); otherwise it is an error.
    """
    source = _reflect(src)
    target = _reflect(dst)
    tables = [t for t in source.sorted_tables if t.name != _VERSION_TABLE]
    for table in tables:
        if table.name not in target.tables:
            if not create_missing:
                raise StoreError(
                    f"The target database has no table {table.name!r}: it is at another "
                    f"schema revision than the snapshot."
                )
            generic = Table(table.name, target)
            for column in table.columns:
                copy = column._copy()
                copy.type = column.type.as_generic()
                copy.server_default = None
                generic.append_column(copy)
            generic.create(dst)
        missing = set(table.columns.keys()) - set(target.tables[table.name].columns.keys())
        if missing:
            raise StoreError(
                f"The target table {table.name!r} lacks column(s) {sorted(missing)}: it is "
                f"at another schema revision than the snapshot."
            )
    for table in reversed(tables):
        dst.execute(delete(target.tables[table.name]))
    counts: dict[str, int] = {}
    for table in tables:
        into = target.tables[table.name]
        names = list(table.columns.keys())
        counts[table.name] = 0
        result = src.execution_options(stream_results=True, yield_per=_BATCH).execute(
            select(*table.columns)
        )
        for batch in result.partitions(_BATCH):
            rows = [dict(zip(names, row, strict=True)) for row in batch]
            dst.execute(into.insert(), rows)
            counts[table.name] += len(rows)
    return counts


def _reset_sequences(conn: Connection) -> None:
    """Move PostgreSQL sequences (serial/identity columns) past the copied rows."""
    for table in _reflect(conn).sorted_tables:
        for column in table.columns:
            seq = conn.execute(
                text("SELECT pg_get_serial_sequence(:t, :c)"),
                {"t": conn.dialect.identifier_preparer.quote(table.name), "c": column.name},
            ).scalar()
            if seq:
                top = conn.execute(select(func.coalesce(func.max(column), 0))).scalar_one()
                conn.execute(
                    text("SELECT setval(:seq, :value, false)"),
                    {"seq": seq, "value": int(top) + 1},
                )


def snapshot_database(url: str, dest: Path) -> SnapshotInfo:
    """Write a consistent snapshot of the database at ``url`` to the SQLite file ``dest``.

    Safe while ``ca serve`` runs and writes: see the module docstring.

    Raises:
        ConfigError: The database cannot be reached, or it is at a schema revision
            this version does not know.
        StoreError: Reading it failed.
    """
    full = normalize_url(url)
    backend = make_url(full).get_backend_name()
    if backend == "sqlite":
        path = _sqlite_path(full)
        if not path.is_file():
            raise ConfigError(f"The CA database {path} does not exist.", path=str(path))
        try:
            # Not mode=ro: a read-only connection cannot open a WAL database whose
            # -wal/-shm files are absent (nothing running). It only reads.
            source = sqlite3.connect(path, timeout=30)
            target = sqlite3.connect(dest)
            try:
                source.execute("PRAGMA busy_timeout=30000")
                source.backup(target)  # all pages in one step: one read transaction
                target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                target.close()
                source.close()
        except sqlite3.Error as exc:
            raise StoreError(f"The SQLite backup of {path} failed: {exc}.") from exc
    else:
        store = open_store(full, migrate=False)
        try:
            _snapshot_postgresql(store, dest)
        except SQLAlchemyError as exc:
            raise StoreError(
                f"The snapshot of {store.url} failed: {getattr(exc, 'orig', exc)}"
            ) from exc
        finally:
            store.close()
    return describe_snapshot(dest)


def _snapshot_postgresql(store: Store, dest: Path) -> None:
    engine = _plain_sqlite(dest)
    try:
        with (
            store.engine.connect().execution_options(
                isolation_level="SERIALIZABLE",
                postgresql_readonly=True,
                postgresql_deferrable=True,
            ) as src,
            src.begin(),
        ):
            revision = _revision(src)
            _known_revision(revision)
            with engine.begin() as dst:
                command.upgrade(_migration_config(dst), revision)
                _copy_tables(src, dst, create_missing=True)
    finally:
        engine.dispose()


def _audit_events(conn: Connection, metadata: MetaData) -> Iterator[AuditEvent]:
    table = metadata.tables["audit_events"]
    result = conn.execution_options(stream_results=True, yield_per=_BATCH).execute(
        select(table).order_by(table.c.seq)
    )
    for r in result:
        yield AuditEvent(
            seq=int(r.seq),
            at=int(r.at),
            actor=r.actor,
            action=r.action,
            subject=r.subject,
            details=json.loads(r.details),
            prev_hash=r.prev_hash,
            hash=r.hash,
        )


def describe_snapshot(path: Path) -> SnapshotInfo:
    """Return the revision, row counts and audit chain state of a snapshot file.

    Raises:
        StoreError: It is not a readable trustmesh SQLite database.
    """
    engine = _plain_sqlite(path)
    try:
        with engine.connect() as conn:
            check = conn.exec_driver_sql("PRAGMA integrity_check").scalar()
            if check != "ok":
                raise StoreError(f"The database snapshot is corrupt: {check}.")
            revision = _revision(conn)
            metadata = _reflect(conn)
            tables = {
                t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                for t in metadata.sorted_tables
                if t.name != _VERSION_TABLE
            }
            counters = metadata.tables["counters"]
            seq = conn.execute(
                select(counters.c.value).where(counters.c.name == "audit_seq")
            ).scalar()
            audit_seq = int(seq or 0)
            head = GENESIS
            if audit_seq:
                events = metadata.tables["audit_events"]
                head = (
                    conn.execute(select(events.c.hash).where(events.c.seq == audit_seq)).scalar()
                    or GENESIS
                )
            report = verify_chain(_audit_events(conn, metadata), expected_count=audit_seq)
    except (SQLAlchemyError, KeyError) as exc:
        raise StoreError(f"{path} is not a readable trustmesh database snapshot: {exc}") from exc
    finally:
        engine.dispose()
    return SnapshotInfo(revision, tables, audit_seq, str(head), report)


@contextlib.contextmanager
def _target(url: str) -> Iterator[Store]:
    store = open_store(url, migrate=False)
    try:
        yield store
    finally:
        store.close()


def restore_snapshot(
    snapshot: Path, url: str, *, audit: dict[str, Any] | None = None
) -> RestoredDatabase:
    """Load a snapshot into the empty database at ``url`` and bring it to the newest schema.

    A SQLite target must not exist yet: the snapshot is upgraded in place and
    then renamed there. A PostgreSQL target must hold no tables in its schema;
    migrations, the copy of every table, the sequence reset and the ``audit``
    event run in one transaction, so a failure leaves it empty.

    Args:
        snapshot: The snapshot file (consumed: it is moved or upgraded).
        url: The target database.
        audit: When given, the keyword arguments of :meth:`Store.append_audit`
            (without ``conn``) for an event appended to the restored chain.

    Raises:
        ConfigError: The target exists or is not empty, or cannot be reached.
        StoreError: The copy failed (nothing was committed).
    """
    full = normalize_url(url)
    with _plain_sqlite(snapshot).connect() as conn:
        revision = _revision(conn)
    _known_revision(revision)
    backend = make_url(full).get_backend_name()
    if backend == "sqlite":
        path = _sqlite_path(full)
        if path.exists():
            raise ConfigError(
                f"The database file {path} already exists; refusing to overwrite it. "
                f"Remove it or pass --database-url with a new path.",
                path=str(path),
            )
        store = open_store(f"sqlite:///{snapshot}")  # migrates the snapshot to head
        try:
            if audit is not None:
                with store.transaction() as tx:
                    store.append_audit(tx, **audit)
            tables = _counts(store)
        finally:
            store.close()
        with contextlib.closing(sqlite3.connect(snapshot)) as plain:
            plain.execute("PRAGMA journal_mode=DELETE")  # checkpoint: one file to move
        if path.parent != snapshot.parent:
            path.parent.mkdir(parents=True, exist_ok=True)
        snapshot.replace(path)
        return RestoredDatabase(f"sqlite:///{path}", "sqlite", tables)
    open_store(f"sqlite:///{snapshot}").close()  # an older snapshot: migrate it first
    with _target(full) as store:
        source = _plain_sqlite(snapshot)
        try:
            with store.engine.begin() as dst, source.connect() as src:
                dst.execute(text("SELECT pg_advisory_xact_lock(7219040221)"))
                existing = _reflect(dst).tables
                if existing:
                    raise ConfigError(
                        f"The database at {_redact(full)} already holds tables "
                        f"({', '.join(sorted(existing)[:4])}); refusing to restore over "
                        f"it. Pass --database-url with an empty database or schema.",
                        field="database_url",
                    )
                command.upgrade(_migration_config(dst), "head")
                tables = _copy_tables(src, dst, create_missing=True)
                _reset_sequences(dst)
                if audit is not None:
                    store.append_audit(dst, **audit)
                    tables["audit_events"] += 1
        except SQLAlchemyError as exc:
            raise StoreError(
                f"Restoring into {store.url} failed, nothing was written: "
                f"{getattr(exc, 'orig', exc)}"
            ) from exc
        finally:
            source.dispose()
        return RestoredDatabase(store.url, "postgresql", tables)


def _counts(store: Store) -> dict[str, int]:
    with store.reader() as conn:
        return {
            t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
            for t in _reflect(conn).sorted_tables
            if t.name != _VERSION_TABLE
        }
