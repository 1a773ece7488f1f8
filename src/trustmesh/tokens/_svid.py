"""JWT-SVIDs (SPIFFE JWT-SVID standard): verification against a trust bundle's JWKS.

A JWT-SVID is a JWS compact token whose ``sub`` is the SPIFFE ID, with an ``aud`` that must
name the verifier and an ``exp``; it is signed by a key the trust bundle publishes with
``"use": "jwt-svid"``. The defaults are those of the access-token verifier: the algorithm
is pinned (ES256 unless told otherwise; never ``none`` or HMAC), the key comes only from the
bundle (``jku``, ``x5u``, ``jwk`` and ``x5c`` headers are ignored), ``crit`` is refused,
``aud`` and ``exp`` are required, and the lifetime is bounded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from trustmesh.pki import SpiffeID

from ._config import MAX_TOKEN_BYTES
from ._errors import ExpiredTokenError, InvalidTokenError
from ._keys import b64url_decode, load_jwks

__all__ = [
    "JWT_SVID_ALGORITHMS",
    "JWT_SVID_LEEWAY",
    "JWT_SVID_MAX_LIFETIME",
    "VerifiedJWTSVID",
    "jwt_svid_keys",
    "verify_jwt_svid",
]

#: Algorithms accepted by default: what trustmesh's CA signs with.
JWT_SVID_ALGORITHMS = ("ES256",)
#: Clock skew allowed on exp, nbf and iat.
JWT_SVID_LEEWAY = timedelta(seconds=30)
#: Longest exp - iat accepted: JWT-SVIDs are short-lived bearer tokens.
JWT_SVID_MAX_LIFETIME = timedelta(hours=1)


@dataclass(frozen=True)
class VerifiedJWTSVID:
    """A JWT-SVID that passed every check.

    .. versionadded:: 0.1
    """

    spiffe_id: str
    audience: tuple[str, ...]
    expires_at: int
    claims: dict[str, object]


def jwt_svid_keys(bundle: Mapping[str, object]) -> dict[str, object]:
    """Return the JWKS of a SPIFFE bundle's ``jwt-svid`` keys (without their ``use``)."""
    keys = bundle.get("keys")
    found: list[object] = []
    if isinstance(keys, list):
        for key in keys:
            if isinstance(key, dict) and key.get("use") == "jwt-svid":
                found.append({k: v for k, v in key.items() if k != "use"})
    return {"keys": found}


def _refuse(reason: str, message: str) -> InvalidTokenError:
    return InvalidTokenError(reason, message)


def _part(value: str, what: str) -> object:
    try:
        if any(c in value for c in "+/="):
            raise ValueError("not base64url")
        return json.loads(b64url_decode(value))
    except (ValueError, UnicodeDecodeError):
        raise _refuse("malformed", f"JWT-SVID {what} is not base64url-encoded JSON.") from None


