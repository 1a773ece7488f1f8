"""``trustmesh token``: join tokens for first enrollment, and access-token checks."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
from cryptography import x509

from trustmesh.errors import ConfigError
from trustmesh.pki import SANAllowance, load_pem_certificates, parse_duration
from trustmesh.tokens import InvalidTokenError, IssuerConfig, Verifier

from ._common import home_option, json_option, open_ca, print_fields, print_json


@click.group("token")
def token_group() -> None:
    """Create join tokens that let a service enroll once; verify access tokens."""


@token_group.command("create")
@click.argument("spiffe_id")
@click.option("--ttl", default="15m", show_default=True, help="How long the token is valid.")
@click.option("--uses", default=1, show_default=True, help="How many enrollments it allows.")
@click.option(
    "--dns",
    "dns",
    multiple=True,
    metavar="PATTERN",
    help="DNS SAN the enrolled identity (and its renewals) may carry: a name, or a glob "
    "('*' within a label, '**' across labels). Repeatable; default: none.",
)
@click.option(
    "--ip",
    "ips",
    multiple=True,
    metavar="ADDR_OR_CIDR",
    help="IP SAN it may carry: an address, or a CIDR range. Repeatable; default: none.",
)
@home_option
@json_option
def create_command(
    spiffe_id: str,
    ttl: str,
    uses: int,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    home: Path | None,
    as_json: bool,
) -> None:
    """Create a join token bound to SPIFFE_ID (or a glob such as spiffe://td/ns/*).

    The identity's certificates carry DNS/IP SANs (agent --dns/--ip, for host-name
    checks) only where --dns/--ip here allow them, at enrollment and every renewal.
    Prints the token alone on stdout (it is shown once; only its hash is stored).
    """
    lifetime = parse_duration(ttl, field="--ttl")
    with open_ca(home) as ca:
        token = ca.create_join_token(spiffe_id, ttl=lifetime, uses=uses, dns=dns, ips=ips)
    if as_json:
        allowance = SANAllowance.parse(dns, ips)
        print_json(
            {
                "token": token,
                "spiffe_id": spiffe_id,
                "uses": uses,
                "ttl": ttl,
                "dns": list(allowance.dns),
                "ips": list(allowance.ips),
            }
        )
    else:
        click.echo(token)


def _read_token(token: str) -> str:
    if token == "-":  # noqa: S105 - the stdin marker, not a secret
        token = sys.stdin.read()
    token = token.strip()
    if not token:
        raise ConfigError("TOKEN is empty. Pass the access token, or - to read it from stdin.")
    return token


def _client_certificate(path: Path | None) -> x509.Certificate | None:
    if path is None:
        return None
    try:
        certs = load_pem_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--client-cert {str(path)!r} is not a readable PEM certificate ({exc}). "
            f"Give the certificate the token was issued to (the agent's cert.pem).",
            field="client_cert",
        ) from None
    if not certs:
        raise ConfigError(f"--client-cert {str(path)!r} holds no PEM certificate.")
    return certs[0]


def _when(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        stamp = datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{stamp} ({int(value)})"
    return str(value)


@token_group.command("verify")
@click.argument("token")
@click.option(
    "--issuer", required=True, help="Exact issuer (iss) to trust, e.g. https://HOST:PORT."
)
@click.option(
    "--audience",
    "audiences",
    required=True,
    multiple=True,
    help="Audience the token must name in aud (repeatable: any one of them).",
)
@click.option(
    "--jwks-url",
    default=None,
    help="Fetch the keys here instead of through {issuer}/.well-known/openid-configuration.",
)
@click.option(
    "--ca-bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM trust anchors for the provider's HTTPS (trustmesh export bundle --out F). "
    "Default: the system CAs.",
)
@click.option(
    "--client-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM certificate a certificate-bound token (cnf.x5t#S256) must be bound to.",
)
@click.option(
    "--ignore-binding",
    is_flag=True,
    help="Accept certificate-bound tokens without --client-cert (debugging; says so).",
)
@click.option("--leeway", default="60s", show_default=True, help="Clock skew allowed.")
@click.option("--max-lifetime", default="1h", show_default=True, help="Longest exp - iat accepted.")
@json_option
def verify_command(
    token: str,
    issuer: str,
    audiences: tuple[str, ...],
    jwks_url: str | None,
    ca_bundle: Path | None,
    client_cert: Path | None,
    ignore_binding: bool,
    leeway: str,
    max_lifetime: str,
    as_json: bool,
) -> None:
    """Verify an access TOKEN (JWT, RFC 9068) as trustmesh services do; - reads stdin.

    Prints the claims, or the refusal reason and exits 1. Keys come from the
    issuer's discovery document (or --jwks-url), its revocation list is
    checked when advertised.

    \b
    Example:
      trustmesh token verify "$TOKEN" --issuer https://127.0.0.1:9443 \\
          --audience orders --ca-bundle bundle.pem
    """
    value = _read_token(token)
    cert = _client_certificate(client_cert)
    config = IssuerConfig(
        issuer,
        audiences=audiences,
        jwks_url=jwks_url,
        ca_bundle=ca_bundle,
        leeway=parse_duration(leeway, field="--leeway"),
        max_lifetime=parse_duration(max_lifetime, field="--max-lifetime"),
    )
    if ignore_binding:
        click.echo("note: certificate binding (cnf) is not checked (--ignore-binding)", err=True)
    # Fetch failures are explained in the refusal; the library's warnings would repeat them.
    library_log = logging.getLogger("trustmesh.tokens")
    level = library_log.level
    library_log.setLevel(logging.ERROR)
    try:
        with Verifier(config, token_cache_size=0) as verifier:
            claims = verifier.verify_access_token(
                value, client_cert=cert, skip_binding=ignore_binding
            )
    except InvalidTokenError as exc:
        if as_json:
            print_json({"valid": False, "reason": exc.reason, "message": exc.message})
        click.echo(f"refused ({exc.reason}): {exc.message}", err=True)
        raise click.exceptions.Exit(1) from None
    finally:
        library_log.setLevel(level)
    if as_json:
        print_json({"valid": True, "claims": claims.to_dict()})
        return
    fields: list[tuple[str, object]] = [
        ("issuer", claims.issuer),
        ("subject", claims.subject),
        ("client_id", claims.client_id),
        ("audience", " ".join(claims.audience)),
        ("scopes", " ".join(sorted(claims.scopes))),
        ("roles", " ".join(claims.roles)),
        ("expires", _when(claims.expires_at)),
        ("issued", _when(claims.issued_at)),
        ("jti", claims.jwt_id),
        ("bound to", claims.certificate_thumbprint or "(not certificate-bound)"),
    ]
    shown = {"iss", "sub", "client_id", "aud", "scope", "roles", "exp", "iat", "jti", "cnf"}
    for name, item in sorted(claims.claims.items()):
        if name not in shown:
            fields.append((name, item if isinstance(item, str) else json.dumps(item)))
    print_fields("valid access token", fields)
