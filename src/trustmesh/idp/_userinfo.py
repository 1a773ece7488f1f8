"""``/userinfo`` (OpenID Connect Core 5.3) and the discovery fields of the user side."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from trustmesh.errors import TrustmeshError

from ._user_grants import OIDC_SCOPES, UserSide, profile_claims

__all__ = ["UserinfoEndpoint", "user_discovery"]


def _bearer_error(status: int, error: str, description: str) -> Response:
    # RFC 6750 section 3: the error goes in WWW-Authenticate; quotes are not allowed in it.
    safe = description.replace('"', "'").replace("\\", "/")
    return Response(
        json.dumps({"error": error, "error_description": description}),
        status_code=status,
        media_type="application/json",
        headers={
            "WWW-Authenticate": f'Bearer error="{error}", error_description="{safe}"',
            "Cache-Control": "no-store",
        },
    )


class UserinfoEndpoint:
    """Return the claims of the user an access token was issued for.

    Args:
        side: The user side (users store).
        verify_access_token: The server's own check of its access tokens (signature
            with its keys, ``iss``, ``exp``, ``typ`` ``at+jwt``, not revoked); returns
            the claims or raises a :class:`TrustmeshError` saying why not.
    """

    def __init__(
        self, side: UserSide, verify_access_token: Callable[[str, Request], dict[str, Any]]
    ) -> None:
        self.side = side
        self.verify = verify_access_token

    async def __call__(self, request: Request) -> Response:
        """Handle GET or POST with ``Authorization: Bearer``."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _bearer_error(
                401,
                "invalid_request",
                "Send the access token as 'Authorization: Bearer TOKEN'.",
            )
        try:
            claims = await run_in_threadpool(self.verify, token.strip(), request)
        except TrustmeshError as exc:
            return _bearer_error(
                401, "invalid_token", f"The access token is not valid: {exc.message}."
            )
        scope = str(claims.get("scope") or "").split()
        if "openid" not in scope:
            return _bearer_error(
                403,
                "insufficient_scope",
                "The access token was not granted the 'openid' scope; request it in the "
                "authorization request.",
            )
        user = await run_in_threadpool(self.side.users.get_by_id, str(claims.get("sub", "")))
        if user is None or user.disabled:
            return _bearer_error(
                401, "invalid_token", "The user of this access token is disabled or unknown."
            )
        body = {"sub": user.user_id, "preferred_username": user.username}
        body.update(profile_claims(user, set(scope) | {"profile"}))
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def user_discovery(issuer: str, *, id_token_algs: list[str]) -> dict[str, Any]:
    """Return the discovery fields the user side adds (OpenID Connect Discovery 1.0).

    ``grant_types_supported`` and ``response_types_supported`` follow the registered
    grants (the server computes them).
    """
    return {
        "authorization_endpoint": f"{issuer}/authorize",
        "userinfo_endpoint": f"{issuer}/userinfo",
        "response_modes_supported": ["query"],
        "code_challenge_methods_supported": ["S256"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": id_token_algs,
        "scopes_supported": sorted(OIDC_SCOPES),
        "claims_supported": [
            "aud",
            "auth_time",
            "azp",
            "email",
            "exp",
            "iat",
            "iss",
            "nonce",
            "preferred_username",
            "roles",
            "sub",
        ],
        "authorization_response_iss_parameter_supported": True,
        "prompt_values_supported": ["none", "login"],
    }
