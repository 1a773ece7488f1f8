"""The claim rules: what a verified token's claims must say, and the claims they give.

Pure functions, no I/O: :func:`jwt_claims` for a JWT whose signature verified,
:func:`introspected_claims` for an introspection answer, :func:`check_binding` for
certificate-bound tokens (RFC 8705). Each refusal is an :class:`InvalidTokenError`
(or :class:`ExpiredTokenError`) naming the claim and how to fix it.
"""

from __future__ import annotations

import hmac
from types import MappingProxyType
from typing import Protocol

from cryptography import x509

from ._claims import AccessTokenClaims, certificate_thumbprint
from ._errors import ExpiredTokenError, InvalidTokenError
from ._json import MAX_DATE

__all__ = [
    "Cert",
    "IssuerRules",
    "check_binding",
    "introspected_claims",
    "is_date",
    "jwt_claims",
    "refuse",
]

Cert = x509.Certificate | bytes | None


class IssuerRules(Protocol):
    """What the claim rules read of an issuer's configuration."""

    @property
    def issuer(self) -> str: ...

    @property
    def audiences(self) -> frozenset[str]: ...

    @property
    def strict(self) -> bool:
        """``strict_rfc9068``: ``client_id`` and ``jti`` are required."""

    @property
    def require_bound(self) -> bool: ...

    @property
    def leeway(self) -> float: ...

    @property
    def max_lifetime(self) -> float: ...


def refuse(reason: str, message: str, **details: str | int | None) -> InvalidTokenError:
    return InvalidTokenError(reason, message, **details)


def is_date(value: object) -> bool:
    # A NumericDate (RFC 7519 §2) we can compare and convert: bool is not a number, NaN
    # fails both comparisons, and a huge int is refused before it meets a float.
    return (type(value) is int or type(value) is float) and 0 <= value <= MAX_DATE


def _not_a_date(source: str, name: str, value: object) -> InvalidTokenError:
    if type(value) is int or type(value) is float:
        found = "a number outside 0..9999-12-31 (or NaN/Infinity)"
    else:
        found = "a JSON boolean" if type(value) is bool else f"a JSON {_json_type(value)}"
    return refuse(
        "bad_claim",
        f"{source} {name} is {found}, not a NumericDate: expected seconds since 1970 "
        f"between 0 and {MAX_DATE} (9999-12-31T23:59:59Z). Fix the issuer's {name}.",
        claim=name,
    )


def _json_type(value: object) -> str:
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _optional_date(doc: dict[str, object], name: str) -> int | float | None:
    value = doc.get(name)
    if value is None:
        return None
    if not is_date(value):
        raise _not_a_date("Introspection", name, value)
    return value  # type: ignore[return-value]


