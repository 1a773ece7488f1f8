"""Bearer tokens at the gateway: who the user is (401/503), and what the route needs (403).

:class:`Authenticator` keeps one :class:`~trustmesh.tokens.AsyncVerifier` per configured
issuer. A JWT goes to the verifier its unverified ``iss`` names (nothing else of the
unverified token is used, and the verifier checks ``iss`` again); an opaque token goes to
introspection at the issuers that configure it. Refusals are :class:`AuthFailure`:

- no token: 401, ``WWW-Authenticate: Bearer realm="trustmesh"`` (RFC 6750 §3.1)
- a header that is not ``Bearer <one token>``: 401, ``error="invalid_request"``
- a refused token: 401, ``error="invalid_token"``, the trustmesh.tokens reason code
- the issuer could not be reached to decide: 503 (fail closed, never a 401)
- a valid token without the route's scopes, roles or claims: 403,
  ``error="insufficient_scope"`` (never a 401: a new login would not help)

Route requirements are a one-rule :class:`~trustmesh.policy.Policy` built by
:func:`route_policy` from the route's ``auth`` block, so they are parsed and decided by
the same code, with the same semantics, as a service's ``user`` block.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence

from trustmesh.policy import ANONYMOUS, Decision, Policy, PolicyFile, PolicyRequest
from trustmesh.tokens import (
    DEFAULT_TOKEN_CACHE_SIZE,
    MAX_TOKEN_BYTES,
    REASONS,
    AccessTokenClaims,
    AsyncVerifier,
    InvalidTokenError,
    IssuerConfig,
    TokenVerifierUnavailableError,
)

__all__ = [
    "REALM",
    "AuthFailure",
    "Authenticator",
    "authorization_value",
    "authorize",
    "client_key",
    "enforce",
    "forbidden",
    "route_policy",
    "token_checked",
    "token_required",
]

log = logging.getLogger("trustmesh.gateway")

#: The realm named in every challenge.
REALM = "trustmesh"

_CHALLENGE = f'Bearer realm="{REALM}"'
# RFC 6750 §2.1: b64token. One token, nothing after it.
_BEARER_RE = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *")
_AUTHORIZATION = b"authorization"
_AUTH_KEYS = frozenset({"public", "issuers", "required", "scopes", "roles", "claims"})
_OWN_REASONS = {
    "token_missing": "no access token was sent",
    "token_invalid": "the Authorization header is not 'Bearer <token>' with one token",
    "token_verifier_unavailable": "the token issuer could not be reached to check the token",
    "issuer_not_allowed": "the token's issuer is not accepted on this route",
}


def _quoted(text: str) -> str:
    # RFC 6750 §3: error_description and scope are %x20-21 / %x23-5B / %x5D-7E.
    return "".join(c for c in text if 0x20 <= ord(c) <= 0x7E and c not in '"\\')


def _describe(reason: str) -> str:
    return _OWN_REASONS.get(reason) or REASONS.get(reason) or "the access token was refused"


# Built once: a refusal costs no string formatting.
_INVALID_TOKEN = {
    reason: (
        f'{_CHALLENGE}, error="invalid_token", error_description="{_quoted(_describe(reason))}"'
    )
    for reason in (*REASONS, "issuer_not_allowed")
}
_INVALID_REQUEST = (
    f'{_CHALLENGE}, error="invalid_request", '
    f'error_description="{_quoted(_OWN_REASONS["token_invalid"])}"'
)


class AuthFailure(Exception):  # noqa: N818 - the spec's name; it is a refusal, not a bug
    """A request refused by authentication (401/503) or authorization (403).

    Attributes:
        status: 401, 403 or 503.
        reason: The access-log/metrics reason: ``token_missing``, ``token_invalid``, a
            trustmesh.tokens reason code (``expired``, ``bad_signature``...),
            ``issuer_not_allowed``, ``token_verifier_unavailable``,
            ``insufficient_scope`` or ``policy_denied``.
        detail: One line for the problem+json ``detail`` (never the token, never
            configuration the client should not learn).
        www_authenticate: The challenge to send ("" for 503).
        log_message: The full explanation for the log (may name issuers and rules).
        token_reason: The trustmesh.tokens reason code behind a 401/503, if any.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        www_authenticate: str,
        *,
        log_message: str | None = None,
        token_reason: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.www_authenticate = www_authenticate
        self.log_message = log_message or detail
        self.token_reason = token_reason

    @property
    def title(self) -> str:
        """The problem+json ``title``."""
        if self.status == 403:
            return "Forbidden: the access token does not grant this"
        if self.status == 503:
            return "Token issuer unreachable: retry shortly"
        if self.reason == "token_missing":
            return "Bearer token required"
        return "Access token not accepted"

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers: ``WWW-Authenticate``, or ``Retry-After`` for 503."""
        if self.status == 503:
            return [(b"retry-after", b"5")]
        return [(b"www-authenticate", self.www_authenticate.encode("ascii"))]


def _missing() -> AuthFailure:
    return AuthFailure(
        401,
        "token_missing",
        "This route needs an access token: send Authorization: Bearer <token>.",
        _CHALLENGE,
    )


def _malformed() -> AuthFailure:
    return AuthFailure(
        401,
        "token_invalid",
        "The Authorization header must be 'Bearer <token>' with exactly one token.",
        _INVALID_REQUEST,
    )


def _refused(reason: str, message: str) -> AuthFailure:
    return AuthFailure(
        401,
        reason,
        f"The access token was refused ({reason}): {_describe(reason)}.",
        _INVALID_TOKEN.get(reason) or _INVALID_TOKEN["malformed"],
        log_message=message,
        token_reason=reason,
    )


def _unavailable(reason: str, message: str) -> AuthFailure:
    return AuthFailure(
        503,
        "token_verifier_unavailable",
        "The access token could not be checked: its issuer could not be reached. Retry shortly.",
        "",
        log_message=message,
        token_reason=reason,
    )


def authorization_value(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The one ``Authorization`` header of ASGI request headers, or None.

    Raises:
        AuthFailure: 401 ``invalid_request`` when there are several.
    """
    found: bytes | None = None
    for name, value in headers:
        if len(name) == 13 and name.lower() == _AUTHORIZATION:
            if found is not None:
                raise _malformed()
            found = value
    return found


