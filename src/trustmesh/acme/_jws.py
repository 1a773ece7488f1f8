"""JWS as ACME uses it (RFC 8555 6.2, RFC 7515 flattened JSON): parse, verify, thumbprint.

Written on :mod:`cryptography` directly: ACME needs only the flattened serialization,
three signature algorithms and exact control over which headers are refused, and
every refusal must become an ACME problem type (``badSignatureAlgorithm``,
``badPublicKey``, ``malformed``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ._problems import ACMEProblem

__all__ = [
    "ACCOUNT_ALGORITHMS",
    "JWS",
    "PublicKey",
    "b64url",
    "b64url_decode",
    "check_mac",
    "jwk_from_key",
    "key_from_jwk",
    "parse_jws",
    "thumbprint",
    "verify_eab",
]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

#: Signature algorithms accepted for account JWS (never ``none`` or an HMAC).
ACCOUNT_ALGORITHMS = ("RS256", "ES256", "ES384", "EdDSA")
_EAB_ALGORITHMS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_CURVES: dict[str, tuple[type[ec.EllipticCurve], int, str]] = {
    "P-256": (ec.SECP256R1, 32, "ES256"),
    "P-384": (ec.SECP384R1, 48, "ES384"),
}
_MIN_RSA_BITS = 2048


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(value: object, what: str) -> bytes:
    """Decode unpadded base64url, or refuse it as ``malformed`` naming ``what``."""
    if not isinstance(value, str) or "=" in value:
        raise ACMEProblem("malformed", f"{what} must be unpadded base64url text.")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ACMEProblem("malformed", f"{what} is not valid base64url.") from None


def _int(value: object, what: str) -> int:
    return int.from_bytes(b64url_decode(value, what), "big")


def key_from_jwk(jwk: object) -> PublicKey:
    """Load an account public key from a JWK (RSA, EC P-256/P-384, Ed25519).

    Raises:
        ACMEProblem: ``badPublicKey`` for an unsupported, private or weak key.
    """
    if not isinstance(jwk, dict):
        raise ACMEProblem("malformed", "The 'jwk' header must be a JSON object.")
    if "d" in jwk:
        raise ACMEProblem(
            "badPublicKey", "The 'jwk' holds a private key ('d'): send the public key only."
        )
    kty = jwk.get("kty")
    try:
        if kty == "RSA":
            key = rsa.RSAPublicNumbers(
                _int(jwk.get("e"), "jwk.e"), _int(jwk.get("n"), "jwk.n")
            ).public_key()
            if key.key_size < _MIN_RSA_BITS:
                raise ACMEProblem(
                    "badPublicKey",
                    f"The account key is RSA-{key.key_size}; use RSA of at least "
                    f"{_MIN_RSA_BITS} bits, or EC P-256.",
                )
            return key
        if kty == "EC":
            crv = jwk.get("crv")
            if crv not in _CURVES:
                raise ACMEProblem(
                    "badPublicKey", f"EC curve {crv!r} is not supported: use P-256 or P-384."
                )
            curve, size, _ = _CURVES[str(crv)]
            x, y = b64url_decode(jwk.get("x"), "jwk.x"), b64url_decode(jwk.get("y"), "jwk.y")
            if len(x) != size or len(y) != size:
                raise ACMEProblem("badPublicKey", f"jwk.x and jwk.y must be {size} bytes each.")
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve()
            ).public_key()
        if kty == "OKP" and jwk.get("crv") == "Ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode(jwk.get("x"), "jwk.x"))
    except ValueError:
        raise ACMEProblem("badPublicKey", "The 'jwk' is not a valid public key.") from None
    raise ACMEProblem(
        "badPublicKey",
        f"Key type {kty!r} is not supported: use RSA (2048+), EC P-256/P-384 or Ed25519.",
    )


def jwk_from_key(key: PublicKey) -> dict[str, str]:
    """The public JWK of a key, with only the required members (RFC 7638 3.2)."""
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return {
            "e": b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
            "kty": "RSA",
            "n": b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        }
    if isinstance(key, ec.EllipticCurvePublicKey):
        name = {"secp256r1": "P-256", "secp384r1": "P-384"}[key.curve.name]
        size = _CURVES[name][1]
        point = key.public_numbers()
        return {
            "crv": name,
            "kty": "EC",
            "x": b64url(point.x.to_bytes(size, "big")),
            "y": b64url(point.y.to_bytes(size, "big")),
        }
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}


def thumbprint(key: PublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of a public key."""
    canonical = json.dumps(jwk_from_key(key), separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def _algorithm_for(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES384" if key.curve.name == "secp384r1" else "ES256"
    return "EdDSA"


def _verify(key: PublicKey, alg: str, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            size = 48 if alg == "ES384" else 32
            if len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            digest = hashes.SHA384() if alg == "ES384" else hashes.SHA256()
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(digest))
        else:
            key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class JWS:
    """A parsed flattened JWS whose signature is not checked yet.

    Attributes:
        protected: The decoded protected header.
        payload: The decoded payload bytes (empty for POST-as-GET).
        signing_input: ``protected.payload`` as sent, the signed bytes.
        signature: The signature bytes.
    """

    protected: dict[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return str(self.protected.get("alg"))

    def payload_json(self) -> dict[str, Any]:
        """The payload as a JSON object (``malformed`` when it is not one)."""
        try:
            data = json.loads(self.payload)
        except (ValueError, UnicodeDecodeError):
            raise ACMEProblem("malformed", "The JWS payload is not JSON.") from None
        if not isinstance(data, dict):
            raise ACMEProblem("malformed", "The JWS payload must be a JSON object.")
        return data

    def verify(self, key: PublicKey) -> None:
        """Check the signature with ``key`` and that ``alg`` fits the key.

        Raises:
            ACMEProblem: ``badSignatureAlgorithm`` or ``malformed`` (bad signature).
        """
        if self.alg != _algorithm_for(key):
            raise ACMEProblem(
                "badSignatureAlgorithm",
                f"alg {self.alg!r} does not fit the account key (a "
                f"{_algorithm_for(key)} key): sign with {_algorithm_for(key)}.",
                algorithms=list(ACCOUNT_ALGORITHMS),
            )
        if not _verify(key, self.alg, self.signature, self.signing_input):
            raise ACMEProblem(
                "malformed", "The JWS signature does not verify with the account key."
            )


def parse_jws(body: bytes) -> JWS:
    """Parse a flattened JSON JWS (RFC 7515 7.2.2) as ACME requires it (RFC 8555 6.2).

    Refuses the general serialization, unprotected headers, ``none`` and HMAC algorithms.

    Raises:
        ACMEProblem: ``malformed`` or ``badSignatureAlgorithm``.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ACMEProblem("malformed", "The body is not JSON: send a flattened JWS.") from None
    if not isinstance(doc, dict):
        raise ACMEProblem("malformed", "The body must be a flattened JWS (a JSON object).")
    if "signatures" in doc or "header" in doc:
        raise ACMEProblem(
            "malformed",
            "Send a flattened JWS with one signature and only a protected header (RFC 8555 6.2).",
        )
    protected_b64, payload_b64 = doc.get("protected"), doc.get("payload")
    if not isinstance(protected_b64, str) or not isinstance(payload_b64, str):
        raise ACMEProblem("malformed", "The JWS needs 'protected', 'payload' and 'signature'.")
    try:
        protected = json.loads(b64url_decode(protected_b64, "protected"))
    except (ValueError, UnicodeDecodeError):
        raise ACMEProblem("malformed", "The JWS protected header is not JSON.") from None
    if not isinstance(protected, dict):
        raise ACMEProblem("malformed", "The JWS protected header must be a JSON object.")
    alg = protected.get("alg")
    if alg not in ACCOUNT_ALGORITHMS:
        raise ACMEProblem(
            "badSignatureAlgorithm",
            f"alg {alg!r} is not accepted for account requests: use one of "
            f"{list(ACCOUNT_ALGORITHMS)}.",
            algorithms=list(ACCOUNT_ALGORITHMS),
        )
    return JWS(
        protected=protected,
        payload=b64url_decode(payload_b64, "payload"),
        signing_input=f"{protected_b64}.{payload_b64}".encode(),
        signature=b64url_decode(doc.get("signature"), "signature"),
    )


def verify_eab(binding: object, *, url: str, account_jwk: dict[str, Any]) -> tuple[str, JWS]:
    """Parse an ``externalAccountBinding`` (RFC 8555 7.3.4) without checking its MAC yet.

    Returns:
        ``(kid, jws)``; check the MAC with :meth:`check_mac` once the key is known.

    Raises:
        ACMEProblem: ``malformed`` when the binding is not as 7.3.4 requires.
    """
    if not isinstance(binding, dict) or set(binding) != {"protected", "payload", "signature"}:
        raise ACMEProblem(
            "malformed",
            "externalAccountBinding must be a flattened JWS (protected, payload, signature).",
        )
    try:
        protected = json.loads(b64url_decode(binding["protected"], "EAB protected"))
        payload = json.loads(b64url_decode(binding["payload"], "EAB payload"))
    except (ValueError, UnicodeDecodeError):
        raise ACMEProblem("malformed", "The externalAccountBinding is not JSON.") from None
    if not isinstance(protected, dict) or protected.get("alg") not in _EAB_ALGORITHMS:
        raise ACMEProblem(
            "malformed",
            f"externalAccountBinding alg must be one of {sorted(_EAB_ALGORITHMS)} (a MAC).",
        )
    if "nonce" in protected:
        raise ACMEProblem("malformed", "externalAccountBinding must not carry a nonce.")
    if protected.get("url") != url:
        raise ACMEProblem(
            "malformed", f"externalAccountBinding url must be the newAccount URL {url}."
        )
    kid = protected.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ACMEProblem("malformed", "externalAccountBinding needs the EAB key id as 'kid'.")
    if payload != account_jwk:
        raise ACMEProblem(
            "malformed", "externalAccountBinding payload must be the account key (the JWS jwk)."
        )
    jws = JWS(
        protected=protected,
        payload=b"",
        signing_input=f"{binding['protected']}.{binding['payload']}".encode(),
        signature=b64url_decode(binding["signature"], "EAB signature"),
    )
    return kid, jws


def check_mac(jws: JWS, key: bytes) -> bool:
    """Whether an EAB JWS's MAC verifies with the HMAC ``key`` (constant time)."""
    digest = _EAB_ALGORITHMS[jws.alg]
    expected = hmac.new(key, jws.signing_input, digest).digest()
    return hmac.compare_digest(expected, jws.signature)
