"""``trustmesh inspect``: field values checked against real openssl, verdicts, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.pki import CertificateSummary, CRLSummary, CSRSummary

from .conftest import PASSPHRASE

DOCS = Path(__file__).resolve().parent.parent / "docs" / "inspect.md"
OPENSSL_EKU = {
    "TLS Web Client Authentication": "clientAuth",
    "TLS Web Server Authentication": "serverAuth",
}
OPENSSL_KU = {
    "Digital Signature": "digitalSignature",
    "Key Encipherment": "keyEncipherment",
    "Certificate Sign": "keyCertSign",
    "CRL Sign": "cRLSign",
}
OPENSSL_REASONS = {"Key Compromise": "keyCompromise", "Superseded": "superseded"}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def inspect_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, "inspect", *argv, "--json")
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def openssl(*args: str, stdin: bytes | None = None) -> str:
    proc = subprocess.run(
        ["openssl", *args], input=stdin, capture_output=True, check=True, timeout=30
    )
    return proc.stdout.decode()


def text_value(text: str, label: str) -> str:
    """The indented line(s) after ``label:`` in ``openssl ... -text`` output."""
    match = re.search(rf"{re.escape(label)}: ?(?:critical)?\s*\n\s+(.+)", text)
    assert match, f"{label} not in openssl output"
    return match.group(1).strip()


@pytest.fixture
def initialized(capsys: pytest.CaptureFixture[str], home: Path) -> Path:
    code, _, err = run(capsys, "ca", "init", "--trust-domain", "example.org")
    assert code == 0, err
    config = home / "config.toml"
    text = config.read_text()
    text = re.sub(r"(?m)^crl_urls = .*$", 'crl_urls = ["http://ca.internal/crl.der"]', text)
    text = re.sub(r"(?m)^ocsp_urls = .*$", 'ocsp_urls = ["http://ca.internal/ocsp"]', text)
    config.write_text(text)
    return home


def issue(capsys: pytest.CaptureFixture[str], out: Path, *extra: str) -> dict[str, Any]:
    code, stdout, err = run(
        capsys,
        "issue",
        "spiffe://example.org/ns/prod/orders",
        "--dns",
        "orders.internal",
        "--ip",
        "10.0.0.7",
        "--out",
        str(out),
        "--json",
        *extra,
    )
    assert code == 0, err
    data: dict[str, Any] = json.loads(stdout)
    return data


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_certificate_fields_match_openssl(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path, key_type: str
) -> None:
    """Every certificate field inspect prints equals what openssl x509 reads from the file."""
    issue(capsys, tmp_path / "o", "--key-type", key_type)
    pem = tmp_path / "o" / "cert.pem"
    cert = inspect_json(capsys, str(pem))["certificates"][0]
    text = openssl("x509", "-in", str(pem), "-noout", "-text")

    assert cert["spiffe_id"] == "spiffe://example.org/ns/prod/orders"
    sans = text_value(text, "X509v3 Subject Alternative Name")
    assert (
        sans == "URI:spiffe://example.org/ns/prod/orders, DNS:orders.internal, IP Address:10.0.0.7"
    )
    assert cert["uris"] == ["spiffe://example.org/ns/prod/orders"]
    assert cert["dns"] == ["orders.internal"]
    assert cert["ips"] == ["10.0.0.7"]

    assert cert["serial_hex_colons"] == text_value(text, "Serial Number")
    serial = openssl("x509", "-in", str(pem), "-noout", "-serial").strip().split("=")[1]
    assert int(serial, 16) == int(cert["serial_decimal"]) == int(cert["serial_hex"], 16)
    assert cert["serial_hex"] == serial.lower().lstrip("0")

    dates = openssl("x509", "-in", str(pem), "-noout", "-dates", "-dateopt", "iso_8601")
    assert f"notBefore={cert['not_before'].replace('T', ' ')}" in dates
    assert f"notAfter={cert['not_after'].replace('T', ' ')}" in dates
    assert cert["status"] == "valid"
    assert 23 * 3600 < cert["expires_in_seconds"] <= 24 * 3600

    names = openssl("x509", "-in", str(pem), "-noout", "-subject", "-issuer", "-nameopt", "RFC2253")
    assert f"subject={cert['subject']}" in names
    assert f"issuer={cert['issuer']}" in names

    bits = re.search(r"Public-Key: \((\d+) bit\)", text)
    assert bits
    assert int(bits.group(1)) == cert["key_size"]
    assert cert["key_type"] == key_type.split("-")[0]
    if key_type == "ec-p256":
        assert "NIST CURVE: P-256" in text
        assert cert["key_curve"] == "secp256r1"
    sig = re.search(r"Signature Algorithm: (\S+)", text)
    assert sig
    assert sig.group(1) == cert["signature_algorithm"]

    ekus = text_value(text, "X509v3 Extended Key Usage").split(", ")
    assert [OPENSSL_EKU[e] for e in ekus] == cert["extended_key_usage"]
    kus = text_value(text, "X509v3 Key Usage").split(", ")
    assert [OPENSSL_KU[k] for k in kus] == cert["key_usage"]
    assert text_value(text, "X509v3 Basic Constraints") == "CA:FALSE"
    assert cert["basic_constraints"] == {"ca": False, "path_length": None, "critical": True}

    fp = openssl("x509", "-in", str(pem), "-noout", "-fingerprint", "-sha256")
    assert fp.strip() == f"sha256 Fingerprint={cert['sha256_fingerprint']}"
    assert cert["subject_key_identifier"] == text_value(text, "X509v3 Subject Key Identifier")
    assert cert["authority_key_identifier"] == text_value(text, "X509v3 Authority Key Identifier")
    assert "URI:http://ca.internal/crl.der" in text
    assert cert["crl_distribution_points"] == ["http://ca.internal/crl.der"]
    assert "OCSP - URI:http://ca.internal/ocsp" in text
    assert cert["ocsp_urls"] == ["http://ca.internal/ocsp"]

    # The human summary shows the same values.
    code, human, err = run(capsys, "inspect", str(pem))
    assert code == 0, err
    for value in (
        cert["spiffe_id"],
        cert["serial_hex"],
        cert["serial_hex_colons"],
        cert["serial_decimal"],
        cert["sha256_fingerprint"],
        cert["subject_key_identifier"],
        cert["authority_key_identifier"],
        "orders.internal",
        "10.0.0.7",
        "clientAuth, serverAuth",
        "http://ca.internal/crl.der",
        "http://ca.internal/ocsp",
    ):
        assert value in human
    assert re.search(r"valid, expires in 2[34]h", human)
    assert "chain: TRUSTED" in human


def test_der_and_stdin_are_detected(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    """A DER certificate given on stdin (the real process) is detected and summarised."""
    issued = issue(capsys, tmp_path / "o")
    raw = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "o" / "cert.pem"), "-outform", "DER"],
        capture_output=True,
        check=True,
    ).stdout
    proc = subprocess.run(
        [sys.executable, "-m", "trustmesh", "inspect", "-", "--json"],
        input=raw,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["source"], data["format"], data["type"]) == ("stdin", "der", "certificate")
    assert data["certificates"][0]["serial_hex"] == issued["serial"]
    assert data["verification"]["trusted"] is True


def test_chain_verdicts_name_the_reason(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    """A chain verifies against the local CA; revoked, expired and foreign chains say why."""
    issued = issue(capsys, tmp_path / "o")
    chain = str(tmp_path / "o" / "chain.pem")
    data = inspect_json(capsys, chain)
    assert data["type"] == "chain"
    assert [c["basic_constraints"]["ca"] for c in data["certificates"]] == [False, True]
    verdict = data["verification"]
    assert verdict["trusted"] is True
    assert verdict["spiffe_id"] == "spiffe://example.org/ns/prod/orders"
    assert verdict["revocation"] == ["the CA's records"]
    # openssl agrees.
    openssl(
        "verify",
        "-CAfile",
        str(initialized / "root.pem"),
        "-untrusted",
        str(initialized / "intermediate.pem"),
        str(tmp_path / "o" / "cert.pem"),
    )

    # Unknown issuer: a second, foreign CA's bundle.
    code, _, err = run(
        capsys, "ca", "init", "--trust-domain", "other.org", "--home", str(tmp_path / "other")
    )
    assert code == 0, err
    foreign = inspect_json(capsys, chain, "--bundle", str(tmp_path / "other" / "root.pem"))
    assert foreign["verification"]["trusted"] is False
    assert foreign["verification"]["reason"] == "unknown_ca"
    assert foreign["verification"]["bundle"] == str(tmp_path / "other" / "root.pem")

    # Revoked: known from the CA's records, and from a CRL file with another bundle.
    code, _, err = run(capsys, "revoke", issued["serial"], "--reason", "keyCompromise")
    assert code == 0, err
    revoked = inspect_json(capsys, chain)["verification"]
    assert (revoked["trusted"], revoked["reason"]) == (False, "revoked")
    crl = tmp_path / "crl.der"
    assert run(capsys, "crl", "--out", str(crl))[0] == 0
    root = str(initialized / "root.pem")
    by_crl = inspect_json(capsys, chain, "--bundle", root, "--crl", str(crl))["verification"]
    assert (by_crl["reason"], by_crl["revocation"]) == ("revoked", [f"--crl {crl}"])
    assert inspect_json(capsys, chain, "--bundle", root)["verification"]["trusted"] is True
    code, human, _ = run(capsys, "inspect", chain)
    assert "chain: NOT TRUSTED (revoked)" in human

    # Expired: a certificate the real CA issued three days ago for one hour.
    with CertificateAuthority.open(initialized, passphrase=PASSPHRASE) as ca:
        old = ca.issue(
            "spiffe://example.org/old",
            ttl=timedelta(hours=1),
            now=datetime.now(UTC) - timedelta(days=3),
        )
        (tmp_path / "old.pem").write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in old.chain)
        )
    expired = inspect_json(capsys, str(tmp_path / "old.pem"))
    assert expired["certificates"][0]["status"] == "expired"
    assert expired["certificates"][0]["expires_in_seconds"] < -2 * 86400
    assert expired["verification"]["reason"] == "expired"
    code, human, _ = run(capsys, "inspect", str(tmp_path / "old.pem"))
    assert re.search(r"EXPIRED, expired 2d2\dh ago", human), human
    assert "chain: NOT TRUSTED (expired)" in human


def test_without_a_bundle_the_chain_is_not_checked(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    """With no CA in --home and no --bundle the summary says the chain was not checked."""
    issue(capsys, tmp_path / "o")
    data = inspect_json(capsys, str(tmp_path / "o" / "chain.pem"), "--home", str(tmp_path / "x"))
    assert data["verification"]["checked"] is False
    assert data["verification"]["reason"] == "no_bundle"
    assert "--bundle" in data["verification"]["message"]


def test_intermediate_and_root_verify_as_ca_certificates(
    capsys: pytest.CaptureFixture[str], initialized: Path
) -> None:
    """CA certificates are checked as CAs (no EKU or SPIFFE ID needed), matching openssl."""
    inter = inspect_json(capsys, str(initialized / "intermediate.pem"))
    assert inter["verification"]["trusted"] is True
    ca = inter["certificates"][0]
    text = openssl("x509", "-in", str(initialized / "intermediate.pem"), "-noout", "-text")
    assert text_value(text, "X509v3 Basic Constraints") == "CA:TRUE, pathlen:0"
    assert ca["basic_constraints"] == {"ca": True, "path_length": 0, "critical": True}
    kus = text_value(text, "X509v3 Key Usage").split(", ")
    assert sorted(OPENSSL_KU[k] for k in kus) == sorted(ca["key_usage"])
    root = inspect_json(capsys, str(initialized / "root.pem"))
    assert root["certificates"][0]["self_signed"] is True
    assert root["verification"]["trusted"] is True


def test_crl_fields_match_openssl(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    """A DER CRL's issuer, dates, number and entries equal openssl crl -text."""
    first = issue(capsys, tmp_path / "a")["serial"]
    second = issue(capsys, tmp_path / "b")["serial"]
    assert run(capsys, "revoke", first, "--reason", "keyCompromise")[0] == 0
    assert run(capsys, "revoke", second, "--reason", "superseded")[0] == 0
    path = tmp_path / "crl.der"
    assert run(capsys, "crl", "--out", str(path))[0] == 0
    data = inspect_json(capsys, str(path))
    assert (data["format"], data["type"], data["verification"]) == ("der", "crl", None)
    crl = data["crls"][0]
    text = openssl("crl", "-in", str(path), "-inform", "DER", "-noout", "-text")
    names = openssl(
        "crl", "-in", str(path), "-inform", "DER", "-noout", "-issuer", "-nameopt", "RFC2253"
    )
    assert names.strip() == f"issuer={crl['issuer']}"
    number = openssl("crl", "-in", str(path), "-inform", "DER", "-noout", "-crlnumber")
    assert int(number.strip().split("=")[1], 16) == crl["crl_number"]
    dates = openssl(
        "crl",
        "-in",
        str(path),
        "-inform",
        "DER",
        "-noout",
        "-lastupdate",
        "-nextupdate",
        "-dateopt",
        "iso_8601",
    )
    assert f"lastUpdate={crl['this_update'].replace('T', ' ')}" in dates
    assert f"nextUpdate={crl['next_update'].replace('T', ' ')}" in dates
    assert crl["authority_key_identifier"] == text_value(text, "X509v3 Authority Key Identifier")
    openssl_entries = dict(
        re.findall(r"Serial Number: ([0-9A-F]+)\n.*?CRL Reason Code: *\n\s+(.+?)\n", text, re.S)
    )
    assert crl["revoked_count"] == len(openssl_entries) == 2
    assert {e["serial_hex"]: e["reason"] for e in crl["revoked"]} == {
        s.lower().lstrip("0"): OPENSSL_REASONS[r.strip()] for s, r in openssl_entries.items()
    }
    assert {e["serial_hex"] for e in crl["revoked"]} == {first, second}
    assert crl["signature_valid"] is True  # checked against the local CA's intermediate
    assert crl["status"] == "current"
    _code, human, _ = run(capsys, "inspect", str(path))
    assert first in human
    assert "keyCompromise" in human
    assert re.search(r"current, next update in 2[34]h", human)