def _unverified_issuer(token: str) -> str | None:
    # Only to choose a verifier; that verifier checks iss again with everything else.
    try:
        part = token.split(".", 2)[1]
        payload = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, binascii.Error):
        return None
    iss = payload.get("iss") if isinstance(payload, dict) else None
    return iss if isinstance(iss, str) else None


class Authenticator:
    """Check bearer tokens against the configured issuers.

    Create it inside the event loop that uses it and close it with :meth:`aclose`.

    Args:
        issuers: The trusted issuers (an issuer's ``introspection`` makes it accept
            opaque tokens).
        token_cache_size: Verified tokens kept per issuer (see trustmesh.tokens).

    Raises:
        ConfigError: No issuer, or the same issuer twice.
    """

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        *,
        token_cache_size: int = DEFAULT_TOKEN_CACHE_SIZE,
    ) -> None:
        from trustmesh.errors import ConfigError

        if isinstance(issuers, IssuerConfig):
            issuers = (issuers,)
        self._verifiers: dict[str, AsyncVerifier] = {}
        for config in issuers:
            if config.issuer in self._verifiers:
                raise ConfigError(f"Issuer {config.issuer!r} is configured twice.", field="issuers")
            self._verifiers[config.issuer] = AsyncVerifier(
                config, token_cache_size=token_cache_size
            )
        self._introspecting = tuple(c.issuer for c in issuers if c.introspection is not None)
        self._only = next(iter(self._verifiers), "")

    @property
    def issuers(self) -> tuple[str, ...]:
        """The configured issuer URLs, in configuration order."""
        return tuple(self._verifiers)

    async def refresh(self) -> None:
        """Fetch every issuer's keys now (start-up warm-up; never raises)."""
        for verifier in self._verifiers.values():
            await verifier.refresh()

    async def aclose(self) -> None:
        """Close the connections to the issuers."""
        for verifier in self._verifiers.values():
            await verifier.aclose()

    async def authenticate(
        self,
        authorization: bytes | str | None,
        *,
        allowed_issuers: Collection[str] | None = None,
        client_cert: bytes | None = None,
    ) -> AccessTokenClaims:
        """Verify the bearer token of an ``Authorization`` header value.

        Args:
            authorization: The header value, or None when the request has none.
            allowed_issuers: The route's ``auth.issuers``; None accepts any configured one.
            client_cert: The client's TLS certificate (DER), for certificate-bound tokens.

        Returns:
            The verified claims.

        Raises:
            AuthFailure: 401 (no, malformed or refused token) or 503 (issuer unreachable).
        """
        if authorization is None:
            raise _missing()
        if isinstance(authorization, bytes):
            try:
                authorization = authorization.decode("ascii")
            except UnicodeDecodeError:
                raise _malformed() from None
        match = _BEARER_RE.fullmatch(authorization)
        if match is None:
            raise _malformed()
        token = match.group(1)
        if len(token) > MAX_TOKEN_BYTES:
            raise _refused("too_large", f"Token of {len(token)} bytes refused unparsed.")
        if token.count(".") == 2:
            verifier = self._jwt_verifier(token, allowed_issuers)
            return await self._verify(verifier, token, client_cert)
        return await self._introspect(token, allowed_issuers, client_cert)

    def _jwt_verifier(self, token: str, allowed: Collection[str] | None) -> AsyncVerifier:
        verifiers = self._verifiers
        if len(verifiers) == 1:
            # The only verifier refuses any other iss itself: no need to peek.
            only = self._only
            if allowed is not None and only not in allowed:
                raise _refused(
                    "issuer_not_allowed",
                    f"The only configured issuer {only!r} is not accepted on this route "
                    f"(auth.issuers: {sorted(allowed)}).",
                )
            return verifiers[only]
        iss = _unverified_issuer(token)
        if iss is None:
            raise _refused("malformed", "Token payload has no readable string iss.")
        verifier = verifiers.get(iss)
        if verifier is None:
            raise _refused(
                "bad_issuer",
                f"Token iss {iss[:200]!r} is not a configured issuer; configured: "
                f"{sorted(verifiers)}.",
            )
        if allowed is not None and iss not in allowed:
            raise _refused(
                "issuer_not_allowed",
                f"Token iss {iss[:200]!r} is configured but not accepted on this route "
                f"(auth.issuers: {sorted(allowed)}).",
            )
        return verifier

    async def _verify(
        self, verifier: AsyncVerifier, token: str, client_cert: bytes | None
    ) -> AccessTokenClaims:
        try:
            return await verifier.verify_access_token(token, client_cert=client_cert)
        except TokenVerifierUnavailableError as exc:
            raise _unavailable(exc.reason, exc.message) from None
        except InvalidTokenError as exc:
            raise _refused(exc.reason, exc.message) from None
        except Exception as exc:  # fail closed: whatever broke, the token is not accepted
            log.exception("gateway: token verification failed unexpectedly")
            raise _unavailable("keys_unavailable", f"verification failed: {exc!r}") from None

    async def _introspect(
        self, token: str, allowed: Collection[str] | None, client_cert: bytes | None
    ) -> AccessTokenClaims:
        candidates = [i for i in self._introspecting if allowed is None or i in allowed]
        if not candidates:
            raise _refused(
                "opaque_unsupported",
                "An opaque (non-JWT) token, and no issuer accepted on this route has "
                "introspection configured.",
            )
        unavailable: AuthFailure | None = None
        inactive: AuthFailure | None = None
        for issuer in candidates:
            try:
                return await self._verify(self._verifiers[issuer], token, client_cert)
            except AuthFailure as refusal:
                if refusal.status == 503:
                    unavailable = unavailable or refusal
                elif refusal.reason == "inactive":
                    inactive = inactive or refusal
                else:
                    raise  # the issuer knows the token and refuses it
        # Not active anywhere that answered; unreachable issuers might have known it.
        last = unavailable or inactive
        assert last is not None  # noqa: S101 - candidates is not empty
        raise last


