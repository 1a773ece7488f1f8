"""The identity server: an OAuth 2.0 / OpenID Connect provider built on Authlib and Starlette.

Machine side (this package's core): discovery, JWKS with key rotation,
``client_credentials``, client authentication (``client_secret_basic``/``post``,
``private_key_jwt``, ``tls_client_auth`` with certificate-bound tokens), introspection,
revocation and the revocation list. See ``docs/idp.md``.

How the user side plugs in
--------------------------
1. Write an :class:`IdpExtension`: an object with ``install(ctx) -> list[BaseRoute]``.
   ``install`` receives the shared :class:`IdpContext` (``ctx.store``, ``ctx.keys``,
   ``ctx.settings``, ``ctx.issuer``, ``ctx.metrics``, ``ctx.audit(...)``) after the
   Authlib server exists, and:

   - registers grants: ``ctx.authorization_server().register_grant(Grant, [ext...])``
     (Authlib's API: ``AuthorizationCodeGrant`` + ``CodeChallenge``/``OpenIDCode``,
     ``RefreshTokenGrant``); give them
     ``TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS (+ ["none"])``;
   - adds discovery fields: ``ctx.metadata["authorization_endpoint"] = ...``
     (``grant_types_supported``/``response_types_supported`` follow the registered
     grants by themselves);
   - returns its routes (``/authorize``, ``/login``, ``/userinfo``...). Use
     :func:`oauth_request` to turn a Starlette request into an Authlib request and run
     Authlib calls with ``run_in_threadpool``; answer errors with :func:`oauth_error`.
2. Tokens: grants call ``self.generate_token(user=..., scope=...)``, which mints an
   RFC 9068 access token via :func:`mint_access_token` (``sub`` =
   ``user.get_user_id()``, ``roles`` = ``user.roles``). To add refresh or ID tokens,
   wrap :meth:`IdpAuthorizationServer.generate_bearer_token` and register the wrapper
   with ``server.register_token_generator("default", ...)``. Issued tokens pass
   through ``server.save_token`` (audit, metrics), then every callable in
   ``server.token_listeners`` (e.g. to store the refresh token).
3. Refresh tokens are stored as :func:`trustmesh.store.token_hash` in
   ``idp_refresh_tokens``; ``/introspect`` and ``/revoke`` already handle them (revoking
   one revokes its family; active only if not rotated, revoked or expired).
4. Add the extension to :func:`default_extensions` (``idp/_extensions.py``) so
   ``trustmesh idp serve`` mounts it; tests may pass ``extensions=`` to
   :func:`create_app` directly.
"""

from ._app import IdpExtension, create_app, discovery_document, oauth_error, oauth_request, problem
from ._client_auth import CLIENT_AUTH_METHODS, JWT_BEARER_ASSERTION
from ._clients import (
    AUTH_METHODS,
    GRANT_TYPES,
    IdpClient,
    add_client,
    get_client,
    hash_secret,
    list_clients,
    load_client,
    rotate_client_secret,
    set_client_disabled,
)
from ._context import IdpContext, IdpMetrics, IdpSettings
from ._extensions import default_extensions
from ._grants import IdpClientCredentialsGrant
from ._keys import (
    DEFAULT_PUBLISH_DELAY,
    SIGNING_ALGORITHMS,
    KeyRing,
    SigningKey,
    SigningKeyInfo,
    ensure_signing_key,
    list_signing_keys,
    rotate_signing_key,
)
from ._oauth import IdpOAuth2Request, InvalidTargetError
from ._serve import IDP_SERVER_PATH, create_context, serve
from ._server import IdpAuthorizationServer, create_server
from ._tokens import (
    ACCESS_TOKEN_TYPE,
    MintedToken,
    RefreshTokenRecord,
    certificate_thumbprint,
    find_refresh_token,
    mint_access_token,
    read_access_token,
    revoke_access_token,
    revoke_refresh_family,
    revoked_access_tokens,
)
from ._user_side import UserSideExtension
from ._users import DEFAULT_LOCKOUT, LockoutPolicy, LoginResult, User, UserStore

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "AUTH_METHODS",
    "CLIENT_AUTH_METHODS",
    "DEFAULT_LOCKOUT",
    "DEFAULT_PUBLISH_DELAY",
    "GRANT_TYPES",
    "IDP_SERVER_PATH",
    "JWT_BEARER_ASSERTION",
    "SIGNING_ALGORITHMS",
    "IdpAuthorizationServer",
    "IdpClient",
    "IdpClientCredentialsGrant",
    "IdpContext",
    "IdpExtension",
    "IdpMetrics",
    "IdpOAuth2Request",
    "IdpSettings",
    "InvalidTargetError",
    "KeyRing",
    "LockoutPolicy",
    "LoginResult",
    "MintedToken",
    "RefreshTokenRecord",
    "SigningKey",
    "SigningKeyInfo",
    "User",
    "UserSideExtension",
    "UserStore",
    "add_client",
    "certificate_thumbprint",
    "create_app",
    "create_context",
    "create_server",
    "default_extensions",
    "discovery_document",
    "ensure_signing_key",
    "find_refresh_token",
    "get_client",
    "hash_secret",
    "list_clients",
    "list_signing_keys",
    "load_client",
    "mint_access_token",
    "oauth_error",
    "oauth_request",
    "problem",
    "read_access_token",
    "revoke_access_token",
    "revoke_refresh_family",
    "revoked_access_tokens",
    "rotate_client_secret",
    "rotate_signing_key",
    "serve",
    "set_client_disabled",
]
