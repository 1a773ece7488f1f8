"""JWKs to verification keys, each pinned to the algorithms its type allows.

A key's algorithms come from its ``kty``/``crv`` (and its ``alg`` when published),
never from a token header: an EC P-256 key verifies ES256 and nothing else, an RSA
key RS*/PS*, an Ed25519 key EdDSA. Symmetric (``oct``) keys are never loaded, so
no token can be checked with HMAC, and ``none`` is no algorithm at all.

Signature checks call ``cryptography`` directly: it is the hot path, and going
through a JOSE library costs more than the 20% the benchmark allows.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "KeySet",
    "VerificationKey",
    "b64url_decode",
    "load_jwk",
    "load_jwks",
]

log = logging.getLogger("trustmesh.tokens")

#: Every algorithm the verifier can ever accept (RFC 7518 and RFC 8037 names).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)

#: RSA keys shorter than this are not loaded (RFC 7518 §3.3 requires 2048).
MIN_RSA_BITS = 2048

_EC_CURVES: dict[str, tuple[ec.EllipticCurve, str, int, hashes.HashAlgorithm]] = {
    "P-256": (ec.SECP256R1(), "ES256", 32, hashes.SHA256()),
    "P-384": (ec.SECP384R1(), "ES384", 48, hashes.SHA384()),
    "P-521": (ec.SECP521R1(), "ES512", 66, hashes.SHA512()),
}
_RSA_HASHES: dict[str, hashes.HashAlgorithm] = {
    "RS256": hashes.SHA256(),
    "RS384": hashes.SHA384(),
    "RS512": hashes.SHA512(),
    "PS256": hashes.SHA256(),
    "PS384": hashes.SHA384(),
    "PS512": hashes.SHA512(),
}

Verify = Callable[[bytes, bytes], bool]


def b64url_decode(value: str) -> bytes:
    """Decode unpadded base64url (RFC 7515 §2); ``ValueError`` if it is not."""
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key from a JWKS, with the signature check for each algorithm it allows.

    Attributes:
        kid: The key id, a lookup key only (``None`` if the JWK had none).
        verifiers: Algorithm name to a function ``(signing_input, signature) -> bool``.
    """

    kid: str | None
    verifiers: Mapping[str, Verify]

    @property
    def algorithms(self) -> frozenset[str]:
        """The algorithms this key may verify."""
        return frozenset(self.verifiers)


def _ecdsa_verifier(
    key: ec.EllipticCurvePublicKey, size: int, hash_: hashes.HashAlgorithm
) -> Verify:
    scheme = ec.ECDSA(hash_)
    verify = key.verify

    def check(data: bytes, signature: bytes) -> bool:
        # JWS carries R || S (RFC 7518 §3.4); cryptography wants DER.
        if len(signature) != 2 * size:
            return False
        der = encode_dss_signature(
            int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
        )
        try:
            verify(der, data, scheme)
        except InvalidSignature:
            return False
        return True

    return check


def _rsa_verifier(key: rsa.RSAPublicKey, alg: str) -> Verify:
    hash_ = _RSA_HASHES[alg]
    pad: padding.AsymmetricPadding = (
        padding.PKCS1v15()
        if alg.startswith("RS")
        else padding.PSS(mgf=padding.MGF1(hash_), salt_length=hash_.digest_size)
    )
    verify = key.verify

    def check(data: bytes, signature: bytes) -> bool:
        try:
            verify(signature, data, pad, hash_)
        except InvalidSignature:
            return False
        return True

    return check


def _eddsa_verifier(key: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey) -> Verify:
    verify = key.verify

    def check(data: bytes, signature: bytes) -> bool:
        try:
            verify(signature, data)
        except InvalidSignature:
            return False
        return True

    return check


def _field(jwk: Mapping[str, object], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"member {name!r} is missing or not a string")
    return b64url_decode(value)


