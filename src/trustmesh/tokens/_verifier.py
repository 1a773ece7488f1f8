"""The verifiers: every check on an access token, the token and revocation caches.

One :class:`AsyncVerifier` trusts one or more issuers. A check never does I/O
when what it needs is cached; when it needs keys, a revocation list or an
introspection answer, it raises the private :class:`_NeedFetch`, the caller
fetches (single-flight, rate-limited) and checks again. :class:`Verifier` runs
the same checks synchronously and does its rare fetches on a private event loop.

Each issuer's keys come from a :class:`~._keysource.KeySource` and its opaque
tokens are asked about through an :class:`~._introspection.Introspector`; both
fetch through the issuer's :class:`~._provider.ProviderHTTP`.
"""

from __future__ import annotations

import asyncio
import binascii
import hmac
import logging
import threading
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType, TracebackType

from cryptography import x509

from ._cache import evict_oldest
from ._claims import AccessTokenClaims, certificate_thumbprint
from ._config import MAX_TOKEN_BYTES, IssuerConfig
from ._errors import ExpiredTokenError, InvalidTokenError, TokenVerifierUnavailableError
from ._introspection import IntrospectionClient, Introspector
from ._json import MAX_DATE, NonStandardJSONError, loads
from ._keysource import JWKSKeySource, KeySource
from ._provider import FetchError, ProviderHTTP

__all__ = ["DEFAULT_TOKEN_CACHE_SIZE", "AsyncVerifier", "Verifier"]

log = logging.getLogger("trustmesh.tokens")

#: Verified tokens kept (until their ``exp``) by default; 0 turns the cache off.
DEFAULT_TOKEN_CACHE_SIZE = 10_000

#: Distinct JOSE headers whose checks are remembered (providers use a handful).
_MAX_HEADERS = 64
_NOTHING_FETCHED: frozenset[str] = frozenset()
_AT_JWT = frozenset({"at+jwt", "application/at+jwt"})
# What ID tokens and pre-RFC 9068 access tokens carry: accepted only with strict_rfc9068=False.
_PLAIN_JWT = frozenset({None, "jwt", "application/jwt"})

Cert = x509.Certificate | bytes | None


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
    """What we know about one issuer: its claim rules, key source, revocation list."""

    def __init__(self, config: IssuerConfig) -> None:
        self.config = config
        self.issuer = config.issuer
        self.allowed = frozenset(config.algorithms)
        self.audiences = frozenset(config.audiences)
        self.require_bound = config.require_bound_tokens
        self.strict = config.strict_rfc9068
        self.leeway = config.leeway.total_seconds()
        self.max_lifetime = config.max_lifetime.total_seconds()
        self.min_refetch = config.jwks_min_refetch_interval.total_seconds()
        self.poll = config.revocation_poll_interval.total_seconds()
        self.max_stale = (
            None
            if config.revocation_max_stale is None
            else config.revocation_max_stale.total_seconds()
        )
        self.http = ProviderHTTP(config)
        self.key_source: KeySource = JWKSKeySource(self.http)
        self.introspector: Introspector | None = (
            None
            if config.introspection is None
            else IntrospectionClient(
                self.http,
                config.introspection,
                leeway=self.leeway,
                to_claims=lambda doc, now: _introspected_claims(self, doc, now),
            )
        )
        self.revoked: dict[str, float] = {}
        self.revoked_at: float | None = None
        self.revoked_attempt: float | None = None
        #: One fetch (keys or revocation list) at a time per issuer.
        self.lock = asyncio.Lock()

    def revocation_due(self, mono: float) -> bool:
        if self.http.revocation_url is None:
            return False
        if self.revoked_at is not None and mono - self.revoked_at < self.poll:
            return False
        retry = min(self.poll, self.min_refetch)
        return self.revoked_attempt is None or mono - self.revoked_attempt >= retry

    def revocation_stale(self, mono: float) -> bool:
        if self.http.revocation_url is None or self.max_stale is None:
            return False
        return self.revoked_at is None or mono - self.revoked_at > self.max_stale

    def apply_revocations(self, doc: object, now: float, mono: float) -> None:
        url = self.http.revocation_url
        if not isinstance(doc, dict) or not isinstance(doc.get("revoked"), list):
            raise FetchError(f"{url} is not a revocation list (no 'revoked' list)")
        if "issuer" in doc and doc["issuer"] != self.issuer:
            raise FetchError(f"{url} names issuer {doc['issuer']!r}, expected {self.issuer!r}")
        revoked: dict[str, float] = {}
        for entry in doc["revoked"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("jti"), str):
                raise FetchError(f"{url} has an entry without a string jti")
            exp = entry.get("exp")
            # An entry without a usable exp stays revoked for a whole token lifetime.
            expiry = float(exp) if _is_date(exp) else now + self.max_lifetime  # type: ignore[arg-type]
            if expiry + self.leeway >= now:
                revoked[entry["jti"]] = expiry
        self.revoked = revoked
        self.revoked_at = mono

    async def fetch_revocations(self, mono: float) -> None:
        url = self.http.revocation_url
        if not self.revocation_due(mono) or url is None:
            return
        self.revoked_attempt = mono
        try:
            doc = await self.http.get_json(url)
            self.apply_revocations(doc, time.time(), time.monotonic())
        except FetchError as exc:
            log.warning(
                "tokens: issuer %s: revocation list not refreshed (%s); keeping %d entries",
                self.issuer,
                exc,
                len(self.revoked),
            )


