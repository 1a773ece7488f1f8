"""The introspection client (RFC 7662): ask the issuer about opaque tokens, keep its answers.

The verifier looks an opaque token up with :meth:`Introspector.answer` (no I/O) and,
when there is no answer yet, calls :meth:`Introspector.introspect`. Turning the
issuer's answer into claims is a claim rule, so the verifier hands the client that
function; the client keeps what it returned (claims, or the refusal) for
``cache_ttl``, never past the token's ``exp``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httpx

from ._cache import evict_oldest
from ._claims import AccessTokenClaims
from ._config import IntrospectionConfig
from ._errors import InvalidTokenError, TokenVerifierUnavailableError
from ._provider import FetchError, ProviderHTTP

__all__ = ["IntrospectionAnswer", "IntrospectionClient", "Introspector"]

log = logging.getLogger("trustmesh.tokens")

#: Turns an introspection answer (parsed JSON) into claims at ``now``, or refuses.
ToClaims = Callable[[object, float], AccessTokenClaims]


@dataclass(slots=True)
class IntrospectionAnswer:
    """What the issuer said about one token: its claims, or why it is refused."""

    claims: AccessTokenClaims | None
    refusal: InvalidTokenError | None
    valid_until: float


class Introspector(Protocol):
    """Introspection of opaque tokens, as the checks see it."""

    @property
    def url(self) -> str | None:
        """The introspection endpoint (``None`` until configured or discovered)."""

    def answer(self, token: str, now: float) -> IntrospectionAnswer | None:
        """The cached answer for ``token`` still valid at ``now`` (no I/O)."""

    async def introspect(self, token: str, now: float) -> None:
        """Ask the issuer about ``token`` and cache the answer.

        Raises:
            TokenVerifierUnavailableError: The endpoint could not be asked.
        """


class IntrospectionClient:
    """Introspect at the issuer's endpoint with the resource server's credentials."""

    def __init__(
        self,
        http: ProviderHTTP,
        settings: IntrospectionConfig,
        *,
        leeway: float,
        to_claims: ToClaims,
    ) -> None:
        self._http = http
        self._settings = settings
        self._leeway = leeway
        self._to_claims = to_claims
        self._answers: dict[bytes, IntrospectionAnswer] = {}

    @property
    def url(self) -> str | None:
        return self._http.introspection_url

    def answer(self, token: str, now: float) -> IntrospectionAnswer | None:
        digest = hashlib.sha256(token.encode()).digest()
        entry = self._answers.get(digest)
        if entry is not None and now > entry.valid_until:
            self._answers.pop(digest, None)
            entry = None
        return entry

    async def introspect(self, token: str, now: float) -> None:
        settings = self._settings
        http = self._http
        url = http.introspection_url
        if url is None or not token:
            return
        digest = hashlib.sha256(token.encode()).digest()
        if digest in self._answers:
            return
        try:
            doc = await http.get_json(
                url,
                data={"token": token, "token_type_hint": "access_token"},
                auth=httpx.BasicAuth(settings.client_id, settings.client_secret),
            )
        except FetchError as exc:
            log.warning("tokens: issuer %s: introspection failed (%s)", http.issuer, exc)
            raise TokenVerifierUnavailableError(
                "introspection_unavailable",
                f"Introspection at {url} failed, so the opaque token cannot be checked. "
                f"Check the provider and the resource server's credentials.",
                issuer=http.issuer,
            ) from None
        ttl = settings.cache_ttl.total_seconds()
        try:
            claims = self._to_claims(doc, now)
            entry = IntrospectionAnswer(
                claims, None, min(now + ttl, claims.expires_at + self._leeway)
            )
        except InvalidTokenError as exc:
            entry = IntrospectionAnswer(None, exc, now + ttl)
        if len(self._answers) >= settings.cache_size:
            evict_oldest(self._answers)
        self._answers[digest] = entry