def jwt_claims(state: IssuerRules, payload: dict[str, object], now: float) -> AccessTokenClaims:
    """The claims of a verified JWT (RFC 9068 §2.2, RFC 7519 §4.1), or the refusal."""
    leeway = state.leeway
    if "nonce" in payload or "at_hash" in payload or "c_hash" in payload:
        raise refuse(
            "not_access_token",
            "Token carries nonce/at_hash/c_hash, ID token claims: ID tokens are not "
            "access tokens. Send the access token instead.",
        )
    exp = payload.get("exp")
    if (type(exp) is not int and type(exp) is not float) or not 0 <= exp <= MAX_DATE:
        if exp is None:
            raise refuse("missing_exp", "Token has no exp claim; tokens must expire.")
        raise _not_a_date("Token", "exp", exp)
    if now > exp + leeway:
        raise ExpiredTokenError(
            "expired",
            f"Token expired {int(now - exp)} s ago (leeway {leeway:g} s). Get a new one.",
        )
    iat = payload.get("iat")
    if (type(iat) is not int and type(iat) is not float) or not 0 <= iat <= MAX_DATE:
        if iat is None:
            raise refuse("missing_claim", "Token has no iat claim (RFC 9068).", claim="iat")
        raise _not_a_date("Token", "iat", iat)
    if iat > now + leeway:
        raise ExpiredTokenError(
            "not_yet_valid",
            f"Token iat is {int(iat - now)} s in the future (leeway {leeway:g} s). "
            f"Check the clocks (NTP).",
        )
    nbf = payload.get("nbf")
    if nbf is not None:
        if (type(nbf) is not int and type(nbf) is not float) or not 0 <= nbf <= MAX_DATE:
            raise _not_a_date("Token", "nbf", nbf)
        if nbf > now + leeway:
            raise ExpiredTokenError(
                "not_yet_valid",
                f"Token is not valid for another {int(nbf - now)} s (nbf; leeway {leeway:g} s).",
            )
    if exp - iat > state.max_lifetime:
        raise refuse(
            "lifetime_too_long",
            f"Token lifetime {int(exp - iat)} s is over the cap of {state.max_lifetime:g} s "
            f"for {state.issuer!r}. Issue shorter-lived tokens or raise max_lifetime.",
        )
    aud = payload.get("aud")
    if type(aud) is str and aud in state.audiences:
        audience: tuple[str, ...] = (aud,)
    else:
        audience = _audience(state, aud)
    sub = payload.get("sub")
    client_id = payload.get("client_id")
    jti = payload.get("jti")
    if type(sub) is not str or type(client_id) is not str or type(jti) is not str:
        sub = _required_str(payload, "sub")
        if state.strict:
            client_id = _required_str(payload, "client_id")
            jti = _required_str(payload, "jti")
        else:
            client_id = _optional_str(payload, "client_id") or _optional_str(payload, "azp")
            jti = _optional_str(payload, "jti")
    scope = payload.get("scope")
    roles = payload.get("roles")
    cnf = payload.get("cnf")
    return AccessTokenClaims(
        state.issuer,
        sub,
        audience,
        client_id,
        int(exp),
        int(iat),
        None if nbf is None else int(nbf),
        jti,
        frozenset(scope.split()) if type(scope) is str else _scopes(scope),
        _roles(roles),
        None if cnf is None else _thumbprint(cnf),
        MappingProxyType(payload),
    )


def check_binding(state: IssuerRules, claims: AccessTokenClaims, cert: Cert) -> None:
    """Refuse a token not bound to ``cert`` (RFC 8705 §3) when it or the issuer asks for it."""
    bound = claims.certificate_thumbprint
    if bound is None:
        if state.require_bound:
            raise refuse(
                "unbound",
                f"Token is not certificate-bound (no cnf) and {state.issuer!r} requires "
                f"bound tokens. Get the token over mTLS (tls_client_auth).",
            )
        return
    if bound == "":
        raise refuse(
            "cnf_unsupported",
            "Token cnf has no x5t#S256; only certificate binding (RFC 8705) is supported.",
        )
    if cert is None:
        raise refuse(
            "cnf_missing_cert",
            "Token is bound to a client certificate (cnf.x5t#S256) but the caller "
            "presented none. Call over mTLS with the certificate the token was issued to.",
        )
    if not hmac.compare_digest(certificate_thumbprint(cert), bound):
        raise refuse(
            "cnf_mismatch",
            "Token is bound to another client certificate (cnf.x5t#S256 differs): a "
            "stolen or misrouted token. Use the token issued to this certificate.",
        )


