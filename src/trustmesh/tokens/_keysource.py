"""Where an issuer's signing keys come from: the JWKS, fetched, cached and refetched.

The verifier asks a :class:`KeySource` only three things (the keys it holds, whether
they are due, whether a fetch is allowed now) and calls :meth:`KeySource.fetch`
under the issuer's lock when it needs more; how the keys are found (discovery, the
JWKS URL), how long they are kept and how often they may be refetched lives here.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from ._keys import KeySet, load_jwks
from ._provider import FetchError, ProviderHTTP

__all__ = ["JWKSKeySource", "KeySource"]

log = logging.getLogger("trustmesh.tokens")


class KeySource(Protocol):
    """An issuer's verification keys, as the checks see them."""

    @property
    def keys(self) -> KeySet | None:
        """The keys in use (``None`` until a fetch succeeded)."""

    @property
    def generation(self) -> int:
        """Bumped when a key went away: tokens it verified must be verified again."""

    @property
    def failed(self) -> bool:
        """The last fetch failed: an unknown kid may then be a rotated-in key."""

    @property
    def min_refetch(self) -> float:
        """Seconds between two fetches at least (named in refusals)."""

    def due(self, mono: float) -> bool:
        """The keys are missing or older than their maximum age."""

    def can_fetch(self, mono: float) -> bool:
        """A fetch now would not break the refetch rate limit."""

    async def fetch(self) -> None:
        """Fetch the keys now if the rate limit allows (never raises)."""


class JWKSKeySource:
    """The keys of an issuer's JWKS (found by discovery when configured so).

    Kept for ``jwks_max_age``; fetched at most every ``jwks_min_refetch_interval``
    (an unknown kid or an expired set triggers a fetch); a failed fetch keeps the
    keys we have (stale-if-error) and never caches an empty or broken set.
    """

    def __init__(self, http: ProviderHTTP) -> None:
        config = http.config
        self._http = http
        self.max_age = config.jwks_max_age.total_seconds()
        self.min_refetch = config.jwks_min_refetch_interval.total_seconds()
        self.keys: KeySet | None = None
        self.fetched_at = 0.0
        self.attempt: float | None = None
        self.failed = False
        self.generation = 0

    def due(self, mono: float) -> bool:
        return self.keys is None or mono - self.fetched_at >= self.max_age

    def can_fetch(self, mono: float) -> bool:
        return self.attempt is None or mono - self.attempt >= self.min_refetch

    def apply(self, keyset: KeySet, mono: float) -> None:
        old = self.keys
        if old is not None and old.material - keyset.material:
            # A key went away (rotated out, or withdrawn after a compromise, perhaps
            # under the same kid): tokens it verified must be verified again.
            self.generation += 1
        self.failed = False
        self.keys = keyset
        self.fetched_at = mono

    async def fetch(self) -> None:
        mono = time.monotonic()
        if not self.can_fetch(mono):
            return  # rate limit: someone else just fetched, or the provider is failing
        self.attempt = mono
        http = self._http
        try:
            discovery = http.config.discovery_url
            if discovery is not None:
                try:
                    http.apply_discovery(await http.get_json(discovery))
                except FetchError as exc:
                    if http.jwks_url is None:
                        raise
                    log.warning(
                        "tokens: issuer %s: discovery failed (%s); using the JWKS URL found before",
                        http.issuer,
                        exc,
                    )
            url = http.jwks_url
            assert url is not None  # noqa: S101 - configured or discovered
            keyset = load_jwks(await http.get_json(url), source=url)
        except (FetchError, ValueError) as exc:
            # Stale-if-error: the keys we have stay in use; an empty or broken set is
            # never cached.
            self.failed = True
            cached = len(self.keys) if self.keys is not None else 0
            log.warning(
                "tokens: issuer %s: keys not refreshed (%s); %d cached key(s) stay in use, "
                "next try in %g s",
                http.issuer,
                exc,
                cached,
                self.min_refetch,
            )
            return
        self.apply(keyset, time.monotonic())
