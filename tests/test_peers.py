"""Interoperability with peers we did not write.

OpenSSL's command line (verify, req, crl, ocsp, pkcs12), Java's keytool and the
standard library's ``ssl`` module (real mutual-TLS handshakes on 127.0.0.1) must
accept what trustmesh issues, and refuse it for the right reason when they should.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from tests.conftest import PASSPHRASE
from trustmesh.authority import CertificateAuthority, Issued
from trustmesh.cli import main
from trustmesh.errors import CSRError
from trustmesh.pki import (
    KeyType,
    Profile,
    SpiffeID,
    dump_private_key,
    fingerprint,
    pem_certificates,
    pkcs12_keystore,
    pkcs12_truststore,
    verify_chain,
)

KEY_TYPES = [KeyType.EC_P256, KeyType.EC_P384, KeyType.ED25519, KeyType.RSA_2048]
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
STORE_PASSWORD = "s3cret-store-pass"
TIMEOUT = 10.0
#: keytool is a JVM start each time; C1 only halves that and changes nothing else.
KEYTOOL_FAST = "-J-XX:TieredStopAtLevel=1"


# -- tools and files --------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH")
    return path


@pytest.fixture
def openssl() -> str:
    return _tool("openssl")


@pytest.fixture
def keytool() -> str:
    return _tool("keytool")


def run(*argv: str | Path, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a peer tool; ``ok`` asserts exit code 0 (else non-zero)."""
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if ok:
        assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
    else:
        assert result.returncode != 0, f"{argv} unexpectedly succeeded: {result.stdout}"
    return result


