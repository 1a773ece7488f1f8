"""``ca backup`` and ``ca restore``: the whole CA in one encrypted archive.

The archive (see :mod:`._archive` for the encryption) holds a gzip'd tar stream:

- ``manifest.json`` first: format version, when, the trust domain, the source
  database, the row count of every table, the audit chain head, and the
  SHA-256, size and mode of every other member;
- ``home/...``: every regular file of ``TRUSTMESH_HOME`` (keys, encrypted as
  they are on disk; certificates; ``config.toml``; ``root.crl``; whatever else a
  later version keeps there), except the SQLite database and its journals;
- ``database.sqlite``: a consistent snapshot of every table
  (:func:`trustmesh.store.snapshot_database`).

A restore unpacks into a temporary directory beside the target, checks every
member, loads the database, appends a ``restore`` event to the restored audit
chain, and only then renames the directory into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from trustmesh import __version__
from trustmesh.authority import CertificateAuthority, default_actor
from trustmesh.config import CONFIG_NAME, CAConfig
from trustmesh.errors import BackupError, ConfigError, PKIError
from trustmesh.pki import SpiffeID, load_private_key
from trustmesh.store import (
    describe_snapshot,
    normalize_url,
    open_store,
    restore_snapshot,
    snapshot_database,
)

from ._archive import ArchiveReader, ArchiveWriter

__all__ = ["BackupSummary", "create_backup", "restore_backup", "verify_backup"]

_MANIFEST = "manifest.json"
_DATABASE = "database.sqlite"
_HOME = "home/"
_MAX_MANIFEST = 16 << 20
_ENCRYPTED_KEY = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class BackupSummary:
    """What an archive holds (after ``create``, ``verify`` or ``restore``).

    Attributes:
        archive: The archive file.
        sha256: SHA-256 of the archive file.
        size: Its size in bytes.
        manifest: The archive's manifest.
        home: The restored home (restore only).
        database: The restored database URL, password hidden (restore only).
        audit_ok: Whether the audit chain verified (after restore: the restored one).
        audit_events: Events in that chain.
    """

    archive: Path
    sha256: str
    size: int
    manifest: dict[str, Any]
    home: Path | None = None
    database: str | None = None
    audit_ok: bool = True
    audit_events: int = 0
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return the ``--json`` form."""
        members = self.manifest["members"]
        return {
            "archive": str(self.archive),
            "sha256": self.sha256,
            "bytes": self.size,
            "created_at": self.manifest["created_at"],
            "trust_domain": self.manifest["trust_domain"],
            "files": sorted(n[len(_HOME) :] for n in members if n.startswith(_HOME)),
            "skipped": self.skipped,
            "database": self.manifest["database"],
            "audit": {
                "ok": self.audit_ok,
                "events": self.audit_events,
                "backup_head": self.manifest["audit"],
            },
            "home": None if self.home is None else str(self.home),
            "restored_database": self.database,
        }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _excluded(home: Path, db_url: str, out: Path) -> set[Path]:
    """The live SQLite database (snapshotted separately), its journals, and the output."""
    skip = {out.resolve()}
    prefix = "sqlite:///"
    if db_url.startswith(prefix):
        db = Path(db_url[len(prefix) :]).resolve()
        skip |= {db, *(db.with_name(db.name + s) for s in ("-wal", "-shm", "-journal"))}
    return skip


def _home_files(home: Path, skip: set[Path]) -> tuple[list[tuple[str, bytes, int]], list[str]]:
    """Every regular file under ``home`` (relative name, content, mode), and what was skipped."""
    files: list[tuple[str, bytes, int]] = []
    skipped: list[str] = []
    for path in sorted(home.rglob("*")):
        rel = path.relative_to(home).as_posix()
        if path.resolve() in skip and not path.is_symlink():
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            skipped.append(rel)  # symlinks, sockets, FIFOs: not CA state
            continue
        if path.is_dir():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue  # a half-written file of files.stage_file
        if path.name.startswith(".") and ".restore-" in path.name:
            continue
        files.append((rel, path.read_bytes(), stat.S_IMODE(path.stat().st_mode)))
    return files, skipped


