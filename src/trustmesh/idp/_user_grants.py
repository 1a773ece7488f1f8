"""The user grants on Authlib's authorization server: code + PKCE, refresh, ID tokens.

* :class:`UserCodeGrant` - Authlib's ``AuthorizationCodeGrant`` with codes stored
  hashed and single use (a replay revokes what the code produced) and
  :class:`S256CodeChallenge` (PKCE required, ``S256`` only).
* :class:`UserRefreshGrant` - Authlib's ``RefreshTokenGrant`` with rotation and reuse
  detection (a rotated token presented again revokes its whole family).
* :class:`IDTokenExtension` - adds an OpenID Connect ID token (``typ`` ``JWT``) when
  the ``openid`` scope was granted.

The grants reach the rest of the identity server through one :class:`UserSide`
(the store, the users, and the signing functions of the server core), bound with
:func:`user_grants`.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import (
    InvalidGrantError,
    InvalidRequestError,
)
from authlib.oauth2.rfc7636 import CodeChallenge

from trustmesh.store import Store

from ._login import FormSigner
from ._user_tokens import (
    CODE_LIFETIME,
    REFRESH_TOKEN_LIFETIME,
    AuthorizationCode,
    RefreshToken,
    claim_code,
    claim_refresh_token,
    find_refresh_token,
    new_secret,
    revoke_code_access_token,
    revoke_family,
    save_code,
    save_refresh_token,
    set_code_family,
)
from ._users import User, UserStore

__all__ = [
    "ID_TOKEN_LIFETIME",
    "OIDC_SCOPES",
    "IDTokenExtension",
    "S256CodeChallenge",
    "UserCodeGrant",
    "UserRefreshGrant",
    "UserSide",
    "at_hash",
    "granted_scope",
    "profile_claims",
    "user_grants",
]

#: Scopes any user may grant (they only select ID token and userinfo claims).
OIDC_SCOPES = frozenset({"openid", "profile", "email", "offline_access"})
#: Lifetime of ID tokens.
ID_TOKEN_LIFETIME = timedelta(minutes=10)


@dataclass
class UserSide:
    """What the user grants, the login page and userinfo need from the server.

    Args:
        store: The database (and audit chain).
        users: Accounts and sign-in.
        issuer: The ``iss`` of every token.
        sign_id_token: Signs ID token claims with the server's current signing key
            (header ``typ`` ``JWT``); given the access token issued alongside, it
            adds ``at_hash`` computed with that key's algorithm. Returns the JWS.
        forms: Login form token signer.
        clock: Returns the current time (tests inject one).
    """

    store: Store
    users: UserStore
    issuer: str
    sign_id_token: Callable[[dict[str, Any], str | None], str]
    forms: FormSigner = field(default_factory=FormSigner)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    code_lifetime: timedelta = CODE_LIFETIME
    refresh_token_lifetime: timedelta = REFRESH_TOKEN_LIFETIME

    def audit(self, action: str, subject: str, actor: str, **details: Any) -> None:
        """Append one event to the audit chain in its own transaction."""
        with self.store.transaction() as conn:
            self.store.append_audit(
                conn, at=self.clock(), actor=actor, action=action, subject=subject, details=details
            )


def granted_scope(scope: str | None, user: User) -> str:
    """Return the part of ``scope`` (already allowed for the client) this user may grant."""
    allowed = OIDC_SCOPES | set(user.scopes)
    return " ".join(s for s in (scope or "").split() if s in allowed)


def at_hash(value: str, alg: str) -> str:
    """OIDC ``at_hash``: left half of the hash of the token, base64url (Core 3.1.3.6)."""
    bits = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}
    digest = bits.get(alg[-3:], hashlib.sha256)(value.encode()).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode()


class S256CodeChallenge(CodeChallenge):
    """PKCE (RFC 7636), required on every authorization request, ``S256`` only.

    ``plain`` and a missing ``code_challenge_method`` (which RFC 7636 reads as
    ``plain``) are refused: ``plain`` gives no protection if the request leaks.
    """

    SUPPORTED_CODE_CHALLENGE_METHOD: ClassVar[list[str]] = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def __init__(self) -> None:
        super().__init__(required=True)

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        """Refuse an authorization request without an S256 code challenge."""
        data = grant.request.payload.data
        challenge, method = data.get("code_challenge"), data.get("code_challenge_method")
        if not challenge:
            raise InvalidRequestError(
                "PKCE is required: send code_challenge=BASE64URL(SHA256(code_verifier)) "
                "and code_challenge_method=S256."
            )
        if method != "S256":
            shown = f"'{method}'" if method else "missing (which means 'plain')"
            raise InvalidRequestError(
                f"code_challenge_method is {shown}; this server accepts S256 only. "
                f"Send code_challenge_method=S256."
            )
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        """Check the verifier against the code's challenge; audit a mismatch."""
        try:
            super().validate_code_verifier(grant, result)
        except InvalidGrantError:
            code: AuthorizationCode = grant.request.authorization_code
            side: UserSide = grant.side
            side.audit(
                "idp.token.refused",
                code.user_id,
                f"client:{code.client_id}",
                reason="pkce_mismatch",
                client_id=code.client_id,
            )
            raise InvalidGrantError(
                "The code_verifier does not match the code_challenge of the authorization "
                "request (PKCE S256). Send the verifier you derived the challenge from."
            ) from None