def write_certs(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(pem_certificates(certs))
    return path


def openssl_serial(serial: int) -> str:
    """A serial as OpenSSL prints it: upper-case hex, whole octets."""
    text = format(serial, "X")
    return text.zfill(len(text) + len(text) % 2)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def add_profile(ca: CertificateAuthority, profile: Profile) -> None:
    """Give a CA an extra profile (in memory, as if config.toml had it)."""
    profiles = {**ca.config.profiles, profile.name: profile}
    ca.config = dataclasses.replace(ca.config, profiles=profiles)


@pytest.fixture(params=KEY_TYPES, ids=str)
def typed_ca(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CertificateAuthority]:
    """A CA whose root, intermediate and default leaf key are of one key type."""
    key_type: KeyType = request.param
    authority = CertificateAuthority.init(
        tmp_path / f"ca-{key_type}",
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=key_type,
    )
    yield authority
    authority.close()


@pytest.fixture
def foreign_ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    """Another CA for the same trust domain: same names, different keys."""
    authority = CertificateAuthority.init(
        tmp_path / "foreign", trust_domain="example.org", passphrase=PASSPHRASE
    )
    yield authority
    authority.close()


@dataclass(frozen=True)
class CAFiles:
    root: Path
    intermediate: Path
    chain: Path  # intermediate + root


def ca_files(ca: CertificateAuthority, directory: Path) -> CAFiles:
    directory.mkdir(parents=True, exist_ok=True)
    return CAFiles(
        root=write_certs(directory / "root.pem", ca.root),
        intermediate=write_certs(directory / "intermediate.pem", ca.intermediate),
        chain=write_certs(directory / "ca-chain.pem", ca.intermediate, ca.root),
    )


# -- openssl verify and x509 ----------------------------------------------------------


def test_openssl_verifies_issued_leaf_for_every_purpose(
    typed_ca: CertificateAuthority, openssl: str, tmp_path: Path
) -> None:
    files = ca_files(typed_ca, tmp_path)
    issued = typed_ca.issue("spiffe://example.org/api", dns=["api.internal"], ips=["10.1.2.3"])
    leaf = write_certs(tmp_path / "leaf.pem", issued.certificate)
    base = (openssl, "verify", "-CAfile", files.root, "-untrusted", files.intermediate)

    for purpose in ((), ("-purpose", "sslclient"), ("-purpose", "sslserver")):
        result = run(*base, *purpose, "leaf.pem", cwd=tmp_path)
        assert result.stdout.strip() == "leaf.pem: OK"

    text = run(openssl, "x509", "-in", leaf, "-noout", "-text", cwd=tmp_path).stdout
    assert re.findall(r"URI:[^\s,]+", text) == ["URI:spiffe://example.org/api"]
    assert "DNS:api.internal" in text
    assert "IP Address:10.1.2.3" in text
    assert re.search(r"X509v3 Basic Constraints: critical\s+CA:FALSE", text)
    assert re.search(r"X509v3 Key Usage: critical\s+Digital Signature", text)
    assert "TLS Web Client Authentication, TLS Web Server Authentication" in text
    assert "Subject: O = example.org\n" in text  # no CN


def test_openssl_refuses_foreign_root_wrong_purpose_and_expired(
    ca: CertificateAuthority,
    foreign_ca: CertificateAuthority,
    openssl: str,
    tmp_path: Path,
) -> None:
    """The positive checks above are not vacuous: OpenSSL does refuse."""
    files = ca_files(ca, tmp_path)
    foreign_root = write_certs(tmp_path / "foreign-root.pem", foreign_ca.root)
    add_profile(
        ca, Profile(name="client-only", spiffe_ids=("spiffe://example.org/**",), eku=("client",))
    )
    client_only = write_certs(
        tmp_path / "client.pem",
        ca.issue("spiffe://example.org/c", profile="client-only").certificate,
    )
    expired = write_certs(
        tmp_path / "expired.pem",
        ca.issue(
            "spiffe://example.org/old",
            ttl=timedelta(hours=1),
            now=datetime.now(UTC) - timedelta(hours=3),
        ).certificate,
    )

    wrong_root = run(
        openssl,
        "verify",
        "-CAfile",
        foreign_root,
        "-untrusted",
        files.intermediate,
        client_only,
        cwd=tmp_path,
        ok=False,
    )
    # Same issuer names, different keys: OpenSSL finds no matching issuer.
    assert "unable to get local issuer certificate" in wrong_root.stdout + wrong_root.stderr

    base = (openssl, "verify", "-CAfile", files.root, "-untrusted", files.intermediate)
    assert run(*base, "-purpose", "sslclient", client_only, cwd=tmp_path).returncode == 0
    wrong_purpose = run(*base, "-purpose", "sslserver", client_only, cwd=tmp_path, ok=False)
    assert "unsuitable certificate purpose" in wrong_purpose.stdout + wrong_purpose.stderr

    too_old = run(*base, expired, cwd=tmp_path, ok=False)
    assert "certificate has expired" in too_old.stdout + too_old.stderr


# -- a CSR from openssl req -------------------------------------------------------------

OPENSSL_NEWKEY = {
    "ec-p256": ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
    "ec-p384": ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"),
    "ed25519": ("-newkey", "ed25519"),
    "rsa-2048": ("-newkey", "rsa:2048"),
}


def openssl_csr(openssl: str, directory: Path, newkey: tuple[str, ...], *addext: str) -> bytes:
    extensions: list[str] = []
    for ext in addext:
        extensions += ["-addext", ext]
    run(
        openssl,
        "req",
        "-new",
        *newkey,
        "-nodes",
        "-keyout",
        "csr-key.pem",
        "-out",
        "req.pem",
        "-subj",
        "/O=example.org",
        *extensions,
        cwd=directory,
    )
    return (directory / "req.pem").read_bytes()


@pytest.mark.parametrize("csr_key", list(OPENSSL_NEWKEY))
def test_ca_signs_openssl_req_csr_and_openssl_verifies_result(
    typed_ca: CertificateAuthority, openssl: str, tmp_path: Path, csr_key: str
) -> None:
    files = ca_files(typed_ca, tmp_path)
    csr = openssl_csr(
        openssl, tmp_path, OPENSSL_NEWKEY[csr_key], "subjectAltName=URI:spiffe://example.org/x"
    )
    issued = typed_ca.sign(csr, ttl=timedelta(hours=1))

    subject_key = serialization.load_pem_private_key(
        (tmp_path / "csr-key.pem").read_bytes(), password=None
    )
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert issued.certificate.public_key().public_bytes(DER, spki) == (
        subject_key.public_key().public_bytes(DER, spki)
    )
    assert issued.record.key_type == csr_key
    assert verify_chain(issued.certificate, [typed_ca.intermediate], typed_ca.bundle) == (
        SpiffeID.parse("spiffe://example.org/x")
    )
    write_certs(tmp_path / "leaf.pem", issued.certificate)
    result = run(
        openssl,
        "verify",
        "-CAfile",
        files.root,
        "-untrusted",
        files.intermediate,
        "-purpose",
        "sslclient",
        "leaf.pem",
        cwd=tmp_path,
    )
    assert result.stdout.strip() == "leaf.pem: OK"


@pytest.mark.parametrize(
    ("addext", "expected"),
    [
        (
            ("subjectAltName=URI:spiffe://example.org/a,URI:spiffe://example.org/b",),
            "has 2 URI SANs",
        ),
        (("subjectAltName=DNS:api.internal",), "has 0 URI SANs"),
        (
            ("subjectAltName=URI:spiffe://example.org/a", "basicConstraints=critical,CA:TRUE"),
            "asks for a CA certificate",
        ),
    ],
)
def test_ca_refuses_bad_openssl_req_csr(
    ca: CertificateAuthority,
    openssl: str,
    tmp_path: Path,
    addext: tuple[str, ...],
    expected: str,
) -> None:
    csr = openssl_csr(openssl, tmp_path, OPENSSL_NEWKEY["ec-p256"], *addext)
    with pytest.raises(CSRError) as info:
        ca.sign(csr, source="req.pem")
    assert expected in info.value.message
    assert info.value.details["source"] == "req.pem"
    assert ca.store.count_certificates() == 0


# -- CRL --------------------------------------------------------------------------------


def crl_number(text: str) -> int:
    match = re.search(r"X509v3 CRL Number: *\n\s*(\d+)\n", text)
    assert match is not None, text
    return int(match.group(1))


def crl_entries(text: str) -> dict[str, str]:
    """Serial -> reason of each entry in ``openssl crl -text`` output."""
    entries: dict[str, str] = {}
    for block in text.split("Serial Number: ")[1:]:
        serial, _, rest = block.partition("\n")
        reason = re.search(r"CRL Reason Code: *\n\s+(.+)\n", rest)
        entries[serial.strip()] = reason.group(1).strip() if reason else "(no reason)"
    return entries


def test_openssl_reads_crl_with_reasons_numbers_and_no_expired_entries(
    ca: CertificateAuthority, openssl: str, tmp_path: Path
) -> None:
    files = ca_files(ca, tmp_path)
    compromised = ca.issue("spiffe://example.org/stolen")
    superseded = ca.issue("spiffe://example.org/old-deploy")
    still_good = ca.issue("spiffe://example.org/fine")
    long_gone = ca.issue(
        "spiffe://example.org/gone",
        ttl=timedelta(hours=1),
        now=datetime.now(UTC) - timedelta(hours=3),
    )
    ca.revoke(serial_hex(compromised.certificate), reason="key-compromise")
    ca.revoke(serial_hex(superseded.certificate), reason="superseded")
    ca.revoke(serial_hex(long_gone.certificate), reason="keyCompromise")

    def crl_text(name: str) -> str:
        (tmp_path / name).write_bytes(ca.crl().public_bytes(DER))
        return run(
            openssl, "crl", "-inform", "DER", "-in", name, "-noout", "-text", cwd=tmp_path
        ).stdout

    first, second = crl_text("first.crl"), crl_text("second.crl")
    assert crl_number(second) == crl_number(first) + 1
    assert crl_entries(first) == {
        openssl_serial(compromised.certificate.serial_number): "Key Compromise",
        openssl_serial(superseded.certificate.serial_number): "Superseded",
    }
    assert openssl_serial(long_gone.certificate.serial_number) not in first
    assert openssl_serial(still_good.certificate.serial_number) not in first

    # OpenSSL checks the CRL signature against the intermediate, then uses it.
    pem_crl = tmp_path / "crl.pem"
    pem_crl.write_bytes(
        x509.load_der_x509_crl((tmp_path / "second.crl").read_bytes()).public_bytes(PEM)
    )
    signed = run(openssl, "crl", "-in", pem_crl, "-CAfile", files.chain, "-noout", cwd=tmp_path)
    assert "verify OK" in signed.stdout + signed.stderr
    base = [openssl, "verify", "-crl_check", "-CRLfile", str(pem_crl), "-CAfile"]
    base += [str(files.root), "-untrusted", str(files.intermediate)]
    write_certs(tmp_path / "stolen.pem", compromised.certificate)
    write_certs(tmp_path / "fine.pem", still_good.certificate)
    refused = run(*base, "stolen.pem", cwd=tmp_path, ok=False)
    assert "certificate revoked" in refused.stdout + refused.stderr
    assert run(*base, "fine.pem", cwd=tmp_path).stdout.strip() == "fine.pem: OK"


# -- OCSP -------------------------------------------------------------------------------


def answer_ocsp(ca: CertificateAuthority, request: Path, response: Path) -> ocsp.OCSPResponse:
    parsed = ocsp.load_der_ocsp_request(request.read_bytes())
    answer = ca.ocsp_response(parsed)
    response.write_bytes(answer.public_bytes(DER))
    return answer


def test_openssl_ocsp_good_then_revoked(
    typed_ca: CertificateAuthority, openssl: str, tmp_path: Path
) -> None:
    files = ca_files(typed_ca, tmp_path)
    issued = typed_ca.issue("spiffe://example.org/api")
    write_certs(tmp_path / "leaf.pem", issued.certificate)
    ask = (openssl, "ocsp", "-issuer", files.intermediate, "-cert", "leaf.pem", "-no_nonce")
    run(*ask, "-reqout", "req.der", cwd=tmp_path)
    check = (*ask, "-CAfile", files.root, "-resp_text")

    answer_ocsp(typed_ca, tmp_path / "req.der", tmp_path / "good.der")
    good = run(*check, "-respin", "good.der", cwd=tmp_path)
    assert "Response verify OK" in good.stderr
    assert re.search(r"^leaf\.pem: good$", good.stdout, re.MULTILINE)
    assert "Cert Status: good" in good.stdout

    typed_ca.revoke(serial_hex(issued.certificate), reason="keyCompromise")
    answer_ocsp(typed_ca, tmp_path / "req.der", tmp_path / "revoked.der")
    revoked = run(*check, "-respin", "revoked.der", cwd=tmp_path)
    assert "Response verify OK" in revoked.stderr
    assert re.search(r"^leaf\.pem: revoked$", revoked.stdout, re.MULTILINE)
    assert "Reason: keyCompromise" in revoked.stdout
    assert "Revocation Time:" in revoked.stdout


def test_openssl_ocsp_unknown_serial_and_foreign_issuer(
    ca: CertificateAuthority,
    foreign_ca: CertificateAuthority,
    openssl: str,
    tmp_path: Path,
) -> None:
    files = ca_files(ca, tmp_path)
    issued = ca.issue("spiffe://example.org/api")
    never = f"0x{issued.certificate.serial_number ^ 0xFFFF:X}"
    ask = (openssl, "ocsp", "-issuer", files.intermediate, "-serial", never, "-no_nonce")
    run(*ask, "-reqout", "req.der", cwd=tmp_path)
    answer = answer_ocsp(ca, tmp_path / "req.der", tmp_path / "resp.der")
    assert answer.certificate_status is ocsp.OCSPCertStatus.UNKNOWN
    unknown = run(*ask, "-CAfile", files.root, "-respin", "resp.der", cwd=tmp_path)
    assert "Response verify OK" in unknown.stderr
    assert f"{never}: unknown" in unknown.stdout

    # The serial exists, but the request names another CA as its issuer.
    write_certs(tmp_path / "foreign-int.pem", foreign_ca.intermediate)
    foreign_serial = f"0x{issued.certificate.serial_number:X}"
    other = ["-issuer", "foreign-int.pem", "-serial", foreign_serial, "-no_nonce"]
    run(openssl, "ocsp", *other, "-reqout", "other.der", cwd=tmp_path)
    answer = answer_ocsp(ca, tmp_path / "other.der", tmp_path / "other-resp.der")
    assert answer.certificate_status is ocsp.OCSPCertStatus.UNKNOWN


def test_openssl_ocsp_nonce_is_echoed(
    ca: CertificateAuthority, openssl: str, tmp_path: Path
) -> None:
    files = ca_files(ca, tmp_path)
    write_certs(tmp_path / "leaf.pem", ca.issue("spiffe://example.org/api").certificate)
    run(
        openssl,
        "ocsp",
        "-issuer",
        files.intermediate,
        "-cert",
        "leaf.pem",
        "-reqout",
        "req.der",
        cwd=tmp_path,
    )
    request_text = run(openssl, "ocsp", "-reqin", "req.der", "-req_text", cwd=tmp_path).stdout
    nonce = re.search(r"OCSP Nonce: *\n\s+([0-9A-F]+)", request_text)
    assert nonce is not None

    answer = answer_ocsp(ca, tmp_path / "req.der", tmp_path / "resp.der")
    echoed = answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    assert echoed.hex().upper() in nonce.group(1)
    # With -reqin, OpenSSL compares the response nonce with the request's.
    result = run(
        openssl,
        "ocsp",
        "-reqin",
        "req.der",
        "-respin",
        "resp.der",
        "-CAfile",
        files.root,
        "-resp_text",
        cwd=tmp_path,
    )
    assert "Response verify OK" in result.stderr
    assert "Nonce Verify error" not in result.stdout + result.stderr
    assert "no nonce in response" not in result.stdout + result.stderr
    assert "Cert Status: good" in result.stdout
    assert re.search(r"Response Extensions:\s+OCSP Nonce: *\n\s+" + nonce.group(1), result.stdout)


# -- PKCS#12 with keytool and openssl ---------------------------------------------------


def keytool_list(keytool: str, store: Path, password: str) -> str:
    result = run(
        keytool,
        KEYTOOL_FAST,
        "-list",
        "-v",
        "-keystore",
        store,
        "-storetype",
        "PKCS12",
        "-storepass",
        password,
        cwd=store.parent,
    )
    return result.stdout


def assert_keystore(text: str, leaf: x509.Certificate, *, alias: str = "trustmesh") -> None:
    assert "Your keystore contains 1 entry" in text
    assert text.count("Entry type: PrivateKeyEntry") == 1
    assert "trustedCertEntry" not in text
    assert "Certificate chain length: 2" in text
    assert f"Alias name: {alias}\n" in text
    assert f"SHA256: {fingerprint(leaf)}" in text
    assert "URIName: spiffe://example.org/api" in text
    assert "Owner: CN=trustmesh Intermediate CA, O=example.org" in text


@pytest.mark.parametrize(
    ("key_type", "legacy"),
    [(k, False) for k in KEY_TYPES] + [(KeyType.EC_P256, True), (KeyType.RSA_2048, True)],
    ids=str,
)
def test_keytool_reads_pkcs12_keystore(
    ca: CertificateAuthority,
    keytool: str,
    openssl: str,
    tmp_path: Path,
    key_type: KeyType,
    legacy: bool,
) -> None:
    issued = ca.issue("spiffe://example.org/api", key_type=key_type)
    assert issued.key is not None
    store = tmp_path / "ks.p12"
    store.write_bytes(
        pkcs12_keystore(
            issued.key,
            issued.certificate,
            [ca.intermediate],
            password=STORE_PASSWORD.encode(),
            legacy=legacy,
        )
    )
    assert_keystore(keytool_list(keytool, store, STORE_PASSWORD), issued.certificate)

    # The encryption is what the flag promises.
    info_run = run(
        openssl,
        "pkcs12",
        "-info",
        "-noout",
        "-in",
        store,
        "-passin",
        f"pass:{STORE_PASSWORD}",
        cwd=tmp_path,
    )
    info = info_run.stdout + info_run.stderr
    if legacy:
        assert "MAC: sha1" in info
        assert "Shrouded Keybag: pbeWithSHA1And3-KeyTripleDES-CBC" in info
    else:
        assert "MAC: sha256" in info
        assert "Shrouded Keybag: PBES2, PBKDF2, AES-256-CBC" in info
    wrong = run(
        openssl,
        "pkcs12",
        "-info",
        "-noout",
        "-in",
        store,
        "-passin",
        "pass:wrong",
        cwd=tmp_path,
        ok=False,
    )
    assert "Mac verify error" in wrong.stderr


@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy"])
def test_keytool_reads_truststore(
    ca: CertificateAuthority, keytool: str, tmp_path: Path, legacy: bool
) -> None:
    store = tmp_path / "trust.p12"
    store.write_bytes(
        pkcs12_truststore(list(ca.bundle), password=STORE_PASSWORD.encode(), legacy=legacy)
    )
    text = keytool_list(keytool, store, STORE_PASSWORD)
    assert "Your keystore contains 1 entry" in text
    assert "Entry type: trustedCertEntry" in text
    assert "PrivateKeyEntry" not in text
    assert f"SHA256: {fingerprint(ca.root)}" in text
    assert "Owner: CN=trustmesh Root CA, O=example.org" in text


def test_cli_exports_read_by_keytool(
    ca: CertificateAuthority,
    keytool: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    issued = ca.issue("spiffe://example.org/api")
    assert issued.key is not None
    cert = write_certs(tmp_path / "cert.pem", issued.certificate)  # leaf only
    key = tmp_path / "key.pem"
    key.write_bytes(dump_private_key(issued.key))
    password_file = tmp_path / "store-pass"
    password_file.write_text(STORE_PASSWORD + "\n")  # the newline is not part of it

    keystore = tmp_path / "svc.p12"
    argv = ["export", "p12", "--cert", str(cert), "--key", str(key), "--out", str(keystore)]
    code = main([*argv, "--alias", "svc", "--password-file", str(password_file)])
    assert code == 0, capsys.readouterr().err
    assert keystore.stat().st_mode & 0o077 == 0
    # The CLI completed the chain with the CA's intermediate.
    assert_keystore(
        keytool_list(keytool, keystore, STORE_PASSWORD), issued.certificate, alias="svc"
    )

    truststore = tmp_path / "trust.p12"
    code = main(
        ["export", "truststore", "--out", str(truststore), "--password-file", str(password_file)]
    )
    assert code == 0, capsys.readouterr().err
    text = keytool_list(keytool, truststore, STORE_PASSWORD)
    assert "Entry type: trustedCertEntry" in text
    assert f"SHA256: {fingerprint(ca.root)}" in text
    assert [e.action for e in ca.audit_tail(2)] == ["export", "export"]


# -- mutual TLS with the stdlib ssl module ----------------------------------------------


@dataclass(frozen=True)
class Identity:
    chain: Path
    key: Path


def write_identity(directory: Path, name: str, issued: Issued) -> Identity:
    assert issued.key is not None
    chain = directory / f"{name}-chain.pem"
    chain.write_bytes(pem_certificates(issued.chain))
    key = directory / f"{name}-key.pem"
    key.write_bytes(dump_private_key(issued.key))
    return Identity(chain, key)


def tls_context(
    purpose: int,
    identity: Identity,
    root: Path,
    *,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = maximum
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(identity.chain, identity.key)
    context.load_verify_locations(cafile=root)
    return context


@dataclass
class Outcome:
    """What each side of one connection saw."""

    server_error: BaseException | None = None
    client_error: BaseException | None = None
    peer_cert: dict[str, Any] = field(default_factory=dict)
    peer_chain: list[x509.Certificate] = field(default_factory=list)
    version: str | None = None
    received: bytes = b""


def peer_chain(tls: ssl.SSLSocket) -> list[x509.Certificate]:
    """The certificates the peer sent (leaf first)."""
    if sys.version_info >= (3, 13):
        return [x509.load_der_x509_certificate(d) for d in tls.get_unverified_chain()]
    # The same call before it became public in 3.13 (typeshed omits _sslobj);
    # it returns _ssl.Certificate objects whose public_bytes() default to PEM.
    sslobj: Any = getattr(tls, "_sslobj")  # noqa: B009
    return [
        x509.load_pem_x509_certificate(c.public_bytes().encode())
        for c in sslobj.get_unverified_chain()
    ]


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> Outcome:
    """Connect once over 127.0.0.1; the server answers b"ok" after the handshake."""
    outcome = Outcome()

    def serve(listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                with server.wrap_socket(conn, server_side=True) as tls:
                    outcome.peer_cert = dict(tls.getpeercert() or {})
                    outcome.peer_chain = peer_chain(tls)
                    outcome.version = tls.version()
                    tls.sendall(b"ok")
        except Exception as exc:  # reported to the test, which asserts on it
            outcome.server_error = exc

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT) as raw,
                client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                # TLS 1.3: the server judges the client's certificate after the
                # client's handshake is done, so a refusal shows up on this read.
                outcome.received = tls.recv(16)
        except OSError as exc:
            outcome.client_error = exc
        thread.join(TIMEOUT * 2)
    assert not thread.is_alive(), "the server thread hung"
    return outcome


@pytest.fixture
def server_identity(ca: CertificateAuthority, tmp_path: Path) -> Identity:
    issued = ca.issue("spiffe://example.org/server", ips=["127.0.0.1"])
    return write_identity(tmp_path, "server", issued)


@pytest.fixture
def root_file(ca: CertificateAuthority, tmp_path: Path) -> Path:
    return write_certs(tmp_path / "root.pem", ca.root)


def assert_refused_by_server(outcome: Outcome, verify_message: str) -> None:
    error = outcome.server_error
    assert isinstance(error, ssl.SSLCertVerificationError), repr(error)
    assert error.reason == "CERTIFICATE_VERIFY_FAILED"
    assert error.verify_message == verify_message
    assert "certificate verify failed" in str(error)
    assert outcome.received == b""
    assert isinstance(outcome.client_error, ssl.SSLError | ConnectionError)


@pytest.mark.parametrize(
    "maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_mtls_between_two_issued_identities(
    typed_ca: CertificateAuthority, tmp_path: Path, maximum: ssl.TLSVersion
) -> None:
    root = write_certs(tmp_path / "root.pem", typed_ca.root)
    server = write_identity(
        tmp_path, "server", typed_ca.issue("spiffe://example.org/server", ips=["127.0.0.1"])
    )
    client = write_identity(tmp_path, "client", typed_ca.issue("spiffe://example.org/client"))

    outcome = handshake(
        tls_context(ssl.PROTOCOL_TLS_SERVER, server, root, maximum=maximum),
        tls_context(ssl.PROTOCOL_TLS_CLIENT, client, root, maximum=maximum),
    )

    assert outcome.server_error is None
    assert outcome.client_error is None
    assert outcome.received == b"ok"
    assert outcome.version == ("TLSv1.2" if maximum is ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
    assert outcome.peer_cert["subjectAltName"] == (("URI", "spiffe://example.org/client"),)
    leaf, *intermediates = outcome.peer_chain
    assert intermediates == [typed_ca.intermediate]
    assert verify_chain(leaf, intermediates, typed_ca.bundle, usage="client") == SpiffeID.parse(
        "spiffe://example.org/client"
    )


@pytest.mark.parametrize("trust_domain", ["example.org", "other.org"])
def test_mtls_refuses_client_from_foreign_ca(
    ca: CertificateAuthority,
    server_identity: Identity,
    root_file: Path,
    tmp_path: Path,
    trust_domain: str,
) -> None:
    with CertificateAuthority.init(
        tmp_path / "foreign", trust_domain=trust_domain, passphrase=PASSPHRASE
    ) as foreign:
        issued = foreign.issue(f"spiffe://{trust_domain}/client")
        foreign_root = write_certs(tmp_path / "foreign-root.pem", foreign.root)
    client = write_identity(tmp_path, "client", issued)

    outcome = handshake(
        tls_context(ssl.PROTOCOL_TLS_SERVER, server_identity, root_file),
        tls_context(ssl.PROTOCOL_TLS_CLIENT, client, foreign_root),
    )
    # The client was not even asked to trust our server: it refuses too.
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert outcome.client_error.verify_message == "unable to get local issuer certificate"

    outcome = handshake(
        tls_context(ssl.PROTOCOL_TLS_SERVER, server_identity, root_file),
        tls_context(ssl.PROTOCOL_TLS_CLIENT, client, root_file),
    )
    assert_refused_by_server(outcome, "unable to get local issuer certificate")


@pytest.mark.parametrize(
    ("shift", "verify_message"),
    [
        (timedelta(hours=-3), "certificate has expired"),
        (timedelta(hours=3), "certificate is not yet valid"),
    ],
    ids=["expired", "not-yet-valid"],
)
def test_mtls_refuses_client_outside_validity(
    ca: CertificateAuthority,
    server_identity: Identity,
    root_file: Path,
    tmp_path: Path,
    shift: timedelta,
    verify_message: str,
) -> None:
    issued = ca.issue(
        "spiffe://example.org/client", ttl=timedelta(hours=1), now=datetime.now(UTC) + shift
    )
    client = write_identity(tmp_path, "client", issued)
    outcome = handshake(
        tls_context(ssl.PROTOCOL_TLS_SERVER, server_identity, root_file),
        tls_context(ssl.PROTOCOL_TLS_CLIENT, client, root_file),
    )
    assert_refused_by_server(outcome, verify_message)


def test_mtls_refuses_revoked_client_with_crl(
    ca: CertificateAuthority, server_identity: Identity, root_file: Path, tmp_path: Path
) -> None:
    good = write_identity(tmp_path, "good", ca.issue("spiffe://example.org/client"))
    bad_issued = ca.issue("spiffe://example.org/client")
    bad = write_identity(tmp_path, "bad", bad_issued)
    ca.revoke(serial_hex(bad_issued.certificate), reason="keyCompromise")
    crl = tmp_path / "crl.pem"
    crl.write_bytes(ca.crl().public_bytes(PEM))

    server = tls_context(ssl.PROTOCOL_TLS_SERVER, server_identity, root_file)
    server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    # load_verify_locations(cadata=...) takes certificates only; a file may hold CRLs.
    server.load_verify_locations(cafile=crl)

    outcome = handshake(server, tls_context(ssl.PROTOCOL_TLS_CLIENT, good, root_file))
    assert outcome.server_error is None
    assert outcome.received == b"ok"

    outcome = handshake(server, tls_context(ssl.PROTOCOL_TLS_CLIENT, bad, root_file))
    assert_refused_by_server(outcome, "certificate revoked")


def test_mtls_refuses_server_only_leaf_as_client(
    ca: CertificateAuthority, server_identity: Identity, root_file: Path, tmp_path: Path
) -> None:
    add_profile(
        ca, Profile(name="server-only", spiffe_ids=("spiffe://example.org/**",), eku=("server",))
    )
    issued = ca.issue("spiffe://example.org/client", profile="server-only")
    client = write_identity(tmp_path, "client", issued)

    outcome = handshake(
        tls_context(ssl.PROTOCOL_TLS_SERVER, server_identity, root_file),
        tls_context(ssl.PROTOCOL_TLS_CLIENT, client, root_file),
    )
    # OpenSSL 3.0 says "unsuitable certificate purpose" (X509_V_ERR_INVALID_PURPOSE).
    assert_refused_by_server(outcome, "unsuitable certificate purpose")

    # The same leaf is fine as a server certificate.
    server = write_identity(
        tmp_path,
        "server-only",
        ca.issue("spiffe://example.org/web", ips=["127.0.0.1"], profile="server-only"),
    )
    client = write_identity(tmp_path, "plain", ca.issue("spiffe://example.org/client"))
    outcome = handshake(
        tls_context(ssl.PROTOCOL_TLS_SERVER, server, root_file),
        tls_context(ssl.PROTOCOL_TLS_CLIENT, client, root_file),
    )
    assert outcome.server_error is None
    assert outcome.received == b"ok"
