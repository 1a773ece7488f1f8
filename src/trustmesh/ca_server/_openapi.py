"""The OpenAPI 3.1 document of the CA API, shipped as package data (``openapi.json``).

The document is written by hand and kept in the repository; ``tests/test_openapi.py``
checks that it is valid OpenAPI 3.1 and that it documents every route the app serves.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["load_openapi", "openapi_response"]

_RESOURCE = "openapi.json"


@cache
def _document_bytes() -> bytes:
    return files(__package__ or "trustmesh.ca_server").joinpath(_RESOURCE).read_bytes()


def load_openapi() -> dict[str, Any]:
    """Return the OpenAPI document as a new dict (callers may modify it)."""
    document: dict[str, Any] = json.loads(_document_bytes())
    return document


def openapi_response(request: Request) -> Response:
    """Serve the OpenAPI document (``GET /v1/openapi.json``) as ``application/json``.

    A plain function, so it works both as a Starlette endpoint
    (``Route("/v1/openapi.json", openapi_response)``) and called from another handler.
    """
    del request  # the document is the same for every caller
    return Response(
        _document_bytes(),
        media_type="application/json",
        headers={"Cache-Control": "max-age=300"},
    )
