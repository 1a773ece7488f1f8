"""A Python service over mTLS (issue #5): the trustmesh stack vs plain uvicorn vs nginx.

Everything runs on 127.0.0.1, on this machine, in one run. Setup (untimed): a fresh
ec-p256 CA; a server identity (DNS localhost, IP 127.0.0.1) and a caller identity
(``spiffe://example.org/svc/orders``) issued by it; a real ``trustmesh ca serve`` for
that CA, whose revocation feed the trustmesh stack subscribes to.

Systems (each its own process, one worker, started once, before the rounds):

  trustmesh      ``python -m trustmesh run svc_app:app --cert-dir DIR --policy FILE
                 --ca URL --log-level warning``: the app below on uvicorn (httptools)
                 with the ``TLSHttpToolsProtocol`` shim filling the ASGI tls extension,
                 ``RotatingCredentials`` (client certificates required, verified
                 against the CA; SNI callback), ``MTLSMiddleware`` with a ``PolicyFile``
                 (one rule: the caller may GET /items and /items/*) and a
                 ``RevocationSet`` fed by the ``ca serve`` above; the serial is looked
                 up on every request
  uvicorn-tls    the same app on plain uvicorn (httptools) over TLS, no client auth
  uvicorn-mtls   the same, with client certificates required (``ssl_cert_reqs``), no
                 middleware: the reference the issue's "about 10k req/s" figure names
  uvicorn-mtls-full  the same without TLS 1.3 session tickets (num_tickets 0): wrk
                 resumes sessions when it reconnects, so only this baseline does the
                 full client-certificate handshake of every new connection that
                 `trustmesh run` does (issue 18's target; see --tickets)
  nginx          nginx (Debian's 1.22, ``worker_processes 1``) with
                 ``ssl_verify_client on`` against the same CA, returning the same body
                 from ``return 200``; config generated into a temp dir, run in the
                 foreground as ``nobody`` on a free port

The app: ``GET /items/{item}`` -> ``{"item":"7"}`` (async FastAPI handler).

Load generator: ``wrk`` (Debian package) for all four systems, one thread. wrk
cannot present a client certificate (it has no option for it), so it runs with a
tiny ``LD_PRELOAD`` shim compiled here (``gcc``, libssl headers) that wraps
``SSL_CTX_new`` and loads the caller's chain and key into wrk's context: every
connection then does a real mTLS handshake with the caller's certificate (a wrong
or missing certificate shows up as non-2xx answers or socket errors, which are
counted and must be 0).

Measurements, each round in rotated order of the systems:

  1. keep-alive  wrk -t1 -c CONN for --duration s: req/s and p50/p99 from wrk's
                 latency distribution. Target: trustmesh >= 90 % of uvicorn-tls.
  2. handshakes  the same with ``Connection: close``: every request opens a new TCP
                 connection with a full TLS 1.3 mTLS handshake (wrk does not resume
                 sessions). Target: trustmesh >= 80 % of nginx.
  3. revocation  --revocations times: issue a fresh caller certificate, open one
                 keep-alive connection to the trustmesh stack, get a 200, revoke the
                 certificate through ``ca serve`` (POST /v1/revoke with an admin
                 identity, on an open connection) and send requests on the same
                 connection back to back until one is refused (403 revoked). The
                 latency is from just before the revoke request is sent (and, second
                 figure, from its answer) to the refusal. Target: p99 <= 1 s.

Server CPU per request comes from /proc/PID/stat around each run, the generator's
CPU from getrusage(RUSAGE_CHILDREN), the machine's from /proc/stat; the 1-minute
load average is printed before every round. --profile runs `trustmesh run` once
more under cProfile during one keep-alive and one new-connection run and prints the top
functions. --breakdown runs the stack built up piece by piece (tm-shim, tm-mw, tm-mw-rev,
tm-full, tm-rot, tm-notix: see the table title it prints) under the same keep-alive load
and times the middleware's pieces in-process; --breakdown-handshakes adds new-connection
runs and the server CPU of one TLS 1.3 handshake per server context in-process (memory
BIOs); --only NAME restricts the breakdown to some systems. --tickets counts, on a bare
asyncio server, how many of wrk's new connections are resumed per ticket setting.
--compare-src DIR also runs `trustmesh run` of another source tree as trustmesh-base in
the same rounds. Before timing, the measured `trustmesh run` must refuse a connection
without a client certificate, a caller and a path the policy does not allow, and a
revoked caller (the script stops otherwise).

Install the tools first (not part of CI):
  apt-get install -y nginx-light wrk gcc libssl-dev

Example:
  .venv/bin/python bench/service.py                 # make bench-service
  .venv/bin/python bench/service.py --rounds 5 --duration 8 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import pstats
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _api import (
    ADMIN,
    HOST,
    Identity,
    ca_serve,
    free_port,
    init_home,
    loadavg,
    percentile,
    stop_process,
    write_identity,
)
from _common import (
    FASTAPI_APP,
    PASSPHRASE,
    TRUST_DOMAIN,
    ClientCert,
    Tally,
    WrkResult,
    as_nobody,
    build_shim,
    median,
    need_tools,
    print_machine,
    print_table,
    process_tree,
    ratio_line,
    spread,
    verdict,
)
from _common import run_wrk as common_run_wrk

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import dump_private_key, pem_certificates

CALLER = f"spiffe://{TRUST_DOMAIN}/svc/orders"
SERVER = f"spiffe://{TRUST_DOMAIN}/svc/inventory"
STRANGER = f"spiffe://{TRUST_DOMAIN}/svc/stranger"
PATH = "/items/7"
BODY = '{"item":"7"}'
SYSTEMS = ("trustmesh", "uvicorn-tls", "uvicorn-mtls", "uvicorn-mtls-full", "nginx")
# --compare-src DIR: also `trustmesh run` of that source tree (e.g. `git archive main src`),
# as "trustmesh-base", in the same rounds: before/after under the same load.
COMPARE_SRC: list[Path] = []
# --breakdown: the trustmesh stack built up one piece at a time (keep-alive CPU per request).
BREAKDOWN = (
    "uvicorn-mtls",
    "tm-shim",
    "tm-mw",
    "tm-mw-rev",
    "tm-full",
    "tm-rot",
    "tm-notix",
    "trustmesh",
    "trustmesh-info",
)
TRUSTMESH_STACKS = ("tm-full", "tm-rot", "tm-notix", "tm-shim", "tm-mw", "tm-mw-rev")
POLICY = f"""\
mode: enforce
rules:
  - name: orders-reads-inventory
    callers: ["{CALLER}"]
    methods: [GET]
    paths: ["/items", "/items/*"]
