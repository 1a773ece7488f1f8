"""Checking certificate signing requests against a profile."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

from trustmesh.errors import CSRError, PolicyError, SpiffeIDError

from ._issue import LeafRequest
from ._profiles import Profile
from ._spiffe import SpiffeID

__all__ = ["MAX_CSR_BYTES", "check_csr", "load_csr", "request_from_csr"]

#: CSRs larger than this are refused before parsing.
MAX_CSR_BYTES = 16 * 1024


def load_csr(data: bytes, *, source: str = "CSR") -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR and check its signature.

    Args:
        data: The CSR bytes (PEM or DER).
        source: What to call the CSR in messages (a file name).

    Raises:
        CSRError: Too large, unparsable, or its self-signature does not verify.
    """
    if len(data) > MAX_CSR_BYTES:
        raise CSRError(
            f"{source} is {len(data)} bytes; CSRs are limited to {MAX_CSR_BYTES} bytes.",
            source=source,
        )
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError:
        raise CSRError(
            f"{source} is not a certificate signing request: expected a "
            f"'-----BEGIN CERTIFICATE REQUEST-----' PEM block or DER.",
            source=source,
        ) from None
    try:
        valid = csr.is_signature_valid
    except Exception:  # unsupported algorithm inside the CSR
        valid = False
    if not valid:
        raise CSRError(
            f"The signature of {source} does not verify: the CSR was altered or not "
            f"signed with the key it contains. Create it again.",
            source=source,
        )
    return csr


def request_from_csr(
    csr: x509.CertificateSigningRequest, *, source: str = "CSR"
) -> tuple[SpiffeID, tuple[str, ...], tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]]:
    """Return the SPIFFE ID, DNS names and IP addresses a CSR asks for.

    Raises:
        CSRError: The CSR asks for a CA, has no or several SPIFFE IDs, or other
            URI SANs.
        SpiffeIDError: Its URI SAN is not a valid SPIFFE ID.
    """
    try:
        bc = csr.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and isinstance(bc.value, x509.BasicConstraints) and bc.value.ca:
        raise CSRError(
            f"{source} asks for a CA certificate (basicConstraints CA:TRUE); trustmesh "
            f"only signs workload certificates. Remove the extension.",
            source=source,
        )
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CSRError(
            f"{source} has {len(uris)} URI SANs; it must carry exactly one, the "
            f"SPIFFE ID (e.g. openssl req -addext "
            f"'subjectAltName=URI:spiffe://example.org/svc').",
            source=source,
        )
    try:
        spiffe_id = SpiffeID.parse(uris[0])
    except SpiffeIDError as exc:
        raise CSRError(f"{source}: {exc.message}", source=source) from None
    dns = tuple(san.get_values_for_type(x509.DNSName))
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for ip in san.get_values_for_type(x509.IPAddress):
        if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise CSRError(
                f"{source} asks for the IP range {ip} as a SAN; list single addresses.",
                source=source,
            )
        ips.append(ip)
    return spiffe_id, dns, tuple(ips)


def check_csr(
    data: bytes | x509.CertificateSigningRequest,
    profile: Profile,
    *,
    source: str = "CSR",
) -> LeafRequest:
    """Parse a CSR and check everything it asks for against a profile.

    Args:
        data: PEM/DER bytes or a parsed CSR.
        profile: The profile to check against.
        source: What to call the CSR in messages.

    Returns:
        The request to sign.

    Raises:
        CSRError: The CSR is malformed, badly signed or asks for a CA.
        PolicyError: The profile forbids its ID, names or key.
    """
    csr = (
        data if isinstance(data, x509.CertificateSigningRequest) else load_csr(data, source=source)
    )
    spiffe_id, dns, ips = request_from_csr(csr, source=source)
    profile.check_spiffe_id(spiffe_id)
    for name in dns:
        profile.check_dns(name)
    for ip in ips:
        profile.check_ip(ip)
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise PolicyError(
            f"{source} holds a {type(key).__name__}; use an EC, RSA or Ed25519 key.",
            profile=profile.name,
            field="key",
        )
    profile.check_key(key)
    return LeafRequest(public_key=key, spiffe_id=spiffe_id, dns=dns, ips=ips, eku=profile.eku)