def client_key(claims: AccessTokenClaims) -> str:
    """The client a token was issued to, for per-client rate limits and alerts.

    ``client_id``, else ``azp``, else ``sub``.
    """
    if claims.client_id:
        return claims.client_id
    azp = claims.claims.get("azp")
    if isinstance(azp, str) and azp:
        return azp
    return claims.subject


def token_required(auth: Mapping[str, object]) -> bool:
    """Whether a route's ``auth`` block needs a token.

    False for ``public: true`` (no token is checked, even when one is sent) and for
    ``required: false`` (a token is checked when one is sent; requests without one pass).
    """
    return auth.get("public") is not True and auth.get("required", True) is not False


def token_checked(auth: Mapping[str, object]) -> bool:
    """Whether a token sent to this route is verified (everything but ``public: true``)."""
    return auth.get("public") is not True


def route_policy(
    auth: Mapping[str, object],
    *,
    name: str,
    methods: Sequence[str] | None = None,
) -> Policy:
    """A one-rule policy holding a route's ``auth`` requirements.

    Args:
        auth: The route's ``auth`` block: ``{public: true}``, or the keys of a policy
            rule's ``user`` block (``scopes``, ``roles``, ``claims``, ``required``) and
            optionally ``issuers`` (used by :meth:`Authenticator.authenticate`, not here).
        name: The route name (the rule's name, and named in errors).
        methods: The route's methods; None for any.

    Returns:
        A policy whose one allow rule admits requests without a client certificate
        (the gateway's callers are users) and checks the ``user`` block.

    Raises:
        trustmesh.policy.PolicyConfigError: The block is invalid; the message names the
            route and the key.
    """
    from trustmesh.policy import PolicyConfigError

    source = f"route {name!r} auth"
    if not isinstance(auth, Mapping):
        raise PolicyConfigError(
            f"{source}: must be a mapping such as {{scopes: [orders:read]}} or {{public: true}}."
        )
    unknown = sorted(str(k) for k in auth if k not in _AUTH_KEYS)
    if unknown:
        raise PolicyConfigError(
            f"{source}: unknown key {unknown[0]!r}; auth has {', '.join(sorted(_AUTH_KEYS))}.",
            field=unknown[0],
        )
    public = auth.get("public", False)
    if not isinstance(public, bool):
        raise PolicyConfigError(f"{source}: public must be true or false.", field="public")
    issuers = auth.get("issuers")
    if issuers is not None and (
        not isinstance(issuers, list | tuple)
        or not issuers
        or not all(isinstance(i, str) and i for i in issuers)
    ):
        raise PolicyConfigError(
            f"{source}: issuers must be a non-empty list of configured issuer URLs, "
            f"e.g. [https://idp.example.org]; got {issuers!r}.",
            field="issuers",
        )
    user = {k: v for k, v in auth.items() if k not in ("public", "issuers")}
    if public and user:
        raise PolicyConfigError(
            f"{source}: public: true cannot be combined with {sorted(user)}; a public route "
            f"checks no token.",
            field="public",
        )
    rule: dict[str, object] = {"name": name, "callers": [ANONYMOUS]}
    if methods is not None:
        rule["methods"] = list(methods)
    if not public:
        rule["user"] = user
    policy_log = logging.getLogger("trustmesh.policy")
    quiet = _DropAnonymousWarning()
    policy_log.addFilter(quiet)  # every gateway rule admits anonymous callers: not news
    try:
        return Policy.from_mapping({"rules": [rule]}, source=source)
    finally:
        policy_log.removeFilter(quiet)


