"""Unit tests of the pure PKI core: verification, CSR policy, issuance profile,
profiles, durations, revocation reasons, keys, CRL/OCSP builders and PKCS#12."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import PASSPHRASE
from trustmesh.authority import CertificateAuthority
from trustmesh.errors import (
    CertificateExpiredError,
    CertificateRevokedError,
    ConfigError,
    CSRError,
    PKIError,
    PolicyError,
    VerificationError,
)
from trustmesh.pki import (
    BACKDATE,
    MAX_BACKDATE,
    MAX_CSR_BYTES,
    REASONS,
    KeyType,
    LeafRequest,
    OCSPStatus,
    PrivateKey,
    Profile,
    RevokedEntry,
    SpiffeID,
    build_crl,
    build_ocsp_response,
    check_backdate,
    check_csr,
    create_intermediate,
    create_root,
    default_profile,
    dump_private_key,
    format_duration,
    generate_private_key,
    issue_leaf,
    load_pem_certificates,
    load_private_key,
    new_serial,
    parse_backdate,
    parse_duration,
    parse_reason,
    pkcs12_keystore,
    pkcs12_truststore,
    request_matches_issuer,
    signature_hash_for,
    spiffe_id_of,
    verify_chain,
)

NOW = datetime(2031, 5, 4, 12, 0, 0, tzinfo=UTC)
KEY_TYPES = [KeyType.EC_P256, KeyType.EC_P384, KeyType.ED25519, KeyType.RSA_2048]
API = "spiffe://example.org/api"
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


@dataclass(frozen=True)
class Pki:
    """A root and an intermediate built with the pure functions, at :data:`NOW`."""

    root: x509.Certificate
    root_key: PrivateKey
    intermediate: x509.Certificate
    key: PrivateKey

    def leaf(
        self,
        spiffe_id: str = API,
        *,
        eku: tuple[str, ...] = ("client", "server"),
        ttl: timedelta = timedelta(hours=1),
        now: datetime = NOW,
        key: PrivateKey | None = None,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
    ) -> x509.Certificate:
        subject = key or ec.generate_private_key(ec.SECP256R1())
        request = LeafRequest(
            subject.public_key(),
            SpiffeID.parse(spiffe_id),
            dns,
            tuple(ipaddress.ip_address(i) for i in ips),
            eku,
        )
        return issue_leaf(request, self.intermediate, self.key, ttl=ttl, now=now)


def make_pki(
    key_type: KeyType = KeyType.EC_P256,
    *,
    trust_domain: str = "example.org",
    root_now: datetime = NOW,
    intermediate_now: datetime = NOW,
) -> Pki:
    root_key = generate_private_key(key_type)
    root = create_root(root_key, trust_domain, now=root_now)
    key = generate_private_key(key_type)
    intermediate = create_intermediate(root, root_key, key, trust_domain, now=intermediate_now)
    return Pki(root, root_key, intermediate, key)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module", params=KEY_TYPES, ids=str)
def typed_pki(request: pytest.FixtureRequest) -> Pki:
    return make_pki(request.param)


def reason_of(info: pytest.ExceptionInfo[VerificationError]) -> str | int | None:
    return info.value.details["reason"]


def forge_leaf(
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    names: Sequence[x509.GeneralName],
    *,
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> x509.Certificate:
    """A leaf trustmesh would never issue, signed by a real issuer key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "example.org")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer_key, signature_hash_for(issuer_key))


# -- verify_chain ----------------------------------------------------------------------


def test_verify_chain_returns_the_spiffe_id(typed_pki: Pki) -> None:
    leaf = typed_pki.leaf("spiffe://example.org/ns/prod/sa/api")
    for usage in ("client", "server"):
        sid = verify_chain(leaf, [typed_pki.intermediate], [typed_pki.root], usage=usage, now=NOW)
        assert sid == SpiffeID.parse("spiffe://example.org/ns/prod/sa/api")
        assert (sid.trust_domain, sid.path) == ("example.org", "/ns/prod/sa/api")
    # The intermediate may also be trusted directly.
    assert verify_chain(leaf, [], [typed_pki.intermediate], now=NOW) == SpiffeID.parse(
        "spiffe://example.org/ns/prod/sa/api"
    )


def test_verify_chain_accepts_both_ends_of_the_validity_period(pki: Pki) -> None:
    leaf = pki.leaf()
    for when in (leaf.not_valid_before_utc, leaf.not_valid_after_utc):
        assert verify_chain(leaf, [pki.intermediate], [pki.root], now=when) == SpiffeID.parse(API)


