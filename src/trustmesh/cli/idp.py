"""``trustmesh idp``: the embedded OAuth 2.0 / OpenID Connect identity server.

``idp serve`` runs it; ``idp client ...`` and ``idp keys ...`` work on the database
directly (no server needed) and are audited.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from trustmesh.authority import CertificateAuthority, default_actor
from trustmesh.config import CONFIG_NAME, CAConfig
from trustmesh.errors import ConfigError
from trustmesh.logs import announce, configure_logging
from trustmesh.pki import parse_duration
from trustmesh.store import open_store

from ._common import (
    ca_passphrase,
    home_option,
    json_option,
    passphrase_option,
    print_json,
    print_table,
    resolve_home,
)
from .idp_users import user_group

__all__ = ["idp_group"]


def db_option(func: Any) -> Any:
    """Add ``--db`` (default: the CA's database from config.toml)."""
    return click.option(
        "--db",
        "db_url",
        default=None,
        help="Database URL (default: the CA's, from config.toml in the home).",
    )(func)


def _open(
    home: Path | None,
    db_url: str | None,
    passphrase: bytes | None = None,
) -> CertificateAuthority:
    directory = resolve_home(home)
    config = CAConfig.load(directory / CONFIG_NAME)
    store = open_store(db_url or config.db)
    try:
        ca = CertificateAuthority(directory, config, store, passphrase)
        if passphrase is not None:
            _ = ca.signing_key  # fail now on a wrong passphrase
    except BaseException:
        store.close()
        raise
    return ca


def _seconds(value: str, option: str, *, zero: bool = False) -> int:
    if zero and value.strip() in {"0", "0s"}:
        return 0
    return int(parse_duration(value, field=option).total_seconds())


def _audit(ca: CertificateAuthority, action: str, subject: str, details: dict[str, Any]) -> None:
    with ca.store.transaction() as conn:
        ca.store.append_audit(
            conn,
            at=datetime.now(UTC).replace(microsecond=0),
            actor=default_actor(),
            action=action,
            subject=subject,
            details=details,
        )


@click.group("idp")
def idp_group() -> None:
    """Run the identity server and manage its clients, users and signing keys."""


@idp_group.command("serve")
@click.option(
    "--listen", default="127.0.0.1:9443", show_default=True, help="HOST:PORT to listen on."
)
@click.option("--issuer", default=None, help="Issuer URL (default: https://LISTEN).")
@click.option(
    "--access-ttl", default="10m", show_default=True, help="Access-token lifetime (max 1h)."
)
@click.option(
    "--token-rate",
    type=click.FloatRange(min=0.1),
    default=50.0,
    show_default=True,
    help="/token requests per second allowed per client (token bucket refill).",
)
@click.option(
    "--token-burst",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="/token requests a client may make at once before --token-rate applies.",
)
@click.option(
    "--ip-rate",
    type=click.FloatRange(min=0.1),
    default=200.0,
    show_default=True,
    help="/token requests per second allowed per client address.",
)
@click.option(
    "--ip-burst",
    type=click.IntRange(min=1),
    default=400,
    show_default=True,
    help="/token requests one address may make at once.",
)
@db_option
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    default="json",
    show_default=True,
    help="JSON lines for log shippers, or text for people.",
)
@home_option
@passphrase_option
def serve_command(
    listen: str,
    issuer: str | None,
    access_ttl: str,
    token_rate: float,
    token_burst: int,
    ip_rate: float,
    ip_burst: int,
    db_url: str | None,
    log_level: str,
    log_format: str,
    home: Path | None,
    passphrase_file: Path | None,
) -> None:
    """Run the OAuth 2.0 / OpenID Connect identity server over HTTPS.

    Its certificate comes from the local CA (verify it with `trustmesh export
    bundle`). Needs the CA passphrase: it encrypts the token-signing keys. The first
    start creates an ES256 signing key.
    """
    from trustmesh.idp import IdpSettings, serve
    from trustmesh.serving import parse_listen

    parse_listen(listen)  # bad input fails before the passphrase is needed
    ttl = _seconds(access_ttl, "--access-ttl")
    if ttl > 3600:
        raise ConfigError(
            f"--access-ttl {access_ttl} is over 1h: access tokens are short-lived; "
            "use refresh tokens for long sessions.",
            field="access_ttl",
        )
    if issuer is not None and not issuer.startswith("https://"):
        raise ConfigError(
            f"--issuer {issuer!r} must be an https:// URL (e.g. https://idp.example.org).",
            field="issuer",
        )
    configure_logging(log_level, log_format)
    passphrase = ca_passphrase(passphrase_file)
    settings = IdpSettings(
        issuer="",
        access_ttl=ttl,
        token_rate=token_rate,
        token_burst=token_burst,
        ip_rate=ip_rate,
        ip_burst=ip_burst,
    )
    with _open(home, db_url, passphrase) as ca:
        serve(
            ca,
            passphrase,
            listen=listen,
            issuer=issuer,
            settings=settings,
            log_level=log_level,
            ready=lambda url: announce(
                f"trustmesh identity server listening on {url}", event="ready", url=url
            ),
        )


