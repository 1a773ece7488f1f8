"""The store and the audit chain on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text

from trustmesh.audit import AuditEvent, verify_chain
from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.errors import ConfigError
from trustmesh.pki import KeyType
from trustmesh.store import open_store

from .conftest import PASSPHRASE


def _issue_some(ca: CertificateAuthority, n: int) -> list[str]:
    return [ca.issue(f"spiffe://example.org/svc{i}").record.serial for i in range(n)]


def test_audit_chain_verifies_after_normal_use(ca: CertificateAuthority) -> None:
    serials = _issue_some(ca, 3)
    ca.revoke(serials[0], reason="keyCompromise")
    ca.crl()
    report = ca.verify_audit()
    assert report.ok
    assert report.checked == 6  # init, 3 x issue, revoke, crl
    assert [e.action for e in ca.audit_tail(3)] == ["issue", "revoke", "crl"]


def test_edited_event_is_reported_as_first_broken_link(ca: CertificateAuthority) -> None:
    _issue_some(ca, 4)
    with ca.store.engine.begin() as conn:
        conn.execute(
            text("UPDATE audit_events SET subject = 'forged' WHERE seq = 3"),
        )
    report = ca.verify_audit()
    assert not report.ok
    assert report.broken_at == 3
    assert "altered" in (report.problem or "")
    assert report.checked == 2


def test_rehashed_edit_breaks_the_next_link(ca: CertificateAuthority) -> None:
    """An editor who also recomputes the edited row's hash is caught one row later."""
    _issue_some(ca, 3)
    event = next(e for e in ca.store.audit_events() if e.seq == 2)
    forged = AuditEvent(
        event.seq, event.at, event.actor, event.action, "forged", event.details, event.prev_hash
    ).sealed()
    with ca.store.engine.begin() as conn:
        conn.execute(
            text("UPDATE audit_events SET subject = 'forged', hash = :h WHERE seq = 2"),
            {"h": forged.hash},
        )
    report = ca.verify_audit()
    assert report.broken_at == 3
    assert "does not link" in (report.problem or "")


def test_deleted_event_is_reported(ca: CertificateAuthority) -> None:
    _issue_some(ca, 4)
    with ca.store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    report = ca.verify_audit()
    assert report.broken_at == 2
    assert "missing" in (report.problem or "")


def test_deleted_last_event_is_reported(ca: CertificateAuthority) -> None:
    _issue_some(ca, 2)
    with ca.store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 3"))
    report = ca.verify_audit()
    assert report.broken_at == 3
    assert "missing from the end" in (report.problem or "")


def test_cli_audit_verify_exits_1_on_tampering(
    ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    _issue_some(ca, 2)
    assert main(["audit", "verify"]) == 0
    with ca.store.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET actor = 'someone else' WHERE seq = 2"))
    capsys.readouterr()
    assert main(["audit", "verify"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Audit chain broken at event 2")
    assert len(err.strip().splitlines()) == 1
    assert main(["audit", "verify", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["broken_at"] == 2


def test_verify_chain_of_nothing_is_ok() -> None:
    assert verify_chain([], expected_count=0).ok


def test_serial_collision_is_retried(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trustmesh.pki._issue as issue_module

    values = iter([2**64 + 7, 2**64 + 7, 2**64 + 8])
    monkeypatch.setattr(issue_module, "new_serial", lambda: next(values))
    first = ca.issue("spiffe://example.org/a")
    second = ca.issue("spiffe://example.org/b")
    assert first.record.serial == format(2**64 + 7, "x")
    assert second.record.serial == format(2**64 + 8, "x")
    assert second.certificate.serial_number == 2**64 + 8  # re-signed with the new serial
    assert ca.store.count_certificates() == 2
    assert ca.verify_audit().ok


def test_failed_delivery_records_nothing(ca: CertificateAuthority) -> None:
    def explode(_: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ca.issue("spiffe://example.org/a", deliver=explode)
    assert ca.store.count_certificates() == 0
    assert ca.store.counter("audit_seq") == 1  # only init
    assert ca.verify_audit().ok


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    open_store(url).close()
    store = open_store(url)
    assert store.counter("audit_seq") == 0
    store.close()


def test_migrations_build_exactly_the_declared_schema(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from trustmesh.store._schema import metadata

    store = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    store.close()
    assert diff == []


def test_lookup_by_serial_uses_an_index(ca: CertificateAuthority) -> None:
    serial = _issue_some(ca, 3)[1]
    with ca.store.engine.connect() as conn:
        plan = conn.execute(
            text("EXPLAIN QUERY PLAN SELECT * FROM certificates WHERE serial = :s"), {"s": serial}
        ).all()
    detail = " ".join(str(row[-1]) for row in plan)
    assert "USING INDEX ix_certificates_serial" in detail, detail
    assert ca.store.get_certificate(serial).serial == serial


def test_unknown_database_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="supports sqlite:/// and postgresql://"):
        open_store("mysql://root@localhost/x")


_WORKER = textwrap.dedent(
    """
    import json, random, sys
    from pathlib import Path
    import trustmesh.pki._issue as issue_module
    from trustmesh.authority import CertificateAuthority

    # A tiny serial space so that the two processes do collide and must retry.
    rng = random.Random(int(sys.argv[3]))
    issue_module.new_serial = lambda: 2**64 + rng.randrange(500)
    ca = CertificateAuthority.open(Path(sys.argv[1]), passphrase=sys.argv[2].encode())
    serials = [
        ca.issue(f"spiffe://example.org/w{sys.argv[3]}/{i}").record.serial
        for i in range(int(sys.argv[4]))
    ]
    ca.close()
    print(json.dumps(serials))
    """
)


def _concurrent_issuance(home: Path, per_process: int) -> list[str]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                str(home),
                PASSPHRASE.decode(),
                str(seed),
                str(per_process),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    serials: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        serials += json.loads(out)
    return serials


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_processes_issue_concurrently_without_loss(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db_url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "ca"
    CertificateAuthority.init(
        home,
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        db_url=db_url,
    ).close()
    per_process = 40
    serials = _concurrent_issuance(home, per_process)
    assert len(serials) == 2 * per_process
    assert len(set(serials)) == len(serials)  # never a duplicate serial
    with CertificateAuthority.open(home) as ca:
        assert ca.store.count_certificates() == 2 * per_process  # nothing lost
        stored = {r.serial for r in ca.store.find_certificates()}
        assert stored == set(serials)
        report = ca.verify_audit()
        assert report.ok, report.problem
        assert report.checked == 1 + 2 * per_process


def test_postgres_full_cycle(pg_url: str, tmp_path: Path) -> None:
    home = tmp_path / "ca"
    with CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, db_url=pg_url
    ) as ca:
        issued = ca.issue("spiffe://example.org/pg", dns=["pg.internal"])
        ca.revoke(issued.record.serial, reason="superseded")
        crl = ca.crl()
        assert crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number)
        assert ca.store.dialect == "postgresql"
        assert ca.verify_audit().ok
    # a second open finds the schema migrated and the data there
    with CertificateAuthority.open(home) as ca:
        record = ca.store.get_certificate(issued.record.serial)
        assert record.revocation_reason == "superseded"