def test_csr_names_and_signature(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    """An openssl CSR shows the names it requests; a tampered one shows an invalid signature."""
    csr = tmp_path / "svc.csr"
    openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(tmp_path / "svc.key"),
        "-subj",
        "/O=example.org",
        "-addext",
        "subjectAltName=URI:spiffe://example.org/svc,DNS:svc.internal",
        "-out",
        str(csr),
    )
    data = inspect_json(capsys, str(csr))
    assert data["type"] == "csr"
    request = data["csrs"][0]
    assert request["spiffe_id"] == "spiffe://example.org/svc"
    assert request["dns"] == ["svc.internal"]
    assert request["signature_valid"] is True
    assert request["key"] == "EC secp256r1 (256-bit)"
    text = openssl("req", "-in", str(csr), "-noout", "-text", "-verify")
    assert "URI:spiffe://example.org/svc, DNS:svc.internal" in text
    names = openssl("req", "-in", str(csr), "-noout", "-subject", "-nameopt", "RFC2253")
    assert names.strip() == f"subject={request['subject']}"

    der = bytearray(
        x509.load_pem_x509_csr(csr.read_bytes()).public_bytes(serialization.Encoding.DER)
    )
    der[-3] ^= 0x01  # inside the signature value
    bad = tmp_path / "bad.csr"
    bad.write_bytes(bytes(der))
    tampered = subprocess.run(
        ["openssl", "req", "-in", str(bad), "-inform", "DER", "-noout", "-verify"],
        capture_output=True,
        check=False,
    )
    assert b"verify failure" in tampered.stderr  # openssl refuses it too
    assert inspect_json(capsys, str(bad))["csrs"][0]["signature_valid"] is False
    code, human, _ = run(capsys, "inspect", str(bad))
    assert code == 0
    assert "INVALID, ecdsa-with-SHA256" in human


