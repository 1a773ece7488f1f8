"""``trustmesh policy``: check what an authorization policy decides, lint a policy file."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import urlsplit

import click

from trustmesh.errors import ConfigError, SpiffeIDError
from trustmesh.pki import SpiffeID
from trustmesh.policy import Decision, Policy, PolicyRequest
from trustmesh.tokens import InvalidTokenError, IssuerConfig, Verifier

from ._common import json_option, print_json

__all__ = ["policy_group"]

_policy_log = logging.getLogger("trustmesh.policy")


@click.group("policy")
def policy_group() -> None:
    """Check what an authorization policy decides for a request; lint a policy file."""


def _load(file: Path) -> Policy:
    # Warnings (audit mode, anonymous rules) are printed by the commands themselves.
    level = _policy_log.level
    _policy_log.setLevel(logging.ERROR)
    try:
        return Policy.load(file)
    finally:
        _policy_log.setLevel(level)


def _caller(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return SpiffeID.parse(value).uri
    except SpiffeIDError as exc:
        raise ConfigError(
            f"--caller: {exc.message} (Omit --caller to test a request without a client "
            f"certificate.)",
            field="caller",
        ) from None


def _path(value: str) -> str:
    if value.startswith(("http://", "https://")):
        value = urlsplit(value).path or "/"
    # The policy sees the path without the query string, as a server does.
    return value.partition("?")[0].partition("#")[0]


def _claims_from_json(text: str) -> dict[str, object]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--claims-json is not valid JSON ({exc.msg} at column {exc.colno}). "
            f'Pass an object such as \'{{"sub": "alice", "scope": "inventory:read"}}\'.',
            field="claims_json",
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            "--claims-json must be a JSON object of claims, e.g. "
            '\'{"sub": "alice", "scope": "inventory:read", "roles": ["admin"]}\'.',
            field="claims_json",
        )
    return data


def _verified_claims(
    token: str, issuer: str | None, audiences: tuple[str, ...], ca_bundle: Path | None
) -> tuple[dict[str, object], frozenset[str], tuple[str, ...]]:
    if issuer is None or not audiences:
        raise ConfigError(
            "--token needs --issuer and --audience to verify it (the service's own "
            "settings). To test claims without a token, use --claims-json.",
            field="token",
        )
    config = IssuerConfig(issuer, audiences=audiences, ca_bundle=ca_bundle)
    token_log = logging.getLogger("trustmesh.tokens")
    level = token_log.level
    token_log.setLevel(logging.ERROR)  # the refusal below explains fetch failures
    try:
        with Verifier(config, token_cache_size=0) as verifier:
            # No client certificate here: a certificate-bound token's binding is not checked.
            claims = verifier.verify_access_token(token.strip(), skip_binding=True)
    except InvalidTokenError as exc:
        raise ConfigError(
            f"--token refused ({exc.reason}): {exc.message} A service would answer 401 "
            f"before its policy runs.",
            field="token",
        ) from None
    finally:
        token_log.setLevel(level)
    return claims.to_dict(), claims.scopes, claims.roles


def _print_decision(decision: Decision, policy: Policy, as_json: bool) -> None:
    if as_json:
        fields = decision.log_fields()
        fields["would_deny"] = decision.would_deny
        fields["policy"] = policy.source
        print_json(fields)
        return
    if decision.would_deny:
        click.echo(f"WOULD DENY (audit mode lets it through): {decision.reason}")
    elif decision.allowed:
        click.echo(f"ALLOW: {decision.reason}")
    else:
        click.echo(f"DENY: {decision.reason}")


@policy_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--caller",
    default=None,
    help="The caller's SPIFFE ID (omit for a request without a client certificate).",
)
@click.option("--method", default="GET", show_default=True, help="HTTP method.")
@click.option("--path", "req_path", required=True, help="Request path, e.g. /items/42.")
@click.option("--token", default=None, help="An access token (JWT) to verify and use.")
@click.option("--issuer", default=None, help="Issuer to trust for --token.")
@click.option(
    "--audience", "audiences", multiple=True, help="Audience --token must name (repeatable)."
)
@click.option(
    "--ca-bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM trust anchors for the issuer's HTTPS (default: the system CAs).",
)
@click.option(
    "--claims-json",
    default=None,
    help="Token claims as JSON, to test user rules without a token (not verified).",
)
@json_option
def check_command(
    file: Path,
    caller: str | None,
    method: str,
    req_path: str,
    token: str | None,
    issuer: str | None,
    audiences: tuple[str, ...],
    ca_bundle: Path | None,
    claims_json: str | None,
    as_json: bool,
) -> None:
    """Print what the policy in FILE decides for one request, and why.

    Exit code 0 when allowed, 1 when denied (in audit mode too, when enforce
    mode would deny), 2 for a bad policy or bad input.

    \b
    Examples:
      trustmesh policy check policy.yaml --caller spiffe://example.org/svc/orders \\
          --method GET --path /items/42 --claims-json '{"scope": "inventory:read"}'
      trustmesh policy check policy.yaml --caller spiffe://example.org/svc/orders \\
          --path /items --token "$TOKEN" --issuer https://idp:9443 --audience inventory
    """
    if token is not None and claims_json is not None:
        raise ConfigError("Give --token or --claims-json, not both.")
    if not method.isalpha():
        raise ConfigError(f"--method {method!r} is not an HTTP method; e.g. GET or POST.")
    policy = _load(file)
    who = _caller(caller)
    path = _path(req_path)
    if token is not None:
        claims, scopes, roles = _verified_claims(token, issuer, audiences, ca_bundle)
        request = PolicyRequest(who, method, path, claims, scopes, roles)
    elif claims_json is not None:
        request = PolicyRequest.from_token_claims(who, method, path, _claims_from_json(claims_json))
    else:
        request = PolicyRequest(who, method, path)
    decision = policy.evaluate(request)
    _print_decision(decision, policy, as_json)
    if not as_json:
        for warning in policy.warnings:
            click.echo(f"warning: {warning}", err=True)
    if not decision.allowed or decision.would_deny:
        raise click.exceptions.Exit(1)


@policy_group.command("lint")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def lint_command(file: Path, as_json: bool) -> None:
    """Validate the policy in FILE; print its rules' count and any warnings.

    Exit code 0 when it loads, 2 with the problem (file, rule, field, fix) when not.
    """
    policy = _load(file)
    if as_json:
        print_json(
            {
                "valid": True,
                "policy": policy.source,
                "mode": policy.mode,
                "rules": [r.name for r in policy.rules],
                "warnings": list(policy.warnings),
            }
        )
        return
    deny = sum(1 for r in policy.rules if r.effect == "deny")
    click.echo(f"ok: {policy.source}: {len(policy.rules)} rules ({deny} deny), mode {policy.mode}")
    for warning in policy.warnings:
        click.echo(f"warning: {warning}", err=True)
