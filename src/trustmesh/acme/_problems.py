"""ACME error documents (RFC 8555 6.7): ``urn:ietf:params:acme:error:*`` problem types."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

__all__ = ["ACME_ERROR", "ACMEProblem", "problem_response"]

ACME_ERROR = "urn:ietf:params:acme:error:"

#: The HTTP status each problem type answers with (RFC 8555 6.7 and its registry).
_STATUS = {
    "accountDoesNotExist": 400,
    "alreadyReplaced": 409,
    "alreadyRevoked": 400,
    "badCSR": 400,
    "badNonce": 400,
    "badPublicKey": 400,
    "badRevocationReason": 400,
    "badSignatureAlgorithm": 400,
    "caa": 403,
    "connection": 400,
    "dns": 400,
    "externalAccountRequired": 401,
    "incorrectResponse": 403,
    "invalidContact": 400,
    "invalidProfile": 400,
    "malformed": 400,
    "orderNotReady": 403,
    "rateLimited": 429,
    "rejectedIdentifier": 400,
    "serverInternal": 500,
    "tls": 400,
    "unauthorized": 403,
    "unsupportedContact": 400,
    "unsupportedIdentifier": 400,
    "userActionRequired": 403,
}


class ACMEProblem(Exception):  # noqa: N818 - it is a problem document, not only an error
    """An ACME error to send back: a problem type, what was wrong and how to fix it.

    Args:
        kind: The problem type without its prefix (``badNonce``).
        detail: One line: what was refused and what to do instead.
        status: The HTTP status (from the type when None).
        extra: More members of the document (``algorithms``, ``subproblems``, ``identifier``).
    """

    def __init__(self, kind: str, detail: str, *, status: int | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status or _STATUS.get(kind, 400)
        self.extra = extra

    def document(self) -> dict[str, Any]:
        """The problem document (also stored as an order's or challenge's ``error``)."""
        doc: dict[str, Any] = {"type": ACME_ERROR + self.kind, "detail": self.detail}
        doc["status"] = self.status
        doc.update(self.extra)
        return doc


def problem_response(problem: ACMEProblem, headers: dict[str, str]) -> Response:
    """The ``application/problem+json`` response of a problem (RFC 8555 6.7)."""
    return Response(
        json.dumps(problem.document()),
        status_code=problem.status,
        media_type="application/problem+json",
        headers=headers,
    )
