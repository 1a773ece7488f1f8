"""One trusted issuer: its claim rules, key source, introspection client, revocation list.

:class:`IssuerState` is what the verifier keeps per issuer. It satisfies
:class:`~._rules.IssuerRules` for the claim checks, holds the
:class:`~._keysource.KeySource` and the :class:`~._introspection.Introspector`,
and polls the issuer's revocation list itself (a document that only says which
``jti`` are revoked).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ._config import IssuerConfig
from ._introspection import IntrospectionClient, Introspector
from ._keysource import JWKSKeySource, KeySource
from ._provider import FetchError, ProviderHTTP
from ._rules import introspected_claims, is_date

__all__ = ["IssuerState"]

log = logging.getLogger("trustmesh.tokens")


class IssuerState:
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
                to_claims=lambda doc, now: introspected_claims(self, doc, now),
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
            expiry = float(exp) if is_date(exp) else now + self.max_lifetime  # type: ignore[arg-type]
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
