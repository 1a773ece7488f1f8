"""ACME (RFC 8555) through the `acme` package against a real `ca serve`: the happy path,
ARI, profiles, EAB, revocation into the feed/CRL/OCSP, and every refusal's problem type."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from acme import challenges, client, messages
from acme import errors as acme_errors
from acme import jws as acme_jws
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import json_util, jwa, jwk

from trustmesh.acme import ACMEServer, cert_id, load_acme_config
from trustmesh.acme._eab import sealing_key
from trustmesh.authority import CertificateAuthority

from ._acme import (
    ACMEServerUnderTest,
    ChallengeServer,
    TXTServer,
    acme_ca_server,
    acme_client,
    answer_http01,
    close_networks,
    make_csr,
    network,
    new_key,
)
from .conftest import PASSPHRASE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def acme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ACMEServerUnderTest]:
    with acme_ca_server(tmp_path_factory.mktemp("acme")) as running:
        yield running


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    close_networks()
    while _RAWS:
        _RAWS.pop().http.close()


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


# -- hand-made JWS ---------------------------------------------------------------------


def _ctx(under_test: ACMEServerUnderTest) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(under_test.server.bundle))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_RAWS: list[Raw] = []


class Raw:
    """Hand-made ACME requests (httpx), to send what no client library would."""

    def __init__(self, under_test: ACMEServerUnderTest, provisioner: str = "web") -> None:
        self.base = f"{under_test.server.url}/acme/{provisioner}"
        self.http = httpx.Client(verify=_ctx(under_test), timeout=10)
        _RAWS.append(self)

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def nonce(self) -> str:
        return self.http.head(f"{self.base}/new-nonce").headers["replay-nonce"]

    def signed(
        self,
        key: jwk.JWK,
        url: str,
        payload: dict[str, object] | bytes | None,
        *,
        kid: str | None = None,
        nonce: str | None = None,
    ) -> str:
        body = (
            b""
            if payload is None
            else payload
            if isinstance(payload, bytes)
            else (json.dumps(payload).encode())
        )
        alg = jwa.ES256 if isinstance(key, jwk.JWKEC) else jwa.RS256
        nonce_value = nonce if nonce is not None else self.nonce()
        signed = acme_jws.JWS.sign(
            body, key, alg, json_util.decode_b64jose(nonce_value), url=url, kid=kid
        )
        return str(signed.json_dumps())

    def post(self, url: str, text: str) -> httpx.Response:
        return self.http.post(url, content=text, headers={"Content-Type": "application/jose+json"})


def _problem(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers.get("replay-nonce"), "every error carries a fresh nonce"
    return str(response.json()["type"])


def test_bad_nonce_and_replayed_jws_are_bad_nonce(acme_server: ACMEServerUnderTest) -> None:
    """A made-up nonce and a JWS sent a second time both answer badNonce with a new nonce."""
    raw = Raw(acme_server, "open")
    key = new_key()
    url = f"{raw.base}/new-account"
    made_up = raw.signed(key, url, {"termsOfServiceAgreed": True}, nonce=_b64(b"x" * 16))
    response = raw.post(url, made_up)
    assert response.status_code == 400
    assert _problem(response) == "urn:ietf:params:acme:error:badNonce"
    once = raw.signed(key, url, {"termsOfServiceAgreed": True})
    assert raw.post(url, once).status_code == 201
    again = raw.post(url, once)
    assert _problem(again) == "urn:ietf:params:acme:error:badNonce"


def test_wrong_url_none_and_hmac_algorithms_are_refused(acme_server: ACMEServerUnderTest) -> None:
    """A JWS signed for another URL is unauthorized; alg none and HS256 are
    badSignatureAlgorithm, listing the accepted algorithms."""
    raw = Raw(acme_server, "open")
    key = new_key()
    signed = raw.signed(key, f"{raw.base}/new-order", {"termsOfServiceAgreed": True})
    response = raw.post(f"{raw.base}/new-account", signed)
    assert _problem(response) == "urn:ietf:params:acme:error:unauthorized"
    for alg in ("none", "HS256"):
        header: dict[str, object] = {
            "alg": alg,
            "nonce": raw.nonce(),
            "url": f"{raw.base}/new-account",
            "jwk": {},
        }
        doc = {
            "protected": _b64(json.dumps(header).encode()),
            "payload": _b64(b"{}"),
            "signature": "",
        }
        response = raw.post(f"{raw.base}/new-account", json.dumps(doc))
        assert _problem(response) == "urn:ietf:params:acme:error:badSignatureAlgorithm"
        assert "ES256" in response.json()["algorithms"]


def test_wrong_account_key_is_refused(acme_server: ACMEServerUnderTest) -> None:
    """A request naming account A's kid but signed with another key does not verify."""
    _acme, _, registration = acme_client(acme_server, provisioner="open", eab=False)
    raw = Raw(acme_server, "open")
    url = f"{raw.base}/new-order"
    forged = raw.signed(
        new_key(),
        url,
        {"identifiers": [{"type": "dns", "value": "app.localhost"}]},
        kid=registration.uri,
    )
    response = raw.post(url, forged)
    assert response.status_code == 400
    assert _problem(response) == "urn:ietf:params:acme:error:malformed"
    assert "signature" in response.json()["detail"]


