"""``trustmesh workload-agent``: the node agent serving the SPIFFE Workload API."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

import click

from trustmesh.errors import ConfigError
from trustmesh.pki import KeyType, SpiffeID, parse_duration

from .agent import _stop_on_signals


def _socket_path(value: str) -> Path:
    parts = urlsplit(value)
    if parts.scheme != "unix" or parts.netloc or not parts.path.startswith("/"):
        raise ConfigError(
            f"--socket {value!r} is not a unix:// URL with an absolute path: use e.g. "
            f"unix:///run/trustmesh/agent.sock.",
            field="socket",
        )
    return Path(parts.path)


def _mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ConfigError(
            f"--socket-mode {value!r} is not octal permission bits such as 0666 or 0660.",
            field="socket_mode",
        )
    return mode


@click.command("workload-agent")
@click.option("--ca", "ca_url", required=True, help="CA API URL, e.g. https://ca.internal:8443.")
@click.option(
    "--node", "node_id", required=True, help="This node's SPIFFE ID (its entries' --node)."
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/lib/trustmesh/workload"),
    show_default=True,
    help="Directory for the node identity (node/key.pem, node/chain.pem...).",
)
@click.option(
    "--bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CA root certificate(s), PEM (default: node/bundle.pem after the first enrollment).",
)
@click.option(
    "--token",
    envvar="TRUSTMESH_JOIN_TOKEN",
    default=None,
    help="Join token for the node's first enrollment (default: $TRUSTMESH_JOIN_TOKEN).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the join token.",
)
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    default=KeyType.EC_P256.value,
    show_default=True,
    help="Type of each new key (node and SVIDs).",
)
@click.option(
    "--socket",
    "socket_url",
    default="unix:///run/trustmesh/agent.sock",
    show_default=True,
    help="Where to serve the Workload API.",
)
@click.option(
    "--socket-mode",
    default="0666",
    show_default=True,
    help="Permission bits of the socket: any local user may ask, entries decide what it gets.",
)
@click.option(
    "--refresh",
    default="5s",
    show_default=True,
    help="How often to look at the CA's entries, bundle and CRL.",
)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds for each call to the CA.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
def workload_agent_command(
    ca_url: str,
    node_id: str,
    data_dir: Path,
    bundle: Path | None,
    token: str | None,
    token_file: Path | None,
    key_type: str,
    socket_url: str,
    socket_mode: str,
    refresh: str,
    timeout: float,
    log_level: str,
) -> None:
    """Serve the SVIDs of this node's registration entries over the SPIFFE Workload API.

    Enrolls as --node with the join token (once; then renews), obtains an X.509-SVID
    for each entry naming this node, renews them at 2/3 of their life, re-issues one the
    CA revokes, and serves FetchX509SVID, FetchX509Bundles, FetchJWTSVID, FetchJWTBundles
    and ValidateJWTSVID, and Envoy SDS v3 (certificates and the validation context with
    the trust bundle and CRLs), on --socket to local callers whose uid, gid and executable
    (from the kernel, never from the caller) match an entry. Runs until SIGINT/SIGTERM.
    """
    if token and token_file:
        raise click.UsageError("Give --token or --token-file, not both.")
    path = _socket_path(socket_url)
    mode = _mode(socket_mode)
    interval = parse_duration(refresh, field="--refresh").total_seconds()
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    for noisy in ("httpx", "httpcore", "asyncio"):  # they log every request at INFO/DEBUG
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from trustmesh.workload import WorkloadAgent, WorkloadServer, add_secret_discovery_service

    agent = WorkloadAgent(
        ca_url,
        SpiffeID.parse(node_id),
        data_dir,
        bundle=bundle,
        token=token,
        token_file=token_file,
        key_type=KeyType(key_type),
        refresh=interval,
        timeout=timeout,
    )
    server = WorkloadServer(agent.cache, path, mode=mode, jwt_issuer=agent.jwt_svid)
    add_secret_discovery_service(server)  # Envoy SDS v3 on the same socket
    server.forwarder.listen()  # a socket that cannot be made fails before enrolling
    try:
        with _stop_on_signals() as stop:
            outcome = agent.node.ensure()
            logging.getLogger("trustmesh.workload").info("node identity: %s", outcome.describe())
            agent.start_revocations()
            try:
                agent.sync()
            except ConfigError:
                raise
            except Exception as exc:  # the loop retries; the socket serves what is held
                logging.getLogger("trustmesh.workload").warning("first sync: %s", exc)
            server.start()
            agent.run(stop, raise_first=False)
    finally:  # also when enrolling fails: no socket or private directory is left behind
        server.stop()
        agent.close()
