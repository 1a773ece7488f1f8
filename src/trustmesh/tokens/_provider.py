"""One issuer's HTTP side: the client, the endpoints discovery found, a request counter.

The key source, the revocation list and the introspection client of an issuer share
one :class:`ProviderHTTP`: one connection pool, one ``fetches`` count, and the
endpoints an OpenID Connect discovery document names (read at each key fetch).
"""

from __future__ import annotations

import httpx

from ._config import IssuerConfig
from ._json import NonStandardJSONError, loads

__all__ = ["MAX_DOCUMENT_BYTES", "FetchError", "ProviderHTTP"]

#: Discovery, JWKS, revocation and introspection answers larger than this are refused.
MAX_DOCUMENT_BYTES = 512 * 1024


class FetchError(Exception):
    """A provider document could not be fetched or used (logged, never raised to callers)."""


class ProviderHTTP:
    """Fetch an issuer's JSON documents over HTTPS, and remember its endpoints."""

    def __init__(self, config: IssuerConfig) -> None:
        self.config = config
        self.issuer = config.issuer
        self.jwks_url = config.jwks_url
        self.revocation_url = config.revocation_list_url
        self.introspection_url = config.introspection.url if config.introspection else None
        self.client: httpx.AsyncClient | None = None
        self.fetches = 0

    def apply_discovery(self, doc: object) -> None:
        url = self.config.discovery_url
        if not isinstance(doc, dict):
            raise FetchError(f"{url} is not a JSON object")
        if doc.get("issuer") != self.issuer:
            # OpenID Connect Discovery §4.3: the issuer must match exactly.
            raise FetchError(f"{url} names issuer {doc.get('issuer')!r}, expected {self.issuer!r}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not self._usable(jwks_uri):
            raise FetchError(f"{url} has no usable https jwks_uri ({jwks_uri!r})")
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

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            timeout = self.config.http_timeout.total_seconds()
            self.client = httpx.AsyncClient(
                verify=self.config.client_ssl_context(),
                timeout=timeout,
                follow_redirects=False,
                trust_env=False,
                headers={"Accept": "application/json", "User-Agent": "trustmesh-tokens"},
            )
        return self.client

    async def get_json(
        self,
        url: str,
        *,
        data: dict[str, str] | None = None,
        auth: httpx.BasicAuth | None = None,
    ) -> object:
        """GET ``url`` (POST ``data`` when given) and parse the JSON answer.

        Raises:
            FetchError: Not HTTP 200, over :data:`MAX_DOCUMENT_BYTES`, not JSON, or
                the request failed.
        """
        client = self._client()
        self.fetches += 1
        method = "POST" if data is not None else "GET"
        try:
            request = client.build_request(method, url, data=data)
            response = await client.send(request, auth=auth, stream=True)
            try:
                if response.status_code != 200:
                    raise FetchError(f"{url} answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise FetchError(f"{url} sent more than {MAX_DOCUMENT_BYTES} bytes")
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            return loads(body)
        except NonStandardJSONError as exc:
            raise FetchError(f"{url} did not send JSON: {exc}") from exc
        except ValueError as exc:
            raise FetchError(f"{url} did not send JSON") from exc

    async def aclose(self) -> None:
        """Close the connections to the provider (a later fetch opens new ones)."""
        if self.client is not None:
            await self.client.aclose()
            self.client = None
