"""Clients of trustmesh servers: the CA API (enroll, renew, revoke, bundle), sync and async."""

from ._client import DEFAULT_TIMEOUT, AsyncCAClient, CAClient, EnrollResult, check_ca_url

__all__ = ["DEFAULT_TIMEOUT", "AsyncCAClient", "CAClient", "EnrollResult", "check_ca_url"]