@dataclass(slots=True)
class _Cached:
    claims: AccessTokenClaims
    state: _IssuerState
    generation: int
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
            (s for s in self._issuers.values() if s.introspector is not None), None
        )
        if token_cache_size < 0:
            raise ValueError("token_cache_size must be >= 0")
        self._cache_size = token_cache_size
        self._cache: dict[str, _Cached] = {}
        self._cache_lock = threading.Lock()
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
            await state.http.aclose()

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
        return self._issuers[issuer].http.fetches

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
            source = owner.key_source
            if (
                source.due(mono)
                and "keys" not in attempted
                and (source.can_fetch(mono) or owner.lock.locked())
            ):
                raise _NeedFetch(owner, "keys")
            if cached.generation == source.generation and now <= cached.valid_until:
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
        source = state.key_source
        keys = source.keys
        if keys is None or source.due(mono):
            # A fetch in flight (lock held) is waited for rather than reported as failed.
            if "keys" not in attempted and (source.can_fetch(mono) or state.lock.locked()):
                raise _NeedFetch(state, "keys")
            if keys is None:
                raise TokenVerifierUnavailableError(
                    "keys_unavailable",
                    f"No signing keys for issuer {state.issuer!r}: its JWKS could not be "
                    f"fetched (see the log). Check the provider is up and trusted (CA bundle).",
                    issuer=state.issuer,
                )
        key, known = keys.find(kid, alg)
        if key is None:
            if not known:
                if "keys" not in attempted and "kid" not in attempted:
                    if source.can_fetch(mono) or state.lock.locked():
                        raise _NeedFetch(state, "kid")
                if kid is None:
                    raise _refuse(
                        "missing_kid",
                        f"Token has no kid and issuer {state.issuer!r} has several {alg} keys; "
                        f"the provider must set kid.",
                    )
                if source.failed:
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
                    f"at most every {source.min_refetch:g} s). The key was rotated out or the "
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
        if state.http.revocation_url is not None:
            self._check_revocation(state, claims, mono, attempted)
        if not skip_binding and (claims.certificate_thumbprint is not None or state.require_bound):
            self._check_binding(state, claims, cert)
        if self._cache_size:
            entry = _Cached(claims, state, source.generation, claims.expires_at + state.leeway)
            # Verifier threads may insert at once; only this miss path (after a signature
            # check) takes the lock, and it keeps the cache within its bound.
            with self._cache_lock:
                if len(self._cache) >= self._cache_size:
                    evict_oldest(self._cache)
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

    def _check_revocation(
        self,
        state: _IssuerState,
        claims: AccessTokenClaims,
        mono: float,
        attempted: AbstractSet[str],
    ) -> None:
        url = state.http.revocation_url
        if url is None:
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
                f"{url}.",
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
        state = self._introspecting
        if state is None or token.count(".") == 2 or not token.isprintable() or not token:
            raise _refuse(
                "malformed" if token.count(".") == 2 or state is None else "opaque_unsupported",
                "Token is not a compact JWS (three base64url parts) and no issuer has "
                "introspection configured for opaque tokens.",
            )
        introspector = state.introspector
        assert introspector is not None  # noqa: S101 - why it is the introspecting issuer
        entry = introspector.answer(token, now)
        if entry is None:
            if introspector.url is None:
                if "keys" not in attempted and state.key_source.can_fetch(mono):
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

    # -- fetching ---------------------------------------------------------------------

    async def _fetch(self, state: _IssuerState, kind: str, token: str | bytes, now: float) -> None:
        if kind == "introspect":
            # Per token, so not serialised behind the issuer's lock.
            if state.introspector is not None and isinstance(token, str):
                await state.introspector.introspect(token, now)
            return
        async with state.lock:
            if kind in ("keys", "kid"):
                await state.key_source.fetch()
            elif kind == "revocation":
                await state.fetch_revocations(time.monotonic())


def _introspected_claims(state: _IssuerState, doc: object, now: float) -> AccessTokenClaims:
    """The claims of an introspection answer (RFC 7662 §2.2), or the refusal."""
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
