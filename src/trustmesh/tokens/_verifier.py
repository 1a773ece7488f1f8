"""The verifiers: every check on an access token, the token and revocation caches.

One :class:`AsyncVerifier` trusts one or more issuers. A check never does I/O
when what it needs is cached; when it needs keys, a revocation list or an
introspection answer, it raises the private :class:`_NeedFetch`, the caller
fetches (single-flight, rate-limited) and checks again. :class:`Verifier` runs
the same checks synchronously and does its rare fetches on a private event loop.

What it knows of each issuer is an :class:`~._issuer.IssuerState`: its keys come
from a :class:`~._keysource.KeySource`, its opaque tokens are asked about through
an :class:`~._introspection.Introspector`, and the claim rules are in ``_rules``.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import threading
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

from ._cache import evict_oldest
from ._claims import AccessTokenClaims
from ._config import MAX_TOKEN_BYTES, IssuerConfig
from ._errors import TokenVerifierUnavailableError
from ._issuer import IssuerState
from ._json import NonStandardJSONError, loads
from ._rules import Cert, check_binding, jwt_claims, refuse

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


class _NeedFetch(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, state: IssuerState, kind: str) -> None:
        super().__init__(kind)
        self.state = state
        self.kind = kind


@dataclass(slots=True)
class _Cached:
    claims: AccessTokenClaims
    state: IssuerState
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
        self._issuers: dict[str, IssuerState] = {}
        for config in configs:
            if config.issuer in self._issuers:
                raise ConfigError(f"Issuer {config.issuer!r} is configured twice.")
            self._issuers[config.issuer] = IssuerState(config)
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
            raise refuse(
                "too_large",
                f"Token of {len(token)} bytes refused unparsed: the cap is {MAX_TOKEN_BYTES}. "
                f"Send fewer claims (roles, scopes) in the token.",
            )
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise refuse("malformed", "Token is not ASCII; expected a compact JWS.") from None
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
                    check_binding(owner, cached.claims, cert)
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
            raise refuse(
                "bad_claim",
                f"Token payload holds {exc.constant}, which is not JSON (RFC 8259 §6): a "
                f"claim must be a finite number, dates (exp, iat, nbf) NumericDates. Fix the "
                f"issuer's encoder.",
            ) from None
        except ValueError:
            raise refuse(
                "malformed", "Token is not a JWS: a part is not base64url-encoded JSON."
            ) from None
        if type(payload) is not dict:
            raise refuse("malformed", "Token payload is not a JSON object.")
        iss = payload.get("iss")
        state = self._issuers.get(iss) if isinstance(iss, str) else None
        if state is None:
            raise refuse(
                "bad_issuer",
                f"Token iss {str(iss)[:200]!r} is not a trusted issuer; expected one of "
                f"{sorted(self._issuers)}.",
            )
        if not at_jwt and state.strict:
            raise refuse(
                "not_access_token",
                f"Token typ is not 'at+jwt' (RFC 9068): an ID token or other JWT is not an "
                f"access token. Request an access token; for providers that predate RFC 9068 "
                f"set strict_rfc9068=False for {state.issuer!r}.",
            )
        if alg not in state.allowed:
            raise refuse(
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
                    raise refuse(
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
                raise refuse(
                    "unknown_kid",
                    f"Token kid {kid[:64]!r} is not in the JWKS of {state.issuer!r} (refetched "
                    f"at most every {source.min_refetch:g} s). The key was rotated out or the "
                    f"token is forged.",
                    kid=kid[:64],
                )
            raise refuse(
                "alg_mismatch",
                f"Token alg {alg!r} is not the algorithm pinned to key {kid!r}; the key's "
                f"type decides which algorithm it verifies.",
                kid=kid,
            )
        if not key.verifiers[alg](token[: len(h64) + len(p64) + 1].encode("ascii"), signature):
            raise refuse(
                "bad_signature",
                f"Token signature does not verify with key {kid!r} of {state.issuer!r}: the "
                f"token was altered or signed by someone else.",
                kid=kid,
            )
        claims = jwt_claims(state, payload, now)
        if state.http.revocation_url is not None:
            self._check_revocation(state, claims, mono, attempted)
        if not skip_binding and (claims.certificate_thumbprint is not None or state.require_bound):
            check_binding(state, claims, cert)
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
            raise refuse(
                "malformed", "Token is not a JWS: the header is not base64url-encoded JSON."
            ) from None
        if type(header) is not dict:
            raise refuse("malformed", "Token header is not a JSON object.")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise refuse(
                "alg_not_allowed",
                f"Token alg {str(alg)[:20]!r} is not allowed: only {sorted(self._algorithms)} "
                f"are (never none, never HMAC). Sign with the provider's asymmetric key.",
                alg=str(alg)[:20],
            )
        if "crit" in header:
            raise refuse(
                "bad_header",
                "Token header has crit extensions; none are supported, so it is refused.",
            )
        typ = header.get("typ")
        kind = typ.lower() if isinstance(typ, str) else typ
        if kind not in _AT_JWT and kind not in _PLAIN_JWT:
            raise refuse(
                "not_access_token",
                f"Token typ is {str(typ)[:40]!r}, expected 'at+jwt' (RFC 9068): that kind of "
                f"JWT is not an access token. Request an access token from the provider.",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise refuse("bad_header", "Token kid is not a string.")
        # jku, x5u, x5c and jwk are never read: keys come only from the configured JWKS.
        parsed = (alg, kid, kind in _AT_JWT)
        if len(self._headers) < _MAX_HEADERS:
            self._headers[h64] = parsed
        return parsed

    def _check_revocation(
        self,
        state: IssuerState,
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
            raise refuse(
                "revoked",
                f"Token {claims.jwt_id[:64]!r} was revoked by {state.issuer!r}.",
                jti=claims.jwt_id[:64],
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
            raise refuse(
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
            check_binding(state, entry.claims, cert)
        return entry.claims

    # -- fetching ---------------------------------------------------------------------

    async def _fetch(self, state: IssuerState, kind: str, token: str | bytes, now: float) -> None:
        if kind == "introspect":
            # Per token, so not serialised behind the issuer's lock.
            if state.introspector is not None:
                # _check refused a non-ASCII token before asking for this fetch.
                text = token.decode("ascii") if isinstance(token, bytes) else token
                await state.introspector.introspect(text, now)
            return
        async with state.lock:
            if kind in ("keys", "kid"):
                await state.key_source.fetch()
            elif kind == "revocation":
                await state.fetch_revocations(time.monotonic())


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
