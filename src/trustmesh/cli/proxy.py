"""``trustmesh proxy``: sidecar proxies (inbound, outbound)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from trustmesh.errors import ConfigError
from trustmesh.logs import announce, configure_logging
from trustmesh.pki import KeyType, SpiffeID, parse_duration

from .agent import enrollment_options, start_agent

__all__ = ["proxy_group"]


@click.group("proxy")
def proxy_group() -> None:
    """Sidecar proxies for services that do not speak mTLS. See docs/sidecars.md."""


def _common_options(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option(
            "--id",
            "spiffe_id",
            required=True,
            help="The sidecar's own SPIFFE ID (the identity it presents).",
        ),
        click.option(
            "--cert-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Identity directory (key.pem, chain.pem, bundle.pem) kept by 'trustmesh "
            "agent'; watched, new connections use renewed files. With --token the agent "
            "runs in this process and keeps it (default then: a private temporary directory).",
        ),
        click.option(
            "--ca",
            "ca_url",
            default=None,
            help="CA URL, e.g. https://ca:8443: the revocation feed, and enrollment with --token.",
        ),
        click.option("--no-revocation", is_flag=True, help="Skip revocation checks (logged)."),
        click.option(
            "--max-connection-age",
            default="10m",
            show_default=True,
            help="Close connections older than this, so a revoked peer cannot linger.",
        ),
        click.option(
            "--drain-timeout",
            default="15s",
            show_default=True,
            help="On SIGTERM, how long open connections get to finish.",
        ),
        click.option(
            "--metrics",
            default=None,
            metavar="HOST:PORT",
            help="Serve Prometheus metrics over plain HTTP here (/metrics).",
        ),
        click.option("--log-level", default="info", show_default=True),
        click.option(
            "--log-format",
            type=click.Choice(["json", "text"]),
            default="json",
            show_default=True,
        ),
    ]
    command = enrollment_options(command)
    for option in reversed(options):
        command = option(command)
    return command


def _seconds(value: str, flag: str) -> float:
    return parse_duration(value, field=flag).total_seconds()


@contextmanager
def _identity(opts: dict[str, Any]) -> Iterator[tuple[Path, Any]]:
    """Yield the identity directory and the in-process agent's keeper (or None).

    The agent runs in this process when a join token is given or no --cert-dir is.
    """
    context = click.get_current_context()
    agent = bool(opts["token"] or opts["token_file"]) or opts["cert_dir"] is None
    given = [
        f"--{'ip' if name == 'ips' else name.replace('_', '-')}"
        for name in ("bundle", "ttl", "key_type", "dns", "ips")
        if context.get_parameter_source(name) == ParameterSource.COMMANDLINE
    ]
    if not agent and given:
        raise ConfigError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for the agent in this "
            f"process: add --token (or --token-file) and --ca.",
        )
    if agent and opts["ca_url"] is None:
        raise ConfigError(
            "Give --cert-dir DIR (kept by 'trustmesh agent'), or --ca URL --token TOKEN to run "
            "the agent in this process."
        )
    if opts["token"] and opts["token_file"]:
        raise ConfigError("Give --token or --token-file, not both.")
    temporary = None
    cert_dir: Path | None = opts["cert_dir"]
    if cert_dir is None:
        temporary = cert_dir = Path(tempfile.mkdtemp(prefix="trustmesh-proxy-"))  # 0700
    try:
        yield cert_dir, (opts if agent else None)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _keeper(opts: dict[str, Any], cert_dir: Path) -> Any:
    return start_agent(
        opts["ca_url"],
        SpiffeID.parse(opts["spiffe_id"]),
        cert_dir,
        bundle=opts["bundle"],
        token=opts["token"] or None,
        token_file=opts["token_file"],
        key_type=KeyType.parse(opts["key_type"]),
        ttl=opts["ttl"],
        dns=tuple(opts["dns"]),
        ips=tuple(opts["ips"]),
    )


def _common_settings(opts: dict[str, Any], cert_dir: Path) -> dict[str, Any]:
    return {
        "spiffe_id": opts["spiffe_id"],
        "cert_dir": cert_dir,
        "listen": opts["listen"],
        "to": opts["to"],
        "ca_url": opts["ca_url"],
        "no_revocation": opts["no_revocation"],
        "max_connection_age": _seconds(opts["max_connection_age"], "--max-connection-age"),
        "drain_timeout": _seconds(opts["drain_timeout"], "--drain-timeout"),
        "metrics": opts["metrics"],
    }


def _start(
    opts: dict[str, Any],
    cert_dir: Path,
    agent: dict[str, Any] | None,
    run: Callable[..., None],
    settings: Any,
) -> None:
    configure_logging(opts["log_level"], opts["log_format"])
    keeper = _keeper(agent, cert_dir) if agent is not None else None
    run(settings, ready=_ready, keeper=keeper)


def _ready(line: str) -> None:
    announce(f"trustmesh proxy: {line}", event="ready")


@proxy_group.command("inbound")
@_common_options
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="HOST:PORT (mTLS).")
@click.option("--to", "to", required=True, help="HOST:PORT of the plain local service.")
@click.option(
    "--policy",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Authorization policy (YAML, reloaded on change). TCP mode uses its callers only "
    "and refuses rules that narrow methods, paths or users.",
)
@click.option(
    "--allow-id",
    "allow_ids",
    multiple=True,
    metavar="GLOB",
    help="Allow callers with this SPIFFE ID or glob (repeatable), instead of --policy.",
)
@click.option(
    "--http",
    is_flag=True,
    help="HTTP mode: the policy per request, caller identity headers for the app.",
)
@click.option(
    "--no-proxy-protocol",
    is_flag=True,
    help="TCP mode: send raw bytes, no PROXY v2 header (logged: the app cannot learn the caller).",
)
@click.option("--issuer", help="HTTP mode: verify bearer tokens against this issuer URL.")
@click.option("--audience", "audiences", multiple=True, help="HTTP mode: accepted audience.")
@click.option("--require-token", is_flag=True, help="HTTP mode: refuse requests without one.")
def inbound_command(**opts: Any) -> None:
    """Terminate mTLS in front of a plain local service at --to.

    TCP mode (default): callers allowed by --allow-id or the policy's callers get through;
    the app receives a PROXY protocol v2 header naming the caller (SPIFFE ID in TLV 0xE0).
    HTTP mode (--http): the full policy per request; the app receives X-Trustmesh-Caller
    and Client-Cert (incoming copies are stripped). See docs/sidecars.md."""
    from trustmesh.proxy import InboundSettings, run_inbound, validate_inbound

    with _identity(opts) as (cert_dir, agent):
        settings = InboundSettings(
            **_common_settings(opts, cert_dir),
            http=opts["http"],
            policy=opts["policy"],
            allow_ids=tuple(opts["allow_ids"]),
            proxy_protocol=not opts["no_proxy_protocol"],
            issuer=opts["issuer"],
            audiences=tuple(opts["audiences"]),
            require_token=opts["require_token"],
        )
        validate_inbound(settings)  # before a join token is spent
        _start(opts, cert_dir, agent, run_inbound, settings)


@proxy_group.command("outbound")
@_common_options
@click.option(
    "--listen",
    default="127.0.0.1:9000",
    show_default=True,
    help="HOST:PORT for plain local clients (loopback unless --allow-remote).",
)
@click.option("--to", "to", required=True, help="HOST:PORT of the mTLS service.")
@click.option(
    "--expect-id",
    required=True,
    help="The service's SPIFFE ID (or glob); any other server is refused and closed.",
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a non-loopback --listen (logged): whoever reaches it calls as --id.",
)
def outbound_command(**opts: Any) -> None:
    """Let plain local clients call the mTLS service at --to with this identity.

    Any TCP protocol works (HTTP with curl, a database driver, ...). The server must prove
    --expect-id right after the handshake, before a byte of the client is sent.
    See docs/sidecars.md."""
    from trustmesh.proxy import OutboundSettings, run_outbound, validate_outbound

    with _identity(opts) as (cert_dir, agent):
        settings = OutboundSettings(
            **_common_settings(opts, cert_dir),
            expect_id=opts["expect_id"],
            allow_remote=opts["allow_remote"],
        )
        validate_outbound(settings)  # before a join token is spent
        _start(opts, cert_dir, agent, run_outbound, settings)