def test_pkcs12_keystore_and_truststore(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    """Exported keystores and truststores open with the password; the wrong one exits 2."""
    issued = issue(capsys, tmp_path / "o")
    secret = tmp_path / "p12.pass"
    secret.write_text("changeit-but-longer\n")
    p12 = tmp_path / "o.p12"
    code, _, err = run(
        capsys,
        "export",
        "p12",
        "--cert",
        str(tmp_path / "o" / "chain.pem"),
        "--key",
        str(tmp_path / "o" / "key.pem"),
        "--out",
        str(p12),
        "--password-file",
        str(secret),
        "--alias",
        "orders",
    )
    assert code == 0, err
    data = inspect_json(capsys, str(p12), "--password-file", str(secret))
    assert (data["format"], data["type"]) == ("pkcs12", "pkcs12")
    assert data["private_key_present"] is True
    assert data["key_matches_certificate"] is True
    assert data["certificates"][0]["alias"] == "orders"
    assert data["certificates"][0]["serial_hex"] == issued["serial"]
    assert data["verification"]["trusted"] is True
    info = openssl("pkcs12", "-in", str(p12), "-nokeys", "-clcerts", "-passin", f"file:{secret}")
    fp = openssl("x509", "-noout", "-fingerprint", "-sha256", stdin=info.encode())
    assert fp.strip().endswith(data["certificates"][0]["sha256_fingerprint"])
    code, human, _ = run(capsys, "inspect", str(p12), "--password-file", str(secret))
    assert "private key: present, matches the first certificate (never printed)" in human
    assert "PRIVATE KEY" not in human

    store = tmp_path / "truststore.p12"
    code, _, err = run(
        capsys, "export", "truststore", "--out", str(store), "--password-file", str(secret)
    )
    assert code == 0, err
    trust = inspect_json(capsys, str(store), "--password-file", str(secret))
    assert trust["type"] == "truststore"
    assert trust["verification"] is None
    assert trust["certificates"][0]["subject"] == "CN=trustmesh Root CA,O=example.org"

    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not-the-password\n")
    code, out, err = run(capsys, "inspect", str(store), "--password-file", str(wrong))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "does not open with the given password" in err
    code, _, err = run(capsys, "inspect", str(p12))
    assert code == 2
    assert "encrypted PKCS#12" in err
    assert "--password-file" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"   \n", "is empty"),
        (b"hello, world\n", "is not a certificate, chain, CSR, CRL or PKCS#12 file"),
        (b"\x30\x03\x02\x01\x05", "is not a certificate, chain, CSR, CRL or PKCS#12 file"),
        (b"\xfe\xed\xfe\xed\x00\x00\x00\x02", "JKS/JCEKS keystore"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "is malformed"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "found PUBLIC KEY"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, message: str
) -> None:
    """Empty, unknown or malformed input is a one-line error with exit code 2."""
    path = tmp_path / "input"
    path.write_bytes(content)
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 2
    assert out == ""
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert message in err


