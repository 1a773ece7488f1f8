"""Run a sidecar: check the settings, start its parts, serve until SIGTERM, drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from trustmesh.addresses import is_loopback, parse_listen
from trustmesh.errors import ConfigError
from trustmesh.pki import SpiffeID

from ._callers import CallerRules, allow_ids_policy
from ._sidecar import (
    InboundSettings,
    Keeper,
    OutboundSettings,
    ProxySettings,
    Sidecar,
    check_common,
)

__all__ = ["run_inbound", "run_outbound", "validate_inbound", "validate_outbound"]

log = logging.getLogger("trustmesh.proxy")


def _check_revocation(settings: ProxySettings, *, required: bool) -> None:
    if required and settings.ca_url is None and not settings.no_revocation:
        raise ConfigError(
            "No --ca given for the revocation feed. Pass --ca https://CA:8443, or "
            "--no-revocation to accept revoked callers until their certificates expire.",
            field="ca",
        )


def validate_inbound(settings: InboundSettings) -> None:
    """Refuse unusable inbound settings before anything irreversible (a join token spent).

    Raises:
        ConfigError: What is wrong and how to fix it.
    """
    check_common(settings)
    _check_revocation(settings, required=True)
    if settings.http:
        if not settings.proxy_protocol:
            raise ConfigError(
                "--no-proxy-protocol is for TCP mode; HTTP mode passes the caller in headers.",
                field="proxy_protocol",
            )
        if settings.require_token and settings.issuer is None:
            raise ConfigError("--require-token needs --issuer and --audience.", field="issuer")
        if settings.issuer is not None and not settings.audiences:
            raise ConfigError("--issuer needs at least one --audience.", field="audience")
        if (settings.policy is None) == (not settings.allow_ids):
            raise ConfigError(
                "Give either --policy FILE or --allow-id GLOB (repeatable), not both and not "
                "neither: nobody is allowed in by default.",
                field="policy",
            )
        if settings.allow_ids:
            allow_ids_policy(settings.allow_ids)
        else:
            from trustmesh.policy import PolicyFile

            assert settings.policy is not None  # noqa: S101 - checked above
            PolicyFile(settings.policy)
    else:
        given = [
            flag
            for flag, value in (
                ("--issuer", settings.issuer),
                ("--audience", settings.audiences),
                ("--require-token", settings.require_token),
            )
            if value
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: user tokens are checked in HTTP mode only; add --http.",
                field="http",
            )
        CallerRules(settings.policy, settings.allow_ids)


def validate_outbound(settings: OutboundSettings) -> None:
    """Refuse unusable outbound settings.

    Raises:
        ConfigError: What is wrong and how to fix it.
    """
    check_common(settings)
    expect = settings.expect_id
    if not expect.startswith("spiffe://"):
        raise ConfigError(
            f"--expect-id {expect!r} is not a SPIFFE ID or glob; give the service's "
            f"identity, e.g. spiffe://example.org/svc/inventory.",
            field="expect_id",
        )
    if "*" not in expect:
        SpiffeID.parse(expect)
    host, _ = parse_listen(settings.listen)
    if not is_loopback(host) and not settings.allow_remote:
        raise ConfigError(
            f"--listen {settings.listen} is not a loopback address: anyone who reaches it "
            f"would call as {settings.spiffe_id}. Listen on 127.0.0.1, or pass "
            f"--allow-remote if the network is yours alone.",
            field="listen",
        )


def _log_weakened(settings: ProxySettings) -> None:
    if settings.no_revocation:
        log.warning(
            "revocation checks are off (--no-revocation): revoked peers are accepted until "
            "their certificates expire",
            extra={"event": "revocation_disabled"},
        )
    elif settings.ca_url is None:
        log.warning(
            "no --ca given: the server's certificate is not checked against the revocation feed",
            extra={"event": "revocation_disabled"},
        )


def _run(settings: ProxySettings, keeper: Keeper | None, serve: Callable[[Sidecar], None]) -> None:
    _log_weakened(settings)
    sidecar = Sidecar(settings, keeper)
    with sidecar.running():
        serve(sidecar)


def run_inbound(
    settings: InboundSettings,
    *,
    ready: Callable[[str], None] | None = None,
    keeper: Keeper | None = None,
) -> None:
    """Serve ``proxy inbound`` until SIGTERM/SIGINT, then drain and return.

    Raises:
        ConfigError: A setting is unusable.
        TrustmeshError: The sidecar could not start.
    """
    validate_inbound(settings)
    if not settings.http and not settings.proxy_protocol:
        log.warning(
            "PROXY protocol off (--no-proxy-protocol): the app gets raw bytes and cannot learn "
            "who called",
            extra={"event": "proxy_protocol_disabled"},
        )

    def serve(sidecar: Sidecar) -> None:
        if settings.http:
            from ._http import serve_inbound_http

            serve_inbound_http(sidecar, ready)
        else:
            from ._tcp import serve_inbound_tcp

            callers = CallerRules(settings.policy, settings.allow_ids)
            asyncio.run(serve_inbound_tcp(sidecar, callers, ready))

    _run(settings, keeper, serve)


def run_outbound(
    settings: OutboundSettings,
    *,
    ready: Callable[[str], None] | None = None,
    keeper: Keeper | None = None,
) -> None:
    """Serve ``proxy outbound`` until SIGTERM/SIGINT, then drain and return.

    Raises:
        ConfigError: A setting is unusable.
        TrustmeshError: The sidecar could not start.
    """
    from ._tcp import serve_outbound

    validate_outbound(settings)
    if settings.allow_remote and not is_loopback(parse_listen(settings.listen)[0]):
        log.warning(
            "outbound sidecar listening on %s (--allow-remote): anyone who reaches it calls as %s",
            settings.listen,
            settings.spiffe_id,
            extra={"event": "outbound_remote_listen"},
        )
    _run(settings, keeper, lambda sidecar: asyncio.run(serve_outbound(sidecar, ready)))
