"""``trustmesh run MODULE:APP``: serve an ASGI app over mTLS with the caller's identity."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click
from click.core import ParameterSource

from trustmesh.errors import ConfigError
from trustmesh.logs import announce, configure_logging
from trustmesh.pki import KeyType, SpiffeID

from .agent import enrollment_options, start_agent

__all__ = ["run_command"]


@click.command("run")
@click.argument("app")
@click.option(
    "--cert-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The identity directory (key.pem, chain.pem, bundle.pem): kept by an external "
    "agent, or with --id by the one in this process (default with --id: a private "
    "temporary directory).",
)
@click.option(
    "--id",
    "spiffe_id",
    default=None,
    help="Run the agent in this process for this SPIFFE ID: enroll with the join token "
    "at start (or reuse a valid identity in --cert-dir) and renew while serving.",
)
@enrollment_options
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
    help="Directory to import the app from (prepended to sys.path; default: the "
    "current directory).",
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes sharing the port (the agent runs once, in the parent).",
)
@click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    default=None,
    help="Serve Prometheus /metrics and /healthz, /readyz over plain HTTP here "
    "(loopback only unless --allow-remote-metrics); never through the app or the policy.",
)
@click.option(
    "--allow-remote-metrics",
    is_flag=True,
    help="Accept a non-loopback --metrics-listen address (logged).",
)
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True
)
def run_command(
    app: str,
    cert_dir: Path | None,
    spiffe_id: str | None,
    bundle: Path | None,
    token: str | None,
    token_file: Path | None,
    key_type: str,
    ttl: str | None,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
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
    workers: int,
    metrics_listen: str | None,
    allow_remote_metrics: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Serve the ASGI (or Flask) app MODULE:APP over mTLS: client certificates required,
    the caller's SPIFFE ID checked (and revocation on every request), the policy applied,
    the caller and user in request.scope["trustmesh"] (Flask: environ). See docs/services.md.

    The service's identity comes from --cert-dir (kept by 'trustmesh agent'), or with
    --id SPIFFE_ID --ca URL --token TOKEN from the agent in this process."""
    from trustmesh.runner import RunSettings, run, validate

    context = click.get_current_context()
    given = [
        f"--{'ip' if name == 'ips' else name.replace('_', '-')}"
        for name in ("bundle", "token", "token_file", "ttl", "key_type", "dns", "ips")
        if context.get_parameter_source(name) == ParameterSource.COMMANDLINE
    ]
    if spiffe_id is None and given:
        raise ConfigError(
            f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --id (the identity "
            f"to enroll)."
        )
    if spiffe_id is None and cert_dir is None:
        raise ConfigError(
            "Give --cert-dir DIR (kept by 'trustmesh agent'), or --id SPIFFE_ID --ca URL "
            "--token TOKEN to run the agent in this process."
        )
    if spiffe_id is not None and ca_url is None:
        raise ConfigError("--id needs --ca URL: the CA to enroll with and renew at.")
    if token and token_file:
        raise ConfigError("Give --token or --token-file, not both.")
    configure_logging(log_level, log_format)
    temporary = None
    if spiffe_id is not None and cert_dir is None:
        temporary = cert_dir = Path(tempfile.mkdtemp(prefix="trustmesh-run-"))  # 0700
    try:
        assert cert_dir is not None  # noqa: S101 - checked above
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
            log_format=log_format,
            workers=workers,
            metrics_listen=metrics_listen,
            allow_remote_metrics=allow_remote_metrics,
        )
        validate(settings)  # before a join token is spent
        keeper = None
        if spiffe_id is not None and ca_url is not None and cert_dir is not None:
            keeper = start_agent(
                ca_url,
                SpiffeID.parse(spiffe_id),
                cert_dir,
                bundle=bundle,
                token=token or None,
                token_file=token_file,
                key_type=KeyType.parse(key_type),
                ttl=ttl,
                dns=dns,
                ips=ips,
            )
        run(
            settings,
            ready=lambda url: announce(f"trustmesh run: {app} on {url}", event="ready", url=url),
            keeper=keeper,
        )
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