def load_jwk(jwk: Mapping[str, object]) -> VerificationKey:
    """Load one public JWK (RFC 7517) as a :class:`VerificationKey`.

    Raises:
        ValueError: The JWK is symmetric, not for signatures, malformed, too weak,
            or its ``alg`` does not fit its key type. The message says which.
    """
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use is {use!r}, not 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("key_ops does not include 'verify'")
    alg = jwk.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise ValueError("alg is not a string")
    verifiers: dict[str, Verify] = {}
    if kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _EC_CURVES:
            raise ValueError(f"EC curve {crv!r} is not P-256, P-384 or P-521")
        curve, pinned, size, hash_ = _EC_CURVES[crv]
        x = int.from_bytes(_field(jwk, "x"), "big")
        y = int.from_bytes(_field(jwk, "y"), "big")
        ec_key = ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        if alg is not None and alg != pinned:
            raise ValueError(f"alg {alg!r} does not fit an EC {crv} key (only {pinned})")
        verifiers[pinned] = _ecdsa_verifier(ec_key, size, hash_)
    elif kty == "RSA":
        n = int.from_bytes(_field(jwk, "n"), "big")
        e = int.from_bytes(_field(jwk, "e"), "big")
        rsa_key = rsa.RSAPublicNumbers(e, n).public_key()
        if rsa_key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {rsa_key.key_size} bits, fewer than {MIN_RSA_BITS}")
        names = sorted(_RSA_HASHES) if alg is None else [alg]
        for name in names:
            if name not in _RSA_HASHES:
                raise ValueError(f"alg {name!r} does not fit an RSA key")
            verifiers[name] = _rsa_verifier(rsa_key, name)
    elif kty == "OKP":
        crv = jwk.get("crv")
        raw = _field(jwk, "x")
        okp: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
        if crv == "Ed25519":
            okp = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        elif crv == "Ed448":
            okp = ed448.Ed448PublicKey.from_public_bytes(raw)
        else:
            raise ValueError(f"OKP curve {crv!r} is not Ed25519 or Ed448")
        if alg is not None and alg not in {"EdDSA", crv}:
            raise ValueError(f"alg {alg!r} does not fit an {crv} key (only EdDSA)")
        verifiers["EdDSA"] = _eddsa_verifier(okp)
    elif kty == "oct":
        raise ValueError("symmetric (oct) keys are never used to verify tokens")
    else:
        raise ValueError(f"kty {kty!r} is not EC, RSA or OKP")
    return VerificationKey(kid, verifiers)


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable keys of one JWKS, indexed by ``kid``."""

    by_kid: Mapping[str, tuple[VerificationKey, ...]]
    without_kid: tuple[VerificationKey, ...]
    skipped: int

    def __len__(self) -> int:
        return sum(len(keys) for keys in self.by_kid.values()) + len(self.without_kid)

    def find(self, kid: str | None, alg: str) -> tuple[VerificationKey | None, bool]:
        """Return ``(key, kid_known)``: the key for ``kid`` that allows ``alg``.

        With no ``kid``, the one key without a kid (or the only key) that allows ``alg``.
        """
        if kid is None:
            pool = self.without_kid or tuple(k for keys in self.by_kid.values() for k in keys)
            fitting = [k for k in pool if alg in k.verifiers]
            return (fitting[0] if len(fitting) == 1 else None), bool(fitting)
        keys = self.by_kid.get(kid)
        if keys is None:
            return None, False
        for key in keys:
            if alg in key.verifiers:
                return key, True
        return None, True


def load_jwks(document: object, *, source: str) -> KeySet:
    """Load the usable keys of a JWKS document (``{"keys": [...]}``).

    Keys we cannot or must not use (symmetric, encryption, weak, malformed) are
    skipped with a warning naming the kid.

    Raises:
        ValueError: Not a JWKS, or no usable key in it.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f"{source} is not a JWKS: expected a JSON object with a 'keys' list")
    by_kid: dict[str, list[VerificationKey]] = {}
    without: list[VerificationKey] = []
    skipped = 0
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            skipped += 1
            continue
        try:
            key = load_jwk(entry)
        except ValueError as exc:
            skipped += 1
            log.warning("JWKS %s: skipping key kid=%r: %s", source, entry.get("kid"), exc)
            continue
        if key.kid is None:
            without.append(key)
        else:
            by_kid.setdefault(key.kid, []).append(key)
    keyset = KeySet({k: tuple(v) for k, v in by_kid.items()}, tuple(without), skipped)
    if not len(keyset):
        raise ValueError(f"{source} has no usable signature key ({skipped} skipped)")
    return keyset
