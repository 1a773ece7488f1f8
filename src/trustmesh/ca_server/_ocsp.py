"""Answering OCSP requests (RFC 6960) over HTTP, for every listener that serves them.

:func:`answer_ocsp` turns the DER bytes of a request (a POST body, or a GET path decoded
by :func:`decode_ocsp_path`) into an ``application/ocsp-response``. It never raises and
never answers a 5xx: a request that is not one is ``malformedRequest``, a database outage
``tryLater``, and anything unexpected ``internalError`` with the cause in the log.

One certificate per request: cryptography's ``OCSPResponseBuilder`` (checked up to 50.x)
builds a single ``SingleResponse`` and its request loader refuses requests with several
(``NotImplementedError``). Such a request is answered ``malformedRequest`` (RFC 6960 section
2.3); clients (OpenSSL, nginx, Java) ask about one certificate per request anyway.
"""

from __future__ import annotations

import base64
import binascii
import logging

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import StoreError

from ._problems import problem

__all__ = ["MAX_GET_REQUEST", "OCSP_MEDIA_TYPE", "answer_ocsp", "decode_ocsp_path"]

log = logging.getLogger("trustmesh.ca_server")

#: Content type of every OCSP answer (RFC 6960 appendix A.2).
OCSP_MEDIA_TYPE = "application/ocsp-response"
#: Longest base64 GET path accepted (a one-certificate request is about 100 characters;
#: RFC 6960 appendix A.1 means GET for requests under 255 bytes).
MAX_GET_REQUEST = 8192


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> Response:
    answer = ocsp.OCSPResponseBuilder.build_unsuccessful(status)
    return Response(
        answer.public_bytes(serialization.Encoding.DER),
        media_type=OCSP_MEDIA_TYPE,
        headers={"Cache-Control": "no-store"},
    )


def decode_ocsp_path(encoded: str) -> bytes | Response:
    """Decode the base64 request of ``GET /…/ocsp/{request}`` (standard or URL-safe).

    Returns:
        The DER bytes, a 414 problem response when the path is longer than
        :data:`MAX_GET_REQUEST`, or a 400 one when it is not base64.
    """
    if len(encoded) > MAX_GET_REQUEST:
        return problem(
            414,
            "OCSP request too long",
            f"GET OCSP requests are limited to {MAX_GET_REQUEST} characters: POST the "
            f"DER request to /v1/ocsp instead.",
        )
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_")
    except (ValueError, binascii.Error):
        return problem(400, "Bad OCSP request", "The URL does not hold a base64 OCSP request.")


async def answer_ocsp(ca: CertificateAuthority, der: bytes) -> Response:
    """Answer the DER OCSP request ``der`` for ``ca``'s intermediate; never raises.

    Args:
        ca: The open CA (its signing key unlocked).
        der: The request, as sent.

    Returns:
        A signed ``successful`` response (``Cache-Control: max-age=60``), or an unsigned
        ``malformedRequest`` / ``tryLater`` / ``internalError`` one (``no-store``).
    """
    try:
        request = ocsp.load_der_ocsp_request(der)
        response = await run_in_threadpool(ca.ocsp_response, request)
    except ValueError:
        return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    except NotImplementedError:
        log.info(
            "OCSP request about several certificates answered malformedRequest: "
            "ask about one certificate per request",
            extra={"event": "ocsp_malformed", "reason": "several_certificates"},
        )
        return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    except UnsupportedAlgorithm:
        # A CertID hashed with an algorithm we cannot compute: nothing to compare.
        return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    except StoreError as exc:
        # RFC 6960 tryLater: the client retries, never takes silence for "good".
        log.error("OCSP answered tryLater: %s", exc.message, extra={"event": "database_error"})
        return _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)
    except Exception:
        log.exception(
            "OCSP request failed; answered internalError",
            extra={"event": "ocsp_internal_error"},
        )
        return _unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR)
    return Response(
        response.public_bytes(serialization.Encoding.DER),
        media_type=OCSP_MEDIA_TYPE,
        headers={"Cache-Control": "max-age=60"},
    )