def test_forbidden_name_is_rejected_identifier_and_nothing_recorded(
    acme_server: ACMEServerUnderTest,
) -> None:
    """An order for a name the profile forbids is rejectedIdentifier with a subproblem
    naming it; no order, authorization or certificate appears."""
    acme, _, _ = acme_client(acme_server)
    before = _records(acme_server)
    _, csr = make_csr(["app.localhost", "www.example.com"])
    with pytest.raises(messages.Error) as caught:
        acme.new_order(csr)
    assert caught.value.typ == "urn:ietf:params:acme:error:rejectedIdentifier"
    assert caught.value.subproblems is not None
    sub = caught.value.subproblems[0]
    assert sub.identifier is not None
    assert sub.identifier.value == "www.example.com"
    assert _records(acme_server) == before


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad_name.localhost", "is not a host name"),
        ("-lead.localhost", "is not a host name"),
        (("a" * 64) + ".localhost", "is not a host name"),
        ("a.*.example.internal", "must be '*.' followed by"),
        ("*.*.example.internal", "must be '*.' followed by"),
        ("10.1.2.3", "send it as an 'ip' identifier"),
    ],
)
def test_a_dns_identifier_that_is_not_a_host_name_is_malformed(
    acme_server: ACMEServerUnderTest, name: str, message: str
) -> None:
    """A dns identifier outside host name syntax (RFC 1123 labels, '*.' only as a whole
    leftmost label, no IP address) is malformed before any profile applies, even where the
    profile's pattern (**.localhost) would match it; nothing is recorded."""
    acme, _, _ = acme_client(acme_server, provisioner="dns", eab=False)
    before = _records(acme_server)
    with pytest.raises(messages.Error) as caught:
        acme.new_order(make_csr([name])[1])
    assert caught.value.typ == "urn:ietf:params:acme:error:malformed"
    assert message in str(caught.value.detail)
    assert _records(acme_server) == before