"""

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_client_certificate {bundle};
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


# -- the servers (run as subprocesses of this script) ------------------------------------


def build_app(work: Path) -> Any:
    import importlib

    sys.path.insert(0, str(work))
    return importlib.import_module("svc_app").app


def serve(args: argparse.Namespace) -> None:
    """Run one system's server in this process until SIGTERM."""
    import logging
    import signal

    import uvicorn

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.dir)
    chain, key, bundle = work / "server/chain.pem", work / "server/key.pem", work / "bundle.pem"
    app = build_app(work)
    kw: dict[str, Any] = {
        "host": HOST,
        "port": args.port,
        "ssl_certfile": str(chain),
        "ssl_keyfile": str(key),
        "http": "httptools",
        "loop": "asyncio",
        "access_log": False,
        "log_level": "warning",
        "lifespan": "on",
        "timeout_keep_alive": 60,
    }
    stack: contextlib.ExitStack = contextlib.ExitStack()
    if args.serve in TRUSTMESH_STACKS:
        from cryptography import x509

        from trustmesh.middleware import MTLSMiddleware
        from trustmesh.policy import PolicyFile
        from trustmesh.tls import (
            RevocationSet,
            RotatingCredentials,
            TLSHttpToolsProtocol,
            client_context,
            server_context,
        )

        revocations: RevocationSet | None = None
        if args.serve in {"tm-full", "tm-rot", "tm-notix", "tm-mw-rev"}:
            own = client_context(cafile=bundle, chain=chain, key=key)
            pem = (work / "intermediate.pem").read_bytes()
            intermediate = x509.load_pem_x509_certificate(pem)
            revocations = RevocationSet(args.ca_url, lambda: own, issuers=lambda: [intermediate])
            stack.enter_context(revocations)
            if not revocations.wait_connected(30):
                raise SystemExit("the revocation set did not connect to ca serve")
        if args.serve != "tm-shim":
            full = args.serve in {"tm-full", "tm-rot", "tm-notix"}
            policy = PolicyFile(work / "policy.yaml") if full else None
            app = MTLSMiddleware(
                app, trust_domain=TRUST_DOMAIN, policy=policy, revocation=revocations
            )
        roots = bundle.read_text()

        def factory(_config: Any, _default: Any) -> ssl.SSLContext:
            if args.serve == "tm-rot":  # tm-full with trustmesh run's listener context
                return RotatingCredentials(work / "server").server_context()
            ctx = server_context(chain, key, cadata=roots, client_cert="required")
            if args.serve == "tm-notix":  # tm-full without TLS 1.3 session tickets
                ctx.num_tickets = 0
            return ctx

        kw.update(http=TLSHttpToolsProtocol, ssl_context_factory=factory)
    elif args.serve in {"uvicorn-mtls", "uvicorn-mtls-full"}:
        kw.update(ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_ca_certs=str(bundle))
        if args.serve == "uvicorn-mtls-full":
            # uvicorn's own context without TLS 1.3 session tickets: wrk resumes a session
            # when it reconnects (see --tickets), so only this way does every new
            # connection do the full client-certificate handshake, as `trustmesh run`'s.
            def no_tickets(_config: Any, default: Any) -> ssl.SSLContext:
                ctx: ssl.SSLContext = default()
                ctx.num_tickets = 0
                return ctx

            kw.update(ssl_context_factory=no_tickets)
    profiler = None
    if args.profile_out:
        import cProfile

        profiler = cProfile.Profile()

    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    server = uvicorn.Server(uvicorn.Config(app, **kw))
    with stack:
        if profiler is not None:
            profiler.enable()
        try:
            server.run()
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile_out)


