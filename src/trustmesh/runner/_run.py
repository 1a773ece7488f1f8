"""``trustmesh run``: serve an ASGI app over mTLS with the identity middleware applied.

The service's own certificate comes from the agent's directory (``key.pem``,
``chain.pem``, ``bundle.pem``) through :class:`RotatingCredentials`, so renewals
apply to new handshakes without a restart. uvicorn runs with our protocol shim,
so the middleware sees each caller's leaf.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from trustmesh.errors import ConfigError, TrustmeshError
from trustmesh.logs import configure_logging
from trustmesh.middleware import MTLSMiddleware
from trustmesh.policy import PolicyFile
from trustmesh.serving import (
    Keeper,
    check_metrics_listen,
    parse_listen,
    public_url,
    start_keeper,
    start_server,
    stop_keeper,
    uvicorn_config,
)
from trustmesh.tls import (
    RevocationSet,
    RotatingCredentials,
    TLSHttpToolsProtocol,
    log_refused_handshakes,
)
from trustmesh.tokens import AsyncVerifier, IssuerConfig

from ._metrics import RunMetrics
from ._wsgi import is_wsgi_app, protect_wsgi

__all__ = ["Keeper", "RunSettings", "load_app", "run", "validate"]

log = logging.getLogger("trustmesh.runner")

#: Seconds `run` waits for the revocation feed before it starts serving.
REVOCATION_STARTUP_WAIT = 10.0


@dataclass(frozen=True)
class RunSettings:
    """What ``trustmesh run`` serves and how.

    Attributes:
        target: ``MODULE:ATTRIBUTE`` of the ASGI app.
        cert_dir: The agent's output directory.
        listen: ``HOST:PORT``.
        policy: The policy file; None only with ``no_policy``.
        no_policy: Serve without a policy (every verified caller allowed; logged).
        ca_url: The CA for the revocation feed (unused for it with ``no_revocation``).
        no_revocation: Serve without revocation checks (logged).
        issuer: Token issuer URL; tokens are ignored without it.
        audiences: Accepted token audiences.
        require_token: Refuse requests without a bearer token.
        trusted_proxies: SPIFFE IDs or globs whose identity headers are believed.
        app_dir: Prepended to ``sys.path`` before importing the app (default: the
            current directory, as uvicorn and gunicorn do).
        log_level: uvicorn's and our log level.
        log_format: ``json`` or ``text`` (for worker processes, which log on their own).
        workers: Worker processes sharing the listening socket (1: serve in this process).
        metrics_listen: ``HOST:PORT`` of the plain-HTTP ``/metrics``, ``/healthz`` and
            ``/readyz`` listener (loopback unless ``allow_remote_metrics``), or None.
        allow_remote_metrics: Accept a non-loopback ``metrics_listen`` (logged).
    """

    target: str
    cert_dir: Path
    listen: str = "127.0.0.1:8443"
    policy: Path | None = None
    no_policy: bool = False
    ca_url: str | None = None
    no_revocation: bool = False
    issuer: str | None = None
    audiences: Sequence[str] = ()
    require_token: bool = False
    trusted_proxies: Sequence[str] = field(default_factory=tuple)
    app_dir: Path | None = None
    log_level: str = "info"
    log_format: str = "json"
    workers: int = 1
    metrics_listen: str | None = None
    allow_remote_metrics: bool = False


#: Seconds workers get to finish their requests after SIGTERM before they are killed.
WORKER_GRACE = 15.0


def load_app(target: str, app_dir: Path | None = None) -> Any:
    """Import ``MODULE:ATTRIBUTE`` from ``app_dir`` (default: the current directory) and
    return the app.

    Raises:
        ConfigError: The target is malformed, cannot be imported, or is a WSGI app
            other than a Flask-style one (with ``wsgi_app``).
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"APP {target!r} is not MODULE:ATTRIBUTE, e.g. inventory.main:app.", field="app"
        )
    # Like uvicorn and gunicorn: the current directory by default. The installed
    # `trustmesh` script has its own directory, not the current one, as sys.path[0].
    directory = str(Path(app_dir if app_dir is not None else os.getcwd()).resolve())
    if sys.path[:1] != [directory]:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"Cannot import {module_name!r} ({exc}). Run from the directory that holds it "
            f"or pass --app-dir.",
            field="app",
        ) from None
    app: Any = module
    for part in attribute.split("."):
        app = getattr(app, part, None)
        if app is None:
            raise ConfigError(
                f"Module {module_name!r} has no attribute {attribute!r}; name the ASGI app "
                f"object, e.g. {module_name}:app.",
                field="app",
            )
    if is_wsgi_app(app):  # Flask: served through trustmesh.runner._wsgi
        return app
    call = app if inspect.isfunction(app) else getattr(app, "__call__", None)  # noqa: B004
    if hasattr(app, "wsgi_app") or not inspect.iscoroutinefunction(call):
        raise ConfigError(
            f"{target} is not an ASGI app (it looks like WSGI). trustmesh run serves ASGI "
            f"apps and Flask apps; wrap other WSGI apps in trustmesh.middleware."
            f"MTLSWSGIMiddleware and serve them with werkzeug or gunicorn (docs/services.md).",
            field="app",
        )
    return app