# -- clients --------------------------------------------------------------------------


@idp_group.group("client")
def client_group() -> None:
    """Register and manage OAuth clients."""


def _print_credentials(client_id: str, secret: str | None, as_json: bool) -> None:
    if as_json:
        print_json({"client_id": client_id, "client_secret": secret})
        return
    click.echo(f"client_id: {client_id}")
    if secret is not None:
        click.echo(f"client_secret: {secret}")
        click.echo("The secret is shown once; only its hash is stored.", err=True)


@client_group.command("add")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, help="Scope the client may request (repeatable).")
@click.option(
    "--audience",
    "audiences",
    multiple=True,
    help="aud of its tokens (repeatable; the first is the default, others may be asked for "
    "with resource=). Default: the client_id.",
)
@click.option("--role", "roles", multiple=True, help="Role put in its tokens (repeatable).")
@click.option(
    "--auth-method",
    type=click.Choice(
        ["client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth", "none"]
    ),
    default="client_secret_basic",
    show_default=True,
    help="How it authenticates at the token endpoint.",
)
@click.option(
    "--jwks-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON Web Key Set with its public keys (private_key_jwt).",
)
@click.option(
    "--tls-spiffe-id",
    default=None,
    help="SPIFFE ID its mTLS certificate carries (tls_client_auth).",
)
@click.option("--redirect-uri", "redirect_uris", multiple=True, help="For authorization_code.")
@click.option(
    "--grant-type",
    "grant_types",
    multiple=True,
    help="client_credentials, authorization_code or refresh_token (repeatable; default "
    "client_credentials, or authorization_code + refresh_token with --redirect-uri).",
)
@db_option
@home_option
@json_option
def client_add_command(
    name: str,
    scopes: tuple[str, ...],
    audiences: tuple[str, ...],
    roles: tuple[str, ...],
    auth_method: str,
    jwks_file: Path | None,
    tls_spiffe_id: str | None,
    redirect_uris: tuple[str, ...],
    grant_types: tuple[str, ...],
    db_url: str | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Register client NAME; print its client_id and secret (shown once)."""
    from trustmesh.idp import add_client

    jwks: dict[str, Any] | None = None
    if jwks_file is not None:
        try:
            loaded = json.loads(jwks_file.read_text())
        except OSError as exc:
            raise ConfigError(
                f"Cannot read --jwks-file {jwks_file}: {exc.strerror}.", path=str(jwks_file)
            ) from None
        except ValueError:
            raise ConfigError(
                f'--jwks-file {jwks_file} is not JSON: give a JWKS {{"keys": [...]}}.',
                path=str(jwks_file),
            ) from None
        if isinstance(loaded, dict) and "keys" not in loaded and "kty" in loaded:
            loaded = {"keys": [loaded]}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"--jwks-file {jwks_file} must hold a JSON object.", path=str(jwks_file)
            )
        jwks = loaded
    with _open(home, db_url) as ca, ca.store.transaction() as conn:
        client, secret = add_client(
            conn,
            name=name,
            scopes=scopes,
            audiences=audiences,
            roles=roles,
            auth_method=auth_method,
            grant_types=grant_types,
            redirect_uris=redirect_uris,
            jwks=jwks,
            tls_spiffe_id=tls_spiffe_id,
        )
        ca.store.append_audit(
            conn,
            at=datetime.now(UTC).replace(microsecond=0),
            actor=default_actor(),
            action="idp.client.add",
            subject=client.client_id,
            details={
                "name": name,
                "auth_method": auth_method,
                "scopes": " ".join(client.scopes),
                "grant_types": " ".join(client.grant_types),
            },
        )
    _print_credentials(client.client_id, secret, as_json)


@client_group.command("list")
@db_option
@home_option
@json_option
def client_list_command(db_url: str | None, home: Path | None, as_json: bool) -> None:
    """List clients (never their secrets)."""
    from trustmesh.idp import list_clients

    with _open(home, db_url) as ca:
        clients = list_clients(ca.store)
    if as_json:
        print_json([c.to_json() for c in clients])
        return
    print_table(
        "identity-server clients",
        ["name", "client_id", "auth method", "grants", "scopes", "audience", "status"],
        [
            (
                c.name,
                c.client_id,
                c.auth_method,
                " ".join(c.grant_types),
                " ".join(c.scopes),
                " ".join(c.audiences) or "(client_id)",
                "disabled" if c.disabled else "enabled",
            )
            for c in clients
        ],
    )


@client_group.command("rotate-secret")
@click.argument("name")
@db_option
@home_option
@json_option
def client_rotate_command(name: str, db_url: str | None, home: Path | None, as_json: bool) -> None:
    """Give client NAME a new secret (the old one stops working at once)."""
    from trustmesh.idp import rotate_client_secret

    with _open(home, db_url) as ca, ca.store.transaction() as conn:
        client, secret = rotate_client_secret(conn, name)
        ca.store.append_audit(
            conn,
            at=datetime.now(UTC).replace(microsecond=0),
            actor=default_actor(),
            action="idp.client.rotate_secret",
            subject=client.client_id,
            details={"name": client.name},
        )
    _print_credentials(client.client_id, secret, as_json)


@client_group.command("disable")
@click.argument("name")
@click.option("--enable", is_flag=True, help="Enable the client again instead.")
@db_option
@home_option
def client_disable_command(name: str, enable: bool, db_url: str | None, home: Path | None) -> None:
    """Disable client NAME: it can no longer get, introspect or revoke tokens."""
    from trustmesh.idp import set_client_disabled

    with _open(home, db_url) as ca, ca.store.transaction() as conn:
        client = set_client_disabled(conn, name, not enable)
        ca.store.append_audit(
            conn,
            at=datetime.now(UTC).replace(microsecond=0),
            actor=default_actor(),
            action="idp.client.enable" if enable else "idp.client.disable",
            subject=client.client_id,
            details={"name": client.name},
        )
    click.echo(f"{'Enabled' if enable else 'Disabled'} client {client.name} ({client.client_id})")


# -- signing keys ---------------------------------------------------------------------


@idp_group.group("keys")
def keys_group() -> None:
    """List and rotate the token-signing keys."""


@keys_group.command("rotate")
@click.option("--alg", type=click.Choice(["ES256", "RS256"]), default="ES256", show_default=True)
@click.option(
    "--publish-delay",
    default="5m",
    show_default=True,
    help="How long the new key is published before it signs (0s: at once). Verifiers "
    "that cache the JWKS pick it up meanwhile.",
)
@db_option
@home_option
@passphrase_option
@json_option
def keys_rotate_command(
    alg: str,
    publish_delay: str,
    db_url: str | None,
    home: Path | None,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Publish a new signing key now; it signs after --publish-delay, and the old key
    stops signing then (it stays in the JWKS until its tokens expire)."""
    from trustmesh.idp import rotate_signing_key

    delay = _seconds(publish_delay, "--publish-delay", zero=True)
    passphrase = ca_passphrase(passphrase_file)
    with _open(home, db_url, passphrase) as ca:
        info = rotate_signing_key(ca.store, passphrase, alg=alg, publish_delay=delay)
        _audit(ca, "idp.key.rotate", info.kid, {"alg": alg, "active_at": info.active_at})
    if as_json:
        print_json(info.to_json(int(time.time()), 0))
    else:
        click.echo(
            f"New {alg} key {info.kid} published; it signs from "
            f"{datetime.fromtimestamp(info.active_at, UTC):%Y-%m-%dT%H:%M:%SZ}."
        )


@keys_group.command("list")
@click.option(
    "--access-ttl",
    default="10m",
    show_default=True,
    help="The server's --access-ttl (how long retired keys stay published).",
)
@db_option
@home_option
@json_option
def keys_list_command(
    access_ttl: str, db_url: str | None, home: Path | None, as_json: bool
) -> None:
    """List signing keys: pending (published, not signing yet), signing, retired, removed."""
    from trustmesh.idp import list_signing_keys

    keep = _seconds(access_ttl, "--access-ttl") + 60
    with _open(home, db_url) as ca:
        keys = list_signing_keys(ca.store)
    now = int(time.time())
    rows = [k.to_json(now, keep) for k in keys]
    if as_json:
        print_json(rows)
        return
    print_table(
        "identity-server signing keys",
        ["kid", "alg", "status", "published", "signs from", "retired"],
        [
            (r["kid"], r["alg"], r["status"], r["published_at"], r["active_at"], r["retired_at"])
            for r in rows
        ],
    )


idp_group.add_command(user_group)
