"""``trustmesh agent``: keep one workload's identity fresh on disk."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from trustmesh.errors import ConfigError, TrustmeshError
from trustmesh.pki import KeyType, SpiffeID, parse_dns_name, parse_ip_address

from ._common import json_option, print_json, read_secret

if TYPE_CHECKING:
    from trustmesh.agent import PKCS12Stores


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """Set the yielded event on SIGINT or SIGTERM (restoring the old handlers after)."""
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("trustmesh.agent").info(
            "%s received, stopping", signal.Signals(signum).name
        )
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _check_dns(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> Any:
    # Refused as soon as the command line is read: before a token is spent or a file written.
    return tuple(parse_dns_name(v) for v in values)


def _check_ips(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> Any:
    return tuple(str(parse_ip_address(v)) for v in values)


def enrollment_options(command: Callable[..., None]) -> Callable[..., None]:
    """The agent's enrollment options (``--bundle``, ``--token``, ``--token-file``,
    ``--key-type``, ``--ttl``, ``--dns``, ``--ip``), shared with ``trustmesh run --id``,
    ``trustmesh proxy`` and ``trustmesh gateway serve``."""
    options = [
        click.option(
            "--bundle",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="CA root certificate(s), PEM, to verify the CA with (from 'trustmesh export "
            "bundle'; default: bundle.pem in the identity directory, present after the "
            "first enrollment).",
        ),
        click.option(
            "--token",
            envvar="TRUSTMESH_JOIN_TOKEN",
            default=None,
            help="Join token for the first enrollment (default: $TRUSTMESH_JOIN_TOKEN).",
        ),
        click.option(
            "--token-file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="File holding the join token (read whenever an enrollment is needed).",
        ),
        click.option(
            "--key-type",
            type=click.Choice([k.value for k in KeyType]),
            default=KeyType.EC_P256.value,
            show_default=True,
            help="Type of each new key.",
        ),
        click.option(
            "--ttl",
            default=None,
            help="Lifetime to ask for, e.g. 1h (default: the CA profile's).",
        ),
        click.option(
            "--dns",
            "dns",
            multiple=True,
            metavar="NAME",
            callback=_check_dns,
            help="DNS name to put in the certificate as a SAN, for peers that check host "
            "names (curl, Java, nginx); asked for at enrollment and every renewal, allowed "
            "only if the join token ('token create --dns') and the CA profile allow it. "
            "Repeatable.",
        ),
        click.option(
            "--ip",
            "ips",
            multiple=True,
            metavar="ADDR",
            callback=_check_ips,
            help="IP address to put in the certificate as a SAN, likewise ('token create "
            "--ip'). Repeatable.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _stores(
    keystore: Path | None,
    truststore: Path | None,
    password_file: Path | None,
    *,
    legacy: bool,
    rekey: bool,
) -> PKCS12Stores | None:
    """The PKCS#12 stores asked for, with the password read from its file."""
    from trustmesh.agent import PKCS12Stores

    if keystore is None and truststore is None:
        if password_file is not None or legacy or rekey:
            given = (
                "--store-password-file"
                if password_file is not None
                else ("--pkcs12-legacy" if legacy else "--rekey-stores")
            )
            raise ConfigError(
                f"{given} is only used with --pkcs12 FILE or --truststore FILE: add one of "
                f"them or drop {given}."
            )
        return None
    if password_file is None:
        raise ConfigError(
            "--pkcs12 and --truststore need --store-password-file FILE holding the store "
            "password (there is no default password)."
        )
    password = read_secret(
        password_file,
        "",
        what="store password",
        option="--store-password-file",
    )
    return PKCS12Stores(keystore, truststore, password=password, legacy=legacy, rekey=rekey)


