"""The verifiers: every check on an access token, the JWKS and revocation caches.

One :class:`AsyncVerifier` trusts one or more issuers. A check never does I/O
when what it needs is cached; when it needs keys, a revocation list or an
introspection answer, it raises the private :class:`_NeedFetch`, the caller
fetches (single-flight, rate-limited) and checks again. :class:`Verifier` runs
the same checks synchronously and does its rare fetches on a private event loop.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType, TracebackType

import httpx
from cryptography import x509

from ._claims import AccessTokenClaims, certificate_thumbprint
from ._config import MAX_TOKEN_BYTES, IssuerConfig
from ._errors import ExpiredTokenError, InvalidTokenError, TokenVerifierUnavailableError
from ._json import MAX_DATE, NonStandardJSONError, loads
from ._keys import KeySet, load_jwks

__all__ = ["DEFAULT_TOKEN_CACHE_SIZE", "AsyncVerifier", "Verifier"]

log = logging.getLogger("trustmesh.tokens")

#: Verified tokens kept (until their ``exp``) by default; 0 turns the cache off.
DEFAULT_TOKEN_CACHE_SIZE = 10_000
#: Discovery, JWKS, revocation and introspection answers larger than this are refused.
MAX_DOCUMENT_BYTES = 512 * 1024

#: Distinct JOSE headers whose checks are remembered (providers use a handful).
_MAX_HEADERS = 64
_NOTHING_FETCHED: frozenset[str] = frozenset()
_AT_JWT = frozenset({"at+jwt", "application/at+jwt"})
# What ID tokens and pre-RFC 9068 access tokens carry: accepted only with strict_rfc9068=False.
_PLAIN_JWT = frozenset({None, "jwt", "application/jwt"})

Cert = x509.Certificate | bytes | None


class _FetchError(Exception):
    """A provider document could not be fetched or used (logged, never raised to callers)."""


class _NeedFetch(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, state: _IssuerState, kind: str) -> None:
        super().__init__(kind)
        self.state = state
        self.kind = kind


def _is_date(value: object) -> bool:
    # A NumericDate (RFC 7519 §2) we can compare and convert: bool is not a number, NaN
    # fails both comparisons, and a huge int is refused before it meets a float.
    return (type(value) is int or type(value) is float) and 0 <= value <= MAX_DATE


def _not_a_date(source: str, name: str, value: object) -> InvalidTokenError:
    if type(value) is int or type(value) is float:
        found = "a number outside 0..9999-12-31 (or NaN/Infinity)"
    else:
        found = "a JSON boolean" if type(value) is bool else f"a JSON {_json_type(value)}"
    return _refuse(
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
    if not _is_date(value):
        raise _not_a_date("Introspection", name, value)
    return value  # type: ignore[return-value]


def _refuse(reason: str, message: str, **details: str | int | None) -> InvalidTokenError:
    return InvalidTokenError(reason, message, **details)


class _IssuerState:
    """What we know about one issuer: its keys, endpoints and revocation list."""

    def __init__(self, config: IssuerConfig) -> None:
        self.config = config
        self.issuer = config.issuer
        self.allowed = frozenset(config.algorithms)
        self.audiences = frozenset(config.audiences)
        self.require_bound = config.require_bound_tokens
        self.strict = config.strict_rfc9068
        self.leeway = config.leeway.total_seconds()
        self.max_lifetime = config.max_lifetime.total_seconds()
        self.max_age = config.jwks_max_age.total_seconds()
        self.min_refetch = config.jwks_min_refetch_interval.total_seconds()
        self.poll = config.revocation_poll_interval.total_seconds()
        self.max_stale = (
            None
            if config.revocation_max_stale is None
            else config.revocation_max_stale.total_seconds()
        )
        self.keys: KeySet | None = None
        self.keys_at = 0.0
        self.keys_attempt: float | None = None
        #: The last JWKS fetch failed: an unknown kid may then be a rotated-in key.
        self.keys_failed = False
        self.generation = 0
        self.jwks_url = config.jwks_url
        self.revocation_url = config.revocation_list_url
        self.introspection_url = config.introspection.url if config.introspection else None
        self.revoked: dict[str, float] = {}
        self.revoked_at: float | None = None
        self.revoked_attempt: float | None = None
        self.lock = asyncio.Lock()
        self.client: httpx.AsyncClient | None = None
        self.fetches = 0

    def keys_due(self, mono: float) -> bool:
        return self.keys is None or mono - self.keys_at >= self.max_age

    def can_fetch_keys(self, mono: float) -> bool:
        return self.keys_attempt is None or mono - self.keys_attempt >= self.min_refetch

    def revocation_due(self, mono: float) -> bool:
        if self.revocation_url is None:
            return False
        if self.revoked_at is not None and mono - self.revoked_at < self.poll:
            return False
        retry = min(self.poll, self.min_refetch)
        return self.revoked_attempt is None or mono - self.revoked_attempt >= retry

    def revocation_stale(self, mono: float) -> bool:
        if self.revocation_url is None or self.max_stale is None:
            return False
        return self.revoked_at is None or mono - self.revoked_at > self.max_stale

    def apply_discovery(self, doc: object) -> None:
        url = self.config.discovery_url
        if not isinstance(doc, dict):
            raise _FetchError(f"{url} is not a JSON object")
        if doc.get("issuer") != self.issuer:
            # OpenID Connect Discovery §4.3: the issuer must match exactly.
            raise _FetchError(f"{url} names issuer {doc.get('issuer')!r}, expected {self.issuer!r}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not self._usable(jwks_uri):
            raise _FetchError(f"{url} has no usable https jwks_uri ({jwks_uri!r})")
        self.jwks_url = jwks_uri
        if self.config.revocation_list_url is None:
            revocation = doc.get("revocation_list_endpoint")
            self.revocation_url = (
                revocation if isinstance(revocation, str) and self._usable(revocation) else None
            )
        if self.config.introspection is not None and self.config.introspection.url is None:
            endpoint = doc.get("introspection_endpoint")
            if isinstance(endpoint, str) and self._usable(endpoint):
                self.introspection_url = endpoint

    def _usable(self, url: str) -> bool:
        return url.startswith("https://") or (
            self.config.allow_insecure_http and url.startswith("http://")
        )

    def apply_keys(self, keyset: KeySet, mono: float) -> None:
        old = self.keys
        if old is not None and old.material - keyset.material:
            # A key went away (rotated out, or withdrawn after a compromise, perhaps
            # under the same kid): tokens it verified must be verified again.
            self.generation += 1
        self.keys_failed = False
        self.keys = keyset
        self.keys_at = mono

    def apply_revocations(self, doc: object, now: float, mono: float) -> None:
        url = self.revocation_url
        if not isinstance(doc, dict) or not isinstance(doc.get("revoked"), list):
            raise _FetchError(f"{url} is not a revocation list (no 'revoked' list)")
        if "issuer" in doc and doc["issuer"] != self.issuer:
            raise _FetchError(f"{url} names issuer {doc['issuer']!r}, expected {self.issuer!r}")
        revoked: dict[str, float] = {}
        for entry in doc["revoked"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("jti"), str):
                raise _FetchError(f"{url} has an entry without a string jti")
            exp = entry.get("exp")
            # An entry without a usable exp stays revoked for a whole token lifetime.
            expiry = float(exp) if _is_date(exp) else now + self.max_lifetime  # type: ignore[arg-type]
            if expiry + self.leeway >= now:
                revoked[entry["jti"]] = expiry
        self.revoked = revoked
        self.revoked_at = mono


@dataclass(slots=True)
class _Cached:
    claims: AccessTokenClaims
    state: _IssuerState
    generation: int
    valid_until: float


@dataclass(slots=True)
class _Introspected:
    claims: AccessTokenClaims | None
    refusal: InvalidTokenError | None
    valid_until: float


class AsyncVerifier:
    """Verify access tokens from one or more issuers (asyncio).

    Create it inside the event loop that uses it; close it with :meth:`aclose`
    (or ``async with``).

    Args:
        issuers: The trusted issuers (their ``issuer`` values must differ).
        token_cache_size: Verified JWTs kept until their ``exp``; 0 disables.

    Raises:
        ConfigError: Two configurations for the same issuer, or none.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        issuers: IssuerConfig | Sequence[IssuerConfig],
        *,
        token_cache_size: int = DEFAULT_TOKEN_CACHE_SIZE,
    ) -> None:
        from trustmesh.errors import ConfigError

        configs = (issuers,) if isinstance(issuers, IssuerConfig) else tuple(issuers)
        if not configs:
            raise ConfigError("No issuer configured. Give at least one IssuerConfig.")
        self._issuers: dict[str, _IssuerState] = {}
        for config in configs:
            if config.issuer in self._issuers:
                raise ConfigError(f"Issuer {config.issuer!r} is configured twice.")
            self._issuers[config.issuer] = _IssuerState(config)
        self._algorithms = frozenset(a for c in configs for a in c.algorithms)
        self._introspecting = next(
            (s for s in self._issuers.values() if s.config.introspection is not None), None
        )
        if token_cache_size < 0:
            raise ValueError("token_cache_size must be >= 0")
        self._cache_size = token_cache_size
        self._cache: dict[str, _Cached] = {}
        self._cache_lock = threading.Lock()
        self._introspected: dict[bytes, _Introspected] = {}
        self._headers: dict[str, tuple[str, str | None, bool]] = {}
        self._skip_binding_logged = False

    # -- public API -----------------------------------------------------------------

    async def verify_access_token(
        self,
        token: str | bytes,
        *,
        client_cert: Cert = None,
        skip_binding: bool = False,
        now: datetime | float | None = None,
    ) -> AccessTokenClaims:
        """Verify an access token and return its claims.

        Args:
            token: The compact JWT (or an opaque token, with introspection configured).
            client_cert: The caller's TLS client certificate (object or DER), when known.
                A certificate-bound token (``cnf.x5t#S256``) is refused without it.
            skip_binding: Accept bound tokens without checking the certificate
                (debugging only; logged once per verifier).
            now: The current time (tests); defaults to the clock.

        Raises:
            InvalidTokenError: Refused; ``.reason`` says which check failed.
            TokenVerifierUnavailableError: The issuer could not be reached to decide.
        """
        at = time.time() if now is None else _timestamp(now)
        if skip_binding:
            self._warn_skip_binding()
        try:
            return self._check(token, client_cert, skip_binding, at, _NOTHING_FETCHED)
        except _NeedFetch as first:
            need = first
        attempted: set[str] = set()
        while True:
            attempted.add(need.kind)
            await self._fetch(need.state, need.kind, token, at)
            try:
                return self._check(token, client_cert, skip_binding, at, attempted)
            except _NeedFetch as again:
                need = again

    async def refresh(self) -> None:
        """Fetch every issuer's keys and revocation list now (warm-up; never raises)."""
        mono = time.monotonic()
        for state in self._issuers.values():
            await self._fetch(state, "keys", b"", time.time())
            if state.revocation_due(mono):
                await self._fetch(state, "revocation", b"", time.time())

    async def aclose(self) -> None:
        """Close the HTTP connections to the providers."""
        for state in self._issuers.values():
            if state.client is not None:
                await state.client.aclose()
                state.client = None

    async def __aenter__(self) -> AsyncVerifier:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def fetch_count(self, issuer: str) -> int:
        """How many HTTP requests went to ``issuer`` (for metrics and tests)."""
        return self._issuers[issuer].fetches

    def _warn_skip_binding(self) -> None:
        if not self._skip_binding_logged:
            self._skip_binding_logged = True
            log.warning("tokens: certificate binding (cnf) not checked: skip_binding=True")

    # -- checks (no I/O) ------------------------------------------------------------

    def _check(
        self,
        token: str | bytes,
        cert: Cert,
        skip_binding: bool,
        now: float,
        attempted: AbstractSet[str],
    ) -> AccessTokenClaims:
        if len(token) > MAX_TOKEN_BYTES:
            raise _refuse(
                "too_large",
                f"Token of {len(token)} bytes refused unparsed: the cap is {MAX_TOKEN_BYTES}. "
                f"Send fewer claims (roles, scopes) in the token.",
            )
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise _refuse("malformed", "Token is not ASCII; expected a compact JWS.") from None
        mono = time.monotonic()
        cached = self._cache.get(token) if self._cache_size else None
        if cached is not None:
            owner = cached.state
            if (
                owner.keys_due(mono)
                and "keys" not in attempted
                and (owner.can_fetch_keys(mono) or owner.lock.locked())
            ):
                raise _NeedFetch(owner, "keys")
            if cached.generation == owner.generation and now <= cached.valid_until:
                self._check_revocation(owner, cached.claims, mono, attempted)
                if not skip_binding:
                    self._check_binding(owner, cached.claims, cert)
                return cached.claims
            self._cache.pop(token, None)
        parts = token.split(".")
        if len(parts) != 3:
            return self._check_opaque(token, cert, skip_binding, now, mono, attempted)
        h64, p64, s64 = parts
        header = self._headers.get(h64)
        if header is None:
            header = self._parse_header(h64)
        alg, kid, at_jwt = header
        try:
            if "+" in token or "/" in token or "=" in token:
                raise ValueError("base64 or padding, not base64url")
            payload = loads(_b64(p64).decode())
            signature = _b64(s64)
        except NonStandardJSONError as exc:
            raise _refuse(
                "bad_claim",
                f"Token payload holds {exc.constant}, which is not JSON (RFC 8259 §6): a "
                f"claim must be a finite number, dates (exp, iat, nbf) NumericDates. Fix the "
                f"issuer's encoder.",
            ) from None
        except ValueError:
            raise _refuse(
                "malformed", "Token is not a JWS: a part is not base64url-encoded JSON."
            ) from None
        if type(payload) is not dict:
            raise _refuse("malformed", "Token payload is not a JSON object.")
        iss = payload.get("iss")
        state = self._issuers.get(iss) if isinstance(iss, str) else None
        if state is None:
            raise _refuse(
                "bad_issuer",
                f"Token iss {str(iss)[:200]!r} is not a trusted issuer; expected one of "
                f"{sorted(self._issuers)}.",
            )
        if not at_jwt and state.strict:
            raise _refuse(
                "not_access_token",
                f"Token typ is not 'at+jwt' (RFC 9068): an ID token or other JWT is not an "
                f"access token. Request an access token; for providers that predate RFC 9068 "
                f"set strict_rfc9068=False for {state.issuer!r}.",
            )
        if alg not in state.allowed:
            raise _refuse(
                "alg_not_allowed",
                f"Token alg {alg!r} is not allowed for issuer {state.issuer!r}; allowed: "
                f"{sorted(state.allowed)}.",
                alg=alg,
            )
        if state.keys is None or mono - state.keys_at >= state.max_age:
            # A fetch in flight (lock held) is waited for rather than reported as failed.
            if "keys" not in attempted and (state.can_fetch_keys(mono) or state.lock.locked()):
                raise _NeedFetch(state, "keys")
            if state.keys is None:
                raise TokenVerifierUnavailableError(
                    "keys_unavailable",
                    f"No signing keys for issuer {state.issuer!r}: its JWKS could not be "
                    f"fetched (see the log). Check the provider is up and trusted (CA bundle).",
                    issuer=state.issuer,
                )
        key, known = state.keys.find(kid, alg)
        if key is None:
            if not known:
                if "keys" not in attempted and "kid" not in attempted:
                    if state.can_fetch_keys(mono) or state.lock.locked():
                        raise _NeedFetch(state, "kid")
                if kid is None:
                    raise _refuse(
                        "missing_kid",
                        f"Token has no kid and issuer {state.issuer!r} has several {alg} keys; "
                        f"the provider must set kid.",
                    )
                if state.keys_failed:
                    # The provider could not be asked: the key may have been rotated in
                    # since the last fetch. Fail closed, but as "try again", not "forged".
                    raise TokenVerifierUnavailableError(
                        "keys_unavailable",
                        f"Token kid {kid[:64]!r} is not among the cached keys of "
                        f"{state.issuer!r} and its JWKS could not be refetched (see the "
                        f"log); the token cannot be checked until the provider answers.",
                        issuer=state.issuer,
                    )
                raise _refuse(
                    "unknown_kid",
                    f"Token kid {kid[:64]!r} is not in the JWKS of {state.issuer!r} (refetched "
                    f"at most every {state.min_refetch:g} s). The key was rotated out or the "
                    f"token is forged.",
                    kid=kid[:64],
                )
            raise _refuse(
                "alg_mismatch",
                f"Token alg {alg!r} is not the algorithm pinned to key {kid!r}; the key's "
                f"type decides which algorithm it verifies.",
                kid=kid,
            )
        if not key.verifiers[alg](token[: len(h64) + len(p64) + 1].encode("ascii"), signature):
            raise _refuse(
                "bad_signature",
                f"Token signature does not verify with key {kid!r} of {state.issuer!r}: the "
                f"token was altered or signed by someone else.",
                kid=kid,
            )
        claims = self._claims(state, payload, now)
        if state.revocation_url is not None:
            self._check_revocation(state, claims, mono, attempted)
        if not skip_binding and (claims.certificate_thumbprint is not None or state.require_bound):
            self._check_binding(state, claims, cert)
        if self._cache_size:
            entry = _Cached(claims, state, state.generation, claims.expires_at + state.leeway)
            # Verifier threads may insert at once; only this miss path (after a signature
            # check) takes the lock, and it keeps the cache within its bound.
            with self._cache_lock:
                if len(self._cache) >= self._cache_size:
                    self._evict(self._cache)
                self._cache[token] = entry
        return claims

    def _parse_header(self, h64: str) -> tuple[str, str | None, bool]:
        """Check a JOSE header once; identical headers (most of them) are then cached."""
        try:
            header = loads(_b64(h64).decode())
        except ValueError:
            raise _refuse(
                "malformed", "Token is not a JWS: the header is not base64url-encoded JSON."
            ) from None
        if type(header) is not dict:
            raise _refuse("malformed", "Token header is not a JSON object.")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _refuse(
                "alg_not_allowed",
                f"Token alg {str(alg)[:20]!r} is not allowed: only {sorted(self._algorithms)} "
                f"are (never none, never HMAC). Sign with the provider's asymmetric key.",
                alg=str(alg)[:20],
            )
        if "crit" in header:
            raise _refuse(
                "bad_header",
                "Token header has crit extensions; none are supported, so it is refused.",
            )
        typ = header.get("typ")
        kind = typ.lower() if isinstance(typ, str) else typ
        if kind not in _AT_JWT and kind not in _PLAIN_JWT:
            raise _refuse(
                "not_access_token",
                f"Token typ is {str(typ)[:40]!r}, expected 'at+jwt' (RFC 9068): that kind of "
                f"JWT is not an access token. Request an access token from the provider.",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _refuse("bad_header", "Token kid is not a string.")
        # jku, x5u, x5c and jwk are never read: keys come only from the configured JWKS.
        parsed = (alg, kid, kind in _AT_JWT)
        if len(self._headers) < _MAX_HEADERS:
            self._headers[h64] = parsed
        return parsed

    def _claims(
        self, state: _IssuerState, payload: dict[str, object], now: float
    ) -> AccessTokenClaims:
        leeway = state.leeway
        if "nonce" in payload or "at_hash" in payload or "c_hash" in payload:
            raise _refuse(
                "not_access_token",
                "Token carries nonce/at_hash/c_hash, ID token claims: ID tokens are not "
                "access tokens. Send the access token instead.",
            )
        exp = payload.get("exp")
        if (type(exp) is not int and type(exp) is not float) or not 0 <= exp <= MAX_DATE:
            if exp is None:
                raise _refuse("missing_exp", "Token has no exp claim; tokens must expire.")
            raise _not_a_date("Token", "exp", exp)
        if now > exp + leeway:
            raise ExpiredTokenError(
                "expired",
                f"Token expired {int(now - exp)} s ago (leeway {leeway:g} s). Get a new one.",
            )
        iat = payload.get("iat")
        if (type(iat) is not int and type(iat) is not float) or not 0 <= iat <= MAX_DATE:
            if iat is None:
                raise _refuse("missing_claim", "Token has no iat claim (RFC 9068).", claim="iat")
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
                    f"Token is not valid for another {int(nbf - now)} s (nbf; leeway "
                    f"{leeway:g} s).",
                )
        if exp - iat > state.max_lifetime:
            raise _refuse(
                "lifetime_too_long",
                f"Token lifetime {int(exp - iat)} s is over the cap of {state.max_lifetime:g} s "
                f"for {state.issuer!r}. Issue shorter-lived tokens or raise max_lifetime.",
            )
        aud = payload.get("aud")
        if type(aud) is str and aud in state.audiences:
            audience: tuple[str, ...] = (aud,)
        else:
            audience = self._audience(state, aud)
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

    @staticmethod
    def _audience(state: _IssuerState, aud: object) -> tuple[str, ...]:
        if aud is None or aud == "" or aud == []:
            raise _refuse(
                "missing_aud",
                f"Token has no aud claim; {state.issuer!r} tokens must name their audience "
                f"(expected {sorted(state.audiences)}).",
            )
        if isinstance(aud, str):
            audience: tuple[str, ...] = (aud,)
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            audience = tuple(str(a) for a in aud)
        else:
            raise _refuse("bad_claim", "Token aud is not a string or list of strings.", claim="aud")
        if state.audiences.isdisjoint(audience):
            raise _refuse(
                "bad_audience",
                f"Token audience {list(audience)[:5]} is not this service's; expected one of "
                f"{sorted(state.audiences)}. Request a token for this audience.",
            )
        return audience

    def _check_revocation(
        self,
        state: _IssuerState,
        claims: AccessTokenClaims,
        mono: float,
        attempted: AbstractSet[str],
    ) -> None:
        if state.revocation_url is None:
            return
        if "revocation" not in attempted and (
            state.revocation_due(mono)
            # A fetch in flight (the first one, at start) is waited for rather than
            # reported as a stale list: concurrent first requests must not get a 503.
            or (state.lock.locked() and state.revocation_stale(mono))
        ):
            raise _NeedFetch(state, "revocation")
        if state.revocation_stale(mono):
            raise TokenVerifierUnavailableError(
                "revocation_unavailable",
                f"The revocation list of {state.issuer!r} could not be fetched for over "
                f"{state.max_stale:g} s, so revoked tokens cannot be told apart. Check "
                f"{state.revocation_url}.",
                issuer=state.issuer,
            )
        if claims.jwt_id is not None and claims.jwt_id in state.revoked:
            raise _refuse(
                "revoked",
                f"Token {claims.jwt_id[:64]!r} was revoked by {state.issuer!r}.",
                jti=claims.jwt_id[:64],
            )

    @staticmethod
    def _check_binding(state: _IssuerState, claims: AccessTokenClaims, cert: Cert) -> None:
        bound = claims.certificate_thumbprint
        if bound is None:
            if state.config.require_bound_tokens:
                raise _refuse(
                    "unbound",
                    f"Token is not certificate-bound (no cnf) and {state.issuer!r} requires "
                    f"bound tokens. Get the token over mTLS (tls_client_auth).",
                )
            return
        if bound == "":
            raise _refuse(
                "cnf_unsupported",
                "Token cnf has no x5t#S256; only certificate binding (RFC 8705) is supported.",
            )
        if cert is None:
            raise _refuse(
                "cnf_missing_cert",
                "Token is bound to a client certificate (cnf.x5t#S256) but the caller "
                "presented none. Call over mTLS with the certificate the token was issued to.",
            )
        if not hmac.compare_digest(certificate_thumbprint(cert), bound):
            raise _refuse(
                "cnf_mismatch",
                "Token is bound to another client certificate (cnf.x5t#S256 differs): a "
                "stolen or misrouted token. Use the token issued to this certificate.",
            )

    def _check_opaque(
        self,
        token: str,
        cert: Cert,
        skip_binding: bool,
        now: float,
        mono: float,
        attempted: AbstractSet[str],
    ) -> AccessTokenClaims:
        intro = self._introspecting
        if intro is None or token.count(".") == 2 or not token.isprintable() or not token:
            raise _refuse(
                "malformed" if token.count(".") == 2 or intro is None else "opaque_unsupported",
                "Token is not a compact JWS (three base64url parts) and no issuer has "
                "introspection configured for opaque tokens.",
            )
        state = intro
        digest = hashlib.sha256(token.encode()).digest()
        entry = self._introspected.get(digest)
        if entry is not None and now > entry.valid_until:
            self._introspected.pop(digest, None)
            entry = None
        if entry is None:
            if state.introspection_url is None:
                if "keys" not in attempted and state.can_fetch_keys(mono):
                    raise _NeedFetch(state, "keys")
                raise TokenVerifierUnavailableError(
                    "introspection_unavailable",
                    f"Issuer {state.issuer!r} advertises no introspection_endpoint; set "
                    f"IntrospectionConfig.url.",
                )
            if "introspect" in attempted:
                raise TokenVerifierUnavailableError(
                    "introspection_unavailable", "The introspection answer was not usable."
                )
            raise _NeedFetch(state, "introspect")
        if entry.refusal is not None:
            refusal = entry.refusal
            raise type(refusal)(refusal.reason, refusal.message)
        assert entry.claims is not None  # noqa: S101 - one of the two is set
        if not skip_binding:
            self._check_binding(state, entry.claims, cert)
        return entry.claims

    @staticmethod
    def _evict(cache: dict[str, _Cached] | dict[bytes, _Introspected]) -> None:
        # Oldest first (dicts keep insertion order). Verifier threads may race here;
        # losing the race only means another thread evicted first.
        try:
            del cache[next(iter(cache))]  # type: ignore[arg-type]
        except (KeyError, RuntimeError, StopIteration):
            pass

    # -- fetching ---------------------------------------------------------------------

    def _client(self, state: _IssuerState) -> httpx.AsyncClient:
        if state.client is None:
            timeout = state.config.http_timeout.total_seconds()
            state.client = httpx.AsyncClient(
                verify=state.config.client_ssl_context(),
                timeout=timeout,
                follow_redirects=False,
                trust_env=False,
                headers={"Accept": "application/json", "User-Agent": "trustmesh-tokens"},
            )
        return state.client

    async def _get_json(self, state: _IssuerState, url: str, **kwargs: object) -> object:
        client = self._client(state)
        state.fetches += 1
        method = "POST" if "data" in kwargs else "GET"
        try:
            request = client.build_request(
                method,
                url,
                data=kwargs.get("data"),  # type: ignore[arg-type]
            )
            auth = kwargs.get("auth")
            response = await client.send(
                request, auth=auth if isinstance(auth, httpx.BasicAuth) else None, stream=True
            )
            try:
                if response.status_code != 200:
                    raise _FetchError(f"{url} answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise _FetchError(f"{url} sent more than {MAX_DOCUMENT_BYTES} bytes")
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise _FetchError(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            return loads(body)
        except NonStandardJSONError as exc:
            raise _FetchError(f"{url} did not send JSON: {exc}") from exc
        except ValueError as exc:
            raise _FetchError(f"{url} did not send JSON") from exc

    async def _fetch(self, state: _IssuerState, kind: str, token: str | bytes, now: float) -> None:
        if kind == "introspect":
            # Per token, so not serialised behind the issuer's lock.
            await self._introspect(state, token if isinstance(token, str) else "", now)
            return
        async with state.lock:
            mono = time.monotonic()
            if kind in ("keys", "kid"):
                await self._fetch_keys(state, mono)
            elif kind == "revocation":
                await self._fetch_revocations(state, mono)

    async def _fetch_keys(self, state: _IssuerState, mono: float) -> None:
        if not state.can_fetch_keys(mono):
            return  # rate limit: someone else just fetched, or the provider is failing
        state.keys_attempt = mono
        try:
            if state.config.discovery_url is not None:
                try:
                    state.apply_discovery(await self._get_json(state, state.config.discovery_url))
                except _FetchError as exc:
                    if state.jwks_url is None:
                        raise
                    log.warning(
                        "tokens: issuer %s: discovery failed (%s); using the JWKS URL found before",
                        state.issuer,
                        exc,
                    )
            url = state.jwks_url
            assert url is not None  # noqa: S101 - configured or discovered
            keyset = load_jwks(await self._get_json(state, url), source=url)
        except (_FetchError, ValueError) as exc:
            # Stale-if-error: the keys we have stay in use; an empty or broken set is
            # never cached.
            state.keys_failed = True
            cached = len(state.keys) if state.keys is not None else 0
            log.warning(
                "tokens: issuer %s: keys not refreshed (%s); %d cached key(s) stay in use, "
                "next try in %g s",
                state.issuer,
                exc,
                cached,
                state.min_refetch,
            )
            return
        state.apply_keys(keyset, time.monotonic())

    async def _fetch_revocations(self, state: _IssuerState, mono: float) -> None:
        if not state.revocation_due(mono) or state.revocation_url is None:
            return
        state.revoked_attempt = mono
        try:
            doc = await self._get_json(state, state.revocation_url)
            state.apply_revocations(doc, time.time(), time.monotonic())
        except _FetchError as exc:
            log.warning(
                "tokens: issuer %s: revocation list not refreshed (%s); keeping %d entries",
                state.issuer,
                exc,
                len(state.revoked),
            )

    async def _introspect(self, state: _IssuerState, token: str, now: float) -> None:
        settings = state.config.introspection
        url = state.introspection_url
        if settings is None or url is None or not token:
            return
        digest = hashlib.sha256(token.encode()).digest()
        if digest in self._introspected:
            return
        try:
            doc = await self._get_json(
                state,
                url,
                data={"token": token, "token_type_hint": "access_token"},
                auth=httpx.BasicAuth(settings.client_id, settings.client_secret),
            )
        except _FetchError as exc:
            log.warning("tokens: issuer %s: introspection failed (%s)", state.issuer, exc)
            raise TokenVerifierUnavailableError(
                "introspection_unavailable",
                f"Introspection at {url} failed, so the opaque token cannot be checked. "
                f"Check the provider and the resource server's credentials.",
                issuer=state.issuer,
            ) from None
        ttl = settings.cache_ttl.total_seconds()
        try:
            claims = self._introspected_claims(state, doc, now)
            entry = _Introspected(claims, None, min(now + ttl, claims.expires_at + state.leeway))
        except InvalidTokenError as exc:
            entry = _Introspected(None, exc, now + ttl)
        if len(self._introspected) >= settings.cache_size:
            self._evict(self._introspected)
        self._introspected[digest] = entry

    def _introspected_claims(
        self, state: _IssuerState, doc: object, now: float
    ) -> AccessTokenClaims:
        if not isinstance(doc, dict):
            raise _refuse("inactive", "The introspection answer is not a JSON object.")
        if doc.get("active") is not True:
            raise _refuse(
                "inactive",
                f"{state.issuer!r} says the token is not active (expired, revoked or unknown).",
            )
        token_type = doc.get("token_type")
        if isinstance(token_type, str) and token_type.lower() == "refresh_token":
            raise _refuse("not_access_token", "Introspection says this is a refresh token.")
        iss = doc.get("iss", state.issuer)
        if iss != state.issuer:
            raise _refuse("bad_issuer", f"Introspection names issuer {str(iss)[:200]!r}.")
        exp = _optional_date(doc, "exp")
        iat = _optional_date(doc, "iat")
        nbf = _optional_date(doc, "nbf")
        expires = float(exp) if exp is not None else now + state.max_lifetime
        if now > expires + state.leeway:
            raise ExpiredTokenError("expired", "The introspected token has expired.")
        audience = self._audience(state, doc.get("aud"))
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


def _b64(value: str) -> bytes:
    # Strict base64url: a2b_base64 in strict mode refuses anything outside the
    # alphabet, and the caller refuses '+', '/' and '=' (plain base64) beforehand.
    return binascii.a2b_base64(
        value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), strict_mode=True
    )


def _timestamp(now: datetime | float | None) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return now.timestamp()
    return float(now)


def _required_str(payload: dict[str, object], name: str) -> str:
    value = payload.get(name)
    if value is None:
        raise _refuse("missing_claim", f"Token has no {name} claim (RFC 9068).", claim=name)
    if not isinstance(value, str):
        raise _refuse("bad_claim", f"Token {name} is not a string.", claim=name)
    return value


def _optional_str(payload: dict[str, object], name: str) -> str | None:
    value = payload.get(name)
    if value is None or isinstance(value, str):
        return value
    raise _refuse("bad_claim", f"Token {name} is not a string.", claim=name)


def _scopes(scope: object) -> frozenset[str]:
    if scope is None:
        return frozenset()
    if not isinstance(scope, str):
        raise _refuse("bad_claim", "Token scope is not a space-separated string.", claim="scope")
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
    raise _refuse("bad_claim", "Token roles is not a list of strings.", claim="roles")


def _thumbprint(cnf: object) -> str | None:
    # "" marks a cnf we cannot check (another confirmation method): refused later.
    if cnf is None:
        return None
    if not isinstance(cnf, dict):
        raise _refuse("bad_claim", "Token cnf is not a JSON object.", claim="cnf")
    value = cnf.get("x5t#S256")
    if value is None:
        return ""
    if not isinstance(value, str) or not value:
        raise _refuse("bad_claim", "Token cnf x5t#S256 is not a string.", claim="cnf")
    return value


class Verifier:
    """Synchronous :class:`AsyncVerifier` for WSGI apps, scripts and the CLI.

    Checks run in the calling thread; the rare fetches (keys, revocation list,
    introspection) run on a private event loop, one at a time. Do not call it
    from inside a running event loop: use :class:`AsyncVerifier` there.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        issuers: IssuerConfig | Sequence[IssuerConfig],
        *,
        token_cache_size: int = DEFAULT_TOKEN_CACHE_SIZE,
    ) -> None:
        self._async = AsyncVerifier(issuers, token_cache_size=token_cache_size)
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()

    def verify_access_token(
        self,
        token: str | bytes,
        *,
        client_cert: Cert = None,
        skip_binding: bool = False,
        now: datetime | float | None = None,
    ) -> AccessTokenClaims:
        """Verify an access token; see :meth:`AsyncVerifier.verify_access_token`."""
        at = time.time() if now is None else _timestamp(now)
        if skip_binding:
            self._async._warn_skip_binding()
        check = self._async._check
        try:
            return check(token, client_cert, skip_binding, at, _NOTHING_FETCHED)
        except _NeedFetch as first:
            need = first
        attempted: set[str] = set()
        while True:
            attempted.add(need.kind)
            with self._lock:
                self._loop.run_until_complete(self._async._fetch(need.state, need.kind, token, at))
            try:
                return check(token, client_cert, skip_binding, at, attempted)
            except _NeedFetch as again:
                need = again

    def refresh(self) -> None:
        """Fetch every issuer's keys and revocation list now (never raises)."""
        with self._lock:
            self._loop.run_until_complete(self._async.refresh())

    def fetch_count(self, issuer: str) -> int:
        """How many HTTP requests went to ``issuer``."""
        return self._async.fetch_count(issuer)

    def close(self) -> None:
        """Close connections and the private event loop."""
        with self._lock:
            if not self._loop.is_closed():
                self._loop.run_until_complete(self._async.aclose())
                self._loop.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