def test_csr_not_matching_the_order_is_bad_csr_and_nothing_recorded(
    acme_server: ACMEServerUnderTest, challenge_server: ChallengeServer
) -> None:
    """Finalizing with a CSR for other names than the order's is badCSR; the order stays
    ready, nothing is issued, and a matching CSR then succeeds."""
    acme, key, _ = acme_client(acme_server)
    _, csr = make_csr(["one.localhost"])
    order = acme.new_order(csr)
    answer_http01(acme, key, order, challenge_server)
    deadline = dt.datetime.now() + dt.timedelta(seconds=30)
    order = acme.poll_authorizations(order, deadline)
    before = _records(acme_server)
    _, other = make_csr(["one.localhost", "two.localhost"])
    with pytest.raises(messages.Error) as caught:
        acme.finalize_order(order.update(csr_pem=other), deadline)
    assert caught.value.typ == "urn:ietf:params:acme:error:badCSR"
    assert "two.localhost" in str(caught.value.detail)
    assert _records(acme_server) == before
    done = acme.finalize_order(order, deadline)
    assert "BEGIN CERTIFICATE" in done.fullchain_pem
    assert len(_records(acme_server)) == len(before) + 1


def test_finalize_before_validation_is_order_not_ready(acme_server: ACMEServerUnderTest) -> None:
    """Finalize on a pending order answers orderNotReady (403)."""
    acme, _, _ = acme_client(acme_server)
    _, csr = make_csr(["early.localhost"])
    order = acme.new_order(csr)
    with pytest.raises(messages.Error) as caught:
        acme.begin_finalization(order)
    assert caught.value.typ == "urn:ietf:params:acme:error:orderNotReady"


def test_wrong_challenge_answer_invalidates_the_order(
    acme_server: ACMEServerUnderTest, challenge_server: ChallengeServer
) -> None:
    """An http-01 answer that is not the key authorization makes the challenge invalid
    with incorrectResponse, and the order invalid."""
    acme, key, _ = acme_client(acme_server)
    _, csr = make_csr(["wrong.localhost"])
    order = acme.new_order(csr)
    authz = order.authorizations[0]
    body = next(c for c in authz.body.challenges if c.chall.typ == "http-01")
    response, _ = body.response_and_validation(key)
    challenge_server.answers[body.chall.encode("token")] = "not-the-key-authorization"
    acme.answer_challenge(body, response)
    deadline = dt.datetime.now() + dt.timedelta(seconds=30)
    with pytest.raises(acme_errors.ValidationError) as caught:
        acme.poll_authorizations(order, deadline)
    failed = caught.value.failed_authzrs[0].body.challenges
    error = next(c.error for c in failed if c.chall.typ == "http-01")
    assert error is not None
    assert error.typ == "urn:ietf:params:acme:error:incorrectResponse"


def test_eab_is_required_single_use_and_checked(acme_server: ACMEServerUnderTest) -> None:
    """Without a binding the web provisioner answers externalAccountRequired; a key
    used once, or a wrong HMAC key, is unauthorized."""
    with pytest.raises(messages.Error) as caught:
        acme_client(acme_server, eab=False)
    assert caught.value.typ == "urn:ietf:params:acme:error:externalAccountRequired"
    kid, hmac_key = acme_server.eab()
    for use, mac in ((1, "A" * 43), (2, hmac_key), (3, hmac_key)):
        key = new_key()
        net = network(key, acme_server.server.bundle)
        directory = client.ClientV2.get_directory(acme_server.directory(), net)
        acme = client.ClientV2(directory, net)
        binding = messages.ExternalAccountBinding.from_data(
            account_public_key=key.public_key(), kid=kid, hmac_key=mac, directory=directory
        )
        registration = messages.NewRegistration.from_data(
            terms_of_service_agreed=True, external_account_binding=binding
        )
        if use == 2:
            assert acme.new_account(registration).body.status == "valid"
            continue
        with pytest.raises(messages.Error) as refused:
            acme.new_account(registration)
        assert refused.value.typ == "urn:ietf:params:acme:error:unauthorized"


def test_unknown_profile_is_invalid_profile(acme_server: ACMEServerUnderTest) -> None:
    """newOrder naming a profile the directory does not list is invalidProfile."""
    acme, _, _ = acme_client(acme_server)
    assert set(acme.directory.meta.profiles) == {"service", "short"}
    _, csr = make_csr(["p.localhost"])
    with pytest.raises(messages.Error) as caught:
        acme.new_order(csr, profile="forever")
    assert caught.value.typ == "urn:ietf:params:acme:error:invalidProfile"


