"""httpx clients for service-to-service calls: mTLS with the service's rotating
certificate, the server's SPIFFE ID checked, the inbound user token forwarded.

The expected ID is checked inside the TLS connection setup (a wrapped httpcore
network backend inspects the peer certificate right after the handshake), so a
server with the wrong identity is refused before any request byte, header,
token or body is sent to it. Each credential rotation starts a new connection
pool; the previous one is closed when its last in-flight response is closed.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Protocol

import httpcore
import httpx
from cryptography import x509

from trustmesh.context import inbound_token
from trustmesh.errors import ConfigError, SpiffeIDError, VerificationError
from trustmesh.pki import SpiffeID, match_spiffe_pattern, spiffe_id_of
from trustmesh.tls import RevocationLike, issuer_withdrawn

__all__ = [
    "AsyncMTLSTransport",
    "ClientCredentials",
    "MTLSTransport",
    "async_mtls_client",
    "mtls_client",
]

log = logging.getLogger("trustmesh.client")

#: httpx options the credentials decide, or that would bypass the checking transport.
_REFUSED = ("verify", "cert", "transport", "mounts", "proxy", "app")
#: Options that configure the connection pool rather than the client.
_POOL_OPTIONS = ("limits", "http1", "http2", "retries", "local_address", "socket_options")


class ClientCredentials(Protocol):
    """The service's own rotating identity (``trustmesh.tls.RotatingCredentials``)."""

    @property
    def generation(self) -> int: ...

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext: ...


class _Fixed:
    """Credentials that never rotate: one ready client context, used as it is."""

    generation = 0

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        return self._ctx


def _context_for(credentials: ClientCredentials, check: _PeerCheck) -> ssl.SSLContext:
    """The credentials' current client context. With ``expect_id`` the server is
    authenticated by its SPIFFE ID (checked after the handshake), as SPIFFE prescribes,
    so the hostname is not matched: agent-issued certificates name no host."""
    return credentials.client_context(check_hostname=check.expect_id is None)


class _PeerCheck:
    """Compare the server's SPIFFE ID with ``expect_id`` (exact, or a glob with ``*``),
    and refuse a revoked server certificate, or one signed by an intermediate the CA no
    longer publishes (retired by a rotation), when a revocation set is given.

    Public as ``trustmesh.client.PeerCheck``: call it with the connection's SSL object,
    host and port right after the handshake (``trustmesh.http1.Pool``'s ``check_peer``
    takes ``lambda obj: check(obj, host, port)``); it raises to refuse."""

    def __init__(self, expect_id: str | None, revocation: RevocationLike | None = None) -> None:
        self.expect_id = expect_id
        self.revocation = revocation
        if expect_id is None:
            log.warning("mtls client: expect_id=None, the server's SPIFFE ID is not checked")
            return
        if "*" not in expect_id:
            try:
                SpiffeID.parse(expect_id)
            except SpiffeIDError as exc:
                raise ConfigError(
                    f"expect_id {expect_id!r} is not a SPIFFE ID: {exc.message}",
                    field="expect_id",
                ) from None
        elif not expect_id.startswith("spiffe://"):
            raise ConfigError(
                f"expect_id {expect_id!r} is not a SPIFFE ID glob; give e.g. "
                f"spiffe://example.org/svc/*.",
                field="expect_id",
            )

    def __call__(self, ssl_object: Any, host: str, port: int) -> None:
        if self.expect_id is None and self.revocation is None:
            return
        # _ssl._SSLSocket (sync backend) takes the flag positionally only.
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
        where = f"{host}:{port}"
        if not der:
            raise httpcore.ConnectError(
                f"Refusing {where}: no server certificate to check against expect_id "
                f"{self.expect_id}."
            )
        try:
            leaf = x509.load_der_x509_certificate(der)
            found = spiffe_id_of(leaf)
        except (ValueError, VerificationError) as exc:
            raise httpcore.ConnectError(
                f"Refusing {where}: its certificate carries no single SPIFFE ID ({exc}); "
                f"expected {self.expect_id}."
            ) from None
        if self.revocation is not None and self.revocation.is_revoked(leaf.serial_number):
            log.warning(
                "mtls client: refused %s: the certificate of %s (serial %x) is revoked",
                where,
                found,
                leaf.serial_number,
            )
            raise httpcore.ConnectError(
                f"Refusing {where}: the certificate of {found} (serial "
                f"{leaf.serial_number:x}) is revoked."
            )
        if issuer_withdrawn(self.revocation, leaf):
            issuer = leaf.issuer.rfc4514_string()
            log.warning(
                "mtls client: refused %s: the certificate of %s (serial %x) was signed by %s, "
                "which the CA no longer publishes (issuer_retired)",
                where,
                found,
                leaf.serial_number,
                issuer,
            )
            raise httpcore.ConnectError(
                f"Refusing {where}: the certificate of {found} (serial "
                f"{leaf.serial_number:x}) was signed by {issuer}, an intermediate the CA no "
                f"longer publishes (retired by a rotation: issuer_retired). The server must "
                f"renew its certificate from the active intermediate (the trustmesh agent does)."
            )
        if self.expect_id is None:
            return
        ok = (
            match_spiffe_pattern(found, self.expect_id)
            if "*" in self.expect_id
            else found.uri == self.expect_id
        )
        if not ok:
            log.warning(
                "mtls client: refused %s: server is %s, expected %s", where, found, self.expect_id
            )
            raise httpcore.ConnectError(
                f"Refusing {where}: the server presented {found}, but this client expects "
                f"{self.expect_id}. Point the client at the right service or fix expect_id."
            )