class _UserGrantMixin:
    """Token minting and storage shared by the code and refresh grants."""

    side: ClassVar[UserSide]
    request: Any
    server: Any
    GRANT_TYPE: ClassVar[str | None]

    def _tokens(self, user: User, scope: str, include_refresh_token: bool) -> dict[str, Any]:
        """The server's RFC 9068 access token for the user, plus a refresh token."""
        token: dict[str, Any] = self.server.generate_token(
            client=self.request.client,
            grant_type=self.GRANT_TYPE,
            user=user,
            scope=scope,
            include_refresh_token=False,
        )
        if include_refresh_token:
            token["refresh_token"] = new_secret()
        return token

    def _save_refresh(self, token: dict[str, Any], *, family_id: str, auth_time: int) -> None:
        """Let the server record the issuance, then store the refresh token (hashed)."""
        self.server.save_token(token, self.request)
        side = self.side
        client_id = self.request.client.get_client_id()
        with side.store.transaction() as conn:
            if "refresh_token" in token:
                save_refresh_token(
                    conn,
                    token["refresh_token"],
                    family_id=family_id,
                    client_id=client_id,
                    user_id=self.request.user.user_id,
                    scope=token["scope"],
                    auth_time=auth_time,
                    now=side.clock(),
                    lifetime=side.refresh_token_lifetime,
                )
            code = self.request.authorization_code
            if isinstance(code, AuthorizationCode):
                minted = getattr(self.request, "minted_claims", None) or {}
                set_code_family(
                    conn,
                    code.code_hash,
                    family_id,
                    access_jti=minted.get("jti"),
                    access_expires_at=minted.get("exp"),
                )


