"""Flask helpers: the caller and the user of the request being handled.

::

    app.wsgi_app = MTLSWSGIMiddleware(app.wsgi_app, trust_domain="example.org", ...)

    @app.get("/items")
    def items():
        return {"caller": str(current_caller())}

They read ``flask.request.environ["trustmesh"]``; outside a request or without
the middleware they raise :class:`RuntimeError`.
"""

from __future__ import annotations

from flask import request

from trustmesh.tokens import AccessTokenClaims

from ._core import Caller, RequestIdentity

__all__ = ["current_caller", "current_identity", "current_user"]


def current_identity() -> RequestIdentity:
    """Return the :class:`RequestIdentity` of the request being handled.

    Raises:
        RuntimeError: Outside a request, or the app is not wrapped in the middleware.

    .. versionadded:: 0.1
    """
    found = request.environ.get("trustmesh")
    if not isinstance(found, RequestIdentity):
        raise RuntimeError(
            "No trustmesh identity on this request: wrap the app with "
            "app.wsgi_app = trustmesh.middleware.MTLSWSGIMiddleware(app.wsgi_app, ...)."
        )
    return found


def current_caller() -> Caller:
    """Return the verified calling workload.

    .. versionadded:: 0.1
    """
    return current_identity().caller


def current_user() -> AccessTokenClaims | None:
    """Return the verified end-user token's claims, or None.

    .. versionadded:: 0.1
    """
    return current_identity().user