class _DropAnonymousWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "'anonymous'" not in record.getMessage()


def _request(
    method: str, path: str, claims: AccessTokenClaims | Mapping[str, object] | None
) -> PolicyRequest:
    if isinstance(claims, AccessTokenClaims):
        return PolicyRequest(None, method, path, claims.claims, claims.scopes, claims.roles)
    return PolicyRequest.from_token_claims(None, method, path, claims)


def authorize(
    policy: Policy | PolicyFile,
    method: str,
    path: str,
    claims: AccessTokenClaims | Mapping[str, object] | None,
) -> Decision:
    """Decide a request with a route's policy (caller anonymous, the user's claims).

    Args:
        policy: From :func:`route_policy`, or a route's ``policy:`` file (a
            :class:`~trustmesh.policy.PolicyFile` is re-read when it changes).
        method: The HTTP method.
        path: The request path (the policy normalises it).
        claims: The verified token (or raw claims; None without a token).
    """
    return policy.evaluate(_request(method, path, claims))


def forbidden(
    policy: Policy | PolicyFile, decision: Decision, *, reason: str = "insufficient_scope"
) -> AuthFailure:
    """The 403 for a refused :class:`Decision`, with an ``insufficient_scope`` challenge.

    Args:
        policy: The policy that decided.
        decision: Its refusal.
        reason: ``insufficient_scope`` (route requirements) or ``policy_denied``
            (a route's policy file). A route refusal the token's scopes, roles and
            claims do not explain (an ambiguous path, a method the rule omits) is
            reported as ``policy_denied``.
    """
    rules = policy.policy.rules if isinstance(policy, PolicyFile) else policy.rules
    scopes = sorted({s for r in rules if r.effect == "allow" and r.user for s in r.user.scopes})
    challenge = f'{_CHALLENGE}, error="insufficient_scope"'
    if scopes:
        challenge += f', scope="{_quoted(" ".join(scopes))}"'
    problems: list[str] = []
    request = decision.request
    if request is not None:
        for rule in rules:
            if rule.effect == "allow" and rule.user is not None:
                problems.extend(rule.user.problems(request))
    if reason == "insufficient_scope" and not problems:
        reason = "policy_denied"  # refused for something else than the token's grants
    if problems and reason == "insufficient_scope":
        detail = f"The access token lacks what this route requires: {'; '.join(problems[:4])}."
    else:
        detail = "The access token does not grant this request."
    return AuthFailure(403, reason, detail, challenge, log_message=decision.reason)


def enforce(
    policy: Policy | PolicyFile,
    method: str,
    path: str,
    claims: AccessTokenClaims | Mapping[str, object] | None,
    *,
    reason: str = "insufficient_scope",
) -> Decision:
    """:func:`authorize`, raising :func:`forbidden`'s 403 when the decision refuses.

    Raises:
        AuthFailure: 403.
    """
    decision = authorize(policy, method, path, claims)
    if not decision.allowed:
        raise forbidden(policy, decision, reason=reason)
    return decision