class UserCodeGrant(_UserGrantMixin, grants.AuthorizationCodeGrant):
    """``authorization_code`` for people signed in on the login page (PKCE S256 required)."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = [
        "client_secret_basic",
        "client_secret_post",
    ]

    def generate_authorization_code(self) -> str:
        """Return 256 random bits, URL-safe."""
        return new_secret()

    def save_authorization_code(self, code: str, request: Any) -> None:
        """Store the code hashed, with the PKCE challenge, nonce and sign-in time."""
        side = self.side
        user: User = request.user
        data = request.payload.data
        now = side.clock()
        with side.store.transaction() as conn:
            save_code(
                conn,
                code,
                client_id=request.client.get_client_id(),
                user_id=user.user_id,
                redirect_uri=request.payload.redirect_uri or "",
                scope=granted_scope(request.scope, user),
                nonce=data.get("nonce"),
                code_challenge=data["code_challenge"],
                code_challenge_method=data.get("code_challenge_method") or "S256",
                auth_time=getattr(request, "auth_time", None) or now,
                now=now,
                lifetime=side.code_lifetime,
            )

    def query_authorization_code(self, code: str, client: Any) -> AuthorizationCode:
        """Claim the code; a replay revokes the refresh family it started."""
        side = self.side
        now = side.clock()
        client_id = client.get_client_id()
        record, status = claim_code(side.store, code, client_id=client_id, now=now)
        if status == "ok" and record is not None:
            return record
        if status == "replayed" and record is not None:
            revoked = 0
            with side.store.transaction() as conn:
                if record.family_id:
                    revoked = revoke_family(conn, record.family_id, now=now)
                access_revoked = revoke_code_access_token(conn, record, now=now)
            side.audit(
                "idp.code.replay",
                record.user_id,
                f"client:{client_id}",
                client_id=client_id,
                family_id=record.family_id,
                refresh_tokens_revoked=revoked,
                access_token_revoked=access_revoked,
                jti=record.access_jti,
            )
            raise InvalidGrantError(
                "The authorization code was already used. Codes are single use; the "
                "tokens issued from it are now revoked. Start a new authorization request."
            )
        if status == "expired":
            raise InvalidGrantError(
                f"The authorization code expired (codes are valid for "
                f"{int(side.code_lifetime.total_seconds())} seconds). Start a new "
                f"authorization request."
            )
        raise InvalidGrantError(
            "The authorization code is not valid for this client: it is unknown, or it was "
            "issued to another client. Use the code from your own authorization response."
        )

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        """Nothing to do: the code was marked used when it was claimed."""

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User:
        """Return the code's user, refusing one disabled since they signed in."""
        user = self.side.users.get_by_id(authorization_code.user_id)
        if user is None or user.disabled:
            raise InvalidGrantError(
                "The user of this authorization code is disabled or no longer exists."
            )
        return user

    def generate_token(
        self,
        user: User | None = None,
        scope: str | None = None,
        grant_type: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        """Mint the user's access token (RFC 9068) and a refresh token if allowed."""
        if user is None:  # pragma: no cover - authenticate_user never returns None
            raise InvalidGrantError("There is no user for this code.")
        return self._tokens(user, scope or "", include_refresh_token)

    def save_token(self, token: dict[str, Any]) -> None:
        """Start a refresh family for this code."""
        code: AuthorizationCode = self.request.authorization_code
        self._save_refresh(token, family_id=uuid.uuid4().hex, auth_time=code.auth_time)


class UserRefreshGrant(_UserGrantMixin, grants.RefreshTokenGrant):
    """``refresh_token`` with rotation and reuse detection."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = [
        "client_secret_basic",
        "client_secret_post",
    ]
    INCLUDE_NEW_REFRESH_TOKEN = True

    def validate_token_request(self) -> None:
        """Authenticate the client, then claim the refresh token (rotating it)."""
        side = self.side
        client = self._validate_request_client()
        self.request.client = client
        presented = self.request.form.get("refresh_token")
        if not presented:
            raise InvalidRequestError("Missing 'refresh_token' in request.")
        record = find_refresh_token(side.store, presented)
        client_id = client.get_client_id()
        if record is None or not record.check_client(client):
            raise InvalidGrantError(
                "The refresh token is not valid for this client: it is unknown or was "
                "issued to another client."
            )
        now = side.clock()
        if record.revoked_at is not None:
            raise InvalidGrantError(
                "The refresh token was revoked. Sign the user in again (authorization code)."
            )
        if record.rotated_at is not None:
            self._reuse(record, client_id, now)
        if record.is_expired(now):
            raise InvalidGrantError(
                "The refresh token expired. Sign the user in again (authorization code)."
            )
        self._validate_token_scope(record)
        user = side.users.get_by_id(record.user_id or "")
        if user is None or user.disabled:
            raise InvalidGrantError("The user of this refresh token is disabled.")
        with side.store.transaction() as conn:
            claimed = claim_refresh_token(conn, record, now=now)
        if not claimed:  # another request rotated it a moment ago
            self._reuse(record, client_id, now)
        self.request.refresh_token = record
        self.request.user = user

    def _reuse(self, record: RefreshToken, client_id: str, now: datetime) -> None:
        side = self.side
        with side.store.transaction() as conn:
            revoked = revoke_family(conn, record.family_id, now=now)
            side.store.append_audit(
                conn,
                at=now,
                actor=f"client:{client_id}",
                action="idp.refresh.reuse",
                subject=record.user_id or "",
                details={
                    "client_id": client_id,
                    "family_id": record.family_id,
                    "refresh_tokens_revoked": revoked,
                },
            )
        raise InvalidGrantError(
            "The refresh token was already used (each refresh returns a new one). Reuse "
            "means it may have leaked, so every token of this sign-in is now revoked. Sign "
            "the user in again."
        )

    def authenticate_user(self, refresh_token: RefreshToken) -> User:
        """Return the user checked in :meth:`validate_token_request`."""
        user: User = self.request.user
        return user

    def generate_token(
        self,
        user: User | None = None,
        scope: str | None = None,
        grant_type: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        """Mint a new access token and the next refresh token of the family."""
        if user is None:  # pragma: no cover - authenticate_user never returns None
            raise InvalidGrantError("There is no user for this token.")
        return self._tokens(user, scope or "", True)

    def save_token(self, token: dict[str, Any]) -> None:
        """Store the next refresh token in the same family."""
        record: RefreshToken = self.request.refresh_token
        self._save_refresh(token, family_id=record.family_id, auth_time=record.auth_time or 0)

    def revoke_old_credential(self, refresh_token: RefreshToken) -> None:
        """Nothing to do: the token was marked rotated when it was claimed."""


class IDTokenExtension:
    """Add an OpenID Connect ID token to token responses that granted ``openid``.

    Claims: ``iss``, ``sub`` (user id), ``aud`` (client id), ``azp``, ``exp``,
    ``iat``, ``auth_time``, ``nonce`` (code flow only), ``at_hash``, and the profile
    claims the scope allows. Signed with the server's current key, header ``typ``
    ``JWT`` so no verifier can take it for an access token (RFC 9068 section 4).
    """

    def __init__(self, side: UserSide) -> None:
        self.side = side

    def __call__(self, grant: Any) -> None:
        """Register on a grant instance (Authlib extension protocol)."""
        grant.register_hook("after_create_token_response", self.process_token)

    def process_token(self, grant: Any, response: Any) -> None:
        """Add ``id_token`` to the response body when ``openid`` was granted."""
        _, token, _ = response
        scope = (token.get("scope") or "").split()
        if "openid" not in scope:
            return
        request = grant.request
        user: User = request.user
        client_id = request.client.get_client_id()
        now = self.side.clock()
        claims: dict[str, Any] = {
            "iss": self.side.issuer,
            "sub": user.user_id,
            "aud": client_id,
            "azp": client_id,
            "iat": int(now.timestamp()),
            "exp": int((now + ID_TOKEN_LIFETIME).timestamp()),
        }
        code = request.authorization_code
        if isinstance(code, AuthorizationCode):
            claims["auth_time"] = code.auth_time
            if code.nonce:
                claims["nonce"] = code.nonce
        elif isinstance(request.refresh_token, RefreshToken) and request.refresh_token.auth_time:
            claims["auth_time"] = request.refresh_token.auth_time
        claims.update(profile_claims(user, scope))
        token["id_token"] = self.side.sign_id_token(claims, token.get("access_token"))


def profile_claims(user: User, scope: list[str] | set[str]) -> dict[str, Any]:
    """Return the user claims a scope releases (``profile``, ``email``; roles always)."""
    claims: dict[str, Any] = {"roles": list(user.roles)}
    if "profile" in scope:
        claims["preferred_username"] = user.username
    if "email" in scope and user.email:
        claims["email"] = user.email
    return claims


def user_grants(
    side: UserSide, auth_methods: list[str] | None = None
) -> list[tuple[type[Any], list[Any]]]:
    """Return ``(grant class, extensions)`` pairs to register on the server.

    The classes are subclasses bound to ``side``::

        for grant, extensions in user_grants(side):
            server.register_grant(grant, extensions)
    """
    methods = auth_methods or ["client_secret_basic", "client_secret_post"]
    code = type(
        "BoundUserCodeGrant",
        (UserCodeGrant,),
        {"side": side, "TOKEN_ENDPOINT_AUTH_METHODS": methods},
    )
    refresh = type(
        "BoundUserRefreshGrant",
        (UserRefreshGrant,),
        {"side": side, "TOKEN_ENDPOINT_AUTH_METHODS": methods},
    )
    id_token = IDTokenExtension(side)
    return [(code, [S256CodeChallenge(), id_token]), (refresh, [id_token])]