# -- the driver ------------------------------------------------------------------------


@dataclass
class Running:
    name: str
    port: int
    proc: subprocess.Popen[Any]


def wait_ready(port: int, ctx: ssl.SSLContext, proc: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            r = httpx.get(f"https://{HOST}:{port}{PATH}", verify=ctx, timeout=2)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start:\n{log.read_text()}")
        time.sleep(0.2)


def start_python(
    kind: str, work: Path, ca_url: str, ctx: ssl.SSLContext, profile_out: Path | None = None
) -> Running:
    port = free_port()
    log = work / f"{kind}.log"
    if kind.startswith("trustmesh"):  # the real runner, `python -m trustmesh run`
        cmd = [sys.executable]
        if profile_out is not None:
            cmd += ["-m", "cProfile", "-o", str(profile_out)]
        cmd += ["-m", "trustmesh", "run", "svc_app:app", "--app-dir", str(work)]
        cmd += ["--cert-dir", str(work / "server"), "--listen", f"{HOST}:{port}"]
        cmd += ["--policy", str(work / "policy.yaml"), "--ca", ca_url]
        if kind in {"trustmesh", "trustmesh-base"}:  # like the others; trustmesh-info: default
            cmd += ["--log-level", "warning"]
    else:
        cmd = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--dir", str(work)]
        cmd += ["--ca-url", ca_url]
        if profile_out is not None:
            cmd += ["--profile-out", str(profile_out)]
    env = None
    if kind == "trustmesh-base":  # `trustmesh run` of another source tree (--compare-src)
        env = {**os.environ, "PYTHONPATH": str(COMPARE_SRC[0])}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    wait_ready(port, ctx, proc, log)
    return Running(kind, port, proc)


def start_nginx(work: Path, ctx: ssl.SSLContext) -> Running:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    ndir = work / "nginx"
    ndir.mkdir()
    port = free_port()
    conf = ndir / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            dir=ndir,
            port=port,
            chain=work / "server/chain.pem",
            key=work / "server/key.pem",
            bundle=work / "bundle.pem",
            body=BODY,
        )
    )
    cmd = [nginx, "-c", str(conf), "-p", str(ndir), "-e", str(ndir / "error.log")]
    cmd = as_nobody(cmd, dirs=(work, work / "server", ndir), files=(work / "server/key.pem",))
    log = ndir / "stdout.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_ready(port, ctx, proc, ndir / "error.log")
    except RuntimeError:
        raise RuntimeError(f"nginx did not start: {log.read_text()}") from None
    return Running("nginx", port, proc)


def run_wrk(
    target: Running, ident: Identity, shim: Path, args: argparse.Namespace, *, new_conn: bool
) -> WrkResult:
    return common_run_wrk(
        f"https://{HOST}:{target.port}{PATH}",
        process_tree(target.proc.pid),
        connections=args.hs_connections if new_conn else args.connections,
        duration=args.duration,
        shim=shim,
        cert=ClientCert(ident.chain, ident.key),
        headers=["Connection: close"] if new_conn else [],
    )


# -- the security checks stay on ------------------------------------------------------


def check_refusals(port: int, work: Path, stranger: Identity, revoked: Identity) -> None:
    """Before timing: the measured `trustmesh run` must refuse what it should.

    A connection without a client certificate fails the handshake; a caller the
    policy does not name, a path the rule does not cover, and a revoked caller get
    403 with the matching reason. Stops the benchmark otherwise."""
    bundle = str(work / "bundle.pem")
    anon = ssl.create_default_context(cafile=bundle)
    try:
        r = httpx.get(f"https://{HOST}:{port}{PATH}", verify=anon, timeout=5)
        raise SystemExit(f"refusal check: no client certificate got {r.status_code}, not refused")
    except (httpx.TransportError, ssl.SSLError):
        pass
    cases = [
        ("a caller the policy does not name", stranger, PATH, "policy_denied"),
        ("a path the rule does not cover", None, "/admin", "policy_denied"),
        ("a revoked caller", revoked, PATH, "revoked"),
    ]
    for what, ident, path, reason in cases:
        ctx = ssl.create_default_context(cafile=bundle)
        if ident is not None:
            ctx.load_cert_chain(ident.chain, ident.key)
        else:
            ctx.load_cert_chain(work / "caller/chain.pem", work / "caller/key.pem")
        deadline = time.monotonic() + 30
        while True:
            r = httpx.get(f"https://{HOST}:{port}{path}", verify=ctx, timeout=5)
            if r.status_code == 403 and r.json().get("reason") == reason:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"refusal check: {what} got {r.status_code} {r.text[:200]}")
            time.sleep(0.2)  # the revocation feed may still be catching up
    print(
        "security checks on: no client certificate -> handshake refused; unnamed caller, "
        "uncovered path -> 403 policy_denied; revoked caller -> 403 revoked"
    )


# -- revocation latency ------------------------------------------------------------------


