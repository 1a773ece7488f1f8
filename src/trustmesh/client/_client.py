"""Calling the CA's HTTP API: bundle, enroll, renew and revoke, sync and async.

The client verifies the CA server against a trust bundle the caller already holds (the
CA's root from ``trustmesh export bundle``), never against the system store, and
presents a workload identity for the routes that need one (renew, revoke). Failures
become one of two exceptions: :class:`~trustmesh.errors.TransportError` when the server
could not be reached or the TLS handshake failed, and :class:`~trustmesh.errors.APIError`
when it answered with an error (its problem document is kept on the exception).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh import __version__
from trustmesh.errors import APIError, ConfigError, TransportError
from trustmesh.pki import format_duration
from trustmesh.tls import client_context

__all__ = ["DEFAULT_TIMEOUT", "AsyncCAClient", "CAClient", "EnrollResult", "check_ca_url"]

#: Seconds to wait for the CA to connect, send or answer.
DEFAULT_TIMEOUT = 10.0

_USER_AGENT = f"trustmesh/{__version__}"
_PROBLEM_TYPES = ("application/problem+json", "application/json")


@dataclass(frozen=True, slots=True)
class EnrollResult:
    """A certificate the CA issued by enrollment or renewal.

    Attributes:
        spiffe_id: The identity the certificate carries.
        serial: Its serial number (lower-case hex).
        not_after: When it expires (timezone-aware UTC).
        certificate: The leaf, PEM.
        chain: The leaf followed by the intermediate, PEM: what TLS presents.
        bundle: The trust anchors, PEM: what peers are verified against.

    .. versionadded:: 0.1
    """

    spiffe_id: str
    serial: str
    not_after: datetime
    certificate: str
    chain: str
    bundle: str

    @classmethod
    def from_json(cls, data: object) -> EnrollResult:
        """Build a result from the API's JSON body.

        Raises:
            ValueError: A field is missing or has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise ValueError("the body is not a JSON object")
        names = ("spiffe_id", "serial", "not_after", "certificate", "chain", "bundle")
        missing = [n for n in names if not isinstance(data.get(n), str) or not data.get(n)]
        if missing:
            raise ValueError(f"missing or non-string field(s) {missing}")
        not_after = datetime.fromisoformat(str(data["not_after"]).replace("Z", "+00:00"))
        if not_after.tzinfo is None:
            not_after = not_after.replace(tzinfo=UTC)
        return cls(
            spiffe_id=str(data["spiffe_id"]),
            serial=str(data["serial"]),
            not_after=not_after.astimezone(UTC),
            certificate=str(data["certificate"]),
            chain=str(data["chain"]),
            bundle=str(data["bundle"]),
        )


def check_ca_url(url: str) -> str:
    """Return the CA's base URL without a trailing slash, or refuse it.

    Args:
        url: ``https://HOST[:PORT][/PREFIX]``.

    Raises:
        ConfigError: Not an https URL with a host, or with a query or fragment.
    """
    fix = "Give the CA's https URL, e.g. https://ca.internal:8443."
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"CA URL {url!r} is not a valid URL. {fix}", field="ca") from None
    if parts.scheme != "https":
        raise ConfigError(
            f"CA URL {url!r} must use https (got {parts.scheme or 'no scheme'!r}). {fix}",
            field="ca",
        )
    if not parts.hostname or parts.query or parts.fragment or parts.username:
        raise ConfigError(
            f"CA URL {url!r} must name a host and have no user, query or fragment. {fix}",
            field="ca",
        )
    return url.rstrip("/")