class _CheckingStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, check: _PeerCheck, host: str, port: int):
        self._inner = inner
        self._check = check
        self._where = (host, port)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._check(tls.get_extra_info("ssl_object"), *self._where)
        except BaseException:
            tls.close()
            raise
        return tls

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _CheckingBackend(httpcore.NetworkBackend):
    def __init__(self, check: _PeerCheck) -> None:
        self._inner = httpcore.SyncBackend()
        self._check = check

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _CheckingStream(stream, self._check, host, port)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(path, timeout, socket_options)
        return _CheckingStream(stream, self._check, path, 0)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncCheckingStream(httpcore.AsyncNetworkStream):
    def __init__(
        self, inner: httpcore.AsyncNetworkStream, check: _PeerCheck, host: str, port: int
    ) -> None:
        self._inner = inner
        self._check = check
        self._where = (host, port)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._check(tls.get_extra_info("ssl_object"), *self._where)
        except BaseException:
            await tls.aclose()
            raise
        return tls

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _AsyncCheckingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, check: _PeerCheck) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._check = check

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncCheckingStream(stream, self._check, host, port)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _AsyncCheckingStream(stream, self._check, path, 0)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _pool_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    limits: httpx.Limits = options.get("limits", httpx.Limits())
    return {
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "http1": options.get("http1", True),
        "http2": options.get("http2", False),
        "retries": options.get("retries", 0),
        "local_address": options.get("local_address"),
        "socket_options": options.get("socket_options"),
    }


def _forward_token(request: httpx.Request, forward: bool) -> None:
    if forward and "authorization" not in request.headers:
        token = inbound_token.get()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"


class _Generation:
    """One connection pool for one credential generation, and its in-flight count."""

    def __init__(self, number: int, transport: Any) -> None:
        self.number = number
        self.transport = transport
        self.inflight = 0
        self.retired = False


class _Tracked(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, done: Callable[[], None]) -> None:
        self._stream = stream
        self._done: Callable[[], None] | None = done

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


class _AsyncTracked(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, done: Callable[[], Any]) -> None:
        self._stream = stream
        self._done: Callable[[], Any] | None = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            done, self._done = self._done, None
            if done is not None:
                await done()


