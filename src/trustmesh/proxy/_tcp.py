"""The byte-pipe sidecars: ``proxy inbound`` in TCP mode and ``proxy outbound``.

Inbound: accept TCP, complete the mTLS handshake (client certificate required, the
current credentials), check the caller (trust domain, revocation, an issuer the CA still
publishes, the callers-only policy), connect to the app, send the PROXY v2 header, then
pipe. Outbound: accept plain TCP on loopback, open mTLS to the service with the current
client credentials, check the server's SPIFFE ID, revocation and issuer right after the
handshake, then pipe. Nothing reaches the other side before its checks passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable

from trustmesh.addresses import parse_listen
from trustmesh.errors import TrustmeshError, VerificationError
from trustmesh.pki import match_spiffe_pattern
from trustmesh.tls import handshake_refusal_reason, issuer_withdrawn

from ._callers import CallerRules
from ._proxy_protocol import TLSInfo, proxy_v2_header
from ._sidecar import (
    Connection,
    InboundSettings,
    OutboundSettings,
    PeerIdentity,
    Sidecar,
    Tracker,
    parse_target,
    peer_identity,
)

__all__ = ["serve_inbound_tcp", "serve_outbound"]

log = logging.getLogger("trustmesh.proxy")

#: Seconds a TLS handshake may take.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds to connect to the app or the upstream service.
CONNECT_TIMEOUT = 10.0
#: Bytes read per step; a full buffer on the other side pauses reading (backpressure).
CHUNK = 64 * 1024
#: Seconds a TLS close waits for the peer's close_notify.
CLOSE_NOTIFY_TIMEOUT = 2.0
#: After a client's half-close toward TLS: seconds of server silence that end its answer.
HALF_CLOSE_IDLE = 5.0

_Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _address(writer: asyncio.StreamWriter, name: str) -> tuple[str, int]:
    info = writer.get_extra_info(name)
    return (str(info[0]), int(info[1])) if isinstance(info, tuple) else ("0.0.0.0", 0)  # noqa: S104


def _certificate_refusal(
    sidecar: Sidecar, peer: PeerIdentity, whose: str
) -> tuple[str, str] | None:
    """(reason, detail) when the revocation set refuses ``peer``'s certificate: its serial
    is revoked (or the set fails closed), or it was signed by an intermediate the CA no
    longer publishes (retired by ``ca rotate ... retire``); None when it may pass."""
    if sidecar.revocation is None:
        return None
    cert = peer.certificate
    serial = cert.serial_number
    if sidecar.revocation.is_revoked(serial):
        return "revoked", f"{whose} {serial:x} of {peer.spiffe_id} is revoked"
    if issuer_withdrawn(sidecar.revocation, cert):
        return "issuer_retired", (
            f"{whose} {serial:x} of {peer.spiffe_id} was signed by "
            f"{cert.issuer.rfc4514_string()}, an intermediate the CA no longer publishes "
            f"(retired by a rotation); it must renew from the active one"
        )
    return None


def _shown(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    count: Callable[[int], None],
) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            return
        writer.write(data)
        count(len(data))
        await writer.drain()


async def _relay(
    tracker: Tracker,
    conn: Connection,
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Pipe both ways until one side is done.

    The server finishing, an error, or :meth:`Connection.close` ends both directions.
    The client finishing its sending is passed on as a half-close where the transport
    can (plain TCP); toward TLS, which cannot half-close here, the connection ends at
    once when the server has already answered the client's last bytes, and otherwise
    once the server's answer ends (it closes, or stays silent for
    :data:`HALF_CLOSE_IDLE` seconds).
    """
    up = asyncio.ensure_future(
        _pipe(client[0], server[1], lambda n: tracker.count(conn, received=n))
    )
    down = asyncio.ensure_future(_pipe(server[0], client[1], lambda n: tracker.count(conn, sent=n)))

    def close() -> None:
        up.cancel()
        down.cancel()

    conn.closer = close
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if up.done() and not up.cancelled() and up.exception() is None and not down.done():
            if server[1].can_write_eof():
                with contextlib.suppress(OSError):
                    server[1].write_eof()
                await asyncio.wait({down})
            elif conn.last_in > conn.last_out:  # a request is outstanding
                while not down.done():
                    await asyncio.wait({down}, timeout=HALF_CLOSE_IDLE)
                    if time.monotonic() - conn.last_activity >= HALF_CLOSE_IDLE:
                        break
        for task in (up, down):
            if task.done() and not task.cancelled():
                error = task.exception()
                if error is not None and conn.close_reason is None:
                    conn.close_reason = f"error: {handshake_refusal_reason(error)}"
    finally:
        close()
        await asyncio.gather(up, down, return_exceptions=True)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 2)