@click.command("agent")
@click.option("--ca", "ca_url", required=True, help="CA API URL, e.g. https://ca.internal:8443.")
@click.option("--id", "spiffe_id", required=True, help="The SPIFFE ID to hold.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for key.pem (0600), cert.pem, chain.pem and bundle.pem.",
)
@enrollment_options
@click.option(
    "--exec",
    "exec_command",
    default=None,
    help="Command run (without a shell) after new files are written, e.g. 'nginx -s reload'.",
)
@click.option(
    "--signal",
    "signal_spec",
    default=None,
    help="Or send a signal after new files are written: PID:SIGNAL, e.g. 1234:HUP.",
)
@click.option(
    "--pkcs12",
    "keystore",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a PKCS#12 keystore (key, certificate and chain; alias 'trustmesh'; "
    "mode 0600) for Java and .NET, rewritten on every renewal.",
)
@click.option(
    "--truststore",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a Java truststore (PKCS#12) with the CA roots, rewritten on every renewal.",
)
@click.option(
    "--store-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the password of --pkcs12 and --truststore (required with them).",
)
@click.option(
    "--pkcs12-legacy",
    is_flag=True,
    help="Encrypt the stores with 3DES/SHA-1 for Java < 8u301, .NET Framework and OpenSSL 1.x.",
)
@click.option(
    "--crl",
    "crl_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Keep this PEM file holding the CRLs of the whole chain (intermediate's and "
    "root-signed) for nginx ssl_crl, HAProxy crl-file or Node's crl option: rewritten "
    "atomically within a second of a revocation (from the revocation feed) and before "
    "the CRLs' nextUpdate.",
)
@click.option(
    "--on-crl",
    default=None,
    help="Command run (without a shell) after each new --crl file, e.g. 'nginx -s reload' "
    "(default: the --exec command or --signal, if given, unless --haproxy-socket). "
    "Retried until it succeeds.",
)
@click.option(
    "--haproxy-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="HAProxy's runtime API socket ('stats socket PATH level admin'): each new --crl "
    "file is pushed with 'set ssl crl-file' + 'commit ssl crl-file', no reload needed. "
    "The bind line's crl-file must be the same absolute path as --crl.",
)
@click.option(
    "--rekey-stores",
    is_flag=True,
    help="Rewrite existing --pkcs12/--truststore files that do not open with the password "
    "in --store-password-file (logged). Without it the agent refuses them (exit 2).",
)
@click.option("--once", is_flag=True, help="Enroll or renew if needed, then exit.")
@click.option("--renew-now", is_flag=True, help="Renew now even if the certificate is not due.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds for each call to the CA.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="Log level on stderr (default: warning with --once, info otherwise).",
)
@json_option
def agent_command(
    ca_url: str,
    spiffe_id: str,
    out: Path,
    bundle: Path | None,
    token: str | None,
    token_file: Path | None,
    key_type: str,
    exec_command: str | None,
    signal_spec: str | None,
    ttl: str | None,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    keystore: Path | None,
    truststore: Path | None,
    store_password_file: Path | None,
    pkcs12_legacy: bool,
    crl_file: Path | None,
    on_crl: str | None,
    haproxy_socket: Path | None,
    rekey_stores: bool,
    once: bool,
    renew_now: bool,
    timeout: float,
    log_level: str | None,
    as_json: bool,
) -> None:
    """Keep the key, certificate and bundle of identity --id fresh in --out.

    Enrolls with the join token when --out holds no valid certificate for --id,
    renews over mTLS (with a new key each time) after 2/3 of the certificate's
    lifetime, writes the files atomically and then runs --exec or sends --signal.
    Every certificate carries --id as its identity, plus the --dns/--ip SANs that
    the join token and the CA profile allow (a refusal exits 2).
    With --pkcs12 and/or --truststore (and --store-password-file) it also writes
    a PKCS#12 keystore and a Java truststore, after the PEM files and before the
    reload, and whenever they are missing or out of date. With --crl it keeps the
    chain CRLs (for nginx ssl_crl, HAProxy crl-file, Node's crl) fresh from the
    revocation feed and runs --on-crl or pushes them to --haproxy-socket.
    Existing stores that do not open with that password are refused (exit 2)
    unless --rekey-stores.
    Without --once it keeps running until SIGINT or SIGTERM, renewing with jitter
    and retrying with backoff while the CA is unreachable (the files stay in place).

    An expired certificate cannot renew: give a new join token. Exit codes with
    --once: 0 valid files are in place, 1 the CA was unreachable or refused (or the
    reload failed), 2 bad input such as a missing token or an unreadable bundle.
    """
    from trustmesh.agent import Agent, BundleFollower, CRLKeeper, HAProxyRuntime, Reload

    if crl_file is None and (on_crl is not None or haproxy_socket is not None):
        given = "--on-crl" if on_crl is not None else "--haproxy-socket"
        raise click.UsageError(f"{given} acts on the --crl file: add --crl FILE.")
    if token and token_file:
        raise click.UsageError("Give --token or --token-file, not both.")
    if exec_command is not None and signal_spec is not None:
        raise click.UsageError("Give --exec or --signal, not both.")
    logging.basicConfig(
        level=(log_level or ("warning" if once else "info")).upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # httpx logs every request at INFO; the agent's own lines say what happened.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stores = _stores(
        keystore, truststore, store_password_file, legacy=pkcs12_legacy, rekey=rekey_stores
    )
    reload = None
    if exec_command is not None:
        reload = Reload.from_command(exec_command)
    elif signal_spec is not None:
        reload = Reload.from_signal(signal_spec)
    agent = Agent(
        ca_url,
        SpiffeID.parse(spiffe_id),
        out,
        bundle=bundle,
        token=token or None,
        token_file=token_file,
        key_type=KeyType.parse(key_type),
        reload=reload,
        timeout=timeout,
        ttl=ttl,
        stores=stores,
        dns=dns,
        ips=ips,
    )
    keeper = None
    if crl_file is not None:
        # --haproxy-socket replaces the reload for CRLs (no reload, as documented): the
        # --exec/--signal fallback then serves certificates only; --on-crl still runs.
        crl_reload = (
            Reload.from_command(on_crl, option="--on-crl")
            if on_crl
            else (reload if haproxy_socket is None else None)
        )
        keeper = CRLKeeper(
            agent.ca_url,
            out,
            agent.trust_bundle,
            crl_file.absolute(),
            reload=crl_reload,
            haproxy=HAProxyRuntime(haproxy_socket) if haproxy_socket is not None else None,
            timeout=timeout,
        )
        keeper.check()  # before anything is enrolled or written
    if not once:
        with _stop_on_signals() as stop:
            if keeper is not None:
                keeper.start(stop)
            # Trust changes (CA rotation steps) reach bundle.pem and the truststore from
            # the feed; until the first enrollment it retries with backoff.
            follower = BundleFollower(agent)
            follower.start(stop)
            agent.run(stop, renew_now=renew_now)
            follower.stop()
        return
    outcome = agent.ensure(force=renew_now)
    crl_line = None
    if keeper is not None:
        wrote = keeper.refresh()
        crl_line = f"{'wrote' if wrote else 'unchanged'} chain CRLs {keeper.path}"
    if as_json:
        print_json({**outcome.to_json(), "crl": crl_line} if keeper else outcome.to_json())
    else:
        click.echo(outcome.describe() + (f"; {crl_line}" if crl_line else ""))
    if outcome.reload_error is not None:  # the files are in place, the workload has not seen them
        raise TrustmeshError(outcome.reload_error)
    if keeper is not None and keeper.failing_hooks:
        raise TrustmeshError(f"The CRL reload failed: {keeper.failing_hooks[0]}")


#: Seconds before the agent's loop is restarted after it gave up on a failure.
RESTART_DELAY = 30.0
_log = logging.getLogger("trustmesh.agent")


def start_agent(
    ca_url: str,
    spiffe_id: SpiffeID,
    cert_dir: Path,
    *,
    bundle: Path | None,
    token: str | None,
    token_file: Path | None,
    key_type: KeyType,
    ttl: str | None,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
) -> Callable[[threading.Event], None]:
    """Enroll now (or keep a valid identity in ``cert_dir``) and return the keeper that
    renews it while serving: the agent's own loop, restarted if it ever gives up.

    Shared by ``trustmesh run --id``, ``trustmesh gateway serve`` and ``trustmesh proxy``."""
    from trustmesh.agent import Agent, BundleFollower

    # httpx logs every request at INFO; the agent's own lines say what happened.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    agent = Agent(
        ca_url,
        spiffe_id,
        cert_dir,
        bundle=bundle,
        token=token,
        token_file=token_file,
        key_type=key_type,
        ttl=ttl,
        dns=dns,
        ips=ips,
    )
    outcome = agent.ensure()
    _log.info("%s", outcome.describe(), extra={"event": f"identity_{outcome.action}"})

    def keep(stop: threading.Event) -> None:
        # Trust changes (CA rotation steps) reach bundle.pem from the feed; the server's
        # RotatingCredentials picks the new bundle up from there.
        BundleFollower(agent).start(stop)
        while not stop.is_set():
            try:
                agent.run(stop)
            except TrustmeshError as exc:
                _log.error(
                    "Renewing %s failed: %s Serving the current certificate; retrying in %gs.",
                    spiffe_id,
                    exc.message,
                    RESTART_DELAY,
                    extra={"event": "renewal_failed"},
                )
                stop.wait(RESTART_DELAY)

    return keep