def revocation_latency(
    args: argparse.Namespace, home: Path, work: Path, ca_url: str, admin: Identity, port: int
) -> tuple[list[float], list[float], list[int]]:
    """Return (from revoke sent, from revoke answered, 200s after the answer) per trial."""
    from trustmesh.client import CAClient

    bundle = work / "bundle.pem"
    from_send: list[float] = []
    from_answer: list[float] = []
    late_ok: list[int] = []
    with (
        CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca,
        CAClient(ca_url, bundle=bundle, cert=admin.chain, key=admin.key) as ca_api,
    ):
        for i in range(args.revocations):
            ident = write_identity(ca, CALLER, work / f"revoked-{i}")
            ctx = ssl.create_default_context(cafile=str(bundle))
            ctx.load_cert_chain(ident.chain, ident.key)
            conn = http.client.HTTPSConnection(HOST, port, context=ctx, timeout=10)
            conn.request("GET", PATH)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"fresh caller refused: {r.status}")
            sock = conn.sock
            sent = time.perf_counter()
            ca_api.revoke(serial=ident.serial)
            answered = time.perf_counter()
            oks = 0
            while True:
                conn.request("GET", PATH)
                r = conn.getresponse()
                body = r.read()
                now = time.perf_counter()
                if conn.sock is not sock and conn.sock is not None:
                    raise RuntimeError("the client reconnected: not the same connection")
                if r.status == 200:
                    oks += 1
                    if now - sent > 10:
                        raise RuntimeError("not refused within 10 s of the revocation")
                    continue
                if r.status != 403 or b"revoked" not in body:
                    raise RuntimeError(f"refused for another reason: {r.status} {body[:200]!r}")
                break
            conn.close()
            from_send.append(now - sent)
            from_answer.append(now - answered)
            late_ok.append(oks)
    return from_send, from_answer, late_ok


# -- main --------------------------------------------------------------------------------


def breakdown(
    args: argparse.Namespace,
    work: Path,
    ca_url: str,
    ctx: ssl.SSLContext,
    caller: Identity,
    shim: Path,
) -> None:
    """Runs of the stack built up piece by piece, alternating, CPU per request: keep-alive,
    and with --breakdown-handshakes new connections too."""
    kinds = [k for k in BREAKDOWN if not args.only or k in args.only]
    servers = [start_python(kind, work, ca_url, ctx) for kind in kinds]
    tally, hand = Tally(), Tally()
    with started(servers):
        warm = argparse.Namespace(**{**vars(args), "duration": 1})
        for s in servers:
            run_wrk(s, caller, shim, warm, new_conn=False)
        for rnd in range(args.rounds):
            order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
            print(f"breakdown round {rnd + 1}, load {loadavg()}")
            for s in order:
                tally.add(s.name, run_wrk(s, caller, shim, args, new_conn=False))
                if args.breakdown_handshakes:
                    hand.add(s.name, run_wrk(s, caller, shim, args, new_conn=True))
    if args.breakdown_handshakes:
        print_table("Breakdown (new connection per request)", hand, "handshakes/s", BREAKDOWN)
        base = hand.med("uvicorn-mtls", "server_cpu_us")
        for name in kinds[1:]:
            cur = hand.med(name, "server_cpu_us")
            print(f"  {name}: {cur - base:+.0f} µs per new connection over uvicorn-mtls")
    print_table(
        "Breakdown (keep-alive): uvicorn-mtls = uvicorn's own ssl context; tm-shim = "
        "trustmesh server_context + TLSHttpToolsProtocol; tm-mw = + MTLSMiddleware "
        "(policy=None, revocation=None); tm-mw-rev = + RevocationSet; tm-full = + PolicyFile "
        "(all built in this script); tm-rot = tm-full with RotatingCredentials' listener "
        "context (SNI callback, no tickets); tm-notix = tm-full with num_tickets = 0; "
        "trustmesh = `trustmesh run` --log-level warning; "
        "trustmesh-info = `trustmesh run` at its default log level (info: a JSON line per "
        "allowed request, to a file)",
        tally,
        "req/s",
        BREAKDOWN,
    )
    base = tally.med("uvicorn-mtls", "server_cpu_us")
    prev = base
    for name in kinds[1:]:
        cur = tally.med(name, "server_cpu_us")
        print(f"  {name}: {cur - prev:+.0f} µs/req over the previous, {cur - base:+.0f} in all")
        prev = cur