def introspected_claims(state: IssuerRules, doc: object, now: float) -> AccessTokenClaims:
    """The claims of an introspection answer (RFC 7662 §2.2), or the refusal."""
    if not isinstance(doc, dict):
        raise refuse("inactive", "The introspection answer is not a JSON object.")
    if doc.get("active") is not True:
        raise refuse(
            "inactive",
            f"{state.issuer!r} says the token is not active (expired, revoked or unknown).",
        )
    token_type = doc.get("token_type")
    if isinstance(token_type, str) and token_type.lower() == "refresh_token":
        raise refuse("not_access_token", "Introspection says this is a refresh token.")
    iss = doc.get("iss", state.issuer)
    if iss != state.issuer:
        raise refuse("bad_issuer", f"Introspection names issuer {str(iss)[:200]!r}.")
    exp = _optional_date(doc, "exp")
    iat = _optional_date(doc, "iat")
    nbf = _optional_date(doc, "nbf")
    expires = float(exp) if exp is not None else now + state.max_lifetime
    if now > expires + state.leeway:
        raise ExpiredTokenError("expired", "The introspected token has expired.")
    audience = _audience(state, doc.get("aud"))
    sub, client_id, jti = doc.get("sub"), doc.get("client_id"), doc.get("jti")
    return AccessTokenClaims(
        issuer=state.issuer,
        subject=sub if isinstance(sub, str) else str(client_id or ""),
        audience=audience,
        client_id=client_id if isinstance(client_id, str) else None,
        expires_at=int(expires),
        issued_at=None if iat is None else int(iat),
        not_before=None if nbf is None else int(nbf),
        jwt_id=jti if isinstance(jti, str) else None,
        scopes=_scopes(doc.get("scope")),
        roles=_roles(doc.get("roles")),
        certificate_thumbprint=_thumbprint(doc.get("cnf")),
        claims=MappingProxyType(doc),
        source="introspection",
    )


def _audience(state: IssuerRules, aud: object) -> tuple[str, ...]:
    if aud is None or aud == "" or aud == []:
        raise refuse(
            "missing_aud",
            f"Token has no aud claim; {state.issuer!r} tokens must name their audience "
            f"(expected {sorted(state.audiences)}).",
        )
    if isinstance(aud, str):
        audience: tuple[str, ...] = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        audience = tuple(str(a) for a in aud)
    else:
        raise refuse("bad_claim", "Token aud is not a string or list of strings.", claim="aud")
    if state.audiences.isdisjoint(audience):
        raise refuse(
            "bad_audience",
            f"Token audience {list(audience)[:5]} is not this service's; expected one of "
            f"{sorted(state.audiences)}. Request a token for this audience.",
        )
    return audience


def _required_str(payload: dict[str, object], name: str) -> str:
    value = payload.get(name)
    if value is None:
        raise refuse("missing_claim", f"Token has no {name} claim (RFC 9068).", claim=name)
    if not isinstance(value, str):
        raise refuse("bad_claim", f"Token {name} is not a string.", claim=name)
    return value


def _optional_str(payload: dict[str, object], name: str) -> str | None:
    value = payload.get(name)
    if value is None or isinstance(value, str):
        return value
    raise refuse("bad_claim", f"Token {name} is not a string.", claim=name)


def _scopes(scope: object) -> frozenset[str]:
    if scope is None:
        return frozenset()
    if not isinstance(scope, str):
        raise refuse("bad_claim", "Token scope is not a space-separated string.", claim="scope")
    return frozenset(scope.split())


def _roles(roles: object) -> tuple[str, ...]:
    if roles is None:
        return ()
    if type(roles) is list:
        values = tuple(roles)
        for role in values:
            if type(role) is not str:
                break
        else:
            return values
    raise refuse("bad_claim", "Token roles is not a list of strings.", claim="roles")


def _thumbprint(cnf: object) -> str | None:
    # "" marks a cnf we cannot check (another confirmation method): refused later.
    if cnf is None:
        return None
    if not isinstance(cnf, dict):
        raise refuse("bad_claim", "Token cnf is not a JSON object.", claim="cnf")
    value = cnf.get("x5t#S256")
    if value is None:
        return ""
    if not isinstance(value, str) or not value:
        raise refuse("bad_claim", "Token cnf x5t#S256 is not a string.", claim="cnf")
    return value
