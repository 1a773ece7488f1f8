"""Verifying an X.509-SVID chain and extracting the caller's SPIFFE ID.

A small, explicit path builder: leaf -> intermediates -> one of the trust anchors,
checking signatures, validity, CA flags and path length, the leaf's EKU and its one
SPIFFE ID. Each failure raises a :class:`VerificationError` whose
``details["reason"]`` names the check, so servers can log and count denials by reason.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from trustmesh.errors import (
    CertificateExpiredError,
    CertificateRevokedError,
    SpiffeIDError,
    VerificationError,
)

from ._spiffe import SpiffeID

__all__ = ["spiffe_id_of", "verify_ca_certificate", "verify_chain"]

_USAGE_OIDS = {
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
}
_MAX_DEPTH = 4


def _serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def spiffe_id_of(cert: x509.Certificate) -> SpiffeID:
    """Return the one SPIFFE ID in a certificate's URI SANs.

    Raises:
        VerificationError: The certificate has no or several URI SANs, or the URI
            is not a SPIFFE ID (reason ``no_spiffe_id``).
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise VerificationError(
            f"Certificate {_serial_hex(cert)} has {len(uris)} URI SANs; an X.509-SVID "
            f"has exactly one SPIFFE ID.",
            reason="no_spiffe_id",
        )
    try:
        return SpiffeID.parse(uris[0])
    except SpiffeIDError as exc:
        raise VerificationError(exc.message, reason="no_spiffe_id") from None


def _check_time(cert: x509.Certificate, now: datetime, role: str) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateExpiredError(
            f"The {role} certificate {_serial_hex(cert)} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}; check the clocks.",
            reason="not_yet_valid",
        )
    if now > cert.not_valid_after_utc:
        raise CertificateExpiredError(
            f"The {role} certificate {_serial_hex(cert)} expired at "
            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}; renew it.",
            reason="expired",
        )


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Collection[x509.Certificate],
    *,
    usage: str = "client",
    now: datetime | None = None,
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
) -> SpiffeID:
    """Verify a leaf up to a trust anchor and return its SPIFFE ID.

    Args:
        leaf: The peer's certificate.
        intermediates: Certificates the peer sent after its leaf.
        roots: The trust anchors.
        usage: ``client`` or ``server``: the EKU the leaf must carry.
        now: The time to verify at (default: now).
        is_revoked: Called with the leaf and each intermediate; True refuses.

    Returns:
        The leaf's SPIFFE ID.

    Raises:
        CertificateExpiredError: A certificate is outside its validity period.
        CertificateRevokedError: ``is_revoked`` said so.
        VerificationError: Any other failure; ``details["reason"]`` is one of
            ``ca_as_leaf``, ``wrong_eku``, ``no_spiffe_id``, ``unknown_ca``,
            ``not_a_ca``, ``path_length``.
    """
    when = now or datetime.now(UTC)
    bc = _basic_constraints(leaf)
    if bc is not None and bc.ca:
        raise VerificationError(
            f"Certificate {_serial_hex(leaf)} is a CA certificate and cannot be used "
            f"as a workload identity.",
            reason="ca_as_leaf",
        )
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = set(eku)
    except x509.ExtensionNotFound:
        usages = set()
    if _USAGE_OIDS[usage] not in usages:
        raise VerificationError(
            f"Certificate {_serial_hex(leaf)} is not allowed for TLS {usage} "
            f"authentication (its extended key usage lacks {usage}Auth); issue it "
            f"with a profile whose eku includes {usage!r}.",
            reason="wrong_eku",
        )
    spiffe_id = spiffe_id_of(leaf)
    _check_time(leaf, when, "leaf")
    if is_revoked is not None and is_revoked(leaf):
        raise CertificateRevokedError(
            f"Certificate {_serial_hex(leaf)} ({spiffe_id}) was revoked.",
            reason="revoked",
        )

    if not _walk_to_anchor(leaf, intermediates, roots, when, is_revoked, start_depth=0):
        raise VerificationError(
            f"Certificate {_serial_hex(leaf)} ({spiffe_id}) was not issued by a trusted "
            f"CA: its chain does not lead to any trust anchor in the bundle.",
            reason="unknown_ca",
        )
    return spiffe_id


def _walk_to_anchor(
    first: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Collection[x509.Certificate],
    when: datetime,
    is_revoked: Callable[[x509.Certificate], bool] | None,
    *,
    start_depth: int,
) -> bool:
    """Follow issuers from ``first`` to a trust anchor; False when none is reached.

    ``start_depth`` counts the CA certificates already below the next issuer
    (RFC 5280 section 4.2.1.9: pathLenConstraint counts non-leaf certificates).
    """
    current = first
    for depth in range(start_depth, start_depth + _MAX_DEPTH):
        anchor = next((r for r in roots if _signed_by(current, r)), None)
        if anchor is not None:
            _check_time(anchor, when, "trust anchor")
            return True
        issuer = next(
            (c for c in intermediates if c is not current and _signed_by(current, c)),
            None,
        )
        if issuer is None:
            return False
        ibc = _basic_constraints(issuer)
        if ibc is None or not ibc.ca:
            raise VerificationError(
                f"Certificate {_serial_hex(issuer)} in the chain is not a CA.",
                reason="not_a_ca",
            )
        if ibc.path_length is not None and depth > ibc.path_length:
            raise VerificationError(
                f"The chain is longer than intermediate {_serial_hex(issuer)} allows "
                f"(pathlen {ibc.path_length}).",
                reason="path_length",
            )
        _check_time(issuer, when, "intermediate")
        if is_revoked is not None and is_revoked(issuer):
            raise CertificateRevokedError(
                f"Intermediate {_serial_hex(issuer)} was revoked.", reason="revoked"
            )
        current = issuer
    return False


def verify_ca_certificate(
    cert: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Collection[x509.Certificate],
    *,
    now: datetime | None = None,
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
) -> None:
    """Verify a CA certificate (an intermediate or a root) up to a trust anchor.

    The workload checks of :func:`verify_chain` (EKU, SPIFFE ID) do not apply;
    signatures, validity, CA flags and path lengths do. A certificate that is
    itself one of ``roots`` verifies when it is within its validity period.

    Args:
        cert: The CA certificate.
        intermediates: Certificates that may lie between it and an anchor.
        roots: The trust anchors.
        now: The time to verify at (default: now).
        is_revoked: Called with ``cert`` and each intermediate; True refuses.

    Raises:
        CertificateExpiredError: A certificate is outside its validity period.
        CertificateRevokedError: ``is_revoked`` said so.
        VerificationError: ``not_a_ca`` (``cert`` is no CA), ``path_length`` or
            ``unknown_ca``.

    .. versionadded:: 0.1
    """
    when = now or datetime.now(UTC)
    bc = _basic_constraints(cert)
    if bc is None or not bc.ca:
        raise VerificationError(
            f"Certificate {_serial_hex(cert)} is not a CA certificate; verify it as "
            f"a workload certificate instead.",
            reason="not_a_ca",
        )
    if cert in roots:
        _check_time(cert, when, "trust anchor")
        return
    _check_time(cert, when, "CA")
    if is_revoked is not None and is_revoked(cert):
        raise CertificateRevokedError(
            f"CA certificate {_serial_hex(cert)} was revoked.", reason="revoked"
        )
    if not _walk_to_anchor(cert, intermediates, roots, when, is_revoked, start_depth=1):
        raise VerificationError(
            f"CA certificate {_serial_hex(cert)} ({cert.subject.rfc4514_string()}) "
            f"does not lead to any trust anchor in the bundle.",
            reason="unknown_ca",
        )
