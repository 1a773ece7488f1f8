"""``trustmesh run MODULE:APP``: serve an ASGI app over mTLS with the caller's identity."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.logs import configure_logging

__all__ = ["run_command"]


@click.command("run")
@click.argument("app")
@click.option(
    "--cert-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The agent's output directory (key.pem, chain.pem, bundle.pem).",
)
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT.")
@click.option(
    "--policy",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Authorization policy (YAML, default deny, reloaded on change).",
)
@click.option("--no-policy", is_flag=True, help="Allow every verified caller (logged).")
@click.option("--ca", "ca_url", help="CA URL for the revocation feed, e.g. https://ca:8443.")
@click.option("--no-revocation", is_flag=True, help="Skip revocation checks (logged).")
@click.option("--issuer", help="Token issuer URL; bearer tokens are verified against it.")
@click.option("--audience", "audiences", multiple=True, help="Accepted token audience.")
@click.option("--require-token", is_flag=True, help="Refuse requests without a bearer token.")
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    help="SPIFFE ID (or glob) of a gateway/sidecar whose identity headers are believed.",
)
@click.option(
    "--app-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to import the app from (prepended to sys.path).",
)
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True
)
def run_command(
    app: str,
    cert_dir: Path,
    listen: str,
    policy: Path | None,
    no_policy: bool,
    ca_url: str | None,
    no_revocation: bool,
    issuer: str | None,
    audiences: tuple[str, ...],
    require_token: bool,
    trusted_proxies: tuple[str, ...],
    app_dir: Path | None,
    log_level: str,
    log_format: str,
) -> None:
    """Serve the ASGI app MODULE:APP over mTLS: client certificates required, the
    caller's SPIFFE ID checked (and revocation on every request), the policy applied,
    the caller and user in request.scope["trustmesh"]. See docs/services.md."""
    from trustmesh.runner import RunSettings, run

    configure_logging(log_level, log_format)
    settings = RunSettings(
        target=app,
        cert_dir=cert_dir,
        listen=listen,
        policy=policy,
        no_policy=no_policy,
        ca_url=ca_url,
        no_revocation=no_revocation,
        issuer=issuer,
        audiences=audiences,
        require_token=require_token,
        trusted_proxies=trusted_proxies,
        app_dir=app_dir,
        log_level=log_level,
    )
    run(settings, ready=lambda url: click.echo(f"trustmesh run: {app} on {url}", err=True))