def _check(settings: RunSettings) -> None:
    if settings.policy is None and not settings.no_policy:
        raise ConfigError(
            "No --policy given. Pass --policy FILE (default deny), or --no-policy to let "
            "every verified caller of the trust domain through.",
            field="policy",
        )
    if settings.ca_url is None and not settings.no_revocation:
        raise ConfigError(
            "No --ca given for the revocation feed. Pass --ca https://CA:8443, or "
            "--no-revocation to accept revoked callers until their certificates expire.",
            field="ca",
        )
    if settings.require_token and settings.issuer is None:
        raise ConfigError("--require-token needs --issuer and --audience.", field="issuer")
    if settings.issuer is not None and not settings.audiences:
        raise ConfigError("--issuer needs at least one --audience.", field="audience")
    if settings.workers < 1:
        raise ConfigError("--workers must be 1 or more.", field="workers")
    if settings.metrics_listen is not None:
        check_metrics_listen(
            settings.metrics_listen,
            allow_remote=settings.allow_remote_metrics,
            option="--metrics-listen",
            allow_flag="--allow-remote-metrics",
        )
        if settings.workers > 1:
            raise ConfigError(
                "--metrics-listen serves one process's counters: it cannot be combined with "
                "--workers yet. Use --workers 1, or the gunicorn worker with its own metrics.",
                field="metrics_listen",
            )


def validate(settings: RunSettings) -> None:
    """Refuse unusable settings and an app that cannot be imported, before anything
    irreversible (such as spending a join token) happens.

    Raises:
        ConfigError: What is wrong and how to fix it.
    """
    _check(settings)
    parse_listen(settings.listen)
    load_app(settings.target, settings.app_dir)


def run(
    settings: RunSettings,
    *,
    ready: Callable[[str], None] | None = None,
    keeper: Keeper | None = None,
) -> None:
    """Serve the app until SIGINT/SIGTERM.

    Args:
        settings: What to serve and how.
        ready: Called with the URL once the server listens.
        keeper: Keeps ``cert_dir`` fresh in a background thread while serving (the
            files must already be valid when :func:`run` is called).

    Raises:
        ConfigError: A setting is unusable (the message says which and how to fix it).
        TrustmeshError: The server could not start.
    """
    _check(settings)
    host, port = parse_listen(settings.listen)
    app = load_app(settings.target, settings.app_dir)
    stop = threading.Event()
    thread = start_keeper(keeper, stop, name="trustmesh-run-identity")
    try:
        if settings.workers > 1:
            RotatingCredentials(settings.cert_dir)  # refuse unusable files before forking
            _supervise(settings, host, port, ready)
        else:
            _run_one(settings, app, host, port, ready, None)
    finally:
        stop_keeper(thread, stop)


