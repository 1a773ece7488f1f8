"""ACME (RFC 8555) through the `acme` package against a real `ca serve`: the happy path,
ARI, profiles, EAB, revocation into the feed/CRL/OCSP, and every refusal's problem type."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from acme import errors as acme_errors
from acme import messages
from cryptography import x509

from trustmesh.authority import CertificateAuthority

from ._acme import (
    ACMEServerUnderTest,
    ChallengeServer,
    acme_ca_server,
    acme_client,
    answer_http01,
    make_csr,
)
from .conftest import PASSPHRASE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def acme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ACMEServerUnderTest]:
    with acme_ca_server(tmp_path_factory.mktemp("acme")) as running:
        yield running


@pytest.fixture(scope="module")
def challenge_server(acme_server: ACMEServerUnderTest) -> Iterator[ChallengeServer]:
    with ChallengeServer(acme_server.http_port) as server:
        yield server


def _records(under_test: ACMEServerUnderTest) -> list[str]:
    with CertificateAuthority.open(under_test.server.home, passphrase=PASSPHRASE) as ca:
        return [r.serial for r in ca.store.find_certificates()]


def test_http01_order_issues_a_chain_recorded_and_audited(
    acme_server: ACMEServerUnderTest, challenge_server: ChallengeServer
) -> None:
    """An order validated over http-01 and finalized yields a server certificate for
    exactly the ordered name, chained to the CA, recorded and audited as 'acme'."""
    acme, key, _ = acme_client(acme_server)
    _, csr = make_csr(["app.localhost"])
    order = acme.new_order(csr)
    answer_http01(acme, key, order, challenge_server)
    deadline = dt.datetime.now() + dt.timedelta(seconds=30)
    order = acme.poll_and_finalize(order, deadline)
    chain = x509.load_pem_x509_certificates(order.fullchain_pem.encode())
    leaf = chain[0]
    assert len(chain) == 2
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["app.localhost"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    with CertificateAuthority.open(acme_server.server.home, passphrase=PASSPHRASE) as ca:
        record = ca.store.get_certificate(format(leaf.serial_number, "x"))
        assert record.spiffe_id.startswith("spiffe://example.org/acme/web/")
        events = [e for e in ca.audit_tail(20) if e.subject == record.serial]
        assert [e.action for e in events] == ["acme"]
        assert chain[1] == ca.intermediate