def micro(work: Path, ca_url: str, caller: Identity, rounds: int, n: int = 20000) -> None:
    """In-process cost of the middleware and its pieces per request (no network, one core).

    The ASGI scope is what the shim hands over for one keep-alive request (the caller's
    real leaf as PEM, the request's headers); the inner app is a no-op.
    """
    import asyncio
    import logging
    import timeit

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from trustmesh.middleware import MTLSMiddleware
    from trustmesh.policy import PolicyFile
    from trustmesh.tls import RevocationSet, client_context

    logging.getLogger("trustmesh").setLevel(logging.WARNING)
    leaf = x509.load_pem_x509_certificate(caller.chain.read_bytes())
    leaf_pem = ssl.DER_cert_to_PEM_cert(leaf.public_bytes(Encoding.DER))
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8443")],
        "extensions": {"tls": {"client_cert_chain": [leaf_pem]}},
    }

    async def noop(_scope: Any, _receive: Any, _send: Any) -> None:
        return None

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(_message: Any) -> None:
        return None

    bundle = work / "bundle.pem"
    server_chain, server_key = work / "server/chain.pem", work / "server/key.pem"
    own = client_context(cafile=bundle, chain=server_chain, key=server_key)
    intermediate = x509.load_pem_x509_certificate((work / "intermediate.pem").read_bytes())
    revocations = RevocationSet(ca_url, lambda: own, issuers=lambda: [intermediate])
    policy = PolicyFile(work / "policy.yaml")
    with revocations:
        revocations.wait_connected(30)
        apps: dict[str, Any] = {
            "no-op app alone": noop,
            "MTLSMiddleware(policy=None, revocation=None)": MTLSMiddleware(
                noop, trust_domain=TRUST_DOMAIN, policy=None, revocation=None
            ),
            "+ RevocationSet": MTLSMiddleware(
                noop, trust_domain=TRUST_DOMAIN, policy=None, revocation=revocations
            ),
            "+ PolicyFile (the trustmesh stack)": MTLSMiddleware(
                noop, trust_domain=TRUST_DOMAIN, policy=policy, revocation=revocations
            ),
        }
        full = apps["+ PolicyFile (the trustmesh stack)"]
        gate = full.gate
        peer = gate.caller_from_peer(leaf_pem)
        decision = gate.decide(peer, None, "GET", PATH)
        pieces: dict[str, Any] = {
            "gate.caller_from_peer (cached leaf, time + revocation check)": lambda: (
                gate.caller_from_peer(leaf_pem)
            ),
            "RevocationSet.is_revoked": lambda: revocations.is_revoked(peer.serial or 0),
            "gate.decide (PolicyFile.evaluate)": lambda: gate.decide(peer, None, "GET", PATH),
            "gate.log_decision (allow, logger at WARNING)": lambda: gate.log_decision(
                method="GET",
                path=PATH,
                caller=peer,
                peer=peer,
                user=None,
                decision=decision,
                refusal=None,
            ),
        }

        async def loop_over(app: Any) -> float:
            start = time.perf_counter()
            for _ in range(n):
                await app(scope, receive, send)
            return (time.perf_counter() - start) / n

        results: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, app in apps.items():
                results.setdefault(name, []).append(asyncio.run(loop_over(app)) * 1e6)
            for name, fn in pieces.items():
                t = timeit.timeit(fn, number=n) / n
                results.setdefault(name, []).append(t * 1e6)
    print(f"\nIn-process cost per request, µs (median of {rounds} x {n} calls) [per round]:")
    print("| what | µs |\n|---|---|")
    for name, values in results.items():
        print(f"| {name} | {median(values):.1f} {spread(values, '{:.1f}')} |")


def handshake_micro(work: Path, caller: Identity, rounds: int, n: int = 200) -> None:
    """Server-side CPU of one TLS 1.3 handshake in-process (memory BIOs, no asyncio), per
    server context: what OpenSSL costs under CPython for each way of building it."""
    from trustmesh.tls import RotatingCredentials, client_context, server_context

    bundle = work / "bundle.pem"
    chain, key = work / "server/chain.pem", work / "server/key.pem"
    roots = bundle.read_text()
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # as uvicorn builds it
    plain.load_cert_chain(chain, key)
    plain.load_verify_locations(cafile=str(bundle))
    plain.verify_mode = ssl.CERT_REQUIRED
    no_auth = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    no_auth.load_cert_chain(chain, key)
    rotating = RotatingCredentials(work / "server")
    no_tickets = server_context(chain, key, cadata=roots, client_cert="required")
    no_tickets.num_tickets = 0  # TLS 1.3 session tickets carry the client's certificate
    servers = {
        "uvicorn-style context, no client certificate": (no_auth, False),
        "uvicorn-style context, CERT_REQUIRED": (plain, True),
        "trustmesh.tls.server_context (required)": (
            server_context(chain, key, cadata=roots, client_cert="required"),
            True,
        ),
        "trustmesh.tls.server_context (required), num_tickets = 0": (no_tickets, True),
        "RotatingCredentials.server_context() (SNI callback; no tickets)": (
            rotating.server_context(),
            True,
        ),
    }
    with_cert = client_context(cafile=bundle, chain=caller.chain, key=caller.key)
    without = client_context(cafile=bundle)

    def one(server: ssl.SSLContext, client: ssl.SSLContext) -> float:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
        srv = server.wrap_bio(s_in, s_out, server_side=True)
        spent = 0.0
        c_done = s_done = False
        while not (c_done and s_done):
            if not c_done:
                try:
                    c.do_handshake()
                    c_done = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            if not s_done:
                start = time.thread_time()
                try:
                    srv.do_handshake()
                    s_done = True
                except ssl.SSLWantReadError:
                    pass
                spent += time.thread_time() - start
            c_in.write(s_out.read())
        # TLS 1.3: the server verifies the client's certificate on its last read.
        start = time.thread_time()
        with contextlib.suppress(ssl.SSLWantReadError):
            srv.read(1)
        spent += time.thread_time() - start
        if with_client_cert_required(server) and not srv.getpeercert(binary_form=True):
            raise RuntimeError("no client certificate in the in-process handshake")
        return spent

    def with_client_cert_required(server: ssl.SSLContext) -> bool:
        return server.verify_mode == ssl.CERT_REQUIRED

    results: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, (server, needs_cert) in servers.items():
            client = with_cert if needs_cert else without
            one(server, client)  # warm
            total = sum(one(server, client) for _ in range(n))
            results.setdefault(name, []).append(total / n * 1e6)
    print(f"\nServer CPU per TLS 1.3 handshake in-process, µs (median of {rounds} x {n}):")
    print("| server context | µs |\n|---|---|")
    for name, values in results.items():
        print(f"| {name} | {median(values):.0f} {spread(values)} |")


