"""Building and signing certificates: the root, the intermediate and workload leaves.

The leaf profile follows DESIGN.md ("Identity") and the X.509-SVID spec: exactly
one URI SAN, optional DNS/IP SANs, no hostname-like CN, EKU from the profile,
SKI/AKI, back-dated notBefore. The intermediate carries no name constraints:
rustls-based peers and pyca's verifier reject chains that have URI ones.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.errors import ConfigError

from ._durations import format_duration, parse_duration
from ._keys import PrivateKey, PublicKey, signature_hash_for
from ._spiffe import SpiffeID

__all__ = [
    "BACKDATE",
    "DEFAULT_INTERMEDIATE_LIFETIME",
    "DEFAULT_ROOT_LIFETIME",
    "MAX_BACKDATE",
    "LeafRequest",
    "ca_common_name",
    "check_backdate",
    "create_intermediate",
    "create_root",
    "cross_certify",
    "issue_leaf",
    "new_serial",
    "parse_backdate",
]

DEFAULT_ROOT_LIFETIME = timedelta(days=3650)
DEFAULT_INTERMEDIATE_LIFETIME = timedelta(days=365)
#: notBefore is set this far in the past to absorb clock skew between hosts (default).
BACKDATE = timedelta(minutes=1)
#: The most back-dating allowed: more would hide a broken clock and stretch lifetimes.
MAX_BACKDATE = timedelta(minutes=10)
_EKU_OIDS = {
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
}


def new_serial() -> int:
    """Return a random positive 159-bit serial number (RFC 5280 allows 20 octets)."""
    while True:
        serial = secrets.randbits(159)
        if serial >= 1 << 64:  # at least 64 bits of entropy visible, never 0
            return serial


def check_backdate(value: timedelta, *, field: str = "backdate") -> timedelta:
    """Return ``value`` if it is a back-dating within 0 to :data:`MAX_BACKDATE`.

    Raises:
        ConfigError: Negative or over :data:`MAX_BACKDATE`; ``field`` names the setting.

    .. versionadded:: 0.2
    """
    if not timedelta(0) <= value <= MAX_BACKDATE:
        shown = format_duration(value) if value > timedelta(0) else f"-{format_duration(-value)}"
        raise ConfigError(
            f"{field} {shown} is out of range: back-date notBefore by 0s to "
            f"{format_duration(MAX_BACKDATE)} (default {format_duration(BACKDATE)}), "
            f"and keep clocks right with NTP rather than back-dating more.",
            field=field,
        )
    return value


def parse_backdate(value: str, *, field: str = "backdate") -> timedelta:
    """Parse a back-dating such as ``0s``, ``90s`` or ``5m`` (0 to :data:`MAX_BACKDATE`).

    Raises:
        ConfigError: Not a duration, or out of range; ``field`` names the setting.

    .. versionadded:: 0.2
    """
    if value.strip().lower() in {"0", "0s", "0m"}:
        return timedelta(0)
    try:
        parsed = parse_duration(value, field=field)
    except ConfigError:
        raise ConfigError(
            f"Invalid {field} {value!r}: expected a duration from 0s to "
            f"{format_duration(MAX_BACKDATE)}, such as '0s', '90s' or '5m'.",
            field=field,
        ) from None
    return check_backdate(parsed, field=field)


def _now(now: datetime | None) -> datetime:
    current = now or datetime.now(UTC)
    if current.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return current.replace(microsecond=0)


def _ca_name(trust_domain: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def ca_common_name(role: str, generation: int = 1) -> str:
    """Return the CN of a CA certificate: ``trustmesh Root CA``, ``trustmesh
    Intermediate CA 2``...

    Every generation gets its own name, so a CRL (matched to its issuer by name in
    OpenSSL, Java and nginx) can never be mistaken for the other issuer's during a
    rotation's overlap.

    .. versionadded:: 0.3
    """
    base = {"root": "trustmesh Root CA", "intermediate": "trustmesh Intermediate CA"}[role]
    return base if generation <= 1 else f"{base} {generation}"


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _distribution_points(urls: Sequence[str]) -> x509.CRLDistributionPoints:
    """One CRL distribution point (RFC 5280 4.2.1.13) naming every URL given."""
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(u) for u in urls],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


def _ocsp_access(urls: Sequence[str]) -> x509.AuthorityInformationAccess:
    """Authority information access (RFC 5280 4.2.2.1) with one OCSP entry per URL."""
    return x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                x509.oid.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(u)
            )
            for u in urls
        ]
    )


def create_root(
    key: PrivateKey,
    trust_domain: str,
    *,
    lifetime: timedelta = DEFAULT_ROOT_LIFETIME,
    now: datetime | None = None,
    backdate: timedelta = BACKDATE,
    generation: int = 1,
) -> x509.Certificate:
    """Create a self-signed root CA certificate for a trust domain.

    Args:
        key: The root's private key.
        trust_domain: Goes into the subject as ``O=`` and into a URI SAN as the
            trust domain's SPIFFE ID.
        lifetime: Validity period (10 years by default).
        now: The current time (for tests).
        backdate: How far ``notBefore`` lies before ``now`` (0 to :data:`MAX_BACKDATE`).
        generation: 1 for the first root, 2 for the one that replaces it...
            (see :func:`ca_common_name`).

    Returns:
        The root certificate.

    .. versionchanged:: 0.3
       ``generation``.
    """
    start = _now(now)
    name = _ca_name(trust_domain, ca_common_name("root", generation))
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(new_serial())
        .not_valid_before(start - check_backdate(backdate))
        .not_valid_after(start + lifetime)
        # pathlen 2, not 1: OpenSSL checks the anchor's pathlen too, and during a root
        # rotation a leaf of the next root reaches this one through two CA certificates
        # (the next intermediate and the next root certified by this one).
        .add_extension(x509.BasicConstraints(ca=True, path_length=2), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(SpiffeID.trust_domain_id(trust_domain).uri)]
            ),
            critical=False,
        )
    )
    return builder.sign(key, signature_hash_for(key))


def create_intermediate(
    root: x509.Certificate,
    root_key: PrivateKey,
    key: PrivateKey | PublicKey,
    trust_domain: str,
    *,
    lifetime: timedelta = DEFAULT_INTERMEDIATE_LIFETIME,
    now: datetime | None = None,
    crl_urls: Sequence[str] = (),
    backdate: timedelta = BACKDATE,
    generation: int = 1,
) -> x509.Certificate:
    """Create the online intermediate CA (pathlen 0) signed by the root.

    Args:
        root: The root certificate.
        root_key: The root's private key.
        key: The intermediate's private key, or its public key (from a CSR, when
            the root signs on an offline machine).
        trust_domain: The trust domain (subject ``O=`` and URI SAN).
        lifetime: Validity period (1 year by default), capped at the root's.
        now: The current time (for tests).
        crl_urls: Where the root-signed CRL is published (CRL distribution point),
            so peers that check the whole chain (``openssl -crl_check_all``, Java
            with CRLDP) find it.
        backdate: How far ``notBefore`` lies before ``now`` (0 to :data:`MAX_BACKDATE`).
        generation: 1 for the first intermediate, 2 for the next... (its CN).

    Returns:
        The intermediate certificate.

    .. versionchanged:: 0.3
       ``generation``.
    """
    start = _now(now)
    not_after = min(start + lifetime, root.not_valid_after_utc)
    public = key if isinstance(key, PublicKey) else key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_ca_name(trust_domain, ca_common_name("intermediate", generation)))
        .issuer_name(root.subject)
        .public_key(public)
        .serial_number(new_serial())
        .not_valid_before(start - check_backdate(backdate))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(SpiffeID.trust_domain_id(trust_domain).uri)]
            ),
            critical=False,
        )
    )
    if crl_urls:
        builder = builder.add_extension(_distribution_points(crl_urls), critical=False)
    return builder.sign(root_key, signature_hash_for(root_key))


def cross_certify(
    subject: x509.Certificate,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    *,
    now: datetime | None = None,
    backdate: timedelta = BACKDATE,
    not_after: datetime | None = None,
) -> x509.Certificate:
    """Certify root ``subject`` (its name and key) under another root, ``issuer``.

    During a root rotation the old root certifies the new one (so peers that trust
    only the old root accept chains under the new one) and the new root certifies
    the old one (for peers that trust only the new root). The cross certificate
    keeps the subject's name and SKI, gets pathlen 1 (an intermediate below it),
    and expires with the earlier of the two roots, or at ``not_after`` if that is
    earlier (a rotation bounds the old-by-new direction to the old chain's leaves).

    Raises:
        ValueError: ``subject`` and ``issuer`` are the same certificate.

    .. versionadded:: 0.3
    .. versionchanged:: 0.4
       ``not_after``.
    """
    if subject == issuer:
        raise ValueError("a root cannot cross-certify itself")
    start = _now(now)
    end = min(subject.not_valid_after_utc, issuer.not_valid_after_utc)
    if not_after is not None:
        end = max(min(end, not_after), start)
    public = subject.public_key()
    ski = subject.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject.subject)
        .issuer_name(issuer.subject)
        .public_key(public)
        .serial_number(new_serial())
        .not_valid_before(start - check_backdate(backdate))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    try:
        san = subject.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        builder = builder.add_extension(san.value, critical=False)
    except x509.ExtensionNotFound:
        pass
    return builder.sign(issuer_key, signature_hash_for(issuer_key))


@dataclass(frozen=True)
class LeafRequest:
    """What a workload certificate will certify, after policy checks.

    Args:
        public_key: The subject's public key.
        spiffe_id: The identity (the only URI SAN).
        dns: DNS SANs for hostname checks.
        ips: IP SANs.
        eku: ``client`` and/or ``server``.

    .. versionadded:: 0.1
    """

    public_key: PublicKey
    spiffe_id: SpiffeID
    dns: tuple[str, ...] = ()
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    eku: tuple[str, ...] = ("client", "server")


def issue_leaf(
    request: LeafRequest,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    *,
    ttl: timedelta,
    serial: int | None = None,
    now: datetime | None = None,
    crl_urls: Sequence[str] = (),
    ocsp_urls: Sequence[str] = (),
    backdate: timedelta = BACKDATE,
) -> x509.Certificate:
    """Sign a workload (leaf) certificate.

    The lifetime ends no later than the issuer's own ``notAfter``.

    Args:
        request: The checked request.
        issuer: The issuing (intermediate) certificate.
        issuer_key: Its private key.
        ttl: Lifetime from now; ``notBefore`` is back-dated by ``backdate``.
        serial: The serial number; a fresh random one when None.
        now: The current time (for tests).
        crl_urls: CRL distribution point URLs to embed.
        ocsp_urls: OCSP responder URLs to embed (AIA).
        backdate: How far ``notBefore`` lies before ``now`` (0 to :data:`MAX_BACKDATE`).

    Returns:
        The leaf certificate.
    """
    start = _now(now)
    not_after = min(start + ttl, issuer.not_valid_after_utc)
    key = request.public_key
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(request.spiffe_id.uri)]
    sans += [x509.DNSName(name) for name in request.dns]
    sans += [x509.IPAddress(ip) for ip in request.ips]
    is_rsa = isinstance(key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, request.spiffe_id.trust_domain)]
            )
        )
        .issuer_name(issuer.subject)
        .public_key(key)
        .serial_number(serial if serial is not None else new_serial())
        .not_valid_before(start - check_backdate(backdate))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([_EKU_OIDS[name] for name in request.eku]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if crl_urls:
        builder = builder.add_extension(_distribution_points(crl_urls), critical=False)
    if ocsp_urls:
        builder = builder.add_extension(_ocsp_access(ocsp_urls), critical=False)
    return builder.sign(issuer_key, signature_hash_for(issuer_key))
