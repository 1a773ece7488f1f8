"""Reading any certificate-shaped file and summarising it for ``trustmesh inspect``.

:func:`load_inspectable` detects the format from the content (PEM blocks, DER
certificate/CSR/CRL, PKCS#12 keystore or truststore); the ``summarize_*``
functions turn the parsed objects into JSON-ready dictionaries whose keys are
documented in docs/inspect.md and stay stable; :func:`check_chain` says whether a
chain verifies against a trust bundle and, when it does not, why. Nothing here
prints or reads files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypedDict, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from trustmesh.errors import PKIError, VerificationError

from ._crl import REASONS
from ._durations import format_duration
from ._verify import verify_ca_certificate, verify_chain

__all__ = [
    "MAX_INSPECT_BYTES",
    "BasicConstraintsSummary",
    "CRLSummary",
    "CSRSummary",
    "CertificateSummary",
    "ChainCheck",
    "Inspectable",
    "RevokedSummary",
    "check_chain",
    "crl_revocation_check",
    "load_inspectable",
    "relative_time",
    "summarize_certificate",
    "summarize_crl",
    "summarize_csr",
]

#: Inputs larger than this are refused before parsing (a big CRL fits easily).
MAX_INSPECT_BYTES = 16 * 1024 * 1024

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_CERT_LABELS = {b"CERTIFICATE", b"X509 CERTIFICATE"}
_CSR_LABELS = {b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"}
_CRL_LABELS = {b"X509 CRL"}
_WHAT = "a certificate, chain, CSR, CRL or PKCS#12 file (PEM or DER)"

_KEY_USAGES = (
    ("digital_signature", "digitalSignature"),
    ("content_commitment", "nonRepudiation"),
    ("key_encipherment", "keyEncipherment"),
    ("data_encipherment", "dataEncipherment"),
    ("key_agreement", "keyAgreement"),
    ("key_cert_sign", "keyCertSign"),
    ("crl_sign", "cRLSign"),
)
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}
_REASON_NAMES = {flag: name for name, flag in REASONS.items()}
_REASON_NAMES[x509.ReasonFlags.remove_from_crl] = "removeFromCRL"


# -- loading -------------------------------------------------------------------------


@dataclass(frozen=True)
class Inspectable:
    """What :func:`load_inspectable` found in the input.

    Args:
        format: ``pem``, ``der`` or ``pkcs12``.
        certificates: In input order; for PKCS#12 the key's certificate first.
        aliases: The PKCS#12 friendly name of each certificate (None elsewhere).
        csrs: Certificate signing requests.
        crls: Certificate revocation lists.
        has_private_key: A PKCS#12 key entry, or a PEM private key block, was present.
        key_matches_certificate: For a PKCS#12 key entry, whether the key belongs to
            the first certificate; None when there is no key entry.
        ignored: PEM labels that were skipped (private keys, unknown blocks).

    .. versionadded:: 0.1
    """

    format: str
    certificates: tuple[x509.Certificate, ...] = ()
    aliases: tuple[str | None, ...] = ()
    csrs: tuple[x509.CertificateSigningRequest, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    has_private_key: bool = False
    key_matches_certificate: bool | None = None
    ignored: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """``certificate``, ``chain``, ``csr``, ``crl``, ``pkcs12``, ``truststore`` or ``mixed``."""
        if self.format == "pkcs12":
            return "pkcs12" if self.key_matches_certificate is not None else "truststore"
        present = [
            name
            for name, items in (
                ("certificate", self.certificates),
                ("csr", self.csrs),
                ("crl", self.crls),
            )
            if items
        ]
        if len(present) > 1:
            return "mixed"
        if present == ["certificate"] and len(self.certificates) > 1:
            return "chain"
        return present[0]


def _pem(data: bytes, source: str) -> Inspectable:
    certs: list[x509.Certificate] = []
    csrs: list[x509.CertificateSigningRequest] = []
    crls: list[x509.CertificateRevocationList] = []
    ignored: list[str] = []
    private_key = False
    for number, match in enumerate(_PEM_BLOCK.finditer(data), start=1):
        label, block = match.group(1), match.group(0)
        try:
            if label in _CERT_LABELS:
                certs.append(x509.load_pem_x509_certificate(block))
            elif label in _CSR_LABELS:
                csrs.append(x509.load_pem_x509_csr(block))
            elif label in _CRL_LABELS:
                crls.append(x509.load_pem_x509_crl(block))
            else:
                private_key = private_key or label.endswith(b"PRIVATE KEY")
                ignored.append(label.decode())
        except ValueError:
            raise PKIError(
                f"{source}: PEM block {number} ({label.decode()}) is malformed; "
                f"copy the whole block from '-----BEGIN' to '-----END' again.",
                source=source,
            ) from None
    if not (certs or csrs or crls):
        if private_key:
            raise PKIError(
                f"{source} holds a private key, not a certificate: inspect the "
                f"cert.pem or chain.pem next to it (keys are never printed).",
                source=source,
            )
        found = ", ".join(sorted(set(ignored))) or "no complete PEM block"
        raise PKIError(
            f"{source} is not {_WHAT}: found {found}; expected CERTIFICATE, "
            f"CERTIFICATE REQUEST or X509 CRL blocks.",
            source=source,
        )
    return Inspectable(
        format="pem",
        certificates=tuple(certs),
        aliases=tuple(None for _ in certs),
        csrs=tuple(csrs),
        crls=tuple(crls),
        has_private_key=private_key,
        ignored=tuple(ignored),
    )


def _looks_like_pkcs12(data: bytes) -> bool:
    # PFX ::= SEQUENCE { version INTEGER {v3(3)}, ... } (RFC 7292 section 4)
    if len(data) < 4 or data[0] != 0x30:
        return False
    size = data[1]
    offset = 2 + (size & 0x7F if size & 0x80 else 0)
    return data[offset : offset + 3] == b"\x02\x01\x03"


def _pkcs12(data: bytes, source: str, password: Callable[[], bytes] | None) -> Inspectable:
    loaded: pkcs12.PKCS12KeyAndCertificates | None = None
    for attempt in (None, b""):
        try:
            loaded = pkcs12.load_pkcs12(data, attempt)
            break
        except ValueError:
            continue
    if loaded is None:
        if password is None:
            raise PKIError(
                f"{source} is an encrypted PKCS#12 file: pass --password-file "
                f"(or set TRUSTMESH_P12_PASSWORD).",
                source=source,
            )
        try:
            loaded = pkcs12.load_pkcs12(data, password())
        except ValueError:
            raise PKIError(
                f"{source} is a PKCS#12 file that does not open with the given "
                f"password (or it is damaged): check --password-file.",
                source=source,
            ) from None
    entries: list[pkcs12.PKCS12Certificate] = []
    if loaded.cert is not None:
        entries.append(loaded.cert)
    entries.extend(loaded.additional_certs)
    matches: bool | None = None
    if loaded.key is not None:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        matches = loaded.cert is not None and loaded.key.public_key().public_bytes(
            der, spki
        ) == loaded.cert.certificate.public_key().public_bytes(der, spki)
    return Inspectable(
        format="pkcs12",
        certificates=tuple(e.certificate for e in entries),
        aliases=tuple(
            e.friendly_name.decode("utf-8", "replace") if e.friendly_name else None for e in entries
        ),
        has_private_key=loaded.key is not None,
        key_matches_certificate=matches,
    )


def load_inspectable(
    data: bytes,
    *,
    source: str = "input",
    password: Callable[[], bytes] | None = None,
) -> Inspectable:
    """Detect the format of ``data`` from its content and parse it.

    Args:
        data: The input bytes.
        source: What to call the input in messages (a file name or ``stdin``).
        password: Called for the password when the input is an encrypted PKCS#12
            file (unencrypted ones open without it).

    Returns:
        The certificates, CSRs and CRLs found.

    Raises:
        PKIError: Empty, too large, not a format we read, a malformed PEM block,
            a PKCS#12 file without or with the wrong password, or a JKS keystore.
    """
    if not data.strip():
        raise PKIError(f"{source} is empty: expected {_WHAT}.", source=source)
    if len(data) > MAX_INSPECT_BYTES:
        raise PKIError(
            f"{source} is {len(data)} bytes; inspect reads at most {MAX_INSPECT_BYTES}.",
            source=source,
        )
    if b"-----BEGIN " in data:
        return _pem(data, source)
    if data[:4] in (b"\xfe\xed\xfe\xed", b"\xce\xce\xce\xce"):
        raise PKIError(
            f"{source} is a JKS/JCEKS keystore, which trustmesh does not read: convert "
            f"it with 'keytool -importkeystore -deststoretype PKCS12' and inspect that.",
            source=source,
        )
    for load in (x509.load_der_x509_certificate, x509.load_der_x509_csr):
        try:
            parsed = load(data)
        except ValueError:
            continue
        if isinstance(parsed, x509.Certificate):
            return Inspectable(format="der", certificates=(parsed,), aliases=(None,))
        return Inspectable(format="der", csrs=(parsed,))
    try:
        return Inspectable(format="der", crls=(x509.load_der_x509_crl(data),))
    except ValueError:
        pass
    if _looks_like_pkcs12(data):
        return _pkcs12(data, source, password)
    raise PKIError(
        f"{source} is not {_WHAT}: it holds neither PEM blocks nor a DER structure "
        f"trustmesh recognises.",
        source=source,
    )


# -- summaries -----------------------------------------------------------------------


class BasicConstraintsSummary(TypedDict):
    """The basicConstraints extension."""

    ca: bool
    path_length: int | None
    critical: bool


class CertificateSummary(TypedDict):
    """One certificate, as ``trustmesh inspect --json`` prints it."""

    alias: str | None
    subject: str
    issuer: str
    self_signed: bool
    serial_hex: str
    serial_hex_colons: str
    serial_decimal: str
    version: int
    signature_algorithm: str
    not_before: str
    not_after: str
    status: str
    expires_in_seconds: int
    spiffe_id: str | None
    uris: list[str]
    dns: list[str]
    ips: list[str]
    emails: list[str]
    key: str
    key_type: str
    key_size: int | None
    key_curve: str | None
    basic_constraints: BasicConstraintsSummary | None
    key_usage: list[str]
    extended_key_usage: list[str]
    sha256_fingerprint: str
    subject_key_identifier: str | None
    authority_key_identifier: str | None
    crl_distribution_points: list[str]
    ocsp_urls: list[str]
    ca_issuers_urls: list[str]


class CSRSummary(TypedDict):
    """One certificate signing request."""

    subject: str
    signature_valid: bool
    signature_algorithm: str
    spiffe_id: str | None
    uris: list[str]
    dns: list[str]
    ips: list[str]
    emails: list[str]
    key: str
    key_type: str
    key_size: int | None
    key_curve: str | None
    basic_constraints: BasicConstraintsSummary | None
    key_usage: list[str]
    extended_key_usage: list[str]


class RevokedSummary(TypedDict):
    """One entry of a CRL."""

    serial_hex: str
    serial_hex_colons: str
    serial_decimal: str
    revoked_at: str
    reason: str | None


class CRLSummary(TypedDict):
    """One certificate revocation list."""

    issuer: str
    signature_algorithm: str
    signature_valid: bool | None
    crl_number: int | None
    this_update: str
    next_update: str | None
    status: str
    next_update_in_seconds: int | None
    authority_key_identifier: str | None
    sha256_fingerprint: str
    revoked_count: int
    revoked: list[RevokedSummary]


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _serial_colons(serial: int) -> str:
    # The spelling of `openssl x509 -text`: the integer's magnitude, byte by byte.
    return serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big").hex(":")


def _hex_colons(value: bytes) -> str:
    return value.hex(":").upper()


def relative_time(seconds: int, *, past: str, future: str) -> str:
    """Phrase a signed number of seconds, e.g. ``expires in 23h59m`` or ``expired 2d3h ago``.

    Only the two largest units are kept: a person reading "expires in 364d23h"
    does not need the seconds.

    Args:
        seconds: Positive for the future, zero or negative for the past.
        past: The verb for the past (``expired``).
        future: The verb for the future (``expires``).

    .. versionadded:: 0.1
    """
    text = format_duration(timedelta(seconds=abs(seconds)))
    parts = re.findall(r"\d+[a-z]", text)
    short = "".join(parts[:2]) or "0s"
    return f"{future} in {short}" if seconds > 0 else f"{past} {short} ago"


def _algorithm_name(
    obj: x509.Certificate | x509.CertificateSigningRequest | x509.CertificateRevocationList,
) -> str:
    oid = obj.signature_algorithm_oid
    name = oid._name  # cryptography's OID names are openssl's (ecdsa-with-SHA256)
    return name if name and name != "Unknown OID" else oid.dotted_string


def _key_fields(key: object) -> tuple[str, str, int | None, str | None]:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}-bit", "rsa", key.key_size, None
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = key.curve.name
        return f"EC {curve} ({key.curve.key_size}-bit)", "ec", key.curve.key_size, curve
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519 (256-bit)", "ed25519", 256, None
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448 (456-bit)", "ed448", 456, None
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}-bit", "dsa", key.key_size, None
    return type(key).__name__, "other", None, None


def _public_key(obj: x509.Certificate | x509.CertificateSigningRequest) -> object:
    try:
        return obj.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return None


_E = TypeVar("_E", bound=x509.ExtensionType)


def _extension(extensions: x509.Extensions, kind: type[_E]) -> x509.Extension[_E] | None:
    try:
        return extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _names(extensions: x509.Extensions) -> tuple[list[str], list[str], list[str], list[str]]:
    ext = _extension(extensions, x509.SubjectAlternativeName)
    if ext is None:
        return [], [], [], []
    san = ext.value
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (
        list(san.get_values_for_type(x509.UniformResourceIdentifier)),
        list(san.get_values_for_type(x509.DNSName)),
        ips,
        list(san.get_values_for_type(x509.RFC822Name)),
    )


def _spiffe(uris: list[str]) -> str | None:
    spiffe = [u for u in uris if u.lower().startswith("spiffe://")]
    return spiffe[0] if len(spiffe) == 1 else None


def _usages(extensions: x509.Extensions) -> tuple[list[str], list[str]]:
    key_usage: list[str] = []
    ku = _extension(extensions, x509.KeyUsage)
    if ku is not None:
        key_usage = [name for attr, name in _KEY_USAGES if getattr(ku.value, attr)]
        if ku.value.key_agreement:
            key_usage += [
                name
                for attr, name in (
                    ("encipher_only", "encipherOnly"),
                    ("decipher_only", "decipherOnly"),
                )
                if getattr(ku.value, attr)
            ]
    eku = _extension(extensions, x509.ExtendedKeyUsage)
    ekus = [] if eku is None else [_EKU_NAMES.get(o, o.dotted_string) for o in eku.value]
    return key_usage, ekus


def _basic(extensions: x509.Extensions) -> BasicConstraintsSummary | None:
    ext = _extension(extensions, x509.BasicConstraints)
    if ext is None:
        return None
    return {"ca": ext.value.ca, "path_length": ext.value.path_length, "critical": ext.critical}


def _aki(extensions: x509.Extensions) -> str | None:
    ext = _extension(extensions, x509.AuthorityKeyIdentifier)
    if ext is None or ext.value.key_identifier is None:
        return None
    return _hex_colons(ext.value.key_identifier)


def _urls(names: Sequence[x509.GeneralName] | None) -> list[str]:
    return [n.value for n in names or () if isinstance(n, x509.UniformResourceIdentifier)]


def summarize_certificate(
    cert: x509.Certificate, *, now: datetime, alias: str | None = None
) -> CertificateSummary:
    """Summarise a certificate: names, serial, validity, key, extensions, fingerprint.

    Args:
        cert: The certificate.
        now: The time validity is judged at (timezone-aware UTC).
        alias: Its PKCS#12 friendly name, if any.

    .. versionadded:: 0.1
    """
    ext = cert.extensions
    uris, dns, ips, emails = _names(ext)
    key, key_type, key_size, curve = _key_fields(_public_key(cert))
    key_usage, ekus = _usages(ext)
    if now < cert.not_valid_before_utc:
        status = "not_yet_valid"
    elif now > cert.not_valid_after_utc:
        status = "expired"
    else:
        status = "valid"
    ski = _extension(ext, x509.SubjectKeyIdentifier)
    cdp = _extension(ext, x509.CRLDistributionPoints)
    aia = _extension(ext, x509.AuthorityInformationAccess)
    access = list(aia.value) if aia is not None else []
    oid = x509.oid.AuthorityInformationAccessOID
    return {
        "alias": alias,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "self_signed": cert.issuer == cert.subject,
        "serial_hex": format(cert.serial_number, "x"),
        "serial_hex_colons": _serial_colons(cert.serial_number),
        "serial_decimal": str(cert.serial_number),
        "version": cert.version.value + 1,
        "signature_algorithm": _algorithm_name(cert),
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
        "status": status,
        "expires_in_seconds": int((cert.not_valid_after_utc - now).total_seconds()),
        "spiffe_id": _spiffe(uris),
        "uris": uris,
        "dns": dns,
        "ips": ips,
        "emails": emails,
        "key": key,
        "key_type": key_type,
        "key_size": key_size,
        "key_curve": curve,
        "basic_constraints": _basic(ext),
        "key_usage": key_usage,
        "extended_key_usage": ekus,
        "sha256_fingerprint": _hex_colons(cert.fingerprint(hashes.SHA256())),
        "subject_key_identifier": None if ski is None else _hex_colons(ski.value.digest),
        "authority_key_identifier": _aki(ext),
        "crl_distribution_points": [
            url for point in (cdp.value if cdp else []) for url in _urls(point.full_name)
        ],
        "ocsp_urls": _urls([a.access_location for a in access if a.access_method == oid.OCSP]),
        "ca_issuers_urls": _urls(
            [a.access_location for a in access if a.access_method == oid.CA_ISSUERS]
        ),
    }


def summarize_csr(csr: x509.CertificateSigningRequest) -> CSRSummary:
    """Summarise a CSR: the names and key it asks for and whether its signature verifies.

    .. versionadded:: 0.1
    """
    try:
        valid = csr.is_signature_valid
    except Exception:  # an algorithm cryptography cannot verify
        valid = False
    try:
        ext = csr.extensions
    except ValueError:  # duplicate or malformed extensions
        ext = x509.Extensions([])
    uris, dns, ips, emails = _names(ext)
    key, key_type, key_size, curve = _key_fields(_public_key(csr))
    key_usage, ekus = _usages(ext)
    return {
        "subject": csr.subject.rfc4514_string(),
        "signature_valid": valid,
        "signature_algorithm": _algorithm_name(csr),
        "spiffe_id": _spiffe(uris),
        "uris": uris,
        "dns": dns,
        "ips": ips,
        "emails": emails,
        "key": key,
        "key_type": key_type,
        "key_size": key_size,
        "key_curve": curve,
        "basic_constraints": _basic(ext),
        "key_usage": key_usage,
        "extended_key_usage": ekus,
    }


def _crl_signed_by(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    if crl.issuer != cert.subject:
        return False
    key = cert.public_key()
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey
        | dsa.DSAPublicKey,
    ):
        return False
    try:
        return crl.is_signature_valid(key)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def summarize_crl(
    crl: x509.CertificateRevocationList,
    *,
    now: datetime,
    issuers: Collection[x509.Certificate] = (),
) -> CRLSummary:
    """Summarise a CRL: issuer, dates, number and every revoked entry.

    Args:
        crl: The CRL.
        now: The time freshness is judged at.
        issuers: Certificates that may have signed it; ``signature_valid`` is
            None when none of them carries the CRL's issuer name.

    .. versionadded:: 0.1
    """
    candidates = [c for c in issuers if c.subject == crl.issuer]
    valid = any(_crl_signed_by(crl, c) for c in candidates) if candidates else None
    number = _extension(crl.extensions, x509.CRLNumber)
    next_update = crl.next_update_utc
    if now < crl.last_update_utc:
        status = "not_yet_valid"
    elif next_update is not None and now > next_update:
        status = "stale"
    else:
        status = "current"
    revoked: list[RevokedSummary] = []
    for entry in crl:
        reason = _extension(entry.extensions, x509.CRLReason)
        revoked.append(
            {
                "serial_hex": format(entry.serial_number, "x"),
                "serial_hex_colons": _serial_colons(entry.serial_number),
                "serial_decimal": str(entry.serial_number),
                "revoked_at": _iso(entry.revocation_date_utc),
                "reason": None if reason is None else _REASON_NAMES[reason.value.reason],
            }
        )
    return {
        "issuer": crl.issuer.rfc4514_string(),
        "signature_algorithm": _algorithm_name(crl),
        "signature_valid": valid,
        "crl_number": None if number is None else number.value.crl_number,
        "this_update": _iso(crl.last_update_utc),
        "next_update": None if next_update is None else _iso(next_update),
        "status": status,
        "next_update_in_seconds": (
            None if next_update is None else int((next_update - now).total_seconds())
        ),
        "authority_key_identifier": _aki(crl.extensions),
        "sha256_fingerprint": _hex_colons(crl.fingerprint(hashes.SHA256())),
        "revoked_count": len(revoked),
        "revoked": revoked,
    }


# -- chain verification --------------------------------------------------------------


class ChainCheck(TypedDict):
    """Whether a chain verifies against a trust bundle."""

    checked: bool
    trusted: bool | None
    reason: str | None
    message: str
    spiffe_id: str | None
    usage: str | None


def crl_revocation_check(
    crls: Sequence[x509.CertificateRevocationList],
    issuers: Collection[x509.Certificate],
) -> Callable[[x509.Certificate], bool]:
    """Return an ``is_revoked`` callback that consults CRLs signed by ``issuers``.

    Raises:
        PKIError: A CRL is not signed by any of ``issuers``.

    .. versionadded:: 0.1
    """
    for crl in crls:
        if not any(_crl_signed_by(crl, c) for c in issuers):
            raise PKIError(
                f"The CRL of {crl.issuer.rfc4514_string()} is not signed by any CA "
                f"certificate in the input or the bundle: inspect the chain (chain.pem, "
                f"which holds the intermediate) rather than cert.pem, or pass the CRL of "
                f"the CA that issued the certificate.",
                issuer=crl.issuer.rfc4514_string(),
            )

    def is_revoked(cert: x509.Certificate) -> bool:
        return any(
            crl.issuer == cert.issuer
            and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
            for crl in crls
        )

    return is_revoked


def check_chain(
    certs: Sequence[x509.Certificate],
    roots: Collection[x509.Certificate],
    *,
    now: datetime,
    intermediates: Sequence[x509.Certificate] = (),
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
) -> ChainCheck:
    """Say whether ``certs`` (first one the subject, the rest its chain) verify.

    A workload certificate is verified as trustmesh peers do (:func:`verify_chain`,
    as a client when its EKU allows, else as a server); a CA certificate with
    :func:`verify_ca_certificate`.

    Args:
        certs: The certificate to verify, then any intermediates.
        roots: The trust anchors.
        now: The time to verify at.
        intermediates: More CA certificates to build the path with (the local
            CA's intermediate, as ``openssl verify -untrusted`` takes them).
        is_revoked: True for a revoked certificate (CA store or CRL).

    Returns:
        ``trusted`` True, or False with the failing check as ``reason``
        (``expired``, ``not_yet_valid``, ``unknown_ca``, ``revoked``, ``wrong_eku``,
        ``no_spiffe_id``, ``not_a_ca``, ``path_length``).

    .. versionadded:: 0.1
    """
    subject, rest = certs[0], [*certs[1:], *intermediates]
    bc = _extension(subject.extensions, x509.BasicConstraints)
    usage: str | None = None
    spiffe_id: str | None = None
    try:
        if bc is not None and bc.value.ca:
            verify_ca_certificate(subject, rest, roots, now=now, is_revoked=is_revoked)
            message = "the CA certificate chains to a trust anchor in the bundle"
        else:
            eku = _extension(subject.extensions, x509.ExtendedKeyUsage)
            usage = (
                "server"
                if eku is not None
                and ExtendedKeyUsageOID.CLIENT_AUTH not in eku.value
                and ExtendedKeyUsageOID.SERVER_AUTH in eku.value
                else "client"
            )
            spiffe_id = verify_chain(
                subject, rest, roots, usage=usage, now=now, is_revoked=is_revoked
            ).uri
            message = f"{spiffe_id} chains to a trust anchor in the bundle ({usage} use)"
    except VerificationError as exc:
        reason = exc.details.get("reason")
        return {
            "checked": True,
            "trusted": False,
            "reason": None if reason is None else str(reason),
            "message": exc.message,
            "spiffe_id": None,
            "usage": usage,
        }
    return {
        "checked": True,
        "trusted": True,
        "reason": None,
        "message": message,
        "spiffe_id": spiffe_id,
        "usage": usage,
    }
