"""The machine grant: ``client_credentials`` (RFC 6749 §4.4).

The user side's grants (authorization code, refresh token) are in ``_user_grants``.
"""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc6749 import InvalidScopeError, UnauthorizedClientError
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant

from ._client_auth import CLIENT_AUTH_METHODS
from ._oauth import _safe

__all__ = ["IdpClientCredentialsGrant"]


class IdpClientCredentialsGrant(ClientCredentialsGrant):
    """client_credentials (RFC 6749 §4.4): scopes must be a subset of the client's."""

    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS

    def validate_token_request(self) -> None:
        client = self.authenticate_token_endpoint_client()
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError(
                _safe(
                    f"Client {client.get_client_id()} may not use client_credentials; register "
                    f"it with --grant-type client_credentials."
                )
            )
        self.request.client = client
        requested = (self.request.payload.scope or "").split()
        extra = sorted(set(requested) - set(client.scopes))
        if extra:
            raise InvalidScopeError(
                _safe(
                    f"Client {client.get_client_id()} may not request scope(s) "
                    f"{' '.join(extra)}; allowed: {' '.join(client.scopes) or '(none)'}."
                )
            )

    def create_token_response(self) -> tuple[int, Any, Any]:
        scope = self.client.get_allowed_scope(self.request.payload.scope)
        token = self.generate_token(scope=scope, include_refresh_token=False)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER
