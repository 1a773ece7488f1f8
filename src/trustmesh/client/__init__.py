"""Clients of trustmesh servers: the CA API (enroll, renew, revoke, bundle), sync and async;
and mTLS httpx clients for calls between services."""

from ._client import DEFAULT_TIMEOUT, AsyncCAClient, CAClient, EnrollResult, check_ca_url
from ._mtls import (
    AsyncMTLSTransport,
    ClientCredentials,
    MTLSTransport,
    async_mtls_client,
    mtls_client,
)
from ._mtls import _PeerCheck as PeerCheck

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncCAClient",
    "AsyncMTLSTransport",
    "CAClient",
    "ClientCredentials",
    "EnrollResult",
    "MTLSTransport",
    "PeerCheck",
    "async_mtls_client",
    "check_ca_url",
    "mtls_client",
]