@pytest.mark.parametrize(
    ("moment", "reason", "fragment"),
    [
        ("before", "not_yet_valid", "is not valid before 2031-05-04T11:59:00Z; check the clocks"),
        ("after", "expired", "expired at 2031-05-04T13:00:00Z; renew it"),
    ],
)
def test_verify_chain_refuses_leaf_outside_validity(
    pki: Pki, moment: str, reason: str, fragment: str
) -> None:
    leaf = pki.leaf()
    second = timedelta(seconds=1)
    when = {
        "before": leaf.not_valid_before_utc - second,
        "after": leaf.not_valid_after_utc + second,
    }[moment]
    with pytest.raises(CertificateExpiredError) as info:
        verify_chain(leaf, [pki.intermediate], [pki.root], now=when)
    assert reason_of(info) == reason
    assert fragment in info.value.message
    assert "leaf certificate" in info.value.message


def test_verify_chain_checks_intermediate_and_anchor_validity() -> None:
    late_intermediate = make_pki(intermediate_now=NOW + timedelta(days=1))
    leaf = late_intermediate.leaf()  # valid now, but its issuer is not yet
    chain = [late_intermediate.intermediate]
    with pytest.raises(CertificateExpiredError) as info:
        verify_chain(leaf, chain, [late_intermediate.root], now=NOW)
    assert reason_of(info) == "not_yet_valid"
    assert "intermediate certificate" in info.value.message

    late_root = make_pki(root_now=NOW + timedelta(days=1))
    with pytest.raises(CertificateExpiredError) as info:
        verify_chain(late_root.leaf(), [late_root.intermediate], [late_root.root], now=NOW)
    assert reason_of(info) == "not_yet_valid"
    assert "trust anchor certificate" in info.value.message


@pytest.mark.parametrize("foreign_domain", ["example.org", "other.org"])
def test_verify_chain_refuses_unknown_ca(pki: Pki, foreign_domain: str) -> None:
    foreign = make_pki(trust_domain=foreign_domain)
    leaf = pki.leaf()
    # With the same trust domain the names are equal: only signatures tell them apart.
    assert (foreign.root.subject == pki.root.subject) is (foreign_domain == "example.org")
    for intermediates, roots in (
        ([pki.intermediate], [foreign.root]),
        ([pki.intermediate, foreign.intermediate], [foreign.root]),
        ([], [pki.root]),  # the intermediate is missing
        ([pki.intermediate], []),
    ):
        with pytest.raises(VerificationError) as info:
            verify_chain(leaf, intermediates, roots, now=NOW)
        assert reason_of(info) == "unknown_ca"
        assert "was not issued by a trusted CA" in info.value.message
        assert API in info.value.message


@pytest.mark.parametrize(
    ("eku", "usage"), [(("server",), "client"), (("client",), "server")], ids=str
)
def test_verify_chain_refuses_wrong_eku(pki: Pki, eku: tuple[str, ...], usage: str) -> None:
    leaf = pki.leaf(eku=eku)
    other = "server" if usage == "client" else "client"
    assert verify_chain(
        leaf, [pki.intermediate], [pki.root], usage=other, now=NOW
    ) == SpiffeID.parse(API)
    with pytest.raises(VerificationError) as info:
        verify_chain(leaf, [pki.intermediate], [pki.root], usage=usage, now=NOW)
    assert type(info.value) is VerificationError
    assert reason_of(info) == "wrong_eku"
    assert f"lacks {usage}Auth" in info.value.message
    assert f"whose eku includes {usage!r}" in info.value.message


def test_verify_chain_refuses_leaf_without_eku(ca: CertificateAuthority) -> None:
    leaf = forge_leaf(
        ca.intermediate, ca.signing_key, [x509.UniformResourceIdentifier(API)], eku=None
    )
    with pytest.raises(VerificationError) as info:
        verify_chain(leaf, [ca.intermediate], ca.bundle)
    assert reason_of(info) == "wrong_eku"


def test_verify_chain_refuses_ca_as_leaf(pki: Pki) -> None:
    # Both chain up to the root, but a CA certificate is no workload identity.
    for cert in (pki.intermediate, pki.root):
        with pytest.raises(VerificationError) as info:
            verify_chain(cert, [pki.intermediate], [pki.root], now=NOW)
        assert reason_of(info) == "ca_as_leaf"
        assert "is a CA certificate and cannot be used as a workload identity" in (
            info.value.message
        )


@pytest.mark.parametrize(
    ("names", "count"),
    [
        (
            [
                x509.UniformResourceIdentifier("spiffe://example.org/a"),
                x509.UniformResourceIdentifier("spiffe://example.org/b"),
            ],
            2,
        ),
        ([x509.DNSName("api.internal")], 0),
        ([], 0),
    ],
    ids=["two-uris", "dns-only", "no-san"],
)
def test_verify_chain_refuses_leaf_without_exactly_one_spiffe_id(
    ca: CertificateAuthority, names: list[x509.GeneralName], count: int
) -> None:
    leaf = forge_leaf(ca.intermediate, ca.signing_key, names)
    with pytest.raises(VerificationError) as info:
        verify_chain(leaf, [ca.intermediate], ca.bundle)
    assert reason_of(info) == "no_spiffe_id"
    assert f"has {count} URI SANs; an X.509-SVID has exactly one SPIFFE ID" in info.value.message


