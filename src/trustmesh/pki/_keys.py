"""Private keys: key types, generation, PEM loading and dumping, descriptions."""

from __future__ import annotations

import enum
from typing import TypeAlias

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from trustmesh.errors import ConfigError, PKIError

__all__ = [
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "describe_key",
    "dump_private_key",
    "generate_private_key",
    "key_type_of",
    "load_private_key",
    "signature_hash_for",
]

#: Private key types trustmesh issues for and signs with.
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
#: Public key types trustmesh accepts in CSRs.
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class KeyType(enum.StrEnum):
    """A key algorithm and size, spelled as on the command line.

    .. versionadded:: 0.1
    """

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    ED25519 = "ed25519"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @classmethod
    def parse(cls, value: str) -> KeyType:
        """Return the key type named ``value``.

        Raises:
            ConfigError: The name is not one of the supported key types.
        """
        try:
            return cls(value.lower())
        except ValueError:
            choices = ", ".join(k.value for k in cls)
            raise ConfigError(
                f"Unknown key type {value!r}: expected one of {choices}.",
                field="key_type",
            ) from None


def generate_private_key(key_type: KeyType) -> PrivateKey:
    """Generate a fresh private key of ``key_type``.

    Args:
        key_type: The algorithm and size.

    Returns:
        The new key.
    """
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    bits = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072, KeyType.RSA_4096: 4096}
    return rsa.generate_private_key(public_exponent=65537, key_size=bits[key_type])


def key_type_of(key: PrivateKey | PublicKey) -> KeyType | None:
    """Return the :class:`KeyType` of a key, or None if it is not one we use.

    RSA keys of other sizes and other curves give None.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": KeyType.EC_P256, "secp384r1": KeyType.EC_P384}.get(key.curve.name)
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return KeyType.ED25519
    return {
        2048: KeyType.RSA_2048,
        3072: KeyType.RSA_3072,
        4096: KeyType.RSA_4096,
    }.get(key.key_size)


def describe_key(key: object) -> str:
    """Return a short human description such as ``RSA 1024-bit`` or ``EC secp256k1``."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size}-bit"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def signature_hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """Return the hash to sign with for a CA key (None for Ed25519)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def dump_private_key(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """Serialize a private key as PKCS#8 PEM, encrypted when a passphrase is given.

    Args:
        key: The key.
        passphrase: Encrypt with this (AES-256-CBC, PBKDF2) when not None.

    Returns:
        The PEM bytes.
    """
    if passphrase is None:
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    else:
        if not passphrase:
            raise ValueError("passphrase must not be empty")
        encryption = serialization.BestAvailableEncryption(passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def load_private_key(
    data: bytes, passphrase: bytes | None = None, *, source: str = "key"
) -> PrivateKey:
    """Load a PEM private key.

    Args:
        data: PEM bytes.
        passphrase: The passphrase for an encrypted key.
        source: What to call the key in error messages (a file name).

    Returns:
        The key.

    Raises:
        PKIError: The data is not a PEM private key, the passphrase is wrong or
            missing, or the key type is not supported.
    """
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise PKIError(
                f"The private key in {source} is encrypted and no passphrase was given: "
                f"set TRUSTMESH_CA_PASSPHRASE or pass --passphrase-file.",
                source=source,
            ) from exc
        raise PKIError(
            f"The private key in {source} is not encrypted but a passphrase was given: "
            f"drop the passphrase.",
            source=source,
        ) from exc
    except ValueError as exc:
        if passphrase is not None and b"ENCRYPTED" in data:
            raise PKIError(
                f"Wrong passphrase for the private key in {source}: check "
                f"TRUSTMESH_CA_PASSPHRASE or --passphrase-file.",
                source=source,
            ) from exc
        raise PKIError(
            f"{source} does not hold a PEM private key: expected a "
            f"'-----BEGIN PRIVATE KEY-----' block.",
            source=source,
        ) from exc
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise PKIError(
            f"The private key in {source} is {describe_key(key)}: use an EC, RSA or Ed25519 key.",
            source=source,
        )
    return key
