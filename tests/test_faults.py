"""Faults on real processes: the CA's PostgreSQL goes away and comes back."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, pem_certificates
from trustmesh.store import normalize_url

from ._server import ADMIN, running_server
from .conftest import PASSPHRASE
from .test_ca_server import assert_problem, make_csr
from .test_feed import Subscriber, http_client, identity


@pytest.fixture
def own_database() -> Iterator[tuple[str, str]]:
    """A database of its own, so the test can cut it off without touching others."""
    base = os.environ.get("TRUSTMESH_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("TRUSTMESH_TEST_POSTGRES_URL is not set")
    name = f"tm_fault_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(normalize_url(base)).set(database=name).render_as_string(hide_password=False)
    yield url, name
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE "{name}"'))
    admin.dispose()


def set_database_online(name: str, online: bool) -> None:
    engine = create_engine(
        normalize_url(os.environ["TRUSTMESH_TEST_POSTGRES_URL"]), isolation_level="AUTOCOMMIT"
    )
    with engine.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(online).lower()}'))
        if not online:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
    engine.dispose()


@pytest.mark.postgres
def test_database_outage_gives_503_records_nothing_and_recovers(
    tmp_path: Path, own_database: tuple[str, str]
) -> None:
    url, name = own_database
    home = tmp_path / "home"
    with CertificateAuthority.init(
        home,
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        db_url=url,
    ) as ca:
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(pem_certificates(ca.bundle))
        reader, _ = identity(ca, "spiffe://example.org/reader", tmp_path / "reader")
        admin, _ = identity(ca, ADMIN, tmp_path / "admin")
        _, before_outage = identity(ca, "spiffe://example.org/a", tmp_path / "a")
        _, during_outage = identity(ca, "spiffe://example.org/b", tmp_path / "b")
        token = ca.create_join_token("spiffe://example.org/new")
    _, csr = make_csr("spiffe://example.org/new")
    with running_server(home, tmp_path) as server:
        server_url = server.url
        subscriber = Subscriber(server_url, bundle, reader)
        try:
            with http_client(server_url, bundle, admin) as http:
                assert http.post("/v1/revoke", json={"serial": before_outage}).status_code == 200
                assert subscriber.next()[1]["serial"] == before_outage

                set_database_online(name, False)
                ready = http.get("/readyz")
                assert_problem(ready, 503)
                assert_problem(http.post("/v1/enroll", json={"token": token, "csr": csr}), 503)
                assert_problem(http.post("/v1/revoke", json={"serial": during_outage}), 503)
                assert http.get("/healthz").status_code == 200  # alive, just not ready

                set_database_online(name, True)
                assert http.get("/readyz").status_code == 200
                enrolled = http.post("/v1/enroll", json={"token": token, "csr": csr})
                assert enrolled.status_code == 201, enrolled.text  # the token was not spent
                assert http.post("/v1/revoke", json={"serial": during_outage}).status_code == 200
            # the stream picks up after the outage without a gap
            assert subscriber.next(timeout=10)[1]["serial"] == during_outage
        finally:
            subscriber.close()
    with CertificateAuthority.open(home) as ca:
        assert ca.verify_audit().ok
        assert [
            r.spiffe_id for r in ca.store.find_certificates(spiffe_id="spiffe://example.org/new")
        ] == ["spiffe://example.org/new"]


def assert_no_database_details(body: str, *secrets: str) -> None:
    """The public body names none of the database's coordinates nor its driver."""
    lowered = body.lower()
    for secret in secrets:
        assert secret.lower() not in lowered, (secret, body)
    assert "database_unavailable" in body, body


@pytest.mark.postgres
def test_database_outage_hides_the_cause_from_callers(
    tmp_path: Path, own_database: tuple[str, str]
) -> None:
    """A 503 during an outage has a generic detail; the URL and driver error go to the log."""
    url, name = own_database
    parsed = make_url(url)
    home = tmp_path / "home"
    with CertificateAuthority.init(
        home,
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        db_url=url,
    ) as ca:
        token = ca.create_join_token("spiffe://example.org/new")
    _, csr = make_csr("spiffe://example.org/new")
    with running_server(home, tmp_path) as server:
        with http_client(server.url, server.bundle, None) as http:
            set_database_online(name, False)
            try:
                answers = [
                    http.get("/v1/crl"),
                    http.post("/v1/enroll", json={"token": token, "csr": csr}),
                    http.get("/readyz"),
                ]
            finally:
                set_database_online(name, True)
        log = (tmp_path / "serve.log").read_text()
    secrets = [
        name,
        str(parsed.host),
        f":{parsed.port or 5432}",
        str(parsed.username),
        "psycopg",
        "postgresql",
        "FATAL",
        "OperationalError",
    ]
    for answer in answers:
        problem = assert_problem(answer, 503, "database_unavailable")
        assert "retry" in problem["detail"]
        assert_no_database_details(answer.text, *secrets)
    errors = [line for line in log.splitlines() if '"database_error"' in line]
    assert len(errors) >= 3, log
    assert any(name in line and "/v1/crl" in line for line in errors), errors
    assert any("/v1/enroll" in line and str(parsed.username) in line for line in errors), errors
    assert all('"level": "error"' in line for line in errors), errors


def test_duplicate_refused_by_the_database_hides_the_driver_text(tmp_path: Path) -> None:
    """A record the database refuses (here a SQLite trigger stands in for a UNIQUE
    constraint) answers 409 with a generic detail; the driver's text goes to the log."""
    home = tmp_path / "home"
    with CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ) as ca:
        token = ca.create_join_token("spiffe://example.org/dup")
    engine = create_engine(f"sqlite:///{home / 'trustmesh.db'}")
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER refuse_enroll BEFORE INSERT ON audit_events "
                "WHEN NEW.details LIKE '%example.org/dup%' "
                "OR NEW.subject LIKE '%example.org/dup%' BEGIN "
                "SELECT RAISE(ABORT, 'UNIQUE constraint failed: certificates.secret_column'); END"
            )
        )
    engine.dispose()
    _, csr = make_csr("spiffe://example.org/dup")
    with running_server(home, tmp_path) as server:
        with http_client(server.url, server.bundle, None) as http:
            answer = http.post("/v1/enroll", json={"token": token, "csr": csr})
        log = (tmp_path / "serve.log").read_text()
    problem = assert_problem(answer, 409, "duplicate")
    assert "retry" in problem["detail"]
    for secret in ("secret_column", "unique constraint", "sqlite", "integrityerror"):
        assert secret not in answer.text.lower(), answer.text
    assert any(
        "secret_column" in line and "/v1/enroll" in line
        for line in log.splitlines()
        if '"database_error"' in line
    ), log
