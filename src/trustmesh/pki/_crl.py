"""Certificate revocation lists and revocation reasons."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from trustmesh.errors import ConfigError

from ._keys import PrivateKey, signature_hash_for

__all__ = [
    "DEFAULT_CRL_LIFETIME",
    "REASONS",
    "RevokedEntry",
    "build_crl",
    "parse_reason",
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

    Args:
        issuer: The CA certificate whose certificates are listed.
        issuer_key: Its private key.
        entries: Revoked certificates to list (callers pass only unexpired ones).
        number: The monotonically increasing CRL number.
        now: ``thisUpdate`` (default: now).
        lifetime: ``nextUpdate`` is ``thisUpdate`` plus this.

    Returns:
        The signed CRL.
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
    for entry in entries:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at.replace(microsecond=0))
        )
        if entry.reason != "unspecified":
            revoked = revoked.add_extension(x509.CRLReason(REASONS[entry.reason]), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    return builder.sign(issuer_key, signature_hash_for(issuer_key))


def reason_name(flag: x509.ReasonFlags) -> str:
    """Return the RFC 5280 name of a reason flag."""
    return _BY_FLAG[flag]