async def _handshake(
    tracker: Tracker,
    conn: Connection,
    writer: asyncio.StreamWriter,
    context: ssl.SSLContext,
) -> bool:
    start = time.perf_counter()
    try:
        await writer.start_tls(context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
    except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as exc:
        reason = handshake_refusal_reason(exc)
        tracker.refused(conn, "handshake_failed", reason)
        return False
    tracker.metrics.handshake.labels(conn.mode).observe(time.perf_counter() - start)
    return True


def _handler(
    tracker: Tracker,
    mode: str,
    body: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter, Connection, tuple[str, int]],
        Awaitable[None],
    ],
) -> _Handler:
    """Wrap ``body`` with the connection's bookkeeping: tracked, and closed at the end."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = _address(writer, "peername")
        conn = Connection(mode, _shown(source))
        tracker.opened(conn)
        conn.closer = writer.close
        try:
            await body(reader, writer, conn, source)
        except Exception:  # a bug must cost one connection, loudly, not the listener
            conn.close_reason = "internal_error"
            log.exception(
                "%s connection %s failed",
                mode,
                conn.id,
                extra={"event": "proxy_connection_failed", "connection": conn.id},
            )
        finally:
            await _close(writer)
            tracker.closed(conn)

    return handle


async def _serve(
    sidecar: Sidecar,
    tracker: Tracker,
    handler: _Handler,
    ready: Callable[[str], None] | None,
    description: str,
) -> None:
    """Accept with ``handler`` until SIGTERM/SIGINT, then drain."""
    host, port = parse_listen(sidecar.settings.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        server = await asyncio.start_server(handler, host, port, backlog=1024)
    except OSError as exc:
        raise TrustmeshError(
            f"trustmesh proxy could not listen on {sidecar.settings.listen} "
            f"({exc.strerror or exc}): is the port in use? Pick another --listen."
        ) from None
    watchdog = asyncio.ensure_future(tracker.watch())
    log.info(
        "%s as %s", description, sidecar.credentials.spiffe_id, extra={"event": "proxy_started"}
    )
    if ready is not None:
        ready(description)
    try:
        await stop.wait()
        log.info("stopping: no new connections", extra={"event": "proxy_stopping"})
        server.close()
        await tracker.drain(sidecar.settings.drain_timeout)
    finally:
        watchdog.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def serve_inbound_tcp(
    sidecar: Sidecar, callers: CallerRules, ready: Callable[[str], None] | None
) -> None:
    """Run the inbound TCP-mode sidecar until SIGTERM."""
    settings = sidecar.settings
    assert isinstance(settings, InboundSettings)  # noqa: S101 - internal contract
    tracker = sidecar.tracker()
    app_host, app_port = parse_target(settings.to)
    listener = sidecar.credentials.server_context()

    async def _inbound(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: Connection,
        source: tuple[str, int],
    ) -> None:
        if not await _handshake(tracker, conn, writer, listener):
            return
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            peer = peer_identity(ssl_object.getpeercert(binary_form=True), sidecar.trust_domain)
        except VerificationError as exc:
            tracker.refused(conn, str(exc.details.get("reason", "bad_certificate")), exc.message)
            return
        conn.peer_id = peer.spiffe_id.uri
        conn.serial = peer.certificate.serial_number
        conn.not_after = peer.certificate.not_valid_after_utc
        conn.certificate = peer.certificate
        refusal = _certificate_refusal(sidecar, peer, "certificate")
        if refusal is not None:
            tracker.refused(conn, *refusal)
            return
        allowed, why = callers.decide(conn.peer_id)
        if not allowed:
            tracker.refused(conn, "policy_denied", why)
            return
        try:
            app = await asyncio.wait_for(
                asyncio.open_connection(app_host, app_port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            tracker.refused(
                conn, "app_unreachable", f"cannot connect to {settings.to}: {exc or 'timeout'}"
            )
            return
        tracker.identified(conn)
        try:
            if settings.proxy_protocol:
                cipher = ssl_object.cipher()
                app[1].write(
                    proxy_v2_header(
                        source,
                        _address(writer, "sockname"),
                        TLSInfo(
                            conn.peer_id,
                            ssl_object.version() or "",
                            cipher[0] if cipher else "",
                        ),
                        unique_id=conn.id,
                    )
                )
            await _relay(tracker, conn, (reader, writer), app)
        finally:
            await _close(app[1])

    await _serve(
        sidecar,
        tracker,
        _handler(tracker, "inbound-tcp", _inbound),
        ready,
        f"inbound on {_shown(parse_listen(settings.listen))} (TCP mode) to {settings.to}",
    )


async def serve_outbound(sidecar: Sidecar, ready: Callable[[str], None] | None) -> None:
    """Run the outbound sidecar until SIGTERM."""
    settings = sidecar.settings
    assert isinstance(settings, OutboundSettings)  # noqa: S101 - internal contract
    tracker = sidecar.tracker()
    host, port = parse_target(settings.to)

    async def _outbound(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: Connection,
        _source: tuple[str, int],
    ) -> None:
        context = sidecar.credentials.client_context(check_hostname=False)
        start = time.perf_counter()
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    port,
                    ssl=context,
                    server_hostname=host,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                    ssl_shutdown_timeout=CLOSE_NOTIFY_TIMEOUT,
                ),
                CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            reason = "handshake_failed" if isinstance(exc, ssl.SSLError) else "upstream_unreachable"
            tracker.refused(
                conn, reason, f"{settings.to}: {handshake_refusal_reason(exc) or 'timeout'}"
            )
            return
        tracker.metrics.handshake.labels(conn.mode).observe(time.perf_counter() - start)
        try:
            ssl_object = upstream[1].get_extra_info("ssl_object")
            try:
                server = peer_identity(
                    ssl_object.getpeercert(binary_form=True), sidecar.trust_domain
                )
            except VerificationError as exc:
                tracker.refused(
                    conn, str(exc.details.get("reason", "bad_server_certificate")), exc.message
                )
                return
            if not match_spiffe_pattern(server.spiffe_id, settings.expect_id):
                tracker.refused(
                    conn,
                    "server_id_mismatch",
                    f"{settings.to} is {server.spiffe_id}, expected {settings.expect_id}; "
                    f"closing without sending a byte",
                )
                return
            refusal = _certificate_refusal(sidecar, server, "server certificate")
            if refusal is not None:
                tracker.refused(conn, *refusal)
                return
            conn.peer_id = server.spiffe_id.uri
            conn.serial = server.certificate.serial_number
            conn.not_after = server.certificate.not_valid_after_utc
            conn.certificate = server.certificate
            tracker.identified(conn)
            await _relay(tracker, conn, (reader, writer), upstream)
        finally:
            await _close(upstream[1])

    await _serve(
        sidecar,
        tracker,
        _handler(tracker, "outbound", _outbound),
        ready,
        f"outbound on {_shown(parse_listen(settings.listen))} to {settings.to} "
        f"({settings.expect_id})",
    )