def _run_one(
    settings: RunSettings,
    app: Any,
    host: str,
    port: int,
    ready: Callable[[str], None] | None,
    sock: socket.socket | None,
) -> None:
    credentials = RotatingCredentials(settings.cert_dir)
    trust_domain = credentials.spiffe_id.removeprefix("spiffe://").partition("/")[0]
    policy = PolicyFile(settings.policy) if settings.policy is not None else None
    revocations = (
        RevocationSet(
            settings.ca_url, credentials.client_context, issuers=credentials.intermediates
        )
        if settings.ca_url is not None and not settings.no_revocation
        else None
    )
    issuer = (
        IssuerConfig(
            settings.issuer,
            audiences=tuple(settings.audiences),
            ca_bundle=settings.cert_dir / "bundle.pem",
        )
        if settings.issuer is not None
        else None
    )
    credentials.start()
    if revocations is not None:
        revocations.start()
        # Until the first page of the feed arrives the set is empty: serving then would let
        # an already-revoked caller in. Wait for it; past the timeout the set's grace and
        # fail-closed rule decide.
        if not revocations.wait_connected(REVOCATION_STARTUP_WAIT):
            log.error(
                "revocation feed at %s not connected after %g s; serving anyway, and "
                "refusing every caller once its grace runs out",
                settings.ca_url,
                REVOCATION_STARTUP_WAIT,
            )
    try:
        asyncio.run(
            _serve(
                app,
                settings,
                host,
                port,
                credentials,
                trust_domain,
                policy,
                revocations,
                issuer,
                ready,
                sock,
            )
        )
    finally:
        if revocations is not None:
            revocations.stop()
        credentials.stop()