def _issue(
    acme_server: ACMEServerUnderTest, challenge_server: ChallengeServer, name: str
) -> tuple[client.ClientV2, jwk.JWK, messages.RegistrationResource, bytes, x509.Certificate]:
    acme, key, registration = acme_client(acme_server)
    cert_key, csr = make_csr([name])
    order = acme.new_order(csr)
    answer_http01(acme, key, order, challenge_server)
    order = acme.poll_and_finalize(order, dt.datetime.now() + dt.timedelta(seconds=30))
    leaf = x509.load_pem_x509_certificates(order.fullchain_pem.encode())[0]
    return acme, key, registration, cert_key, leaf


def test_renewal_info_window_and_after_revocation(
    acme_server: ACMEServerUnderTest, challenge_server: ChallengeServer
) -> None:
    """renewalInfo suggests a window inside the certificate's second half; once revoked
    by its own key (jwk-signed), the window lies in the past and the CRL and OCSP say so."""
    _, _, _, cert_key, leaf = _issue(acme_server, challenge_server, "ari.localhost")
    url = f"{acme_server.server.url}/acme/web/renewal-info/{cert_id(leaf)}"
    http = Raw(acme_server).http
    info = http.get(url)
    assert info.status_code == 200
    assert int(info.headers["retry-after"]) >= 60
    window = info.json()["suggestedWindow"]
    start = dt.datetime.fromisoformat(window["start"])
    end = dt.datetime.fromisoformat(window["end"])
    assert leaf.not_valid_before_utc < start < end < leaf.not_valid_after_utc
    # Revocation signed by the certificate's key (no account).
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(cert_key, None)
    net = network(jwk.JWKEC(key=private), acme_server.server.bundle)
    directory = client.ClientV2.get_directory(acme_server.directory(), net)
    client.ClientV2(directory, net).revoke(leaf, 1)
    after = http.get(url).json()["suggestedWindow"]
    assert dt.datetime.fromisoformat(after["end"]) <= dt.datetime.now(dt.UTC) + dt.timedelta(
        seconds=5
    )
    with CertificateAuthority.open(acme_server.server.home, passphrase=PASSPHRASE) as ca:
        record = ca.store.get_certificate(format(leaf.serial_number, "x"))
        assert record.revocation_reason == "keyCompromise"


