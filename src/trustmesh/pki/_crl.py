"""Certificate revocation lists and revocation reasons."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding

from trustmesh.errors import ConfigError

from ._keys import PrivateKey, signature_hash_for

__all__ = [
    "DEFAULT_CRL_LIFETIME",
    "REASONS",
    "RevokedEntry",
    "build_crl",
    "parse_reason",
    "pem_crls",
]

#: How long a CRL is valid (``nextUpdate`` - ``thisUpdate``).
DEFAULT_CRL_LIFETIME = timedelta(hours=24)

#: Revocation reasons by their RFC 5280 names, as the CLI spells them.
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
_BY_FLAG = {flag: name for name, flag in REASONS.items()}


def parse_reason(value: str) -> str:
    """Return the canonical RFC 5280 spelling of a revocation reason.

    Accepts any case and ``_``/``-`` spellings (``key-compromise``).

    Raises:
        ConfigError: Not a revocation reason.
    """
    wanted = value.replace("_", "").replace("-", "").lower()
    for name in REASONS:
        if name.lower() == wanted:
            return name
    raise ConfigError(
        f"Unknown revocation reason {value!r}: expected one of {', '.join(REASONS)}.",
        field="reason",
    )


@dataclass(frozen=True)
class RevokedEntry:
    """One revoked certificate as a CRL lists it.

    Args:
        serial: The certificate's serial number.
        revoked_at: When it was revoked.
        reason: RFC 5280 reason name (see :data:`REASONS`).
    """

    serial: int
    revoked_at: datetime
    reason: str = "unspecified"


def pem_crls(crls: Iterable[x509.CertificateRevocationList]) -> bytes:
    """Return CRLs as one PEM file, in order: the layout nginx ``ssl_crl``, HAProxy
    ``crl-file`` and ``openssl verify -CRLfile`` read for a whole chain."""
    return b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in crls)


def build_crl(
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    entries: Iterable[RevokedEntry],
    *,
    number: int,
    now: datetime | None = None,
    lifetime: timedelta = DEFAULT_CRL_LIFETIME,
) -> x509.CertificateRevocationList:
    """Build and sign a CRL.

    cryptography builds the CRL's header (issuer, dates, extensions) and signature
    algorithm; the revoked entries are DER-encoded here and spliced into its
    ``TBSCertList``, which is then signed with ``issuer_key``. (Adding entries one
    at a time with ``CertificateRevocationListBuilder.add_revoked_certificate``
    copies the list on every call, so time grew quadratically; see bench/crl.py.)
    The DER is the same that builder produces; the signature is checked before the
    CRL is returned.

    Args:
        issuer: The CA certificate whose certificates are listed.
        issuer_key: Its private key.
        entries: Revoked certificates to list (callers pass only unexpired ones).
        number: The monotonically increasing CRL number.
        now: ``thisUpdate`` (default: now).
        lifetime: ``nextUpdate`` is ``thisUpdate`` plus this.

    Returns:
        The signed CRL.

    Raises:
        ValueError: A serial is not positive or longer than 159 bits, or a
            revocation date is before 1950.
        KeyError: A reason is not one of :data:`REASONS`.
    """
    this_update = (now or datetime.now(UTC)).replace(microsecond=0)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(this_update + lifetime)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    revoked = _encode_entries(entries)
    header = builder.sign(issuer_key, signature_hash_for(issuer_key))
    if not revoked:
        return header
    tbs = _splice_revoked(header.tbs_certlist_bytes, _tlv(0x30, revoked))
    _, algorithm, _ = _children(header.public_bytes(serialization.Encoding.DER))
    signature = _sign(issuer_key, tbs)
    crl = x509.load_der_x509_crl(_tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature)))
    if not crl.is_signature_valid(issuer_key.public_key()):  # pragma: no cover - a bug here
        raise ValueError("the CRL built does not verify against the issuer key")
    return crl


# -- DER encoding of revoked entries (RFC 5280 section 5.1) ----------------------------

_REASON_OID = b"\x06\x03\x55\x1d\x15"  # id-ce-cRLReasons 2.5.29.21


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _length(len(content)) + content


def _reason_extensions(flag: x509.ReasonFlags) -> bytes:
    """``crlEntryExtensions`` holding a non-critical reasonCode."""
    value = x509.CRLReason(flag).public_bytes()  # the ENUMERATED
    return _tlv(0x30, _tlv(0x30, _REASON_OID + _tlv(0x04, value)))


_ENTRY_EXTENSIONS = {
    name: b"" if name == "unspecified" else _reason_extensions(flag)
    for name, flag in REASONS.items()
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
_DAY = 86400
_EARLIEST_DAY = (datetime(1950, 1, 1, tzinfo=UTC) - _EPOCH).days
_GENERALIZED_FROM_DAY = (datetime(2050, 1, 1, tzinfo=UTC) - _EPOCH).days


def _day_prefix(day: int) -> bytes:
    """Tag, length and date digits of a Time on ``day`` (days since 1970)."""
    date = _EPOCH + timedelta(days=day)
    if day < _GENERALIZED_FROM_DAY:
        return b"\x17\x0d" + date.strftime("%y%m%d").encode()
    return b"\x18\x0f" + date.strftime("%Y%m%d").encode()


def _encode_entries(entries: Iterable[RevokedEntry]) -> bytes:
    """DER of the entries of ``revokedCertificates``, concatenated.

    Byte for byte what cryptography's RevokedCertificateBuilder encodes (naive
    times are UTC, microseconds dropped, UTCTime before 2050), with the same checks.
    Entries run to a few hundred thousand, so time strings are cached per day and
    per second of the day.
    """
    days: dict[int, bytes] = {}
    clock: dict[int, bytes] = {}
    extensions = _ENTRY_EXTENSIONS
    out = []
    for entry in entries:
        serial = entry.serial
        if serial <= 0:
            raise ValueError("The serial number should be positive")
        bits = serial.bit_length()
        if bits >= 160:
            raise ValueError("The serial number should not be more than 159 bits.")
        when = entry.revoked_at
        if when.utcoffset() is None:  # naive: UTC, as cryptography assumes
            when = when.replace(tzinfo=UTC)
        day, second = divmod((when - _EPOCH) // _SECOND, _DAY)
        if day < _EARLIEST_DAY:
            raise ValueError("The revocation date must be on or after 1950 January 1.")
        prefix = days.get(day)
        if prefix is None:
            prefix = days[day] = _day_prefix(day)
        hms = clock.get(second)
        if hms is None:
            hours, rest = divmod(second, 3600)
            hms = clock[second] = b"%02d%02d%02dZ" % (hours, *divmod(rest, 60))
        raw = serial.to_bytes(bits // 8 + 1, "big")
        body = b"\x02" + bytes((len(raw),)) + raw + prefix + hms + extensions[entry.reason]
        out.append(b"\x30" + bytes((len(body),)) + body)  # always under 128 bytes
    return b"".join(out)


def _children(der: bytes) -> list[bytes]:
    """Split a DER SEQUENCE into its encoded elements."""
    if not der or der[0] != 0x30:
        raise ValueError("expected a DER SEQUENCE")
    start, end = _header(der, 0)
    out = []
    while start < end:
        _, content_end = _header(der, start)
        out.append(der[start:content_end])
        start = content_end
    return out


def _header(der: bytes, offset: int) -> tuple[int, int]:
    """Return (content start, content end) of the TLV at ``offset``."""
    first = der[offset + 1]
    if first < 0x80:
        return offset + 2, offset + 2 + first
    count = first & 0x7F
    length = int.from_bytes(der[offset + 2 : offset + 2 + count], "big")
    start = offset + 2 + count
    return start, start + length


def _splice_revoked(tbs: bytes, revoked: bytes) -> bytes:
    """Insert ``revokedCertificates`` after ``nextUpdate`` of an entry-less TBSCertList."""
    parts = _children(tbs)
    # version, signature, issuer, thisUpdate, nextUpdate, [0] crlExtensions
    if len(parts) != 6 or parts[4][0] not in (0x17, 0x18) or parts[5][0] != 0xA0:
        raise ValueError("unexpected TBSCertList layout from cryptography")
    return _tlv(0x30, b"".join(parts[:5]) + revoked + parts[5])


def _sign(key: PrivateKey, data: bytes) -> bytes:
    """Sign as CertificateRevocationListBuilder.sign does (PKCS#1 v1.5 for RSA)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    algorithm = signature_hash_for(key)
    if algorithm is None:  # pragma: no cover - only Ed25519 has no hash
        raise ValueError("no signature hash for this key")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(algorithm))
    return key.sign(data, padding.PKCS1v15(), algorithm)


def reason_name(flag: x509.ReasonFlags) -> str:
    """Return the RFC 5280 name of a reason flag."""
    return _BY_FLAG[flag]
