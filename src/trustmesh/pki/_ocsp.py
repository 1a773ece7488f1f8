"""Signing OCSP responses (RFC 6960) with the issuing CA's key."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from ._crl import REASONS
from ._keys import PrivateKey, signature_hash_for

__all__ = [
    "DEFAULT_OCSP_LIFETIME",
    "OCSPStatus",
    "build_ocsp_response",
    "request_matches_issuer",
]

#: ``nextUpdate`` of a response is this far after ``thisUpdate``.
DEFAULT_OCSP_LIFETIME = timedelta(hours=1)


@dataclass(frozen=True)
class OCSPStatus:
    """What the CA knows of one serial number.

    Args:
        state: ``good``, ``revoked`` or ``unknown``.
        revoked_at: Revocation time when revoked.
        reason: RFC 5280 reason name when revoked.
    """

    state: str
    revoked_at: datetime | None = None
    reason: str | None = None


def build_ocsp_response(
    request: ocsp.OCSPRequest,
    status: OCSPStatus,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    *,
    now: datetime | None = None,
    lifetime: timedelta = DEFAULT_OCSP_LIFETIME,
) -> ocsp.OCSPResponse:
    """Answer one OCSP request, signed by the issuing CA itself.

    The response echoes the request's CertID (hash algorithm, name and key
    hashes) and its nonce, if any.

    Args:
        request: The parsed request.
        status: What the store says of the requested serial.
        issuer: The issuing CA certificate (also the responder).
        issuer_key: Its key.
        now: ``thisUpdate`` (default: now).
        lifetime: ``nextUpdate`` - ``thisUpdate``.

    Returns:
        The signed response.
    """
    this_update = (now or datetime.now(UTC)).replace(microsecond=0)
    cert_status = {
        "good": ocsp.OCSPCertStatus.GOOD,
        "revoked": ocsp.OCSPCertStatus.REVOKED,
        "unknown": ocsp.OCSPCertStatus.UNKNOWN,
    }[status.state]
    revoked = status.state == "revoked"
    reason = REASONS[status.reason] if revoked and status.reason else None
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            issuer_name_hash=request.issuer_name_hash,
            issuer_key_hash=request.issuer_key_hash,
            serial_number=request.serial_number,
            algorithm=request.hash_algorithm,
            cert_status=cert_status,
            this_update=this_update,
            next_update=this_update + lifetime,
            revocation_time=(status.revoked_at or this_update) if revoked else None,
            revocation_reason=reason,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
        .certificates([issuer])
    )
    try:
        nonce = request.extensions.get_extension_for_class(x509.OCSPNonce)
    except x509.ExtensionNotFound:
        pass
    else:
        builder = builder.add_extension(nonce.value, critical=False)
    algorithm = signature_hash_for(issuer_key)
    return builder.sign(issuer_key, algorithm if algorithm else None)


def request_matches_issuer(request: ocsp.OCSPRequest, issuer: x509.Certificate) -> bool:
    """Return True when the request's CertID names ``issuer`` (name and key hash)."""
    algorithm = request.hash_algorithm
    name_hash = hashes.Hash(algorithm)
    name_hash.update(issuer.subject.public_bytes())
    der = issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_digest = hashes.Hash(algorithm)
    key_digest.update(_subject_public_key_bits(der))
    key_hash = key_digest.finalize()
    return name_hash.finalize() == request.issuer_name_hash and key_hash == request.issuer_key_hash


def _subject_public_key_bits(spki_der: bytes) -> bytes:
    """Return the subjectPublicKey bits (without the unused-bits octet) of an SPKI."""

    def read(data: bytes, pos: int) -> tuple[int, int, int]:
        tag = data[pos]
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        return tag, pos, length

    _, pos, _ = read(spki_der, 0)  # SEQUENCE
    _, alg_start, alg_len = read(spki_der, pos)  # AlgorithmIdentifier
    _, bits_start, bits_len = read(spki_der, alg_start + alg_len)  # BIT STRING
    return spki_der[bits_start + 1 : bits_start + bits_len]