def test_account_revocation_reaches_feed_crl_and_ocsp(
    acme_server: ACMEServerUnderTest, challenge_server: ChallengeServer, tmp_path: Path
) -> None:
    """A certificate revoked by its account through ACME is in the revocation feed, the
    CRL (openssl crl) and OCSP (openssl ocsp), and a second revocation is alreadyRevoked."""
    import subprocess

    acme, _, _, _, leaf = _issue(acme_server, challenge_server, "gone.localhost")
    acme.revoke(leaf, 4)
    serial = format(leaf.serial_number, "x")
    with pytest.raises(messages.Error) as again:
        acme.revoke(leaf, 4)
    assert again.value.typ == "urn:ietf:params:acme:error:alreadyRevoked"
    with CertificateAuthority.open(acme_server.server.home, passphrase=PASSPHRASE) as ca:
        watcher = ca.issue("spiffe://example.org/watcher")
        (tmp_path / "w.pem").write_bytes(b"".join(pem(c) for c in watcher.chain))
        (tmp_path / "w.key").write_bytes(pem_key(watcher.key))
        (tmp_path / "int.pem").write_bytes(pem(ca.intermediate))
    mtls = _ctx(acme_server)
    mtls.load_cert_chain(tmp_path / "w.pem", tmp_path / "w.key")
    with httpx.Client(verify=mtls) as http:
        feed = http.get(f"{acme_server.server.url}/v1/revocations?since=0").json()
    assert serial in [e["serial"] for e in feed["events"]]
    crl = httpx.get(f"{acme_server.ocsp_url}/crl").content
    (tmp_path / "crl.der").write_bytes(crl)
    text = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(tmp_path / "crl.der"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert serial.upper().zfill(2) in text.replace(":", "").upper()
    (tmp_path / "leaf.pem").write_bytes(pem(leaf))
    ocsp = subprocess.run(
        [
            "openssl",
            "ocsp",
            "-issuer",
            str(tmp_path / "int.pem"),
            "-cert",
            str(tmp_path / "leaf.pem"),
            "-url",
            acme_server.ocsp_url,
            "-CAfile",
            str(acme_server.server.bundle),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "revoked" in ocsp.lower()
    assert "superseded" in ocsp.lower()


def pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_key_change_moves_the_account_to_the_new_key(acme_server: ACMEServerUnderTest) -> None:
    """keyChange (RFC 8555 7.3.5) swaps the account key: the new key signs for the
    account, the old one no longer does."""
    _, old, registration = acme_client(acme_server, provisioner="open", eab=False)
    raw = Raw(acme_server, "open")
    new = new_key()
    url = f"{raw.base}/key-change"
    inner = acme_jws.JWS.sign(
        json.dumps(
            {"account": registration.uri, "oldKey": old.public_key().to_partial_json()}
        ).encode(),
        new,
        jwa.ES256,
        None,
        url=url,
    )
    inner_doc = json.loads(inner.json_dumps())
    inner_doc["protected"] = inner_doc["protected"]
    outer = raw.signed(old, url, json.dumps(inner_doc).encode(), kid=registration.uri)
    assert raw.post(url, outer).status_code == 200
    account_url = registration.uri
    by_new = raw.post(account_url, raw.signed(new, account_url, None, kid=account_url))
    assert by_new.status_code == 200
    assert by_new.json()["status"] == "valid"
    by_old = raw.post(account_url, raw.signed(old, account_url, None, kid=account_url))
    assert _problem(by_old) == "urn:ietf:params:acme:error:malformed"


def test_deactivated_account_and_authorization(acme_server: ACMEServerUnderTest) -> None:
    """A deactivated authorization makes its order invalid; a deactivated account is
    refused (unauthorized) from then on."""
    acme, _, registration = acme_client(acme_server, provisioner="open", eab=False)
    _, csr = make_csr(["deact.localhost"])
    order = acme.new_order(csr)
    gone = acme.deactivate_authorization(order.authorizations[0])
    assert gone.body.status == messages.STATUS_DEACTIVATED or gone.body.status == "deactivated"
    order = acme.poll(order.authorizations[0])[0]
    acme.deactivate_registration(registration)
    with pytest.raises(messages.Error) as caught:
        acme.new_order(csr)
    assert caught.value.typ == "urn:ietf:params:acme:error:unauthorized"


def test_expired_orders_and_nonces_are_cleaned_up(acme_server: ACMEServerUnderTest) -> None:
    """`ca serve` deletes an expired pending order (the brief provisioner's live 2 s) on its
    own; cleanup() also drops expired nonces."""
    from sqlalchemy import func, select

    from trustmesh.store import acme_nonces, acme_orders

    acme, _, _ = acme_client(acme_server, provisioner="brief", eab=False)
    _, csr = make_csr(["brief.localhost"])
    order_id = acme.new_order(csr).uri.rsplit("/", 1)[-1]
    with CertificateAuthority.open(acme_server.server.home, passphrase=PASSPHRASE) as ca:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with ca.store.reader() as conn:
                left = conn.execute(
                    select(acme_orders.c.id).where(acme_orders.c.id == order_id)
                ).first()
            if left is None:
                break
            time.sleep(0.5)
        assert left is None, "the expired order was not cleaned up"
        config = load_acme_config(ca.home / "config.toml", ca.config)
        server = ACMEServer(ca, config, eab_key=sealing_key(ca))
        counts = server.cleanup(now=int(time.time()) + 7200)
        assert counts["nonces"] >= 1
        with ca.store.reader() as conn:
            assert conn.execute(select(func.count()).select_from(acme_nonces)).scalar() == 0


@pytest.mark.slow
def test_a_body_that_never_arrives_is_refused_within_the_body_timeout(
    acme_server: ACMEServerUnderTest,
) -> None:
    """A client that announces a JWS body and sends none gets a 408 malformed problem after
    the body time bound (as on /v1/*), and a declared body over the limit a 413 at once."""
    url = httpx.URL(acme_server.server.url)
    host, port = url.host, url.port
    assert port is not None
    context = _ctx(acme_server)

    def exchange(head: bytes, wait: float) -> tuple[bytes, float]:
        with socket.create_connection((host, port), timeout=wait) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                started = time.monotonic()
                tls.sendall(head)
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                return answer, time.monotonic() - started

    path = "/acme/open/new-account"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/jose+json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    answer, took = exchange(head, wait=30)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"application/problem+json" in answer
    assert 9 <= took < 20, took
    big = head.replace(b"Content-Length: 100", b"Content-Length: 9999999")
    answer, took = exchange(big, wait=10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert took < 5


# -- dns-01 (RFC 8555 8.4) and wildcards ---------------------------------------------------


def _answer_dns01(
    acme: client.ClientV2, key: jwk.JWK, order: messages.OrderResource, txt: TXTServer
) -> None:
    """Publish base64url(SHA-256(keyAuthorization)) for each authorization, and answer."""
    for authz in order.authorizations:
        body = next(c for c in authz.body.challenges if isinstance(c.chall, challenges.DNS01))
        name = body.chall.validation_domain_name(authz.body.identifier.value) + "."
        txt.records.setdefault(name, []).append(body.chall.validation(key))
        acme.answer_challenge(body, body.chall.response(key))


def test_dns01_issues_a_wildcard_and_its_base_name_over_tcp_fallback(
    acme_server: ACMEServerUnderTest,
) -> None:
    """An order for *.wild.example.internal and wild.example.internal on the dns
    provisioner: the wildcard's authorization names the base with wildcard=true and
    offers dns-01 only; both TXT values at _acme-challenge.wild.example.internal (among
    decoys too big for one UDP answer, so the CA retries over TCP) validate, and the
    certificate names both."""
    acme, key, _ = acme_client(acme_server, provisioner="dns", eab=False)
    names = ["*.wild.example.internal", "wild.example.internal"]
    _, csr = make_csr(names)
    order = acme.new_order(csr)
    by_wildcard = {a.body.wildcard or False: a.body for a in order.authorizations}
    assert by_wildcard[True].identifier.value == "wild.example.internal"
    assert [c.chall.typ for c in by_wildcard[True].challenges] == ["dns-01"]
    offered = {c.to_partial_json()["type"] for c in by_wildcard[False].challenges}
    assert offered == {"dns-01", "http-01", "tls-alpn-01"}
    record = "_acme-challenge.wild.example.internal."
    acme_server.dns.records[record] = [f"decoy-{i:02d}-" + "x" * 40 for i in range(12)]
    _answer_dns01(acme, key, order, acme_server.dns)
    order = acme.poll_and_finalize(order, dt.datetime.now() + dt.timedelta(seconds=30))
    leaf = x509.load_pem_x509_certificates(order.fullchain_pem.encode())[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(names)
    assert ("udp", record) in acme_server.dns.queries
    assert ("tcp", record) in acme_server.dns.queries


def _order_status(acme: client.ClientV2, order: messages.OrderResource) -> dict[str, object]:
    return dict(acme._post_as_get(order.uri).json())


def test_dns01_wrong_txt_value_invalidates_the_order_and_nothing_is_recorded(
    acme_server: ACMEServerUnderTest,
) -> None:
    """A TXT record that is not base64url(SHA-256(keyAuthorization)) makes the dns-01
    challenge invalid with incorrectResponse and the order invalid; finalize is refused
    and no certificate is recorded."""
    acme, key, _ = acme_client(acme_server, provisioner="dns", eab=False)
    before = _records(acme_server)
    _, csr = make_csr(["*.wrong.example.internal"])
    order = acme.new_order(csr)
    body = order.authorizations[0].body.challenges[0]
    assert body.chall.typ == "dns-01"
    acme_server.dns.records["_acme-challenge.wrong.example.internal."] = [
        challenges.DNS01(token=b"x" * 32).validation(key)  # another challenge's value
    ]
    acme.answer_challenge(body, body.chall.response(key))
    with pytest.raises(acme_errors.ValidationError) as caught:
        acme.poll_authorizations(order, dt.datetime.now() + dt.timedelta(seconds=30))
    error = caught.value.failed_authzrs[0].body.challenges[0].error
    assert error is not None
    assert error.typ == "urn:ietf:params:acme:error:incorrectResponse"
    assert "_acme-challenge.wrong.example.internal." in str(error.detail)
    assert _order_status(acme, order)["status"] == "invalid"
    with pytest.raises(messages.Error) as refused:
        acme.begin_finalization(order)
    assert refused.value.typ == "urn:ietf:params:acme:error:orderNotReady"
    assert _records(acme_server) == before


def test_dns01_without_a_record_is_a_dns_problem(acme_server: ACMEServerUnderTest) -> None:
    """No _acme-challenge record at the configured resolver (NXDOMAIN) is a dns problem."""
    acme, key, _ = acme_client(acme_server, provisioner="dns", eab=False)
    _, csr = make_csr(["absent.example.internal"])
    order = acme.new_order(csr)
    body = next(
        c for c in order.authorizations[0].body.challenges if isinstance(c.chall, challenges.DNS01)
    )
    acme.answer_challenge(body, body.chall.response(key))
    with pytest.raises(acme_errors.ValidationError) as caught:
        acme.poll_authorizations(order, dt.datetime.now() + dt.timedelta(seconds=30))
    failed = caught.value.failed_authzrs[0].body.challenges
    error = next(c.error for c in failed if c.chall.typ == "dns-01")
    assert error is not None
    assert error.typ == "urn:ietf:params:acme:error:dns"
    assert "NXDOMAIN" in str(error.detail)


@pytest.mark.parametrize(
    ("provisioner", "profile", "name", "message"),
    [
        ("open", None, "*.x.example.internal", "needs dns-01"),
        ("dns", "pinned", "*.pinned.localhost", "allows DNS names matching"),
    ],
)
def test_wildcards_need_dns01_and_a_profile_allowing_them(
    acme_server: ACMEServerUnderTest,
    provisioner: str,
    profile: str | None,
    name: str,
    message: str,
) -> None:
    """A wildcard is rejectedIdentifier on a provisioner without dns-01 and when the
    profile's patterns do not cover every name it stands for (app*.pinned.localhost does
    not cover *.pinned.localhost). ('*' other than as the whole leftmost label is malformed:
    tests/test_acme_pebble.py, as pebble answers.)"""
    acme, _, _ = acme_client(acme_server, provisioner=provisioner, eab=False)
    before = _records(acme_server)
    _, csr = make_csr([name])
    with pytest.raises(messages.Error) as caught:
        acme.new_order(csr, profile=profile)
    assert caught.value.typ == "urn:ietf:params:acme:error:rejectedIdentifier"
    assert message in str(caught.value.detail)
    assert _records(acme_server) == before
    if profile == "pinned":  # the same profile takes a name its pattern covers
        acme.new_order(make_csr(["app1.pinned.localhost"])[1], profile=profile)
