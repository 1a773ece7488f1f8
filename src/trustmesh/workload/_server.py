"""The socket server: one grpc.Server behind the credential forwarder, several services.

:class:`WorkloadServer` owns the public Unix socket (through
:class:`~._peer.CredentialForwarder`) and one ``grpc.Server`` on the private socket. The
SPIFFE Workload API is registered by default; other services reading the same
:class:`~._cache.IdentityCache` (Envoy SDS, ``envoy.service.secret.v3.SecretDiscoveryService``)
are added with :meth:`WorkloadServer.add_service` before :meth:`start`, and attest their
callers with :meth:`WorkloadServer.attest`. Reflection lists every registered service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection

from ._cache import IdentityCache
from ._peer import CredentialForwarder, PeerInfo
from ._proto import workload_pb2_grpc as pb_grpc
from ._service import SERVICE_NAME, JWTIssuer, WorkloadAPIService

__all__ = ["DEFAULT_MAX_STREAMS", "DEFAULT_SOCKET", "WorkloadServer"]

log = logging.getLogger("trustmesh.workload.server")

#: Where the agent listens unless told otherwise.
DEFAULT_SOCKET = "unix:///run/trustmesh/agent.sock"
#: Concurrent calls (each open stream holds one worker thread).
DEFAULT_MAX_STREAMS = 256


class WorkloadServer:
    """Serve the Workload API (and services added later) on one Unix socket.

    Args:
        cache: What the agent holds.
        socket_path: The public socket path.
        mode: Its permission bits (default 0o666).
        jwt_issuer: Obtains JWT-SVIDs for FetchJWTSVID.
        max_streams: Concurrent calls; more are refused with RESOURCE_EXHAUSTED.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        cache: IdentityCache,
        socket_path: Path,
        *,
        mode: int = 0o666,
        jwt_issuer: JWTIssuer | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        self.cache = cache
        self.forwarder = CredentialForwarder(socket_path, mode=mode)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="workload"),
            maximum_concurrent_rpcs=max_streams,
        )
        self._services = [SERVICE_NAME]
        pb_grpc.add_SpiffeWorkloadAPIServicer_to_server(  # type: ignore[no-untyped-call]
            WorkloadAPIService(cache, self.attest, jwt_issuer), self.server
        )
        self._started = False

    @property
    def socket_path(self) -> Path:
        """The public socket."""
        return self.forwarder.public

    def attest(self, context: grpc.ServicerContext) -> PeerInfo | None:
        """Return the kernel credentials of the connection a call arrived on."""
        return self.forwarder.peer(context.peer())

    def add_service(self, name: str, register: Callable[[grpc.Server], None]) -> None:
        """Register another gRPC service (full name ``name``) on the same socket.

        Call before :meth:`start`, e.g. ``add_service("envoy.service.secret.v3.
        SecretDiscoveryService", lambda s: add_SecretDiscoveryServiceServicer_to_server(
        SDS(server.cache, server.attest), s))``.
        """
        if self._started:
            raise RuntimeError("add services before start()")
        register(self.server)
        self._services.append(name)

    def start(self) -> None:
        """Create the public socket and start serving.

        Raises:
            ConfigError: The socket cannot be created.
        """
        self.forwarder.listen()  # fail on a bad socket path before anything runs
        reflection.enable_server_reflection((*self._services, reflection.SERVICE_NAME), self.server)
        if not self.server.add_insecure_port(f"unix:{self.forwarder.private_socket}"):
            raise RuntimeError(f"gRPC could not listen on {self.forwarder.private_socket}")
        self.server.start()
        self.forwarder.start()
        self._started = True
        log.info(
            "serving %s on %s (mode %o)",
            ", ".join(self._services),
            self.socket_path,
            self.forwarder.mode,
        )

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving and remove the socket."""
        self.cache.close()
        self.forwarder.stop()
        self.server.stop(grace).wait(grace + 1)
