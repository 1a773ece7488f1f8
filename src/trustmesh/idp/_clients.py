"""OAuth clients: registration, secrets (hashed), lookup, and Authlib's ``ClientMixin``.

A client secret is ``tms_`` + 256 random bits. It is stored as
``sha256$SALT$HEX``: a salted SHA-256. A slow hash (argon2) protects guessable
passwords; a 256-bit random secret cannot be guessed, so a fast hash is as safe
and keeps ``/token`` fast. Comparison is constant-time.

Lists (scopes, roles, audiences, grant types, redirect URIs) are stored
space-separated, so their values may not contain whitespace.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, insert, select, update

from trustmesh.errors import ConfigError, NotFoundError
from trustmesh.store import Store, idp_clients

__all__ = [
    "AUTH_METHODS",
    "CLIENT_ID_PREFIX",
    "CLIENT_SECRET_PREFIX",
    "GRANT_TYPES",
    "IdpClient",
    "add_client",
    "get_client",
    "hash_secret",
    "list_clients",
    "load_client",
    "rotate_client_secret",
    "set_client_disabled",
]

#: Client authentication methods a client may be registered with.
AUTH_METHODS = (
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "tls_client_auth",
    "none",
)
#: Grant types a client may be registered for.
GRANT_TYPES = ("client_credentials", "authorization_code", "refresh_token")
CLIENT_ID_PREFIX = "tmc_"
CLIENT_SECRET_PREFIX = "tms_"  # noqa: S105 - a prefix, not a secret
_SECRET_METHODS = {"client_secret_basic", "client_secret_post"}


def hash_secret(secret: str, salt: str | None = None) -> str:
    """Return ``sha256$SALT$HEX`` for a client secret."""
    salt = salt if salt is not None else secrets.token_hex(16)
    digest = hashlib.sha256(f"{salt}${secret}".encode()).hexdigest()
    return f"sha256${salt}${digest}"


def _check_secret(stored: str | None, secret: str) -> bool:
    if not stored or not secret:
        return False
    parts = stored.split("$")
    if len(parts) != 3 or parts[0] != "sha256":
        return False
    return hmac.compare_digest(hash_secret(secret, parts[1]), stored)


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v for v in (value or "").split() if v)


@dataclass(frozen=True)
class IdpClient:
    """A registered client (implements Authlib's ``ClientMixin``).

    Attributes:
        client_id: Random ``tmc_...`` identifier.
        name: Unique human name.
        auth_method: How it authenticates at the token endpoint.
        grant_types: Grants it may use.
        scopes: Scopes it may request (all of them when it asks for none).
        roles: Roles put in its tokens' ``roles`` claim.
        audiences: Allowed ``aud`` values; the first is the default. Empty: the client_id.
        redirect_uris: For authorization_code (user side).
        jwks: Public keys for private_key_jwt.
        tls_spiffe_id: SPIFFE ID its mTLS certificate must carry (tls_client_auth).
        disabled: Refused everywhere when True.
    """

    client_id: str
    name: str
    auth_method: str
    grant_types: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    redirect_uris: tuple[str, ...] = ()
    jwks: dict[str, Any] | None = None
    tls_spiffe_id: str | None = None
    disabled: bool = False
    created_at: int = 0
    secret_hash: str | None = field(default=None, repr=False)

    @property
    def default_audience(self) -> str:
        """The ``aud`` of its tokens when it does not ask for one."""
        return self.audiences[0] if self.audiences else self.client_id

    def to_json(self) -> dict[str, Any]:
        """JSON for ``idp client list --json`` (never the secret)."""
        return {
            "client_id": self.client_id,
            "name": self.name,
            "auth_method": self.auth_method,
            "grant_types": list(self.grant_types),
            "scopes": list(self.scopes),
            "roles": list(self.roles),
            "audiences": list(self.audiences),
            "redirect_uris": list(self.redirect_uris),
            "tls_spiffe_id": self.tls_spiffe_id,
            "has_jwks": self.jwks is not None,
            "disabled": self.disabled,
        }

    # -- authlib ClientMixin --------------------------------------------------------

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if self.redirect_uris else None

    def get_allowed_scope(self, scope: str | None) -> str:
        """The requested scopes that this client may have (all of them if none asked)."""
        if not scope:
            return " ".join(self.scopes)
        allowed = set(self.scopes)
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return self.auth_method in _SECRET_METHODS and _check_secret(
            self.secret_hash, client_secret
        )

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return not self.disabled and method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


def _from_row(row: Any) -> IdpClient:
    return IdpClient(
        client_id=row.client_id,
        name=row.name,
        auth_method=row.auth_method,
        grant_types=_split(row.grant_types),
        scopes=_split(row.scopes),
        roles=_split(row.roles),
        audiences=_split(row.audience),
        redirect_uris=_split(row.redirect_uris),
        jwks=json.loads(row.jwks) if row.jwks else None,
        tls_spiffe_id=row.tls_spiffe_id,
        disabled=bool(row.disabled),
        created_at=int(row.created_at),
        secret_hash=row.secret_hash,
    )


def _check_words(values: Sequence[str], option: str) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        if not value or any(c.isspace() for c in value) or '"' in value or "\\" in value:
            raise ConfigError(
                f"{option} {value!r} is not a single word: pass one value per {option}.",
                field=option.lstrip("-"),
            )
        if value not in out:
            out.append(value)
    return tuple(out)


def _check_jwks(jwks: dict[str, Any]) -> None:
    keys = jwks.get("keys")
    if not isinstance(keys, list) or not keys:
        raise ConfigError(
            'The JWKS must be a JSON object {"keys": [...]} with at least one public key.',
            field="jwks",
        )
    for key in keys:
        if not isinstance(key, dict) or key.get("kty") not in {"EC", "RSA", "OKP"}:
            raise ConfigError(
                "Every JWKS key must be an EC, RSA or OKP public key (kty EC/RSA/OKP).",
                field="jwks",
            )
        if any(p in key for p in ("d", "p", "q", "dp", "dq", "qi")):
            raise ConfigError(
                "The JWKS holds a private key: register the public keys only.", field="jwks"
            )


def add_client(
    conn: Connection,
    *,
    name: str,
    scopes: Sequence[str],
    audiences: Sequence[str] = (),
    roles: Sequence[str] = (),
    auth_method: str = "client_secret_basic",
    grant_types: Sequence[str] = (),
    redirect_uris: Sequence[str] = (),
    jwks: dict[str, Any] | None = None,
    tls_spiffe_id: str | None = None,
    now: int | None = None,
) -> tuple[IdpClient, str | None]:
    """Register a client inside the caller's transaction; return it and its secret.

    The secret (secret methods only) is returned once; only its hash is stored.

    Raises:
        ConfigError: Inconsistent settings (say which and how to fix them).
        ConflictError: The name is taken.
    """
    if not name or len(name) > 128 or any(c.isspace() for c in name):
        raise ConfigError(
            f"Client name {name!r} must be 1-128 characters without spaces.", field="name"
        )
    if auth_method not in AUTH_METHODS:
        raise ConfigError(
            f"Unknown --auth-method {auth_method!r}: use one of {', '.join(AUTH_METHODS)}.",
            field="auth_method",
        )
    grants = _check_words(grant_types, "--grant-type") or (
        ("authorization_code", "refresh_token") if redirect_uris else ("client_credentials",)
    )
    unknown = [g for g in grants if g not in GRANT_TYPES]
    if unknown:
        raise ConfigError(
            f"Unknown --grant-type {unknown[0]!r}: use one of {', '.join(GRANT_TYPES)}.",
            field="grant_type",
        )
    if auth_method == "none" and "client_credentials" in grants:
        raise ConfigError(
            "A public client (--auth-method none) cannot use client_credentials: "
            "pick an authenticating --auth-method.",
            field="auth_method",
        )
    if "authorization_code" in grants and not redirect_uris:
        raise ConfigError(
            "authorization_code needs at least one --redirect-uri.", field="redirect_uri"
        )
    if auth_method == "private_key_jwt":
        if jwks is None:
            raise ConfigError(
                "private_key_jwt needs the client's public keys: pass --jwks-file F.",
                field="jwks",
            )
        _check_jwks(jwks)
    elif jwks is not None:
        raise ConfigError("--jwks-file is only for --auth-method private_key_jwt.", field="jwks")
    if auth_method == "tls_client_auth":
        if not tls_spiffe_id or not tls_spiffe_id.startswith("spiffe://"):
            raise ConfigError(
                "tls_client_auth needs --tls-spiffe-id spiffe://TRUST-DOMAIN/PATH, the "
                "ID in the client's certificate.",
                field="tls_spiffe_id",
            )
    elif tls_spiffe_id is not None:
        raise ConfigError(
            "--tls-spiffe-id is only for --auth-method tls_client_auth.", field="tls_spiffe_id"
        )
    for uri in redirect_uris:
        if not (uri.startswith(("https://", "http://127.0.0.1", "http://localhost"))) or "#" in uri:
            raise ConfigError(
                f"--redirect-uri {uri!r} must be an https:// URL (or http://127.0.0.1 / "
                f"http://localhost for native apps) without a fragment.",
                field="redirect_uri",
            )
    stamp = int(time.time()) if now is None else now
    secret = (
        CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32) if auth_method in _SECRET_METHODS else None
    )
    client = IdpClient(
        client_id=CLIENT_ID_PREFIX + secrets.token_hex(12),
        name=name,
        auth_method=auth_method,
        grant_types=grants,
        scopes=_check_words(scopes, "--scope"),
        roles=_check_words(roles, "--role"),
        audiences=_check_words(audiences, "--audience"),
        redirect_uris=_check_words(redirect_uris, "--redirect-uri"),
        jwks=jwks,
        tls_spiffe_id=tls_spiffe_id,
        created_at=stamp,
        secret_hash=hash_secret(secret) if secret else None,
    )
    conn.execute(
        insert(idp_clients).values(
            client_id=client.client_id,
            name=client.name,
            secret_hash=client.secret_hash,
            auth_method=client.auth_method,
            grant_types=" ".join(client.grant_types),
            scopes=" ".join(client.scopes),
            roles=" ".join(client.roles),
            audience=" ".join(client.audiences),
            redirect_uris=" ".join(client.redirect_uris),
            jwks=json.dumps(jwks, sort_keys=True) if jwks is not None else None,
            tls_spiffe_id=tls_spiffe_id,
            disabled=0,
            created_at=stamp,
            updated_at=stamp,
        )
    )
    return client, secret


def load_client(conn: Connection, client_id: str) -> IdpClient | None:
    """The client with this id, or None."""
    row = conn.execute(select(idp_clients).where(idp_clients.c.client_id == client_id)).first()
    return _from_row(row) if row is not None else None


def get_client(conn: Connection, name_or_id: str) -> IdpClient:
    """The client with this name or id.

    Raises:
        NotFoundError: No such client.
    """
    row = conn.execute(
        select(idp_clients).where(
            (idp_clients.c.name == name_or_id) | (idp_clients.c.client_id == name_or_id)
        )
    ).first()
    if row is None:
        raise NotFoundError(
            f"No identity-server client named {name_or_id!r}: see `trustmesh idp client list`.",
            field="name",
        )
    return _from_row(row)


def list_clients(store: Store) -> list[IdpClient]:
    """Every client, by name."""
    with store.reader() as conn:
        rows = conn.execute(select(idp_clients).order_by(idp_clients.c.name)).all()
    return [_from_row(r) for r in rows]


def rotate_client_secret(conn: Connection, name_or_id: str) -> tuple[IdpClient, str]:
    """Replace a secret client's secret; return the client and the new secret.

    Raises:
        NotFoundError: No such client.
        ConfigError: The client does not use a secret.
    """
    client = get_client(conn, name_or_id)
    if client.auth_method not in _SECRET_METHODS:
        raise ConfigError(
            f"Client {client.name!r} authenticates with {client.auth_method}, not a secret; "
            f"there is no secret to rotate.",
            field="name",
        )
    secret = CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        update(idp_clients)
        .where(idp_clients.c.client_id == client.client_id)
        .values(secret_hash=hash_secret(secret), updated_at=int(time.time()))
    )
    return client, secret


def set_client_disabled(conn: Connection, name_or_id: str, disabled: bool) -> IdpClient:
    """Disable (or re-enable) a client.

    Raises:
        NotFoundError: No such client.
    """
    client = get_client(conn, name_or_id)
    conn.execute(
        update(idp_clients)
        .where(idp_clients.c.client_id == client.client_id)
        .values(disabled=int(disabled), updated_at=int(time.time()))
    )
    return client