def verify_jwt_svid(
    token: str,
    *,
    audience: str | Sequence[str],
    jwks: Mapping[str, object],
    trust_domain: str,
    algorithms: Sequence[str] = JWT_SVID_ALGORITHMS,
    leeway: timedelta = JWT_SVID_LEEWAY,
    max_lifetime: timedelta = JWT_SVID_MAX_LIFETIME,
    now: float | None = None,
) -> VerifiedJWTSVID:
    """Verify a JWT-SVID for ``audience`` against the trust domain's keys.

    Args:
        token: The JWS compact token.
        audience: The audience this verifier is (any one of them must be in ``aud``).
        jwks: The bundle's JWT-SVID keys (``{"keys": [...]}``; a whole SPIFFE bundle is
            accepted too: only its ``jwt-svid`` keys count).
        trust_domain: The trust domain ``sub`` must belong to.
        algorithms: Allowed ``alg`` values (asymmetric only).
        leeway: Clock skew allowed.
        max_lifetime: Longest ``exp - iat`` accepted.
        now: The current time, Unix seconds (for tests).

    Raises:
        InvalidTokenError: With ``reason`` from :data:`~trustmesh.tokens.REASONS`.
        ExpiredTokenError: ``exp`` is in the past beyond the leeway.

    .. versionadded:: 0.1
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise _refuse("too_large", f"JWT-SVID is over {MAX_TOKEN_BYTES} bytes; refused unparsed.")
    parts = token.split(".")
    if len(parts) != 3:
        raise _refuse("malformed", "JWT-SVID is not a JWS compact token (three parts).")
    header, payload = _part(parts[0], "header"), _part(parts[1], "payload")
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise _refuse("malformed", "JWT-SVID header and payload must be JSON objects.")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms or alg.startswith("HS"):
        raise _refuse(
            "alg_not_allowed",
            f"JWT-SVID alg {str(alg)[:20]!r} is not allowed: only {list(algorithms)} are.",
        )
    if "crit" in header:
        raise _refuse("bad_header", "JWT-SVID header has crit extensions; none are supported.")
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise _refuse("bad_header", f"JWT-SVID typ is {str(typ)[:40]!r}, expected 'JWT'.")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _refuse("bad_header", "JWT-SVID kid is not a string.")
    listed = jwks.get("keys")
    tagged = isinstance(listed, list) and any(isinstance(k, dict) and "use" in k for k in listed)
    document = jwt_svid_keys(jwks) if tagged else dict(jwks)
    try:
        keyset = load_jwks(document, source="the trust bundle")
    except ValueError:
        raise _refuse(
            "unknown_kid", "The trust bundle has no JWT-SVID key: the agent has no keys yet."
        ) from None
    key, known = keyset.find(kid, alg)
    if key is None:
        raise _refuse(
            "unknown_kid" if not known else "alg_mismatch",
            f"No JWT-SVID key {kid!r} for {alg} in the trust bundle of {trust_domain}.",
        )
    try:
        signature = b64url_decode(parts[2])
    except ValueError:
        raise _refuse("malformed", "JWT-SVID signature is not base64url.") from None
    if not key.verifiers[alg](f"{parts[0]}.{parts[1]}".encode(), signature):
        raise _refuse("bad_signature", "JWT-SVID signature does not verify with the bundle key.")
    sub = payload.get("sub")
    try:
        spiffe_id = SpiffeID.parse(sub) if isinstance(sub, str) else None
    except ValueError:
        spiffe_id = None
    if spiffe_id is None or not spiffe_id.member_of(trust_domain):
        raise _refuse(
            "bad_claim", f"JWT-SVID sub {str(sub)[:200]!r} is not a SPIFFE ID of {trust_domain}."
        )
    aud = payload.get("aud")
    auds = [aud] if isinstance(aud, str) else aud
    if not isinstance(auds, list) or not auds or not all(isinstance(a, str) for a in auds):
        raise _refuse("missing_aud", "JWT-SVID has no aud: it must name its audience.")
    wanted = [audience] if isinstance(audience, str) else list(audience)
    if not set(auds) & set(wanted):
        raise _refuse(
            "bad_audience",
            f"JWT-SVID is for audience {auds[:5]}, not {wanted}: ask for one for this service.",
        )
    clock = time.time() if now is None else now
    skew = leeway.total_seconds()
    exp = payload.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise _refuse("missing_exp", "JWT-SVID has no numeric exp.")
    if clock > exp + skew:
        raise ExpiredTokenError("expired", f"JWT-SVID expired {int(clock - exp)} s ago.")
    for name in ("nbf", "iat"):
        value = payload.get(name)
        if value is not None:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise _refuse("bad_claim", f"JWT-SVID {name} is not a number.")
            if value > clock + skew:
                raise _refuse("not_yet_valid", f"JWT-SVID {name} is in the future.")
    iat = payload.get("iat")
    if isinstance(iat, int | float) and exp - iat > max_lifetime.total_seconds():
        raise _refuse(
            "lifetime_too_long",
            f"JWT-SVID lives {int(exp - iat)} s, over the {int(max_lifetime.total_seconds())} s "
            f"allowed.",
        )
    return VerifiedJWTSVID(spiffe_id.uri, tuple(auds), int(exp), dict(payload))
