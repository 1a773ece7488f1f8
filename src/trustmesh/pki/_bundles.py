"""PEM bundles, PKCS#12 keystores and Java truststores for non-Python callers."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from trustmesh.errors import PKIError

from ._keys import PrivateKey

__all__ = [
    "fingerprint",
    "load_pem_certificates",
    "pem_certificates",
    "pkcs12_keystore",
    "pkcs12_truststore",
]


def pem_certificates(certs: Sequence[x509.Certificate]) -> bytes:
    """Concatenate certificates as PEM, in the given order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def load_pem_certificates(data: bytes, *, source: str = "file") -> list[x509.Certificate]:
    """Load one or more PEM certificates.

    Raises:
        PKIError: No certificate was found or a block is malformed.
    """
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PKIError(
            f"{source} does not hold PEM certificates: expected "
            f"'-----BEGIN CERTIFICATE-----' blocks.",
            source=source,
        ) from None
    return certs


def fingerprint(cert: x509.Certificate) -> str:
    """Return the SHA-256 fingerprint as colon-separated upper-case hex."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _encryption(
    password: bytes | None, *, legacy: bool
) -> serialization.KeySerializationEncryption:
    if not password:
        raise PKIError(
            "A PKCS#12 file needs a password: Java and .NET refuse empty ones. "
            "Pass --password-file or set TRUSTMESH_P12_PASSWORD."
        )
    builder = serialization.PrivateFormat.PKCS12.encryption_builder()
    if legacy:
        legacy_mac = hashes.SHA1()  # noqa: S303 - the legacy profile, only on request
        builder = builder.key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC).hmac_hash(
            legacy_mac
        )
    else:
        builder = builder.key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC).hmac_hash(
            hashes.SHA256()
        )
    return builder.kdf_rounds(50_000 if not legacy else 2048).build(password)


def pkcs12_keystore(
    key: PrivateKey,
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    *,
    password: bytes | None,
    alias: str = "trustmesh",
    legacy: bool = False,
) -> bytes:
    """Build a PKCS#12 keystore with the key, its certificate and chain.

    Args:
        key: The private key; must match ``cert``.
        cert: The leaf certificate.
        chain: Intermediates (and optionally the root) after the leaf.
        password: The store password (required).
        alias: The friendly name Java shows as the alias.
        legacy: 3DES/SHA-1 for old Java (< 8u301), .NET Framework, Windows;
            otherwise AES-256-CBC with PBKDF2-HMAC-SHA256.

    Raises:
        PKIError: The key does not match the certificate, or no password.
    """
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise PKIError(
            "The private key does not match the certificate: pass the key.pem that "
            "was written next to this cert.pem."
        )
    return pkcs12.serialize_key_and_certificates(
        alias.encode(), key, cert, list(chain), _encryption(password, legacy=legacy)
    )


def pkcs12_truststore(
    certs: Sequence[x509.Certificate], *, password: bytes | None, legacy: bool = False
) -> bytes:
    """Build a Java truststore: a PKCS#12 file of trusted certificate entries.

    ``keytool -list`` shows each certificate as a ``trustedCertEntry`` (the
    entries carry Java's trusted-key-usage attribute).
    """
    entries = [
        pkcs12.PKCS12Certificate(c, f"trustmesh-ca-{i}".encode()) for i, c in enumerate(certs)
    ]
    return pkcs12.serialize_java_truststore(entries, _encryption(password, legacy=legacy))
