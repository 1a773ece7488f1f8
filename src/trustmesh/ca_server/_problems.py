"""RFC 9457 problem documents and the mapping from our exceptions to HTTP statuses."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from trustmesh.errors import (
    CertificateRevokedError,
    ConfigError,
    ConflictError,
    CSRError,
    NotFoundError,
    PolicyError,
    ScopeError,
    SpiffeIDError,
    StoreError,
    TokenError,
    TrustmeshError,
    VerificationError,
)
from trustmesh.problems import PROBLEM_CONTENT_TYPE, problem_document

__all__ = [
    "DATABASE_UNAVAILABLE",
    "DUPLICATE_RECORD",
    "is_database_failure",
    "is_driver_conflict",
    "problem",
    "problem_for",
    "status_for",
]

# Most specific first: the first class in an exception's MRO found here wins.
_STATUS: dict[type[BaseException], tuple[int, str]] = {
    CertificateRevokedError: (403, "Certificate revoked"),
    VerificationError: (401, "Client certificate not accepted"),
    CSRError: (400, "Bad certificate signing request"),
    SpiffeIDError: (400, "Bad SPIFFE ID"),
    PolicyError: (403, "Not allowed by the certificate profile"),
    ScopeError: (403, "Not allowed"),
    TokenError: (401, "Join token not accepted"),
    NotFoundError: (404, "Not found"),
    ConflictError: (409, "Conflict"),
    ConfigError: (400, "Bad request"),
    StoreError: (503, "Database unavailable"),
}

#: The public detail of a database failure. The cause (driver, host, port, user, database
#: and the driver's message) is for the server log only, never for anonymous callers.
DATABASE_UNAVAILABLE = (
    "The CA's database is unavailable; retry in a few seconds. The server log has the cause."
)


#: The public detail of a record the database refused as a duplicate: the driver's
#: message (table, columns, values) is for the server log only.
DUPLICATE_RECORD = (
    "The CA's database refused a duplicate record; retry the request. The server log has the cause."
)


def is_driver_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is a duplicate the database driver refused (its text is private)."""
    return isinstance(exc, ConflictError) and exc.details.get("reason") == "duplicate"


def is_database_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the database failing (not a missing or duplicate record)."""
    return isinstance(exc, StoreError) and not isinstance(exc, NotFoundError | ConflictError)


def status_for(exc: BaseException) -> tuple[int, str]:
    """Return ``(status, title)`` for an exception by walking its MRO."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500, "Internal error"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """Return an ``application/problem+json`` response."""
    headers = {"Cache-Control": "no-store", **(headers or {})}
    if status == 401:
        headers["WWW-Authenticate"] = 'Mutual realm="trustmesh"'
    body = problem_document(status, title, detail, **extra)
    return Response(body, status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=headers)


def problem_for(exc: TrustmeshError) -> Response:
    """Return the problem response for one of our exceptions.

    A database failure gets the generic :data:`DATABASE_UNAVAILABLE` detail, and a
    duplicate the driver refused :data:`DUPLICATE_RECORD`: their messages name the
    database URL or the driver's error, which the caller logs instead.
    """
    status, title = status_for(exc)
    if is_database_failure(exc):
        return problem(
            status,
            title,
            DATABASE_UNAVAILABLE,
            reason="database_unavailable",
            headers={"Retry-After": "5"},
        )
    if is_driver_conflict(exc):
        return problem(status, title, DUPLICATE_RECORD, reason="duplicate")
    reason = exc.details.get("reason")
    # ``san``: the refused host-name SAN (``DNS:name`` or ``IP:address``), when one was.
    return problem(status, title, exc.message, reason=reason, san=exc.details.get("san"))