class MTLSTransport(httpx.BaseTransport):
    """An httpx transport presenting the current credentials and checking the server's ID.

    Args:
        credentials: A ``RotatingCredentials`` (or anything with ``generation`` and
            ``client_context()``), or a fixed ``ssl.SSLContext``.
        expect_id: The server's SPIFFE ID, or a glob (``*`` within a segment,
            ``**`` across); None disables the check (logged).
        forward_token: Send the inbound user token (from the middleware) as
            ``Authorization: Bearer`` unless the request sets its own.
        revocation: Revoked serials (``trustmesh.tls.RevocationSet``): a server whose
            certificate is revoked, or signed by an intermediate the CA no longer
            publishes, is refused right after the handshake, like a wrong ID.
            Connections made before a revocation are not re-checked; start a new
            pool (rotate) to drop them.
        **pool_options: ``limits``, ``http1``, ``http2``, ``retries``,
            ``local_address``, ``socket_options`` as for ``httpx.HTTPTransport``.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        credentials: ClientCredentials | ssl.SSLContext,
        *,
        expect_id: str | None,
        forward_token: bool = True,
        revocation: RevocationLike | None = None,
        **pool_options: Any,
    ) -> None:
        self._credentials = (
            _Fixed(credentials) if isinstance(credentials, ssl.SSLContext) else credentials
        )
        self._check = _PeerCheck(expect_id, revocation)
        self._forward = forward_token
        self._pool_options = _pool_kwargs(pool_options)
        self._lock = threading.Lock()
        self._closed = False
        self._current = self._new_generation()

    def _new_generation(self) -> _Generation:
        number = self._credentials.generation
        ctx = _context_for(self._credentials, self._check)
        transport = httpx.HTTPTransport(verify=ctx)
        # httpx offers no network-backend option; its pool is replaced by an identical
        # one whose backend checks the server's SPIFFE ID right after the handshake.
        transport._pool = httpcore.ConnectionPool(
            ssl_context=ctx,
            network_backend=_CheckingBackend(self._check),
            **self._pool_options,
        )
        return _Generation(number, transport)

    def _acquire(self) -> _Generation:
        with self._lock:
            if self._closed:
                raise RuntimeError("The mTLS client is closed.")
            if self._credentials.generation != self._current.number:
                old = self._current
                self._current = self._new_generation()
                old.retired = True
                log.info(
                    "mtls client: credentials rotated (generation %d -> %d); new connection pool",
                    old.number,
                    self._current.number,
                )
                if old.inflight == 0:
                    old.transport.close()
            generation = self._current
            generation.inflight += 1
            return generation

    def _release(self, generation: _Generation) -> None:
        with self._lock:
            generation.inflight -= 1
            close = generation.retired and generation.inflight == 0
        if close:
            generation.transport.close()

    @property
    def generation(self) -> int:
        """The credential generation new requests use."""
        return self._current.number

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        _forward_token(request, self._forward)
        generation = self._acquire()
        try:
            response: httpx.Response = generation.transport.handle_request(request)
        except BaseException:
            self._release(generation)
            raise
        if not isinstance(response.stream, httpx.SyncByteStream):
            self._release(generation)
            raise TypeError("httpx.HTTPTransport returned a non-sync stream")
        response.stream = _Tracked(response.stream, lambda: self._release(generation))
        return response

    def close(self) -> None:
        with self._lock:
            self._closed = True
            current = self._current
        current.transport.close()


class AsyncMTLSTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of :class:`MTLSTransport` (same arguments).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        credentials: ClientCredentials | ssl.SSLContext,
        *,
        expect_id: str | None,
        forward_token: bool = True,
        revocation: RevocationLike | None = None,
        **pool_options: Any,
    ) -> None:
        self._credentials = (
            _Fixed(credentials) if isinstance(credentials, ssl.SSLContext) else credentials
        )
        self._check = _PeerCheck(expect_id, revocation)
        self._forward = forward_token
        self._pool_options = _pool_kwargs(pool_options)
        self._closed = False
        self._current = self._new_generation()

    def _new_generation(self) -> _Generation:
        number = self._credentials.generation
        ctx = _context_for(self._credentials, self._check)
        transport = httpx.AsyncHTTPTransport(verify=ctx)
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=ctx,
            network_backend=_AsyncCheckingBackend(self._check),
            **self._pool_options,
        )
        return _Generation(number, transport)

    async def _acquire(self) -> _Generation:
        # One event loop: no lock needed between the check and the swap (no await).
        if self._closed:
            raise RuntimeError("The mTLS client is closed.")
        old: _Generation | None = None
        if self._credentials.generation != self._current.number:
            old = self._current
            self._current = self._new_generation()
            old.retired = True
            log.info(
                "mtls client: credentials rotated (generation %d -> %d); new connection pool",
                old.number,
                self._current.number,
            )
        generation = self._current
        generation.inflight += 1
        if old is not None and old.inflight == 0:
            await old.transport.aclose()
        return generation

    async def _release(self, generation: _Generation) -> None:
        generation.inflight -= 1
        if generation.retired and generation.inflight == 0:
            await generation.transport.aclose()

    @property
    def generation(self) -> int:
        """The credential generation new requests use."""
        return self._current.number

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        _forward_token(request, self._forward)
        generation = await self._acquire()
        try:
            response: httpx.Response = await generation.transport.handle_async_request(request)
        except BaseException:
            await self._release(generation)
            raise
        if not isinstance(response.stream, httpx.AsyncByteStream):
            await self._release(generation)
            raise TypeError("httpx.AsyncHTTPTransport returned a non-async stream")
        response.stream = _AsyncTracked(response.stream, lambda: self._release(generation))
        return response

    async def aclose(self) -> None:
        self._closed = True
        await self._current.transport.aclose()


def _split_options(httpx_kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    refused = [k for k in _REFUSED if k in httpx_kwargs]
    if refused:
        raise TypeError(
            f"mtls_client() does not take {refused}: the TLS settings come from the "
            f"credentials, and another transport or proxy would bypass the server ID check."
        )
    pool = {k: httpx_kwargs.pop(k) for k in _POOL_OPTIONS if k in httpx_kwargs}
    # Proxies from the environment would be mounted beside our transport, unchecked.
    httpx_kwargs.setdefault("trust_env", False)
    return pool, httpx_kwargs


def mtls_client(
    credentials: ClientCredentials | ssl.SSLContext,
    *,
    expect_id: str | None,
    forward_token: bool = True,
    revocation: RevocationLike | None = None,
    **httpx_kwargs: Any,
) -> httpx.Client:
    """Return an ``httpx.Client`` for calling another service over mTLS.

    ::

        with mtls_client(creds, expect_id="spiffe://example.org/svc/inventory",
                         base_url="https://inventory:8443") as http:
            http.get("/items")

    Args:
        credentials: The service's ``RotatingCredentials`` (each rotation opens a
            new connection pool; the old one closes when its responses are done),
            or a fixed ``ssl.SSLContext``.
        expect_id: The SPIFFE ID (or glob) the server must present, checked on
            every new connection before anything is sent; None turns the check off
            (logged). With ``RotatingCredentials`` and an ``expect_id`` the SPIFFE ID
            is what authenticates the server, so its hostname is not matched
            (agent-issued certificates name no host); without ``expect_id`` it is.
            A fixed ``ssl.SSLContext`` is used as given.
        forward_token: Forward the inbound user token of the request being handled
            as ``Authorization: Bearer`` unless the request sets its own.
        revocation: Revoked serials (``trustmesh.tls.RevocationSet``); a server with
            a revoked certificate, or one signed by an intermediate the CA no longer
            publishes (``ca rotate ... retire``), is refused before anything is sent.
        **httpx_kwargs: For ``httpx.Client`` (``base_url``, ``timeout``,
            ``headers``...), plus pool options (``limits``, ``http2``, ``retries``).
            ``verify``, ``cert``, ``transport``, ``mounts`` and ``proxy`` are refused.

    Raises:
        ConfigError: ``expect_id`` is not a SPIFFE ID or glob.
        TypeError: An option that would bypass the checks.

    .. versionadded:: 0.1
    """
    pool, kwargs = _split_options(dict(httpx_kwargs))
    transport = MTLSTransport(
        credentials,
        expect_id=expect_id,
        forward_token=forward_token,
        revocation=revocation,
        **pool,
    )
    return httpx.Client(transport=transport, **kwargs)


def async_mtls_client(
    credentials: ClientCredentials | ssl.SSLContext,
    *,
    expect_id: str | None,
    forward_token: bool = True,
    revocation: RevocationLike | None = None,
    **httpx_kwargs: Any,
) -> httpx.AsyncClient:
    """Return an ``httpx.AsyncClient``; see :func:`mtls_client`.

    .. versionadded:: 0.1
    """
    pool, kwargs = _split_options(dict(httpx_kwargs))
    transport = AsyncMTLSTransport(
        credentials,
        expect_id=expect_id,
        forward_token=forward_token,
        revocation=revocation,
        **pool,
    )
    return httpx.AsyncClient(transport=transport, **kwargs)