async def _serve(
    app: Any,
    settings: RunSettings,
    host: str,
    port: int,
    credentials: RotatingCredentials,
    trust_domain: str,
    policy: PolicyFile | None,
    revocations: RevocationSet | None,
    issuer: IssuerConfig | None,
    ready: Callable[[str], None] | None,
    sock: socket.socket | None = None,
) -> None:
    # The verifier's HTTP client belongs to this event loop: create and close it here.
    verifier = AsyncVerifier(issuer) if issuer is not None and not is_wsgi_app(app) else None
    metrics = RunMetrics(credentials, revocations) if settings.metrics_listen is not None else None
    registry = metrics.registry if metrics is not None else None
    protected: Any
    if is_wsgi_app(app):  # Flask: the WSGI middleware in a thread pool (runner/_wsgi.py)
        protected = protect_wsgi(
            app,
            issuer=issuer,
            trust_domain=trust_domain,
            policy=policy,
            revocation=revocations,
            require_token=settings.require_token,
            trusted_proxies=settings.trusted_proxies,
            trust_bundle=[*credentials.roots, *credentials.intermediates()],
            metrics_registry=registry,
        )
    else:
        protected = MTLSMiddleware(
            app,
            trust_domain=trust_domain,
            policy=policy,
            revocation=revocations,
            verifier=verifier,
            require_token=settings.require_token,
            trusted_proxies=settings.trusted_proxies,
            trust_bundle=[*credentials.roots, *credentials.intermediates()],
            metrics_registry=registry,
        )

    def context_factory(_config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return credentials.server_context()

    log_refused_handshakes()
    config = uvicorn_config(
        protected,
        host=host,
        port=port,
        http=TLSHttpToolsProtocol,
        ssl_context_factory=context_factory,
        timeout_keep_alive=15,
        timeout_graceful_shutdown=10,
        log_level=settings.log_level,
        access_log=False,
        lifespan="auto",
        # uvicorn believes X-Forwarded-For/-Proto from 127.0.0.1 by default: any local
        # process could then set the client address the app sees. Callers are identified
        # by certificate; the address is the socket's.
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    url = public_url(host, port)
    log.info(
        "serving %s as %s on %s",
        settings.target,
        credentials.spiffe_id,
        url,
        extra={"event": "run_started"},
    )
    side: uvicorn.Server | None = None
    if metrics is not None and settings.metrics_listen is not None:
        mhost, mport = parse_listen(settings.metrics_listen)
        side = uvicorn.Server(
            uvicorn_config(
                metrics.app(),
                host=mhost,
                port=mport,
                lifespan="off",
                access_log=False,
                server_header=False,
                proxy_headers=False,
                log_level=settings.log_level,
            )
        )
        await start_server(side)
        if not side.started:
            raise TrustmeshError(
                f"trustmesh run could not listen on --metrics-listen "
                f"{settings.metrics_listen} (see the log above): is the port in use?"
            )
        log.info(
            "metrics and health on http://%s/metrics, /healthz, /readyz",
            settings.metrics_listen,
            extra={"event": "metrics_started"},
        )
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        serving = asyncio.ensure_future(server.serve([sock] if sock is not None else None))
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started and ready is not None:
            ready(url)
        try:
            await serving
        except SystemExit:
            if server.started:
                raise
            serving_failed = True
        else:
            serving_failed = not server.started
        if serving_failed:
            raise TrustmeshError(
                f"trustmesh run could not start on {settings.listen} (see the log above): "
                f"is the port in use? Pick another --listen."
            )
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if side is not None and side.started:
            await side.shutdown()
        if verifier is not None:
            await verifier.aclose()


def _exit_cleanly(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


# -- several worker processes -----------------------------------------------------------


def _worker_main(settings: RunSettings, sock: socket.socket) -> None:
    """One worker process: its own credentials watcher, revocation set and middleware."""
    configure_logging(settings.log_level, settings.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns ^C into SIGTERM
    try:
        host, port = parse_listen(settings.listen)
        app = load_app(settings.target, settings.app_dir)
        _run_one(settings, app, host, port, None, sock)
    except TrustmeshError as exc:
        log.error("worker %d: %s", os.getpid(), exc.message, extra={"event": "worker_failed"})
        sys.exit(1)
    except Exception:
        # multiprocessing would print the traceback as plain text: log it instead.
        log.exception("worker %d crashed", os.getpid(), extra={"event": "worker_failed"})
        sys.exit(1)


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TrustmeshError(
            f"trustmesh run could not listen on {host}:{port} ({exc.strerror}): is the port "
            f"in use? Pick another --listen."
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _supervise(
    settings: RunSettings, host: str, port: int, ready: Callable[[str], None] | None
) -> None:
    """Bind once, start ``settings.workers`` spawned workers on the socket, and wait.

    SIGTERM or SIGINT: every worker gets SIGTERM (uvicorn stops accepting, finishes
    open requests within its graceful timeout), stragglers are killed after
    :data:`WORKER_GRACE` seconds, then this returns. A worker that exits on its own
    stops the others and raises, so a supervisor restarts the whole service.
    """
    sock = _listen_socket(host, port)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received, stopping the workers", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    spawn = multiprocessing.get_context("spawn")
    workers = []
    failed: str | None = None
    try:
        for _ in range(settings.workers):
            worker = spawn.Process(target=_worker_main, args=(settings, sock), daemon=False)
            worker.start()
            workers.append(worker)
        log.info(
            "started %d workers: %s",
            len(workers),
            " ".join(str(w.pid) for w in workers),
            extra={"event": "workers_started"},
        )
        if ready is not None:
            ready(f"{public_url(host, port)} ({len(workers)} workers)")
        while not stop.wait(0.2):
            dead = [w for w in workers if not w.is_alive()]
            if dead:
                failed = f"worker {dead[0].pid} exited with status {dead[0].exitcode}"
                break
    finally:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + WORKER_GRACE
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("worker %s did not stop in %gs; killing it", worker.pid, WORKER_GRACE)
                worker.kill()
                worker.join()
        for signum, old in previous.items():
            signal.signal(signum, old)
        sock.close()
    if failed is not None:
        raise TrustmeshError(f"trustmesh run stopped: {failed} (see the log above).")