# -- TLS 1.3 session tickets under wrk (--tickets) ---------------------------------------

TICKET_CONTEXTS = ("tickets-on", "tickets-off", "trustmesh-run")


def _ticket_context(kind: str, work: Path) -> ssl.SSLContext:
    from trustmesh.tls import RotatingCredentials

    if kind == "trustmesh-run":  # the listener of `trustmesh run` (tickets and cache off)
        return RotatingCredentials(work / "server").server_context()
    # What uvicorn builds for ssl_cert_reqs=CERT_REQUIRED: CPython's defaults, 2 tickets.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(work / "server/chain.pem", work / "server/key.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(work / "bundle.pem")
    if kind == "tickets-off":
        ctx.num_tickets = 0
    return ctx


def _ticket_server(kind: str, work: str, out: Any, commands: Any) -> None:
    """A bare asyncio TLS server (loop.create_server, no HTTP library) in a child process:
    answers each request with a fixed response and closes; counts the handshakes that
    were resumed and those without a client certificate."""
    import asyncio
    import resource

    ctx = _ticket_context(kind, Path(work))
    counts = {"full": 0, "resumed": 0, "no_cert": 0}
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\nconnection: close\r\n\r\n" + BODY.encode()

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            tls = transport.get_extra_info("ssl_object")
            counts["resumed" if tls.session_reused else "full"] += 1
            if not tls.getpeercert(binary_form=True):
                counts["no_cert"] += 1

        def data_received(self, _data: bytes) -> None:
            self.transport.write(answer)
            self.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Answer, HOST, 0, ssl=ctx, backlog=1024)
        out.put(server.sockets[0].getsockname()[1])
        while True:
            command = await loop.run_in_executor(None, commands.get)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            out.put((usage.ru_utime + usage.ru_stime, dict(counts)))
            if command == "stop":
                return

    asyncio.run(main())


def ticket_runs(args: argparse.Namespace, work: Path, caller: Identity, shim: Path) -> None:
    """The same wrk new-connection load on a bare asyncio server per ticket setting: how
    many connections wrk resumes, and the server CPU per connection."""
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    tally = Tally()
    resumed: dict[str, list[float]] = {k: [] for k in TICKET_CONTEXTS}
    for rnd in range(args.rounds):
        print(f"tickets round {rnd + 1}, load {loadavg()}")
        for kind in TICKET_CONTEXTS[rnd % 3 :] + TICKET_CONTEXTS[: rnd % 3]:
            out, commands = mp.Queue(), mp.Queue()
            proc = mp.Process(target=_ticket_server, args=(kind, str(work), out, commands))
            proc.start()
            port = out.get(timeout=30)
            commands.put("mark")
            cpu0, before = out.get(timeout=30)
            r = common_run_wrk(
                f"https://{HOST}:{port}{PATH}",
                [proc.pid],
                connections=args.hs_connections,
                duration=args.duration,
                shim=shim,
                cert=ClientCert(caller.chain, caller.key),
                headers=["Connection: close"],
            )
            commands.put("stop")
            cpu1, after = out.get(timeout=30)
            proc.join(10)
            n = sum(after[k] - before[k] for k in ("full", "resumed"))
            if after["no_cert"]:
                raise SystemExit(f"{kind}: {after['no_cert']} connections without a certificate")
            r.server_cpu_us = (cpu1 - cpu0) * 1e6 / max(n, 1)
            tally.add(kind, r)
            resumed[kind].append(100 * (after["resumed"] - before["resumed"]) / max(n, 1))
    print_table(
        "TLS 1.3 session tickets under wrk -H 'Connection: close' (bare asyncio "
        "loop.create_server in-process, no HTTP library): tickets-on = CPython's default "
        "(uvicorn-mtls), tickets-off = num_tickets 0 (uvicorn-mtls-full), trustmesh-run = "
        "RotatingCredentials' listener",
        tally,
        "handshakes/s",
        TICKET_CONTEXTS,
    )
    for kind in TICKET_CONTEXTS:
        print(f"  {kind}: connections resumed by wrk, % per round: {spread(resumed[kind])}")


