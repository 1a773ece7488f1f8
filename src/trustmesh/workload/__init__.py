"""The node agent: registration entries' SVIDs served over the SPIFFE Workload API.

:class:`WorkloadAgent` keeps the node identity and one SVID per registration entry current
in an :class:`IdentityCache`; :class:`WorkloadServer` serves that cache on a Unix socket
(``SpiffeWorkloadAPI``; Envoy SDS v3, :class:`SecretDiscoveryService`, added with
:func:`add_secret_discovery_service`; gRPC reflection), attesting each caller from its
kernel credentials (:class:`PeerInfo`).

The generated protobuf module defines the Workload API's messages without a package, as
the SPIFFE standard does; like py-spiffe's, it registers them in protobuf's default pool,
so do not import this package and py-spiffe in the same process.
"""

from ._agent import DEFAULT_REFRESH, WorkloadAgent
from ._cache import SVID, IdentityCache, Snapshot
from ._peer import CredentialForwarder, PeerInfo
from ._sds import (
    SDS_SERVICE_NAME,
    SECRET_TYPE_URL,
    SecretDiscoveryService,
    add_secret_discovery_service,
)
from ._server import DEFAULT_MAX_STREAMS, DEFAULT_SOCKET, WorkloadServer
from ._service import SECURITY_HEADER, SERVICE_NAME, JWTIssuer, WorkloadAPIService

__all__ = [
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_REFRESH",
    "DEFAULT_SOCKET",
    "SDS_SERVICE_NAME",
    "SECRET_TYPE_URL",
    "SECURITY_HEADER",
    "SERVICE_NAME",
    "SVID",
    "CredentialForwarder",
    "IdentityCache",
    "JWTIssuer",
    "PeerInfo",
    "SecretDiscoveryService",
    "Snapshot",
    "WorkloadAPIService",
    "WorkloadAgent",
    "WorkloadServer",
    "add_secret_discovery_service",
]
