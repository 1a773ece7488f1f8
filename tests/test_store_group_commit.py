"""Group commit of issuance records (Store.record_issued) on real SQLite and PostgreSQL:
one transaction for the records that wait together, each caller answered only after
its own record and audit event are committed, one bad record failing alone."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConflictError
from trustmesh.pki import KeyType
from trustmesh.store import CertificateRecord, Store

from .conftest import PASSPHRASE


def _record(serial: str) -> CertificateRecord:
    now = datetime.now(UTC).replace(microsecond=0)
    return CertificateRecord(
        issuer="test-issuer",
        serial=serial,
        spiffe_id=f"spiffe://example.org/g/{serial}",
        dns=(),
        ips=(),
        profile="default",
        key_type="ec-p256",
        fingerprint=serial * 4,
        not_before=now,
        not_after=now + timedelta(hours=1),
        issued_at=now,
        pem="-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    )


def _grouped(store: Store, records: list[CertificateRecord]) -> tuple[list[object], list[int]]:
    """Call record_issued from one thread per record, all queued behind one leader."""
    results: list[object] = [None] * len(records)
    batches: list[int] = []
    original = store._write_group

    def counted(batch: list) -> list:  # type: ignore[type-arg]
        batches.append(len(batch))
        return original(batch)

    store._write_group = counted  # type: ignore[method-assign]

    def call(i: int) -> None:
        try:
            results[i] = store.record_issued(
                records[i],
                at=records[i].issued_at,
                actor="test",
                action="renew",
                details={"spiffe_id": records[i].spiffe_id},
            )
        except ConflictError as exc:
            results[i] = exc

    with store._group:
        store._leading = True  # as if a leader were committing: everyone queues
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(records))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(store._waiting) < len(records) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(store._waiting) == len(records)
    with store._group:
        first = store._waiting[0]
    first.wake.release()  # the pretend leader hands over to the first in the queue
    for thread in threads:
        thread.join(10)
    store._write_group = original  # type: ignore[method-assign]
    return results, batches


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def authority(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CertificateAuthority]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    ca = CertificateAuthority.init(
        tmp_path / "home",
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        db_url=url,
    )
    yield ca
    ca.close()


def test_waiting_records_commit_in_one_transaction(authority: CertificateAuthority) -> None:
    """Ten callers queued together are committed by one transaction, and the audit
    chain holds their ten events in order."""
    store = authority.store
    records = [_record(f"a{i:02x}") for i in range(10)]
    results, batches = _grouped(store, records)
    assert batches == [10]
    seqs = sorted(r.seq for r in results)  # type: ignore[attr-defined]
    assert seqs == list(range(seqs[0], seqs[0] + 10))  # one run of the chain
    for record in records:
        assert store.lookup_certificate(record.serial) is not None
    assert authority.verify_audit().ok


def test_one_duplicate_fails_alone(authority: CertificateAuthority) -> None:
    """A duplicate serial in a group fails only its own caller; the others are
    committed (record by record after the group failed) and the chain verifies."""
    store = authority.store
    taken = _record("dup1")
    with store.transaction() as conn:
        store.add_certificate(conn, taken)
    records = [_record(f"b{i:02x}") for i in range(5)]
    records.insert(2, dataclasses.replace(taken, spiffe_id="spiffe://example.org/g/other"))
    results, batches = _grouped(store, records)
    assert batches[0] == 6
    assert batches[1:] == [1] * 6
    refused = results[2]
    assert isinstance(refused, ConflictError)
    assert refused.details["reason"] == "duplicate_serial"
    assert all(not isinstance(r, Exception) for i, r in enumerate(results) if i != 2)
    for i, record in enumerate(records):
        found = store.lookup_certificate(record.serial)
        assert found is not None
        if i == 2:
            assert found.spiffe_id == taken.spiffe_id  # the first one stays
    report = authority.verify_audit()
    assert report.ok, report
    assert {e.subject for e in store.audit_events()[-5:]} == {
        r.serial for i, r in enumerate(records) if i != 2
    }


def test_concurrent_callers_all_return(authority: CertificateAuthority) -> None:
    """16 threads recording 20 records each, as fast as they can: every call returns
    (each waiter is woken once: committed, or its turn to lead, never lost), more
    than 64 queued at once are taken in several groups, and the chain verifies."""
    store = authority.store
    errors: list[BaseException] = []

    def caller(t: int) -> None:
        try:
            for i in range(20):
                record = _record(f"c{t:02x}{i:02x}")
                event = store.record_issued(
                    record, at=record.issued_at, actor="test", action="renew", details={}
                )
                assert event.subject == record.serial
        except BaseException as exc:  # shown below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    assert not store._leading
    assert not store._waiting
    assert store.count_certificates() >= 16 * 20
    assert authority.verify_audit().ok


def test_more_waiting_than_one_group_takes(authority: CertificateAuthority) -> None:
    """70 queued records (more than one group's 64) go in two groups, in order."""
    records = [_record(f"d{i:02x}") for i in range(70)]
    results, batches = _grouped(authority.store, records)
    assert sorted(batches) == [6, 64]
    assert all(not isinstance(r, Exception) for r in results)
    assert not authority.store._leading
    assert authority.verify_audit().ok