def test_verify_chain_refuses_uri_that_is_not_a_spiffe_id(ca: CertificateAuthority) -> None:
    leaf = forge_leaf(
        ca.intermediate, ca.signing_key, [x509.UniformResourceIdentifier("https://example.org/")]
    )
    with pytest.raises(VerificationError) as info:
        verify_chain(leaf, [ca.intermediate], ca.bundle)
    assert reason_of(info) == "no_spiffe_id"
    assert "https://example.org/" in info.value.message
    with pytest.raises(VerificationError):
        spiffe_id_of(leaf)


def test_verify_chain_asks_is_revoked_about_leaf_and_intermediate(pki: Pki) -> None:
    leaf = pki.leaf()
    asked: list[int] = []

    def nothing_revoked(cert: x509.Certificate) -> bool:
        asked.append(cert.serial_number)
        return False

    verify_chain(leaf, [pki.intermediate], [pki.root], now=NOW, is_revoked=nothing_revoked)
    assert asked == [leaf.serial_number, pki.intermediate.serial_number]

    with pytest.raises(CertificateRevokedError) as info:
        verify_chain(
            leaf,
            [pki.intermediate],
            [pki.root],
            now=NOW,
            is_revoked=lambda c: c.serial_number == leaf.serial_number,
        )
    assert reason_of(info) == "revoked"
    assert f"{leaf.serial_number:x} ({API}) was revoked" in info.value.message

    with pytest.raises(CertificateRevokedError) as info:
        verify_chain(
            leaf,
            [pki.intermediate],
            [pki.root],
            now=NOW,
            is_revoked=lambda c: c.serial_number == pki.intermediate.serial_number,
        )
    assert reason_of(info) == "revoked"
    assert info.value.message.startswith("Intermediate ")


def test_verify_chain_refuses_leaf_signed_by_a_leaf(pki: Pki) -> None:
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    fake_ca = pki.leaf("spiffe://example.org/fake-ca", key=leaf_key)
    request = LeafRequest(ec.generate_private_key(ec.SECP256R1()).public_key(), SpiffeID.parse(API))
    leaf = issue_leaf(request, fake_ca, leaf_key, ttl=timedelta(minutes=5), now=NOW)
    with pytest.raises(VerificationError) as info:
        verify_chain(leaf, [fake_ca, pki.intermediate], [pki.root], now=NOW)
    assert reason_of(info) == "not_a_ca"


def test_verify_chain_enforces_intermediate_path_length(pki: Pki) -> None:
    # The intermediate has pathlen 0, so it must not issue another CA. (Another
    # name, so that the sub-CA is not self-issued, which pathlen would not count.)
    sub_key = generate_private_key(KeyType.EC_P256)
    sub = create_intermediate(pki.intermediate, pki.key, sub_key, "sub.example.org", now=NOW)
    assert sub.subject != pki.intermediate.subject
    request = LeafRequest(ec.generate_private_key(ec.SECP256R1()).public_key(), SpiffeID.parse(API))
    leaf = issue_leaf(request, sub, sub_key, ttl=timedelta(minutes=5), now=NOW)
    with pytest.raises(VerificationError) as info:
        verify_chain(leaf, [sub, pki.intermediate], [pki.root], now=NOW)
    assert reason_of(info) == "path_length"
    assert "(pathlen 0)" in info.value.message


# -- check_csr -------------------------------------------------------------------------