def test_key_file_and_empty_stdin_are_refused(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    """A key.pem is refused without printing it; an empty stdin (real process) exits 2."""
    issue(capsys, tmp_path / "o")
    code, out, err = run(capsys, "inspect", str(tmp_path / "o" / "key.pem"))
    assert code == 2
    assert "holds a private key, not a certificate" in err
    assert "BEGIN" not in out + err
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing.pem"))
    assert code == 2
    assert "Cannot read" in err
    proc = subprocess.run(
        [sys.executable, "-m", "trustmesh", "inspect", "-"],
        input=b"",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.decode() == (
        "error: stdin is empty: expected a certificate, chain, CSR, CRL or PKCS#12 file "
        "(PEM or DER).\n"
    )


def test_user_data_is_not_rich_markup_or_emoji(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Markup and emoji codes in a subject or SAN print literally."""
    key = ec.generate_private_key(ec.SECP256R1())
    evil = "[bold red]boss[/bold red] :smile: :AB: [link=http://x]y[/link]"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, evil)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("[i]a[/i].example"), x509.DNSName(":AB:")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "evil.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 0, err
    assert "[bold red]boss[/bold red] :smile: :AB: [link=http://x]y[/link]" in out
    assert "[i]a[/i].example, :AB:" in out
    assert "\N{SMILING FACE WITH OPEN MOUTH AND SMILING EYES}" not in out
    assert "\N{NEGATIVE SQUARED AB}" not in out


def test_json_keys_are_the_documented_ones(
    capsys: pytest.CaptureFixture[str], initialized: Path, tmp_path: Path
) -> None:
    """--json prints exactly the keys docs/inspect.md documents, for every object type."""
    issue(capsys, tmp_path / "o")
    docs = DOCS.read_text()
    data = inspect_json(capsys, str(tmp_path / "o" / "chain.pem"))
    top = {
        "source",
        "format",
        "type",
        "certificates",
        "csrs",
        "crls",
        "private_key_present",
        "key_matches_certificate",
        "ignored_blocks",
        "verification",
    }
    assert set(data) == top
    assert set(data["certificates"][0]) == set(CertificateSummary.__annotations__)
    verification = {
        "checked",
        "trusted",
        "reason",
        "message",
        "spiffe_id",
        "usage",
        "bundle",
        "revocation",
    }
    assert set(data["verification"]) == verification
    for key in (
        top
        | verification
        | set(CertificateSummary.__annotations__)
        | set(CSRSummary.__annotations__)
        | set(CRLSummary.__annotations__)
    ):
        assert f"`{key}`" in docs, f"{key} is not documented in docs/inspect.md"


def test_pki_ca_paths_mixed_pem_and_crl_checks(ca: CertificateAuthority, tmp_path: Path) -> None:
    """verify_ca_certificate, mixed PEM input and foreign CRLs behave as documented."""
    from cryptography.hazmat.primitives.serialization import pkcs12

    from trustmesh.errors import PKIError, VerificationError
    from trustmesh.pki import (
        check_chain,
        crl_revocation_check,
        load_inspectable,
        verify_ca_certificate,
    )

    now = datetime.now(UTC)
    verify_ca_certificate(ca.intermediate, [], ca.bundle, now=now)
    with pytest.raises(VerificationError, match="does not lead to any trust anchor"):
        verify_ca_certificate(ca.intermediate, [], [], now=now)
    with pytest.raises(VerificationError, match="was revoked"):
        verify_ca_certificate(ca.intermediate, [], ca.bundle, now=now, is_revoked=lambda c: True)
    leaf = ca.issue("spiffe://example.org/x").certificate
    with pytest.raises(VerificationError, match="not a CA certificate"):
        verify_ca_certificate(leaf, [], ca.bundle, now=now)
    # A CA certificate under the pathlen:0 intermediate breaks its path length.
    sub = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sub")]))
        .issuer_name(ca.intermediate.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca.signing_key, hashes.SHA256())
    )
    check = check_chain([sub, ca.intermediate], ca.bundle, now=now)
    assert (check["trusted"], check["reason"]) == (False, "path_length")

    crl = ca.crl()
    pem = b"".join(
        obj.public_bytes(serialization.Encoding.PEM) for obj in (leaf, crl, ca.intermediate)
    )
    found = load_inspectable(pem + dump_key_block(), source="mixed.pem")
    assert found.kind == "mixed"
    assert (len(found.certificates), len(found.crls)) == (2, 1)
    assert found.has_private_key
    assert found.ignored == ("PRIVATE KEY",)
    with pytest.raises(PKIError, match=r"not signed by any CA certificate.*inspect the chain"):
        crl_revocation_check([crl], [leaf])
    assert crl_revocation_check([crl], [ca.intermediate])(leaf) is False

    unencrypted = pkcs12.serialize_key_and_certificates(
        b"x", None, leaf, None, serialization.NoEncryption()
    )
    opened = load_inspectable(unencrypted, source="open.p12")
    assert opened.kind == "truststore"
    assert opened.certificates == (leaf,)


def dump_key_block() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