def print_profile(path: Path, requests: int, new_conn: bool, system: str = "trustmesh") -> None:
    stats = pstats.Stats(str(path))
    kind = "new-connection" if new_conn else "keep-alive"
    print(f"\ncProfile of {system} (main thread) over {requests} {kind} requests")
    print("(seconds; the profiler itself slows Python code several-fold):")
    stats.sort_stats("tottime").print_stats(25)
    if system != "trustmesh":
        return
    if new_conn:
        stats.print_callers(r"do_handshake|getpeercert")
        stats.print_callees(r"_uvicorn.py:\d+\(connection_made\)")
    else:
        stats.print_callees(r"_asgi.py:\d+\(__call__\)")
        stats.print_callees(r"_uvicorn.py:\d+\(__call__\)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--hs-connections", type=int, default=16, help="for the handshake runs")
    parser.add_argument("--revocations", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--breakdown", action="store_true", help="keep-alive CPU per request, piece by piece"
    )
    parser.add_argument("--only", action="append", help="--breakdown: only these systems")
    parser.add_argument(
        "--breakdown-handshakes", action="store_true", help="--breakdown with new connections too"
    )
    parser.add_argument("--skip", action="append", default=[], help="skip a measurement (1/2/3)")
    parser.add_argument(
        "--compare-src",
        type=Path,
        help="a src/ directory of another commit to run as trustmesh-base in the same rounds",
    )
    parser.add_argument(
        "--tickets",
        action="store_true",
        help="wrk's session resumption per ticket setting, on a bare asyncio server",
    )
    parser.add_argument("--serve", choices=SYSTEMS + BREAKDOWN[1:7], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--ca-url", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    if args.compare_src is not None:
        if not (args.compare_src / "trustmesh" / "__init__.py").is_file():
            raise SystemExit(f"--compare-src {args.compare_src}: no trustmesh package in it")
        COMPARE_SRC.append(args.compare_src.resolve())
    need_tools(
        ("wrk", "nginx", "gcc", "setpriv"), "apt-get install -y nginx-light wrk gcc libssl-dev"
    )
    print_machine({"nginx": ["nginx", "-v"], "wrk": ["wrk", "-v"]})
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        run(args, Path(tmp))


@contextlib.contextmanager
def started(items: list[Running]) -> Iterator[None]:
    try:
        yield
    finally:
        for item in items:
            stop_process(item.proc)


def run(args: argparse.Namespace, work: Path) -> None:
    home = work / "home"
    bundle = init_home(home, None)
    shutil.copy(bundle, work / "bundle.pem")
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        (work / "intermediate.pem").write_bytes(pem_certificates([ca.intermediate]))
        issued = ca.issue(SERVER, dns=["localhost"], ips=["127.0.0.1"], actor="bench")
        assert issued.key is not None
        (work / "server").mkdir()
        (work / "server/chain.pem").write_bytes(pem_certificates(issued.chain))
        (work / "server/key.pem").write_bytes(dump_private_key(issued.key))
        caller = write_identity(ca, CALLER, work / "caller")
        admin = write_identity(ca, ADMIN, work / "admin")
        # For the checks before timing: a caller the policy does not name, and a
        # caller whose certificate is revoked before ca serve starts.
        stranger = write_identity(ca, STRANGER, work / "stranger")
        revoked = write_identity(ca, CALLER, work / "revoked-caller")
        ca.revoke(revoked.serial, actor="bench")
    (work / "policy.yaml").write_text(POLICY)
    (work / "svc_app.py").write_text(FASTAPI_APP)
    shutil.copy(bundle, work / "server/bundle.pem")
    shim = build_shim(work)
    ctx = ssl.create_default_context(cafile=str(work / "bundle.pem"))
    ctx.load_cert_chain(caller.chain, caller.key)
    with ca_serve(home, work / "bundle.pem", work / "ca-serve.log") as ca_server:
        servers: list[Running] = []
        with started(servers):
            for kind in SYSTEMS[:4]:
                servers.append(start_python(kind, work, ca_server.url, ctx))
            servers.append(start_nginx(work, ctx))
            if COMPARE_SRC:
                servers.append(start_python("trustmesh-base", work, ca_server.url, ctx))
            print(f"servers: {', '.join(f'{s.name} :{s.port}' for s in servers)}")
            check_refusals(servers[0].port, work, stranger, revoked)
            # Warm-up: a short untimed keep-alive and handshake run per system.
            warm = argparse.Namespace(**{**vars(args), "duration": 1})
            for s in servers:
                run_wrk(s, caller, shim, warm, new_conn=False)
                run_wrk(s, caller, shim, warm, new_conn=True)
            keep, hand = Tally(), Tally()
            for rnd in range(args.rounds):
                order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
                print(f"round {rnd + 1}: order {[s.name for s in order]}, load {loadavg()}")
                for s in order:
                    if "1" not in args.skip:
                        keep.add(s.name, run_wrk(s, caller, shim, args, new_conn=False))
                    if "2" not in args.skip:
                        hand.add(s.name, run_wrk(s, caller, shim, args, new_conn=True))
                    sys.stdout.flush()
            print(f"load average after the rounds: {loadavg()}")
            results: dict[str, float] = {}
            if "1" not in args.skip:
                print_table(
                    f"1. keep-alive, wrk -t1 -c{args.connections} -d{args.duration}s, "
                    f"median of {args.rounds} rounds [per round]",
                    keep,
                    "req/s",
                    (*SYSTEMS, "trustmesh-base"),
                )
                results["keep"] = ratio_line(keep, "trustmesh", "uvicorn-tls")
                ratio_line(keep, "uvicorn-tls", "trustmesh", "server_cpu_us")
                ratio_line(keep, "trustmesh", "uvicorn-mtls")
                ratio_line(keep, "trustmesh", "nginx")
                if COMPARE_SRC:
                    ratio_line(keep, "trustmesh-base", "trustmesh", "server_cpu_us")
                    ratio_line(keep, "uvicorn-tls", "trustmesh-base", "server_cpu_us")
                busy = spread([v * 100 for s in SYSTEMS for v in keep.values(s, "machine_busy")])
                print(f"machine busy during the runs, % of all cores: {busy}")
            if "2" not in args.skip:
                print_table(
                    f"2. new connection per request (full mTLS handshake), wrk -t1 "
                    f"-c{args.hs_connections} -H 'Connection: close', median of {args.rounds}",
                    hand,
                    "handshakes/s",
                    (*SYSTEMS, "trustmesh-base"),
                )
                results["hand"] = ratio_line(hand, "trustmesh", "nginx")
                # Issue 18: the CPython limit, plain uvicorn doing the same handshake.
                ratio_line(hand, "trustmesh", "uvicorn-mtls")
                # ... and the same full handshake (uvicorn-mtls's tickets let wrk resume).
                results["hand_py"] = ratio_line(hand, "trustmesh", "uvicorn-mtls-full")
                ratio_line(hand, "uvicorn-mtls-full", "trustmesh", "server_cpu_us")
                if COMPARE_SRC:
                    ratio_line(hand, "trustmesh-base", "trustmesh", "server_cpu_us")
                    ratio_line(hand, "uvicorn-mtls-full", "trustmesh-base", "server_cpu_us")
                ratio_line(hand, "uvicorn-mtls", "nginx")
                ratio_line(hand, "uvicorn-tls", "nginx")
            tm = servers[0]
            if "3" not in args.skip:
                print(f"\n3. revoke -> refusal on an open keep-alive connection, load {loadavg()}")
                send, answer, oks = revocation_latency(
                    args, home, work, ca_server.url, admin, tm.port
                )
                p50, p99 = percentile(send, 50), percentile(send, 99)
                print(
                    f"from revoke sent: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                    f"max {max(send) * 1000:.0f} ms over {len(send)} revocations"
                )
                print(
                    f"from revoke answered: p50 {percentile(answer, 50) * 1000:.0f} ms, "
                    f"p99 {percentile(answer, 99) * 1000:.0f} ms"
                )
                print(f"all (ms, from sent): {spread([x * 1000 for x in send])}")
                print(f"requests still answered 200 after the revoke answer: {spread(oks)}")
                results["revoke_p99"] = p99
            print(f"\nload average at the end: {loadavg()}")
            print("\nTargets:")
            if "keep" in results:
                ok = results["keep"] >= 0.9
                print(f"  keep-alive trustmesh >= 90% of uvicorn-tls: {verdict(ok)}")
            if "hand" in results:
                ok = results["hand"] >= 0.8
                print(f"  handshakes trustmesh >= 80% of nginx (issue 5): {verdict(ok)}")
                ok = results["hand_py"] >= 0.95
                print(
                    f"  handshakes trustmesh >= 95% of uvicorn-mtls-full (issue 18): {verdict(ok)}"
                )
            if "revoke_p99" in results:
                ok = results["revoke_p99"] <= 1.0
                print(f"  revoke -> refused p99 <= 1 s: {verdict(ok)}")
        if args.breakdown:
            breakdown(args, work, ca_server.url, ctx, caller, shim)
            micro(work, ca_server.url, caller, args.rounds)
        if args.breakdown_handshakes:
            handshake_micro(work, caller, args.rounds)
        if args.tickets:
            ticket_runs(args, work, caller, shim)
        if args.profile:
            for new_conn in (False, True):
                prof = work / f"trustmesh-{new_conn}.prof"
                profiled = start_python("trustmesh", work, ca_server.url, ctx, profile_out=prof)
                with started([profiled]):
                    r = run_wrk(profiled, caller, shim, args, new_conn=new_conn)
                print_profile(prof, r.requests, new_conn)
            # The baseline of the new-connection target, profiled the same way.
            prof = work / "uvicorn-mtls-full.prof"
            profiled = start_python("uvicorn-mtls-full", work, ca_server.url, ctx, profile_out=prof)
            with started([profiled]):
                r = run_wrk(profiled, caller, shim, args, new_conn=True)
            print_profile(prof, r.requests, True, "uvicorn-mtls-full")


if __name__ == "__main__":
    main()
