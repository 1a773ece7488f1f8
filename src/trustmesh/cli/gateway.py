"""``trustmesh gateway``: the edge gateway (serve, check)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import click

from trustmesh.errors import ConfigError
from trustmesh.logs import announce, configure_logging
from trustmesh.pki import KeyType, SpiffeID

from ._common import json_option, print_fields, print_json, print_table
from .agent import enrollment_options, start_agent

__all__ = ["gateway_group"]


@click.group("gateway")
def gateway_group() -> None:
    """The edge gateway: user tokens in, mTLS out. See docs/gateway.md."""


_CONFIG = click.Path(dir_okay=False, path_type=Path)


@gateway_group.command("check")
@click.argument("file", type=_CONFIG)
@json_option
def check_command(file: Path, as_json: bool) -> None:
    """Validate the gateway configuration FILE and show its route table.

    Exit status 0 when the file is valid; otherwise the first problem is printed as
    FILE:LINE: KEY: problem and the exit status is 2."""
    from trustmesh.gateway import load_config

    try:
        config = load_config(file)
    except ConfigError as exc:
        if as_json:
            print_json(
                {
                    "ok": False,
                    "file": str(file),
                    "error": exc.message,
                    "line": exc.details.get("line"),
                    "key": exc.details.get("field"),
                }
            )
        raise
    from trustmesh.gateway import describe_config

    summary = describe_config(config)
    if as_json:
        print_json({"ok": True, **summary})
        return
    print_fields(
        f"{file}: valid",
        [
            ("listen", summary["listen"]),
            ("id", summary["id"]),
            ("ca", summary["ca"]),
            ("public certificate", summary["public_certificate"]),
            ("redirect_http", summary["redirect_http"]),
            ("metrics", summary["metrics"]),
            ("issuers", ", ".join(i["issuer"] for i in summary["issuers"]) or "none"),
            ("trusted_proxies", ", ".join(summary["trusted_proxies"]) or "none"),
            ("redis", summary["redis"] or "none (rate limits in memory)"),
        ],
    )
    print_table(
        "routes (first match wins, in this order)",
        ("route", "host", "path", "methods", "to path", "auth", "upstream", "upstream id"),
        [
            (
                r["name"],
                r["host"] or "*",
                r["path"],
                ",".join(r["methods"]) if r["methods"] else "any",
                r["upstream_path"],
                _auth_text(r),
                " ".join(r["upstream"]["urls"]),
                r["upstream"]["id"],
            )
            for r in summary["routes"]
        ],
    )


def _auth_text(route: dict[str, Any]) -> str:
    if route["public"]:
        return "public"
    parts = [f"{key}={value}" for key, value in sorted(route["auth"].items())]
    if route["policy"]:
        parts.append(f"policy={route['policy']}")
    return "token " + " ".join(parts) if parts else "token"


@gateway_group.command("serve")
@click.option("--config", "config_path", required=True, type=_CONFIG, help="gateway.yaml")
@click.option(
    "--cert-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The gateway's identity directory (key.pem, chain.pem, bundle.pem): kept by an "
    "external agent, or with --token by the one in this process (default: cert_dir in the "
    "configuration; with --token and neither, a private temporary directory).",
)
@enrollment_options
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True
)
def serve_command(
    config_path: Path,
    cert_dir: Path | None,
    bundle: Path | None,
    token: str | None,
    token_file: Path | None,
    key_type: str,
    ttl: str | None,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    log_level: str,
    log_format: str,
) -> None:
    """Serve the gateway configured in --config until SIGTERM (drains, then exits 0).

    Its identity (mTLS to the services, and the public certificate unless tls: is
    configured) comes from --cert-dir, or with --token/--token-file from the agent in
    this process, which enrolls the configuration's id at its ca and renews it, with
    the DNS/IP SANs of --dns/--ip (or else the configuration's dns and ip lists)."""
    from trustmesh.gateway import load_config, run_gateway

    if token and token_file:
        raise ConfigError("Give --token or --token-file, not both.")
    config = load_config(config_path)  # refuse a bad file before a join token is spent
    configure_logging(log_level, log_format)
    cert_dir = cert_dir or config.cert_dir
    enrolling = bool(token or token_file)
    if not enrolling and (dns or ips):
        raise ConfigError(
            "--dns and --ip are for the agent in this process: add --token (or "
            "--token-file), or give the SANs to the 'trustmesh agent' that keeps --cert-dir."
        )
    if enrolling and (config.id is None or config.ca is None):
        raise ConfigError(
            f"--token needs 'id' (the gateway's SPIFFE ID) and 'ca' (the CA URL) in "
            f"{config_path}: the agent enrolls that identity there.",
            field="id" if config.id is None else "ca",
        )
    if not enrolling and cert_dir is None:
        raise ConfigError(
            "The gateway has no identity: give --cert-dir DIR (kept by 'trustmesh agent'), or "
            "--token TOKEN (or --token-file) to enroll the configuration's id at its ca."
        )
    temporary = None
    if cert_dir is None:
        temporary = cert_dir = Path(tempfile.mkdtemp(prefix="trustmesh-gateway-"))  # 0700
    try:
        keeper = None
        if enrolling and config.id is not None and config.ca is not None:
            keeper = start_agent(
                config.ca,
                SpiffeID.parse(config.id),
                cert_dir,
                bundle=bundle,
                token=token or None,
                token_file=token_file,
                key_type=KeyType.parse(key_type),
                ttl=ttl,
                dns=dns or config.dns,
                ips=ips or config.ips,
            )
        run_gateway(
            config_path,
            cert_dir=cert_dir,
            keeper=keeper,
            ready=lambda url: announce(
                f"trustmesh gateway: listening on {url}", event="ready", url=url
            ),
        )
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