def make_csr(
    names: Sequence[x509.GeneralName],
    *,
    key: PrivateKey | None = None,
    ca: bool = False,
) -> x509.CertificateSigningRequest:
    private = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "example.org")])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    algorithm = None if isinstance(private, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(private, algorithm)


def uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


PROFILE = default_profile("example.org")


def test_check_csr_returns_the_checked_request() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    csr = make_csr(
        [uri(API), x509.DNSName("api.internal"), x509.IPAddress(ipaddress.ip_address("10.0.0.7"))],
        key=key,
    )
    profile = Profile(name="web", spiffe_ids=("spiffe://example.org/*",), eku=("server",))
    for data in (csr, csr.public_bytes(serialization.Encoding.PEM), csr.public_bytes(DER)):
        request = check_csr(data, profile)
        assert request.spiffe_id == SpiffeID.parse(API)
        assert request.dns == ("api.internal",)
        assert request.ips == (ipaddress.ip_address("10.0.0.7"),)
        assert request.eku == ("server",)
        assert request.public_key.public_bytes(DER, SPKI) == key.public_key().public_bytes(
            DER, SPKI
        )


@pytest.mark.parametrize(
    ("names", "key", "profile", "field", "fragments"),
    [
        (
            [uri("spiffe://other.org/api")],
            None,
            PROFILE,
            "spiffe_id",
            [
                "Refusing spiffe://other.org/api",
                "['spiffe://example.org/**']",
                "Request an ID under one of them",
            ],
        ),
        (
            [uri(API), x509.DNSName("www.example.com")],
            None,
            PROFILE,
            "dns",
            ["Refusing DNS name 'www.example.com'", "'**.internal'", "add a pattern"],
        ),
        (
            [uri(API), x509.DNSName("bad..internal")],
            None,
            PROFILE,
            "dns",
            ["Refusing DNS name 'bad..internal'", "not a valid host name"],
        ),
        (
            [uri(API), x509.IPAddress(ipaddress.ip_address("8.8.8.8"))],
            None,
            PROFILE,
            "ip",
            ["Refusing IP address 8.8.8.8", "'10.0.0.0/8'", "add the range"],
        ),
        (
            [uri(API)],
            "rsa-1024",
            PROFILE,
            "key",
            ["Refusing a RSA 1024-bit key", "RSA of 2048 bits or more", "Generate an allowed key"],
        ),
        (
            [uri(API)],
            "secp256k1",
            PROFILE,
            "key",
            ["Refusing a EC secp256k1 key", "--key-type ec-p256"],
        ),
        (
            [uri(API)],
            None,
            Profile(name="edonly", spiffe_ids=(API,), key_types=(KeyType.ED25519,)),
            "key",
            ["Refusing a EC secp256r1 key", "profile 'edonly' allows ['ed25519']"],
        ),
    ],
    ids=["spiffe-id", "dns", "dns-syntax", "ip", "weak-rsa", "odd-curve", "key-type"],
)
def test_check_csr_policy_refusals_name_rule_value_and_fix(
    names: list[x509.GeneralName],
    key: str | None,
    profile: Profile,
    field: str,
    fragments: list[str],
) -> None:
    private: PrivateKey | None = None
    if key == "rsa-1024":
        private = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key under test
    elif key == "secp256k1":
        private = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(PolicyError) as info:
        check_csr(make_csr(names, key=private), profile)
    details = dict(info.value.details)
    if field in ("dns", "ip"):  # the CA's problem+json names the SAN and why
        assert details.pop("reason") in ("san_not_allowed", "bad_san")
        assert str(details.pop("san")).startswith("DNS:" if field == "dns" else "IP:")
    assert details == {"profile": profile.name, "field": field}
    for fragment in fragments:
        assert fragment in info.value.message
    assert "\n" not in info.value.message


def _bad_signature() -> bytes:
    der = bytearray(make_csr([uri(API)]).public_bytes(DER))
    der[-5] ^= 0x01
    return bytes(der)


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (
            make_csr([uri("spiffe://example.org/a"), uri("spiffe://example.org/b")]),
            ["req.pem has 2 URI SANs", "exactly one", "subjectAltName=URI:spiffe://"],
        ),
        (make_csr([x509.DNSName("api.internal")]), ["req.pem has 0 URI SANs"]),
        (make_csr([]), ["req.pem has 0 URI SANs"]),
        (
            make_csr([uri(API)], ca=True),
            ["asks for a CA certificate", "CA:TRUE", "Remove the extension"],
        ),
        (make_csr([uri("https://example.org/api")]), ["req.pem:", "spiffe"]),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n",
            ["req.pem is not a certificate signing request", "BEGIN CERTIFICATE REQUEST"],
        ),
        (b"\x30\x03\x02\x01\x00", ["req.pem is not a certificate signing request"]),
        (_bad_signature(), ["The signature of req.pem does not verify", "Create it again"]),
        (
            b"x" * (MAX_CSR_BYTES + 1),
            [f"req.pem is {MAX_CSR_BYTES + 1} bytes", f"limited to {MAX_CSR_BYTES} bytes"],
        ),
    ],
    ids=[
        "two-uris",
        "dns-only",
        "no-san",
        "ca",
        "not-spiffe",
        "bad-pem",
        "bad-der",
        "bad-sig",
        "too-big",
    ],
)
def test_check_csr_refuses_malformed_requests(
    data: bytes | x509.CertificateSigningRequest, fragments: list[str]
) -> None:
    with pytest.raises(CSRError) as info:
        check_csr(data, PROFILE, source="req.pem")
    assert info.value.details == {"source": "req.pem"}
    for fragment in fragments:
        assert fragment in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize("key_type", KEY_TYPES, ids=str)
def test_check_csr_accepts_every_supported_key_type(key_type: KeyType) -> None:
    request = check_csr(make_csr([uri(API)], key=generate_private_key(key_type)), PROFILE)
    assert request.spiffe_id == SpiffeID.parse(API)


# -- issued certificates ---------------------------------------------------------------


