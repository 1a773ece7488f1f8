"""`ca backup` and `ca restore` with real processes: a live `ca serve` under renewal load,
restore into a new home (SQLite and PostgreSQL, also across), serving from it again,
and archives that are wrong in every way we can think of."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import create_engine, text

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.pki import KeyType
from trustmesh.store import normalize_url

from ._server import Server, running_server
from .conftest import PASSPHRASE
from .test_ca_server import client, enroll, make_csr, save_identity


def trustmesh(
    *args: str, home: Path, passphrase: bytes = PASSPHRASE
) -> subprocess.CompletedProcess[str]:
    """Run `python -m trustmesh ARGS` for the CA in ``home``."""
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args],
        env={
            **os.environ,
            "TRUSTMESH_HOME": str(home),
            "TRUSTMESH_CA_PASSPHRASE": passphrase.decode(),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def pg_url_other() -> Iterator[str]:
    """A second empty PostgreSQL schema (a restore target); skips without the env var."""
    base = os.environ.get("TRUSTMESH_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("TRUSTMESH_TEST_POSTGRES_URL is not set")
    schema = f"r_{uuid.uuid4().hex[:12]}"
    engine = create_engine(normalize_url(base))
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def _renewals(server: Server, identity: Path, stop: threading.Event, done: list[str]) -> None:
    """Renew over mTLS in a loop (bounded in count and time), recording each new serial."""
    deadline = time.monotonic() + 60
    with client(server, identity) as http:
        for _ in range(5000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            _key, csr = make_csr("spiffe://example.org/load")
            response = http.post("/v1/renew", json={"csr": csr})
            assert response.status_code == 201, response.text
            done.append(response.json()["serial"])


def _backup_restore_serve(tmp_path: Path, source_db: str | None, target_db: str | None) -> None:
    home = tmp_path / "home"
    CertificateAuthority.init(
        home,
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        db_url=normalize_url(source_db) if source_db else None,
    ).close()
    archive = tmp_path / "ca.tmbackup"
    with running_server(home, _dir(tmp_path / "old")) as old:
        web, _ = enroll(old, "spiffe://example.org/web", tmp_path / "web")
        _, bad = enroll(old, "spiffe://example.org/bad", tmp_path / "bad")
        load, _ = enroll(old, "spiffe://example.org/load", tmp_path / "load")
        with client(old, tmp_path / "bad") as http:
            assert http.post("/v1/revoke", json={"serial": bad["serial"]}).status_code == 200
        stop, serials = threading.Event(), list[str]()
        worker = threading.Thread(target=_renewals, args=(old, load, stop, serials))
        worker.start()
        try:
            while len(serials) < 5 and worker.is_alive():
                time.sleep(0.05)
            before = list(serials)  # handed out before the backup started
            result = trustmesh("ca", "backup", "--out", str(archive), "--json", home=home)
            during = len(serials)
            while len(serials) < during + 5 and worker.is_alive():
                time.sleep(0.05)
        finally:
            stop.set()
            worker.join(timeout=60)
        assert result.returncode == 0, result.stderr
        assert len(serials) > during > len(before)  # issuance went on around the backup
    summary = json.loads(result.stdout)
    assert summary["audit"]["ok"] is True
    assert {"config.toml", "root.key", "intermediate.key", "root.crl"} <= set(summary["files"])
    assert oct(archive.stat().st_mode & 0o777) == "0o600"

    new_home = tmp_path / "restored"
    args = ["ca", "restore", str(archive), "--home", str(new_home), "--json"]
    if target_db:
        args += ["--database-url", target_db]
    restored = trustmesh(*args, home=new_home)
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["audit"]["ok"] is True
    with CertificateAuthority.open(new_home) as ca:
        assert ca.store.dialect == ("postgresql" if target_db else "sqlite")
        known = {r.serial for r in ca.store.iter_certificates()}
        assert set(before) <= known  # every certificate handed out before the backup
        assert serials[-1] not in known  # issued after it: unknown, so its renewal fails
        assert summary["database"]["tables"]["certificates"] == len(known)
        assert ca.audit_tail(1)[0].action == "restore"
    verify = trustmesh("audit", "verify", home=new_home)
    assert verify.returncode == 0, verify.stderr

    with running_server(new_home, _dir(tmp_path / "new")) as new:
        _key, csr = make_csr("spiffe://example.org/web")
        with client(new, web) as http:  # issued before the backup: renews
            response = http.post("/v1/renew", json={"csr": csr})
        assert response.status_code == 201, response.text
        renewed = save_identity(response.json(), _key, tmp_path / "web2")
        with client(new) as http:
            crl = http.get("/v1/crl")
        (tmp_path / "leaf.crl").write_bytes(crl.content)
        text_crl = subprocess.run(
            [
                "openssl",
                "crl",
                "-inform",
                "DER",
                "-in",
                str(tmp_path / "leaf.crl"),
                "-noout",
                "-text",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        listed = {m.lstrip("0") for m in re.findall(r"Serial Number: ([0-9A-F]+)", text_crl)}
        assert bad["serial"].upper().lstrip("0") in listed
        _key2, csr2 = make_csr("spiffe://example.org/bad")
        with client(new, tmp_path / "bad") as http:  # revoked before the backup: refused
            assert http.post("/v1/renew", json={"csr": csr2}).status_code in (401, 403)
        assert renewed.is_dir()
    tail = trustmesh("audit", "tail", "-n", "50", "--json", home=new_home)
    actions = [e["action"] for e in json.loads(tail.stdout)]
    assert "restore" in actions
    assert "renew" in actions[actions.index("restore") :]  # the chain went on
    assert trustmesh("audit", "verify", home=new_home).returncode == 0


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.slow
def test_backup_under_load_sqlite(tmp_path: Path) -> None:
    """A backup taken while `ca serve` renews restores into a CA that serves, renews and revokes."""
    _backup_restore_serve(tmp_path, None, None)


@pytest.mark.slow
def test_backup_under_load_postgresql(tmp_path: Path, pg_url: str, pg_url_other: str) -> None:
    """The same on PostgreSQL: one read-only snapshot transaction, restore into an empty schema."""
    _backup_restore_serve(tmp_path, pg_url, pg_url_other)


@pytest.mark.slow
def test_cross_restore_postgresql_to_sqlite(tmp_path: Path, pg_url: str) -> None:
    """A PostgreSQL backup restores into SQLite, and a SQLite backup of that into PostgreSQL."""
    home = tmp_path / "home"
    with CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, db_url=normalize_url(pg_url)
    ) as ca:
        serial = ca.issue("spiffe://example.org/a").record.serial
        ca.revoke(serial, reason="keyCompromise")
    assert main(["ca", "backup", "--out", str(tmp_path / "pg.tmb"), "--home", str(home)]) == 0
    lite = tmp_path / "lite"
    sqlite_url = f"sqlite:///{lite / 'ca.db'}"
    code = main(
        [
            "ca",
            "restore",
            str(tmp_path / "pg.tmb"),
            "--home",
            str(lite),
            "--database-url",
            sqlite_url,
        ]
    )
    assert code == 0
    with CertificateAuthority.open(lite, passphrase=PASSPHRASE) as ca:
        assert ca.store.dialect == "sqlite"
        assert ca.store.get_certificate(serial).revoked_at is not None
        assert ca.verify_audit().ok
        ca.issue("spiffe://example.org/b")
        assert ca.verify_audit().ok


def test_sqlite_backup_restores_into_postgresql(
    tmp_path: Path, ca: CertificateAuthority, home: Path, pg_url: str
) -> None:
    """A SQLite backup restores into an empty PostgreSQL schema; its sequences continue."""
    serial = ca.issue("spiffe://example.org/a").record.serial
    assert main(["ca", "backup", "--out", str(tmp_path / "b.tmb")]) == 0
    target = tmp_path / "pg-home"
    assert (
        main(
            [
                "ca",
                "restore",
                str(tmp_path / "b.tmb"),
                "--home",
                str(target),
                "--database-url",
                pg_url,
            ]
        )
        == 0
    )
    with CertificateAuthority.open(target, passphrase=PASSPHRASE) as restored:
        assert restored.store.dialect == "postgresql"
        assert restored.store.get_certificate(serial).spiffe_id == "spiffe://example.org/a"
        restored.issue("spiffe://example.org/b")  # the id sequence moved past the copied rows
        assert restored.verify_audit().ok
    # The same PostgreSQL schema now holds a CA: a second restore into it is refused.
    code = main(
        [
            "ca",
            "restore",
            str(tmp_path / "b.tmb"),
            "--home",
            str(tmp_path / "x"),
            "--database-url",
            pg_url,
        ]
    )
    assert code == 2
    assert not (tmp_path / "x").exists()


# -- bad input ----------------------------------------------------------------------


@pytest.fixture
def archive(ca: CertificateAuthority, tmp_path: Path) -> Path:
    ca.issue("spiffe://example.org/web")
    out = tmp_path / "ca.tmb"
    assert main(["ca", "backup", "--out", str(out)]) == 0
    return out


def _nothing_written(tmp_path: Path, target: Path) -> None:
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if ".restore-" in p.name]
    assert leftovers == []


def test_verify_and_check_accept_a_good_archive(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ca backup verify` and `ca restore --check` pass a good archive and print its head."""
    capsys.readouterr()
    assert main(["ca", "backup", "verify", str(archive), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["database"]["tables"]["certificates"] == 1
    assert len(report["audit"]["backup_head"]["head"]) == 64
    assert main(["ca", "restore", str(archive), "--check"]) == 0


def test_wrong_passphrase(
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A wrong passphrase is one line, exit 2, and nothing is written."""
    monkeypatch.setenv("TRUSTMESH_CA_PASSPHRASE", "not the passphrase")
    capsys.readouterr()
    assert main(["ca", "restore", str(archive), "--home", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: The passphrase does not open")
    _nothing_written(tmp_path, tmp_path / "r")


@pytest.mark.parametrize("offset", [100, -40, -2])
def test_flipped_byte(
    archive: Path, tmp_path: Path, offset: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flipped byte anywhere after the header is refused as damaged; nothing is written."""
    data = bytearray(archive.read_bytes())
    data[offset] ^= 0x01
    bad = tmp_path / "bad.tmb"
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["ca", "restore", str(bad), "--home", str(tmp_path / "r")]) == 2
    assert "is damaged" in capsys.readouterr().err
    _nothing_written(tmp_path, tmp_path / "r")
    assert main(["ca", "backup", "verify", str(bad)]) == 2


def test_flipped_header_byte(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A changed header (here the salt) is refused: the key or the tags no longer match."""
    data = bytearray(archive.read_bytes())
    data[30] ^= 0x01
    bad = tmp_path / "bad.tmb"
    bad.write_bytes(bytes(data))
    assert main(["ca", "restore", str(bad), "--home", str(tmp_path / "r")]) == 2
    _nothing_written(tmp_path, tmp_path / "r")


@pytest.mark.parametrize("keep", [10, 60, 2000, -1])
def test_truncated(
    archive: Path, tmp_path: Path, keep: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated archive (in the header, in a chunk, one byte short) is refused."""
    data = archive.read_bytes()
    cut = tmp_path / "cut.tmb"
    cut.write_bytes(data[:keep])
    capsys.readouterr()
    assert main(["ca", "restore", str(cut), "--home", str(tmp_path / "r")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line
    assert last.startswith("error: ")
    assert "truncated" in last
    _nothing_written(tmp_path, tmp_path / "r")


def test_truncated_at_a_chunk_boundary(
    ca: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dropping whole chunks at the end is detected: the last chunk left is not marked last."""
    from trustmesh.backup import ArchiveReader, ArchiveWriter
    from trustmesh.errors import BackupError

    target = tmp_path / "raw"
    with target.open("wb") as sink:
        writer = ArchiveWriter(sink, PASSPHRASE)
        writer.write(os.urandom(3 * (1 << 20)))
        writer.close()
    data = target.read_bytes()
    header = len(writer.header)
    (tmp_path / "short").write_bytes(data[: header + 2 * ((1 << 20) + 16)])
    with (tmp_path / "short").open("rb") as source:
        reader = ArchiveReader(source, PASSPHRASE, name="short")
        with pytest.raises(BackupError, match="is truncated") as info:
            reader.drain()
    assert info.value.details["reason"] == "truncated"


def test_not_a_backup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Some other file is refused as not a backup, exit 2."""
    other = tmp_path / "other"
    other.write_bytes(b"PK\x03\x04" + os.urandom(200))
    assert main(["ca", "backup", "verify", str(other)]) == 2
    assert "is not a trustmesh backup" in capsys.readouterr().err


def test_existing_target_and_existing_out(
    archive: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Restore over an existing CA, and backup over an existing file, exit 2 naming the fix."""
    before = sorted(p.name for p in home.iterdir())
    capsys.readouterr()
    assert main(["ca", "restore", str(archive), "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a CA" in err
    assert "--home DIR" in err
    assert sorted(p.name for p in home.iterdir()) == before
    content = archive.read_bytes()
    assert main(["ca", "backup", "--out", str(archive)]) == 2
    assert "--force" in capsys.readouterr().err
    assert archive.read_bytes() == content
    assert main(["ca", "backup", "--out", str(archive), "--force"]) == 0
    assert archive.read_bytes() != content
    assert oct(archive.stat().st_mode & 0o777) == "0o600"


def test_backup_refuses_a_passphrase_that_does_not_unlock_the_keys(
    ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An archive sealed with a typo would be lost: the passphrase must open the CA keys."""
    monkeypatch.setenv("TRUSTMESH_CA_PASSPHRASE", "typo")
    capsys.readouterr()
    assert main(["ca", "backup", "--out", str(tmp_path / "b.tmb")]) == 2
    assert "does not unlock" in capsys.readouterr().err
    assert list(tmp_path.glob("*b.tmb*")) == []


def test_home_is_backed_up_generically(
    ca: CertificateAuthority, home: Path, tmp_path: Path
) -> None:
    """Every file of the home is archived (a future issuer directory too), with its mode."""
    extra = home / "issuers" / "next"
    extra.mkdir(parents=True)
    (extra / "intermediate.pem").write_bytes(ca.intermediate.public_bytes(Encoding.PEM))
    (extra / "intermediate.key").write_bytes((home / "intermediate.key").read_bytes())
    os.chmod(extra / "intermediate.key", 0o600)
    assert main(["ca", "backup", "--out", str(tmp_path / "b.tmb")]) == 0
    target = tmp_path / "r"
    assert main(["ca", "restore", str(tmp_path / "b.tmb"), "--home", str(target)]) == 0
    restored = target / "issuers" / "next" / "intermediate.key"
    assert restored.read_bytes() == (extra / "intermediate.key").read_bytes()
    assert oct(restored.stat().st_mode & 0o777) == "0o600"
    assert not (target / "trustmesh.db-wal").exists()
