"""FastAPI and Starlette helpers: the caller and the user as dependencies.

::

    from trustmesh.middleware.fastapi import CallerDep, UserDep

    @app.get("/items")
    def items(caller: CallerDep, user: UserDep) -> dict[str, str]:
        return {"caller": str(caller), "user": user.subject if user else "-"}

They read what :class:`~trustmesh.middleware.MTLSMiddleware` put at
``request.scope["trustmesh"]``; without the middleware they raise
:class:`RuntimeError` (a 500), never an empty identity.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from trustmesh.tokens import AccessTokenClaims

from ._core import Caller, RequestIdentity

__all__ = ["CallerDep", "IdentityDep", "UserDep", "caller", "identity", "user"]


def identity(request: HTTPConnection) -> RequestIdentity:
    """Return the request's :class:`RequestIdentity` (a dependency).

    Raises:
        RuntimeError: The app is not wrapped in ``MTLSMiddleware``.

    .. versionadded:: 0.1
    """
    found = request.scope.get("trustmesh")
    if not isinstance(found, RequestIdentity):
        raise RuntimeError(
            "No trustmesh identity on this request: wrap the app with "
            "trustmesh.middleware.MTLSMiddleware (app.add_middleware(MTLSMiddleware, ...))."
        )
    return found


def caller(request: HTTPConnection) -> Caller:
    """Return the verified calling workload (a dependency).

    .. versionadded:: 0.1
    """
    return identity(request).caller


def user(request: HTTPConnection) -> AccessTokenClaims | None:
    """Return the verified end-user token's claims, or None (a dependency).

    .. versionadded:: 0.1
    """
    return identity(request).user


#: ``caller: CallerDep`` in an endpoint's signature.
CallerDep = Annotated[Caller, Depends(caller)]
#: ``user: UserDep`` in an endpoint's signature (None without a token).
UserDep = Annotated[AccessTokenClaims | None, Depends(user)]
#: ``who: IdentityDep`` for the caller, the user and the policy decision.
IdentityDep = Annotated[RequestIdentity, Depends(identity)]