def test_issued_leaf_profile(typed_pki: Pki) -> None:
    key = generate_private_key(KeyType.EC_P256)
    leaf = typed_pki.leaf(key=key, dns=("api.internal",), ips=("10.0.0.7", "::1"))
    inter_ski = typed_pki.intermediate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value

    assert leaf.version is x509.Version.v3
    assert 2**64 <= leaf.serial_number < 2**159
    assert leaf.not_valid_before_utc == NOW - timedelta(seconds=60) == NOW - BACKDATE
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=1)
    assert leaf.issuer == typed_pki.intermediate.subject
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    assert leaf.subject.rfc4514_string() == "O=example.org"

    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    assert not ku.value.crl_sign
    assert not ku.value.key_encipherment  # an EC subject key
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [API]
    assert san.get_values_for_type(x509.DNSName) == ["api.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == inter_ski.digest
    leaf.verify_directly_issued_by(typed_pki.intermediate)


@pytest.mark.parametrize(
    ("key_type", "hash_name"),
    [
        (KeyType.EC_P256, "sha256"),
        (KeyType.EC_P384, "sha384"),
        (KeyType.ED25519, None),
        (KeyType.RSA_2048, "sha256"),
    ],
    ids=str,
)
def test_ca_certificates_profile(key_type: KeyType, hash_name: str | None) -> None:
    pki = make_pki(key_type)
    root_bc = pki.root.extensions.get_extension_for_class(x509.BasicConstraints)
    inter_bc = pki.intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert (root_bc.critical, root_bc.value.ca, root_bc.value.path_length) == (
        True,
        True,
        2,
    )  # 2: a root rotation adds a cross certificate
    assert (inter_bc.critical, inter_bc.value.ca, inter_bc.value.path_length) == (True, True, 0)
    for cert in (pki.root, pki.intermediate):
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical
        assert ku.value.key_cert_sign
        assert ku.value.crl_sign
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
        assert cert.not_valid_before_utc == NOW - BACKDATE
        algorithm = cert.signature_hash_algorithm
        assert (algorithm.name if algorithm else None) == hash_name
        with pytest.raises(x509.ExtensionNotFound):  # rustls and pyca refuse URI ones
            cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert pki.root.subject == pki.root.issuer
    pki.root.verify_directly_issued_by(pki.root)
    pki.intermediate.verify_directly_issued_by(pki.root)
    aki = pki.intermediate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = pki.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert pki.root.not_valid_after_utc == NOW + timedelta(days=3650)
    assert pki.intermediate.not_valid_after_utc == NOW + timedelta(days=365)


def test_rsa_leaf_allows_key_encipherment(pki: Pki) -> None:
    leaf = pki.leaf(key=generate_private_key(KeyType.RSA_2048))
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


def test_lifetimes_are_capped_by_the_issuer(pki: Pki) -> None:
    leaf = pki.leaf(ttl=timedelta(days=10_000))
    assert leaf.not_valid_after_utc == pki.intermediate.not_valid_after_utc
    inter = create_intermediate(
        pki.root,
        pki.root_key,
        generate_private_key(KeyType.EC_P256),
        "example.org",
        lifetime=timedelta(days=100_000),
        now=NOW,
    )
    assert inter.not_valid_after_utc == pki.root.not_valid_after_utc


def test_leaf_embeds_crl_and_ocsp_urls(pki: Pki) -> None:
    request = LeafRequest(generate_private_key(KeyType.EC_P256).public_key(), SpiffeID.parse(API))
    leaf = issue_leaf(
        request,
        pki.intermediate,
        pki.key,
        ttl=timedelta(hours=1),
        serial=2**100 + 7,
        now=NOW,
        crl_urls=["http://ca.internal/crl"],
        ocsp_urls=["http://ca.internal/ocsp"],
    )
    assert leaf.serial_number == 2**100 + 7
    cdp = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for n in cdp[0].full_name or []] == ["http://ca.internal/crl"]
    aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [d.access_location.value for d in aia] == ["http://ca.internal/ocsp"]
    plain = pki.leaf()
    with pytest.raises(x509.ExtensionNotFound):
        plain.extensions.get_extension_for_class(x509.CRLDistributionPoints)


def test_new_serial_range_and_uniqueness() -> None:
    serials = {new_serial() for _ in range(500)}
    assert len(serials) == 500
    assert all(2**64 <= s < 2**159 for s in serials)
    assert max(serials).bit_length() > 150  # really random over 159 bits


def test_issuing_with_a_naive_time_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.leaf(now=datetime(2031, 1, 1))