def _check_passphrase(files: list[tuple[str, bytes, int]], passphrase: bytes) -> list[str]:
    """Refuse a passphrase that does not unlock every encrypted key: the archive needs it."""
    keys = []
    for name, data, _ in files:
        if data.lstrip().startswith(_ENCRYPTED_KEY):
            try:
                load_private_key(data, passphrase, source=name)
            except PKIError:
                raise ConfigError(
                    f"The passphrase does not unlock {name}: the archive is encrypted with "
                    f"the CA passphrase; give the one the keys use (--passphrase-file or "
                    f"TRUSTMESH_CA_PASSPHRASE).",
                    path=name,
                ) from None
            keys.append(name)
    return keys


def _add(tar: tarfile.TarFile, name: str, size: int, mode: int, data: IO[bytes]) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, data)


def _place(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename ``tmp`` to ``out``; without ``force`` never replace a file that appeared since."""
    if force:
        os.replace(tmp, out)
    else:
        try:
            os.link(tmp, out)  # fails if out exists: no window for a clobber
        except FileExistsError:
            raise _exists(out) from None
        os.unlink(tmp)
    with contextlib.suppress(OSError):
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exists(out: Path) -> ConfigError:
    return ConfigError(
        f"{out} already exists; refusing to overwrite it. Pass --force to replace it or "
        f"choose another --out.",
        path=str(out),
    )


def create_backup(
    home: Path,
    out: Path,
    passphrase: bytes,
    *,
    force: bool = False,
    progress: Progress = _quiet,
    actor: str | None = None,
    now: datetime | None = None,
) -> BackupSummary:
    """Write an encrypted, consistent backup of the CA in ``home`` to ``out``.

    Safe while ``ca serve`` runs. The archive is written to a temporary file
    (mode 0600) beside ``out`` and renamed into place; a ``backup`` event is
    appended to the audit chain afterwards.

    Raises:
        ConfigError: No CA in ``home``, ``out`` exists (without ``force``) or
            cannot be written, or the passphrase does not unlock the CA keys.
        StoreError: The database snapshot failed.
    """
    at = (now or datetime.now(UTC)).replace(microsecond=0)
    config = CAConfig.load(home / CONFIG_NAME)
    out = out.absolute()
    if out.exists() and not force:
        raise _exists(out)
    if not out.parent.is_dir():
        raise ConfigError(
            f"Cannot write {out}: {out.parent} is not a directory. Create it first.",
            path=str(out),
        )
    files, skipped = _home_files(home, _excluded(home, config.db, out))
    keys = _check_passphrase(files, passphrase)
    progress(f"read {len(files)} file(s) from {home} ({len(keys)} encrypted key(s))")
    with tempfile.TemporaryDirectory(prefix="trustmesh-backup-") as work:
        snapshot = Path(work) / _DATABASE
        store_url = open_store(config.db, migrate=False)
        dialect, shown = store_url.dialect, store_url.url
        store_url.close()
        progress(f"taking a consistent snapshot of the {dialect} database {shown}")
        info = snapshot_database(config.db, snapshot)
        if not info.audit.ok:
            progress(f"warning: the audit chain is broken in the snapshot: {info.audit.problem}")
        progress(
            f"snapshot: {sum(info.tables.values())} row(s) in {len(info.tables)} table(s), "
            f"audit chain at event {info.audit_seq}"
        )
        members: dict[str, dict[str, Any]] = {
            _HOME + name: {
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "mode": mode,
            }
            for name, data, mode in files
        }
        members[_DATABASE] = {
            "sha256": _sha256_file(snapshot),
            "size": snapshot.stat().st_size,
            "mode": 0o600,
        }
        manifest = {
            "format": "trustmesh-backup",
            "version": 1,
            "created_at": _iso(at),
            "trustmesh": __version__,
            "trust_domain": config.trust_domain,
            "source_home": str(home.absolute()),
            "database": {
                "dialect": dialect,
                "url": shown,
                "revision": info.revision,
                "tables": info.tables,
            },
            "audit": {"events": info.audit_seq, "head": info.audit_head, "ok": info.audit.ok},
            "members": members,
        }
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as sink:
                writer = ArchiveWriter(sink, passphrase)
                with tarfile.open(fileobj=writer, mode="w|gz", format=tarfile.PAX_FORMAT) as tar:
                    _add(tar, _MANIFEST, len(body), 0o600, io.BytesIO(body))
                    for name, data, mode in files:
                        _add(tar, _HOME + name, len(data), mode, io.BytesIO(data))
                    with snapshot.open("rb") as db:
                        _add(tar, _DATABASE, members[_DATABASE]["size"], 0o600, db)
                writer.close()
                sink.flush()
                os.fsync(sink.fileno())
            digest, size = _sha256_file(tmp), tmp.stat().st_size
            _place(tmp, out, force=force)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    progress(f"wrote {out} ({size} bytes, SHA-256 {digest})")
    store = open_store(config.db)
    try:
        with store.transaction() as conn:
            store.append_audit(
                conn,
                at=at,
                actor=actor or default_actor(),
                action="backup",
                subject=str(out),
                details={
                    "sha256": digest,
                    "audit_seq": info.audit_seq,
                    "audit_head": info.audit_head,
                },
            )
    finally:
        store.close()
    return BackupSummary(
        out,
        digest,
        size,
        manifest,
        audit_ok=info.audit.ok,
        audit_events=info.audit_seq,
        skipped=skipped,
    )


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise BackupError(f"The archive holds an unsafe member name {name!r}.", reason="damaged")
    return path


def _damaged(archive: Path, what: str) -> BackupError:
    return BackupError(
        f"{archive} is damaged: {what}; nothing was restored. Use another copy of the backup.",
        reason="damaged",
    )


def _unpack(archive: Path, passphrase: bytes, dest: Path) -> dict[str, Any]:
    """Authenticate and unpack ``archive`` into ``dest``; return its manifest.

    Raises:
        BackupError: Wrong passphrase, damaged, truncated or not a backup.
    """
    try:
        handle = archive.open("rb")
    except OSError as exc:
        raise ConfigError(
            f"Cannot read {archive}: {exc.strerror}. Give the path of a backup archive.",
            path=str(archive),
        ) from None
    with handle:
        reader = ArchiveReader(handle, passphrase, name=str(archive))
        try:
            with tarfile.open(fileobj=reader, mode="r|gz") as tar:
                manifest = _read_members(archive, tar, dest)
        except tarfile.TarError as exc:
            raise _damaged(archive, f"the tar stream is invalid ({exc})") from None
        reader.drain()
    return manifest


def _read_members(archive: Path, tar: tarfile.TarFile, dest: Path) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != _MANIFEST or first.size > _MAX_MANIFEST:
        raise _damaged(archive, "it does not start with its manifest")
    source = tar.extractfile(first)
    try:
        manifest = json.loads(source.read() if source else b"")
        members: dict[str, dict[str, Any]] = manifest["members"]
        if manifest["format"] != "trustmesh-backup" or manifest["version"] != 1:
            raise ValueError("unknown manifest format")
    except (ValueError, KeyError, TypeError) as exc:
        raise _damaged(archive, f"its manifest is unreadable ({exc})") from None
    seen = set()
    while (member := tar.next()) is not None:
        name = member.name
        if name not in members or name in seen or not member.isfile():
            raise _damaged(archive, f"member {name!r} is not in its manifest")
        seen.add(name)
        target = dest / _safe_name(name)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        digest = hashlib.sha256()
        data = tar.extractfile(member)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            while data is not None and (block := data.read(1 << 20)):
                digest.update(block)
                out.write(block)
        expected = members[name]
        if digest.hexdigest() != expected["sha256"]:
            raise _damaged(archive, f"{name} does not match its SHA-256 in the manifest")
        os.chmod(target, int(expected["mode"]) & 0o777)
    missing = set(members) - seen
    if missing:
        raise _damaged(archive, f"member(s) {sorted(missing)} are missing")
    if _HOME + CONFIG_NAME not in members or _DATABASE not in members:
        raise _damaged(archive, f"it holds no {CONFIG_NAME} or no database snapshot")
    result: dict[str, Any] = manifest
    return result


@contextlib.contextmanager
def _workdir(parent: Path | None, prefix: str) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def verify_backup(archive: Path, passphrase: bytes) -> BackupSummary:
    """Check an archive end to end without restoring it.

    Authenticates every byte, checks every member against the manifest, opens the
    database snapshot (SQLite integrity check) and verifies its audit chain and
    head against the manifest.

    Raises:
        BackupError: Wrong passphrase, damaged, truncated, or not a backup.
    """
    archive = archive.absolute()
    with _workdir(None, "trustmesh-verify-") as work:
        manifest = _unpack(archive, passphrase, work)
        info = _check_snapshot(archive, work / _DATABASE, manifest)
    return BackupSummary(
        archive,
        _sha256_file(archive),
        archive.stat().st_size,
        manifest,
        audit_ok=info.audit.ok,
        audit_events=info.audit_seq,
    )


def _check_snapshot(archive: Path, snapshot: Path, manifest: dict[str, Any]) -> Any:
    try:
        info = describe_snapshot(snapshot)
    except Exception as exc:
        raise _damaged(archive, f"its database snapshot is unreadable ({exc})") from None
    head = manifest["audit"]
    if (info.audit_seq, info.audit_head) != (head["events"], head["head"]):
        raise _damaged(archive, "the audit chain head differs from its manifest")
    if info.tables != manifest["database"]["tables"]:
        raise _damaged(archive, "the table row counts differ from its manifest")
    return info


def _set_db(config: Path, url: str) -> None:
    """Point ``config.toml`` at the restored database (the one line; the rest unchanged)."""
    text = config.read_text()
    line = f"db = {json.dumps(url)}"
    new, count = re.subn(r"(?m)^db\s*=.*$", lambda _: line, text, count=1)
    if not count:
        new = f"{line}\n{text}"
    config.write_text(new)


def _check_target(home: Path) -> None:
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        found = "a CA" if (home / CONFIG_NAME).exists() else "files" if home.is_dir() else "a file"
        raise ConfigError(
            f"{home} already holds {found}; refusing to restore over it. Restore into a "
            f"new or empty directory with --home DIR (or move {home} away first).",
            path=str(home),
        )


def restore_backup(
    archive: Path,
    passphrase: bytes,
    home: Path,
    *,
    database_url: str | None = None,
    progress: Progress = _quiet,
    actor: str | None = None,
    now: datetime | None = None,
) -> BackupSummary:
    """Restore the CA from ``archive`` into the new or empty directory ``home``.

    Args:
        database_url: Where the database goes. Default: for a SQLite backup,
            ``trustmesh.db`` in ``home``; for a PostgreSQL one, the URL in the
            archived ``config.toml`` (which must then be an empty database).

    Raises:
        ConfigError: ``home`` or the target database already holds something.
        BackupError: Wrong passphrase, damaged, truncated, or not a backup.
        StoreError: Loading the database failed (nothing was written).
    """
    at = (now or datetime.now(UTC)).replace(microsecond=0)
    archive, home = archive.absolute(), home.absolute()
    _check_target(home)
    home.parent.mkdir(parents=True, exist_ok=True)
    with _workdir(home.parent, f".{home.name}.restore-") as work:
        progress(f"decrypting and checking {archive}")
        manifest = _unpack(archive, passphrase, work)
        _check_snapshot(archive, work / _DATABASE, manifest)
        staged = work / "home"
        config_path = staged / CONFIG_NAME
        source = manifest["database"]
        if database_url:
            final_url = normalize_url(database_url)
        elif source["dialect"] == "sqlite":
            final_url = f"sqlite:///{home / 'trustmesh.db'}"
        else:
            final_url = CAConfig.load(config_path).db
        work_url = final_url
        prefix = "sqlite:///"
        if final_url.startswith(prefix):
            db_path = Path(final_url[len(prefix) :]).absolute()
            if db_path.is_relative_to(home):
                work_url = prefix + str(staged / db_path.relative_to(home))
        _set_db(config_path, final_url)
        config = CAConfig.load(config_path)  # the restored config must load
        digest = _sha256_file(archive)
        progress(f"restoring the database ({source['dialect']} backup) into {final_url}")
        restore_snapshot(
            work / _DATABASE,
            work_url,
            audit={
                "at": at,
                "actor": actor or default_actor(),
                "action": "restore",
                "subject": SpiffeID.trust_domain_id(config.trust_domain).uri,
                "details": {
                    "archive": str(archive),
                    "sha256": digest,
                    "backup_created_at": manifest["created_at"],
                    "backup_audit_seq": manifest["audit"]["events"],
                    "backup_audit_head": manifest["audit"]["head"],
                    "source_database": source["dialect"],
                    "restored_database": _dialect(final_url),
                },
            },
        )
        if home.exists():
            home.rmdir()  # checked empty above
        os.replace(staged, home)
        os.chmod(home, 0o700)
    progress(f"restored the CA into {home}")
    with CertificateAuthority.open(home) as ca:
        report = ca.verify_audit()
        shown = ca.store.url
    return BackupSummary(
        archive,
        digest,
        archive.stat().st_size,
        manifest,
        home=home,
        database=shown,
        audit_ok=report.ok,
        audit_events=report.checked,
    )


def _dialect(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"