def _ssl_context(
    bundle: Path | str,
    cert_dir: Path | None,
    cert: Path | None,
    key: Path | None,
) -> ssl.SSLContext:
    if cert_dir is not None and (cert is not None or key is not None):
        raise ValueError("give cert_dir or cert/key, not both")
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together")
    if cert_dir is not None:
        cert, key = cert_dir / "chain.pem", cert_dir / "key.pem"
    bundle_path = Path(bundle)
    try:
        ctx = client_context(cafile=bundle_path)
    except (OSError, ssl.SSLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no PEM certificate"
        raise ConfigError(
            f"Cannot load the CA trust bundle {bundle_path}: {why}. Pass the CA's root "
            f"certificate as PEM (from 'trustmesh export bundle').",
            path=str(bundle_path),
        ) from None
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(
                f"Cannot load the client identity {cert} / {key}: {why}. Pass the "
                f"certificate chain (leaf + intermediate, e.g. chain.pem) and its key.",
                path=str(cert),
            ) from None
    return ctx


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "no details"


def _transport_error(
    exc: httpx.TransportError, url: str, bundle: Path, identity: bool, timeout: float
) -> TransportError:
    cause = _ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return TransportError(
            f"The CA at {url} failed TLS verification ({_one_line(cause.verify_message or '')}): "
            f"check that {bundle} holds this CA's root ('trustmesh export bundle') and that "
            f"the URL names a host in the server's certificate (localhost or its address).",
            url=url,
        )
    if cause is not None and "alert" in str(cause).lower() and identity:
        return TransportError(
            f"The CA at {url} refused our client certificate in the TLS handshake "
            f"({_one_line(cause.reason or str(cause))}): an expired or foreign certificate "
            f"cannot renew; enroll again with a new join token.",
            url=url,
        )
    if identity and isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        # With TLS 1.3 the server checks the client certificate after the client
        # considers the handshake done: a refusal shows up as a closed connection.
        return TransportError(
            f"The CA at {url} closed the connection without answering "
            f"({_one_line(str(exc) or type(exc).__name__)}): most likely it refused our "
            f"client certificate (expired, or not issued by this CA); enroll again with a "
            f"new join token, or check the CA's log.",
            url=url,
        )
    if isinstance(exc, httpx.TimeoutException):
        return TransportError(
            f"The CA at {url} did not answer within {timeout:g}s: check that "
            f"'trustmesh ca serve' is running and reachable there.",
            url=url,
        )
    return TransportError(
        f"Cannot reach the CA at {url} ({_one_line(str(exc) or type(exc).__name__)}): check "
        f"that 'trustmesh ca serve' is running there and that the URL is right.",
        url=url,
    )


def _problem(response: httpx.Response) -> dict[str, str | int | None]:
    media = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in _PROBLEM_TYPES:
        return {}
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(body, dict):
        return {}
    return {str(k): v for k, v in body.items() if v is None or isinstance(v, str | int)}


def _api_error(response: httpx.Response, what: str) -> APIError:
    problem = _problem(response)
    detail = problem.get("detail")
    if isinstance(detail, str) and detail:
        message = _one_line(detail)
    else:
        message = (
            f"The CA answered {response.status_code} {response.reason_phrase} to {what}: "
            f"check the CA's log."
        )
    return APIError(message, status=response.status_code, problem=problem)


def _json(response: httpx.Response, what: str) -> Any:
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        raise APIError(
            f"The CA answered {what} with a body that is not JSON: check that the URL points "
            f"at 'trustmesh ca serve'.",
            status=response.status_code,
        ) from None


def _enroll_result(response: httpx.Response, what: str) -> EnrollResult:
    try:
        return EnrollResult.from_json(_json(response, what))
    except ValueError as exc:
        raise APIError(
            f"The CA's answer to {what} is not a certificate ({exc}): check that the URL "
            f"points at 'trustmesh ca serve' of a matching version.",
            status=response.status_code,
        ) from None


def _revoke_body(serial: str | None, spiffe_id: str | None, reason: str) -> dict[str, str]:
    if (serial is None) == (spiffe_id is None):
        raise ValueError("give exactly one of serial or spiffe_id")
    body = {"reason": reason}
    if serial is not None:
        body["serial"] = serial
    else:
        body["spiffe_id"] = str(spiffe_id)
    return body


def _revoked(response: httpx.Response) -> list[dict[str, Any]]:
    data = _json(response, "revoke")
    records = data.get("revoked") if isinstance(data, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise APIError(
            "The CA's answer to revoke has no 'revoked' list: check that the URL points at "
            "'trustmesh ca serve' of a matching version.",
            status=response.status_code,
        )
    return records


def _csr_body(csr_pem: bytes | str, ttl: str | timedelta | None, **extra: str) -> dict[str, str]:
    body = {**extra, "csr": csr_pem.decode() if isinstance(csr_pem, bytes) else csr_pem}
    if ttl is not None:
        body["ttl"] = format_duration(ttl) if isinstance(ttl, timedelta) else ttl
    return body


def _dated(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add a ``Date`` header (RFC 9110 section 6.6.1): the CA warns when our clock is off."""
    headers = {**(kwargs.get("headers") or {}), "date": formatdate(usegmt=True)}
    return {**kwargs, "headers": headers}


class _Base:
    def __init__(
        self,
        base_url: str,
        *,
        bundle: Path | str,
        cert_dir: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = check_ca_url(base_url)
        self.bundle_path = Path(bundle)
        self.timeout = timeout
        self._identity = cert_dir is not None or cert is not None
        self._ssl = _ssl_context(bundle, cert_dir, cert, key)

    def _client_options(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "verify": self._ssl,
            "timeout": self.timeout,
            # Calls to the CA never go through proxies picked up from the environment.
            "trust_env": False,
            "headers": {"user-agent": _USER_AGENT, "accept": "application/json"},
        }

    def _fail(self, exc: httpx.TransportError) -> TransportError:
        return _transport_error(exc, self.base_url, self.bundle_path, self._identity, self.timeout)

    @staticmethod
    def _check(response: httpx.Response, what: str) -> httpx.Response:
        if response.is_success:
            return response
        raise _api_error(response, what)


class CAClient(_Base):
    """A synchronous client of the CA API (``trustmesh ca serve``).

    Args:
        base_url: The CA's URL, e.g. ``https://ca.internal:8443``.
        bundle: PEM file of the CA's trust anchors, used to verify the server.
        cert_dir: Directory holding ``chain.pem`` and ``key.pem``: the identity
            presented over mTLS for :meth:`renew` and :meth:`revoke`.
        cert: Or the chain file (leaf + intermediate) itself, with ``key``.
        key: The private key of ``cert``.
        timeout: Seconds for connecting, sending and reading.

    Raises:
        ConfigError: The URL is not https, or the bundle or identity cannot be loaded.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        base_url: str,
        *,
        bundle: Path | str,
        cert_dir: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(
            base_url, bundle=bundle, cert_dir=cert_dir, cert=cert, key=key, timeout=timeout
        )
        self._http = httpx.Client(**self._client_options())

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **_dated(kwargs))
        except httpx.TransportError as exc:
            raise self._fail(exc) from exc
        return self._check(response, what)

    def bundle(self) -> bytes:
        """Return the CA's trust bundle (PEM).

        Raises:
            TransportError: The CA could not be reached.
            APIError: The CA answered with an error.
        """
        return self._request("GET", "/v1/bundle", "bundle").content

    def enroll(
        self, token: str, csr_pem: bytes | str, *, ttl: str | timedelta | None = None
    ) -> EnrollResult:
        """Trade a join token and a CSR for a first certificate.

        Args:
            token: The join token from ``trustmesh token create``.
            csr_pem: A PEM CSR carrying exactly the SPIFFE ID as URI SAN.
            ttl: Lifetime to ask for, e.g. ``"1h"`` (default: the profile's).

        Raises:
            TransportError: The CA could not be reached.
            APIError: The CA refused (used, expired or foreign token, bad CSR...).
        """
        body = _csr_body(csr_pem, ttl, token=token)
        response = self._request("POST", "/v1/enroll", "enroll", json=body)
        return _enroll_result(response, "enroll")

    def renew(self, csr_pem: bytes | str, *, ttl: str | timedelta | None = None) -> EnrollResult:
        """Renew the identity this client presents, for the CSR's new key.

        Args:
            csr_pem: A PEM CSR for a new key, carrying the same SPIFFE ID.
            ttl: Lifetime to ask for, e.g. ``"1h"`` (default: the profile's).

        Raises:
            TransportError: The CA could not be reached or refused the client
                certificate in the handshake (expired, foreign CA).
            APIError: The CA refused (revoked, identity change, same key...).
        """
        body = _csr_body(csr_pem, ttl)
        response = self._request("POST", "/v1/renew", "renew", json=body)
        return _enroll_result(response, "renew")

    def revoke(
        self,
        serial: str | None = None,
        spiffe_id: str | None = None,
        *,
        reason: str = "unspecified",
    ) -> list[dict[str, Any]]:
        """Revoke a certificate by serial, or every valid one of an identity.

        The caller must be an admin identity, or the holder of the certificate.

        Returns:
            The revoked certificate records (JSON objects).

        Raises:
            ValueError: Neither or both of ``serial`` and ``spiffe_id`` were given.
            TransportError: The CA could not be reached.
            APIError: The CA refused (not the holder or an admin, unknown serial...).
        """
        body = _revoke_body(serial, spiffe_id, reason)
        response = self._request("POST", "/v1/revoke", "revoke", json=body)
        return _revoked(response)

    def ssl_context(self) -> ssl.SSLContext:
        """The client context this client calls the CA with (its identity, if any)."""
        return self._ssl

    def spiffe_bundle(self) -> dict[str, Any]:
        """Return the SPIFFE bundle document (JWKS of X.509 roots and JWT-SVID keys).

        Raises:
            TransportError, APIError: As for :meth:`bundle`.
        """
        response = self._request("GET", "/v1/bundle", "bundle", params={"format": "spiffe"})
        data = _json(response, "bundle")
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise APIError(
                "The CA's SPIFFE bundle has no 'keys' list: check the CA's version.",
                status=response.status_code,
            )
        return data

    def crl(self) -> bytes:
        """Return the CA's current CRL (DER)."""
        return self._request("GET", "/v1/crl", "crl").content

    def crl_chain(self) -> list[bytes]:
        """Return the CRLs of the whole chain, DER: the leaf CRL, then the root-signed one.

        .. versionadded:: 0.1

        Raises:
            TransportError: The CA could not be reached.
            APIError: The CA refused (503: no valid root CRL) or the answer is not PEM CRLs.
        """
        response = self._request(
            "GET", "/v1/crl/chain", "chain CRL", headers={"accept": "application/x-pem-file"}
        )
        marker = b"-----BEGIN X509 CRL-----"
        try:
            crls = [
                x509.load_pem_x509_crl(marker + part) for part in response.content.split(marker)[1:]
            ]
        except ValueError:
            crls = []
        if not crls:
            raise APIError(
                "The CA's /v1/crl/chain is not PEM CRLs: check the CA's version.",
                status=response.status_code,
            )
        return [crl.public_bytes(serialization.Encoding.DER) for crl in crls]

    def entries(self) -> list[dict[str, Any]]:
        """Return the registration entries of the node this client presents (mTLS).

        Raises:
            TransportError: The CA could not be reached.
            APIError: The CA refused (no or a revoked identity...).
        """
        data = _json(self._request("GET", "/v1/entries", "list entries"), "list entries")
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise APIError(
                "The CA's answer to list entries has no 'entries' list: check the CA's version.",
                status=200,
            )
        return entries

    def entry_svid(self, entry_id: str, csr_pem: bytes | str) -> EnrollResult:
        """Obtain an X.509-SVID for one of this node's registration entries (mTLS).

        Raises:
            TransportError: The CA could not be reached.
            APIError: The CA refused (another node's entry, wrong ID in the CSR...).
        """
        body = _csr_body(csr_pem, None, entry_id=entry_id)
        response = self._request("POST", "/v1/entries/svid", "entry SVID", json=body)
        return _enroll_result(response, "entry SVID")

    def entry_jwt_svid(self, entry_id: str, audience: list[str]) -> tuple[str, datetime]:
        """Obtain a JWT-SVID for one of this node's entries; return it and its expiry.

        Raises:
            TransportError: The CA could not be reached.
            APIError: The CA refused.
        """
        body = {"entry_id": entry_id, "audience": audience}
        response = self._request("POST", "/v1/entries/jwt-svid", "JWT-SVID", json=body)
        data = _json(response, "JWT-SVID")
        token = data.get("token") if isinstance(data, dict) else None
        expires = data.get("expires_at") if isinstance(data, dict) else None
        if not isinstance(token, str) or not isinstance(expires, str):
            raise APIError(
                "The CA's answer to JWT-SVID has no token: check the CA's version.",
                status=response.status_code,
            )
        when = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return token, when


class AsyncCAClient(_Base):
    """The asynchronous twin of :class:`CAClient` (same arguments, same methods).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        base_url: str,
        *,
        bundle: Path | str,
        cert_dir: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(
            base_url, bundle=bundle, cert_dir=cert_dir, cert=cert, key=key, timeout=timeout
        )
        self._http = httpx.AsyncClient(**self._client_options())

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **_dated(kwargs))
        except httpx.TransportError as exc:
            raise self._fail(exc) from exc
        return self._check(response, what)

    async def bundle(self) -> bytes:
        """Return the CA's trust bundle (PEM). See :meth:`CAClient.bundle`."""
        return (await self._request("GET", "/v1/bundle", "bundle")).content

    async def enroll(
        self, token: str, csr_pem: bytes | str, *, ttl: str | timedelta | None = None
    ) -> EnrollResult:
        """Trade a join token and a CSR for a certificate. See :meth:`CAClient.enroll`."""
        body = _csr_body(csr_pem, ttl, token=token)
        response = await self._request("POST", "/v1/enroll", "enroll", json=body)
        return _enroll_result(response, "enroll")

    async def renew(
        self, csr_pem: bytes | str, *, ttl: str | timedelta | None = None
    ) -> EnrollResult:
        """Renew the presented identity. See :meth:`CAClient.renew`."""
        body = _csr_body(csr_pem, ttl)
        response = await self._request("POST", "/v1/renew", "renew", json=body)
        return _enroll_result(response, "renew")

    async def revoke(
        self,
        serial: str | None = None,
        spiffe_id: str | None = None,
        *,
        reason: str = "unspecified",
    ) -> list[dict[str, Any]]:
        """Revoke by serial or identity. See :meth:`CAClient.revoke`."""
        body = _revoke_body(serial, spiffe_id, reason)
        response = await self._request("POST", "/v1/revoke", "revoke", json=body)
        return _revoked(response)