# -- profiles --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        (
            {"spiffe_ids": [API], "colour": "blue"},
            None,
            "unknown setting(s) ['colour']; expected some of",
        ),
        ({}, "spiffe_ids", "spiffe_ids is missing or empty"),
        ({"spiffe_ids": []}, "spiffe_ids", "e.g. ['spiffe://example.org/**']"),
        ({"spiffe_ids": API}, "spiffe_ids", "spiffe_ids must be a list of strings"),
        ({"spiffe_ids": [API], "dns": ["a.internal", 3]}, "dns", "dns must be a list of strings"),
        ({"spiffe_ids": [API], "min_rsa_bits": 1024}, "min_rsa_bits", "at least 2048"),
        ({"spiffe_ids": [API], "min_rsa_bits": "4096"}, "min_rsa_bits", "an integer"),
        ({"spiffe_ids": [API], "default_ttl": 3600}, "default_ttl", "a duration string"),
        ({"spiffe_ids": [API], "max_ttl": "forever"}, "profiles.p.max_ttl", "'forever'"),
        (
            {"spiffe_ids": [API], "default_ttl": "8d"},
            "default_ttl",
            "default_ttl 8d is longer than max_ttl 7d",
        ),
        ({"spiffe_ids": [API], "eku": ["client", "email"]}, "eku", "non-empty subset"),
        ({"spiffe_ids": [API], "eku": []}, "eku", "got []"),
        ({"spiffe_ids": [API], "ips": ["10.0.0.0/33"]}, "ips", "'10.0.0.0/33' in ips"),
        ({"spiffe_ids": [API], "key_types": ["dsa-1024"]}, "key_type", "Unknown key type"),
    ],
)
def test_profile_from_mapping_errors(
    data: dict[str, object], field: str | None, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Profile.from_mapping("p", data)
    assert fragment in info.value.message
    assert info.value.details.get("field") == field


def test_profile_mapping_round_trip() -> None:
    profile = Profile(
        name="web",
        spiffe_ids=("spiffe://example.org/web/*",),
        dns=("*.web.internal",),
        ips=("10.9.0.0/16",),
        key_types=(KeyType.EC_P384, KeyType.RSA_3072),
        min_rsa_bits=3072,
        default_ttl=timedelta(hours=1, minutes=30),
        max_ttl=timedelta(days=2),
        eku=("server",),
    )
    assert Profile.from_mapping("web", profile.to_mapping()) == profile
    assert profile.to_mapping()["default_ttl"] == "1h30m"


def test_profile_resolve_ttl() -> None:
    assert PROFILE.resolve_ttl(None) == timedelta(hours=24)
    assert PROFILE.resolve_ttl(timedelta(days=7)) == timedelta(days=7)
    with pytest.raises(PolicyError, match="at most 7d"):
        PROFILE.resolve_ttl(timedelta(days=7, seconds=1))
    with pytest.raises(PolicyError, match="zero or less"):
        PROFILE.resolve_ttl(timedelta(0))


# -- durations, reasons ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("24h", 86400),
        ("7d", 604800),
        ("2w", 1209600),
        ("1h30m", 5400),
        (" 1D12H ", 129600),
        ("0m5s", 5),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "  ", "0s", "soon", "15", "m", "1h 30m", "-5m", "1.5h", "1y"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text, field="--ttl")
    assert info.value.message == (
        f"Invalid --ttl {text!r}: expected a positive duration such as "
        f"'90s', '15m', '24h', '7d' or '1h30m'."
    )
    assert info.value.details == {"field": "--ttl"}


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(hours=36), "1d12h"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(days=7), "7d"),
        (timedelta(days=1, hours=2, minutes=3, seconds=4), "1d2h3m4s"),
        (timedelta(0), "0s"),
        (timedelta(seconds=-5), "0s"),
        (timedelta(seconds=1.9), "1s"),
    ],
)
def test_format_duration(delta: timedelta, text: str) -> None:
    assert format_duration(delta) == text
    if delta >= timedelta(seconds=1):
        assert parse_duration(text) == timedelta(seconds=int(delta.total_seconds()))


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("keyCompromise", "keyCompromise"),
        ("key-compromise", "keyCompromise"),
        ("KEY_COMPROMISE", "keyCompromise"),
        ("keycompromise", "keyCompromise"),
        ("ca-compromise", "cACompromise"),
        ("aa_compromise", "aACompromise"),
        ("Superseded", "superseded"),
        ("cessation-of-operation", "cessationOfOperation"),
        ("certificate_hold", "certificateHold"),
    ],
)
def test_parse_reason_variants(value: str, canonical: str) -> None:
    assert parse_reason(value) == canonical


def test_parse_reason_round_trips_every_name_and_refuses_others() -> None:
    assert [parse_reason(name) for name in REASONS] == list(REASONS)
    with pytest.raises(ConfigError) as info:
        parse_reason("bored")
    assert "Unknown revocation reason 'bored'" in info.value.message
    assert "keyCompromise" in info.value.message
    assert info.value.details == {"field": "reason"}


# -- private keys ----------------------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES, ids=str)
def test_key_dump_and_load_round_trip(key_type: KeyType) -> None:
    key = generate_private_key(key_type)
    for passphrase in (None, PASSPHRASE):
        pem = dump_private_key(key, passphrase)
        assert (b"ENCRYPTED PRIVATE KEY" in pem) is (passphrase is not None)
        loaded = load_private_key(pem, passphrase)
        assert loaded.public_key().public_bytes(DER, SPKI) == key.public_key().public_bytes(
            DER, SPKI
        )


def test_key_load_errors(tmp_path: Path) -> None:
    key = generate_private_key(KeyType.EC_P256)
    encrypted = dump_private_key(key, PASSPHRASE)
    plain = dump_private_key(key)
    x25519_pem = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cases: list[tuple[bytes, bytes | None, str]] = [
        (
            encrypted,
            b"wrong",
            "Wrong passphrase for the private key in ca.key: check TRUSTMESH_CA_PASSPHRASE "
            "or --passphrase-file.",
        ),
        (
            encrypted,
            None,
            "The private key in ca.key is encrypted and no passphrase was given: set "
            "TRUSTMESH_CA_PASSPHRASE or pass --passphrase-file.",
        ),
        (
            plain,
            PASSPHRASE,
            "The private key in ca.key is not encrypted but a passphrase was given: "
            "drop the passphrase.",
        ),
        (
            b"hello",
            None,
            "ca.key does not hold a PEM private key: expected a "
            "'-----BEGIN PRIVATE KEY-----' block.",
        ),
        (
            x25519_pem,
            None,
            "The private key in ca.key is X25519PrivateKey: use an EC, RSA or Ed25519 key.",
        ),
    ]
    for data, passphrase, message in cases:
        with pytest.raises(PKIError) as info:
            load_private_key(data, passphrase, source="ca.key")
        assert info.value.message == message
        assert info.value.details == {"source": "ca.key"}
    with pytest.raises(ValueError, match="must not be empty"):
        dump_private_key(key, b"")


def test_ca_signing_key_needs_the_right_passphrase(ca: CertificateAuthority, home: Path) -> None:
    with CertificateAuthority.open(home, passphrase=b"not it") as wrong:
        with pytest.raises(PKIError) as info:
            _ = wrong.signing_key
        assert info.value.message.startswith("Wrong passphrase for the private key in ")
        assert info.value.details["source"] == str(home / "intermediate.key")
    with CertificateAuthority.open(home) as read_only:
        with pytest.raises(PKIError, match="is encrypted and no passphrase was given"):
            _ = read_only.signing_key
        assert read_only.root == ca.root  # reading needs no passphrase
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as right:
        assert right.signing_key.public_key().public_bytes(DER, SPKI) == (
            ca.intermediate.public_key().public_bytes(DER, SPKI)
        )


# -- CRL and OCSP builders -------------------------------------------------------------


def test_build_crl(typed_pki: Pki) -> None:
    entries = [
        RevokedEntry(2**70 + 1, NOW - timedelta(hours=1), "keyCompromise"),
        RevokedEntry(2**70 + 2, NOW - timedelta(minutes=5) + timedelta(microseconds=7)),
    ]
    crl = build_crl(typed_pki.intermediate, typed_pki.key, entries, number=42, now=NOW)
    issuer_key = typed_pki.intermediate.public_key()
    assert isinstance(
        issuer_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    )
    assert crl.is_signature_valid(issuer_key)
    assert crl.issuer == typed_pki.intermediate.subject
    assert crl.last_update_utc == NOW
    assert crl.next_update_utc == NOW + timedelta(hours=24)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 42
    first = crl.get_revoked_certificate_by_serial_number(2**70 + 1)
    assert first is not None
    assert first.revocation_date_utc == NOW - timedelta(hours=1)
    reason = first.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    second = crl.get_revoked_certificate_by_serial_number(2**70 + 2)
    assert second is not None
    assert second.revocation_date_utc == NOW - timedelta(minutes=5)
    with pytest.raises(x509.ExtensionNotFound):  # unspecified: the entry carries no reason
        second.extensions.get_extension_for_class(x509.CRLReason)


@pytest.mark.parametrize(
    "algorithm",
    [hashes.SHA1(), hashes.SHA256()],  # noqa: S303 - SHA-1 is OpenSSL's default CertID hash
    ids=["sha1", "sha256"],
)
def test_request_matches_issuer(typed_pki: Pki, algorithm: hashes.HashAlgorithm) -> None:
    leaf = typed_pki.leaf()
    request = (
        ocsp.OCSPRequestBuilder().add_certificate(leaf, typed_pki.intermediate, algorithm).build()
    )
    assert request_matches_issuer(request, typed_pki.intermediate)
    assert not request_matches_issuer(request, typed_pki.root)
    assert not request_matches_issuer(request, make_pki().intermediate)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (OCSPStatus("good"), ocsp.OCSPCertStatus.GOOD),
        (OCSPStatus("unknown"), ocsp.OCSPCertStatus.UNKNOWN),
        (
            OCSPStatus("revoked", NOW - timedelta(hours=2), "superseded"),
            ocsp.OCSPCertStatus.REVOKED,
        ),
    ],
    ids=["good", "unknown", "revoked"],
)
def test_build_ocsp_response(
    typed_pki: Pki, status: OCSPStatus, expected: ocsp.OCSPCertStatus
) -> None:
    leaf = typed_pki.leaf()
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(leaf, typed_pki.intermediate, hashes.SHA1())  # noqa: S303 - as OpenSSL
        .add_extension(x509.OCSPNonce(b"\x01" * 16), critical=False)
        .build()
    )
    response = build_ocsp_response(request, status, typed_pki.intermediate, typed_pki.key, now=NOW)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status is expected
    assert response.serial_number == leaf.serial_number
    assert response.issuer_key_hash == request.issuer_key_hash
    assert response.issuer_name_hash == request.issuer_name_hash
    assert response.this_update_utc == NOW
    assert response.next_update_utc == NOW + timedelta(hours=1)
    assert response.certificates == [typed_pki.intermediate]
    assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == (b"\x01" * 16)
    if expected is ocsp.OCSPCertStatus.REVOKED:
        assert response.revocation_time_utc == NOW - timedelta(hours=2)
        assert response.revocation_reason is x509.ReasonFlags.superseded
    else:
        assert response.revocation_time_utc is None
    # The signature verifies with the intermediate's key.
    public = typed_pki.intermediate.public_key()
    data, signature = response.tbs_response_bytes, response.signature
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, data)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        algorithm = response.signature_hash_algorithm
        assert algorithm is not None
        public.verify(signature, data, ec.ECDSA(algorithm))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        algorithm = response.signature_hash_algorithm
        assert algorithm is not None
        public.verify(signature, data, padding.PKCS1v15(), algorithm)


# -- bundles ---------------------------------------------------------------------------


def test_pkcs12_keystore_and_truststore_round_trip(pki: Pki) -> None:
    key = generate_private_key(KeyType.EC_P256)
    leaf = pki.leaf(key=key)
    for legacy in (False, True):
        data = pkcs12_keystore(
            key, leaf, [pki.intermediate], password=b"pw", alias="svc", legacy=legacy
        )
        loaded = pkcs12.load_pkcs12(data, b"pw")
        assert loaded.cert is not None
        assert loaded.cert.certificate == leaf
        assert loaded.cert.friendly_name == b"svc"
        assert [c.certificate for c in loaded.additional_certs] == [pki.intermediate]
        assert loaded.key is not None
        assert loaded.key.public_key().public_bytes(DER, SPKI) == key.public_key().public_bytes(
            DER, SPKI
        )
        trust = pkcs12.load_pkcs12(
            pkcs12_truststore([pki.root], password=b"pw", legacy=legacy), b"pw"
        )
        assert trust.key is None
        assert [c.certificate for c in trust.additional_certs] == [pki.root]


def test_pkcs12_refusals(pki: Pki) -> None:
    key = generate_private_key(KeyType.EC_P256)
    leaf = pki.leaf(key=key)
    for password in (None, b""):
        with pytest.raises(PKIError, match="needs a password"):
            pkcs12_keystore(key, leaf, [pki.intermediate], password=password)
        with pytest.raises(PKIError, match="needs a password"):
            pkcs12_truststore([pki.root], password=password)
    with pytest.raises(PKIError, match="does not match the certificate"):
        pkcs12_keystore(pki.key, leaf, [pki.intermediate], password=b"pw")


def test_load_pem_certificates() -> None:
    pki = make_pki()
    data = b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in (pki.intermediate, pki.root)
    )
    assert load_pem_certificates(data) == [pki.intermediate, pki.root]
    with pytest.raises(PKIError) as info:
        load_pem_certificates(b"not a cert", source="chain.pem")
    assert info.value.message.startswith("chain.pem does not hold PEM certificates")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        ("90s", timedelta(seconds=90)),
        ("10m", MAX_BACKDATE),
    ],
)
def test_parse_backdate_accepts_zero_to_ten_minutes(text: str, expected: timedelta) -> None:
    """A back-dating from 0s to 10m parses; 0 is allowed (unlike other durations)."""
    assert parse_backdate(text) == expected


@pytest.mark.parametrize("text", ["11m", "1h", "-1m", "soon", ""])
def test_parse_backdate_refuses_others_naming_the_range(text: str) -> None:
    """Anything else is a ConfigError naming the field and the 0s-10m range."""
    with pytest.raises(ConfigError, match=r"^(Invalid )?--backdate .*10m"):
        parse_backdate(text, field="--backdate")


def test_certificates_use_the_given_backdating(pki: Pki) -> None:
    """notBefore is ``now`` minus ``backdate`` (0 here); a negative back-dating is refused."""
    key = generate_private_key(KeyType.EC_P256)
    root = create_root(key, "example.org", now=NOW, backdate=timedelta(0))
    assert root.not_valid_before_utc == NOW
    request = LeafRequest(key.public_key(), SpiffeID.parse("spiffe://example.org/a"))
    leaf = issue_leaf(
        request, pki.intermediate, pki.key, ttl=timedelta(hours=1), now=NOW, backdate=MAX_BACKDATE
    )
    assert leaf.not_valid_before_utc == NOW - MAX_BACKDATE
    with pytest.raises(ConfigError, match="backdate -1m is out of range"):
        check_backdate(timedelta(minutes=-1))
    assert BACKDATE < MAX_BACKDATE
