"""The edge gateway (issue #6): trustmesh gateway vs HAProxy 2.6 vs calling the service directly.

Everything runs on 127.0.0.1, on this machine, in one run. Setup (untimed): a fresh
ec-p256 CA and a real ``trustmesh ca serve`` for it (the revocation feed of the gateway
and of the service); identities from it for the service
(``spiffe://example.org/svc/inventory``, DNS localhost, IP 127.0.0.1) and the gateway
(``spiffe://example.org/gateway``); a token issuer: a small static HTTPS server (thread
of this script, certificate from the CA) publishing a discovery document and a JWKS
(``tests/_provider.py``), whose ES256 key signs the access tokens (RFC 9068: ``typ``
at+jwt, ``iss``, ``aud`` api, ``sub``, ``client_id``, ``iat``, ``exp`` +1 h, ``jti``,
``scope`` "orders:read orders:write") with joserfc.

The upstream (one process, shared by the three systems): the trivial FastAPI app of
``bench/service.py`` (``GET /items/{item}`` -> ``{"item":"7"}``) under ``python -m
trustmesh run svc_app:app --cert-dir DIR --policy FILE --ca URL --log-level warning``:
mTLS with client certificates required, a policy allowing the gateway's SPIFFE ID to
GET /items/*, revocation checked per request. It does not verify the bearer token
(no --issuer): the same work whoever calls it.

Systems, each request ``GET /items/7`` with ``Authorization: Bearer <token>``:

  direct     wrk (client-certificate shim: the gateway's identity) straight to the
             upstream over mTLS: the floor
  trustmesh  ``python -m trustmesh gateway serve --config FILE --cert-dir DIR --log-level
             warning``: public TLS listener (the gateway's CA-issued certificate; clients
             present none), one route ``/items`` requiring scope ``orders:read`` of the
             issuer above (discovery, JWKS), upstream by SPIFFE ID over mTLS
  haproxy    HAProxy 2.6 (Debian), ``nbthread 1``, doing the same job: TLS listener with
             the same certificate; bearer from ``http_auth_bearer``; ``alg`` must be ES256
             (``jwt_header_query``), ``jwt_verify`` with the issuer's public key (PEM)
             must be 1, ``iss`` and ``aud`` compared, ``exp`` present and not before
             ``date()``, ``scope`` must contain the word orders:read (regex on
             ``jwt_payload_query('$.scope')``); 401 with WWW-Authenticate for a missing or
             bad token, 403 for the scope; X-Forwarded-For/-Proto set by it; the same
             security response headers as the gateway; upstream ``server ... ssl verify
             required ca-file bundle.pem crt client.pem verifyhost localhost`` (the
             gateway's identity as client certificate, keep-alive to the upstream)

Before timing, each proxy is checked: valid token 200 with the app's body, no token 401,
token signed by another key 401, expired token 401, token without the scope 403.

Measurements, each round in rotated order of the systems:

  a. throughput  wrk -t1 -c CONN -dD (keep-alive), req/s, wrk's p50/p99; target:
                 trustmesh/haproxy req/s >= 0.50
  b. latency     ``ratelat`` (bench/_ratelat.c, compiled here): open loop at a fixed
                 --rate (500 req/s) over 16 keep-alive connections; latency from each
                 request's scheduled send time to its answer's last byte (no coordinated
                 omission); p50/p99 per system; added = system - direct (medians across
                 rounds); target: trustmesh added p99 <= 2 ms

Server CPU per request comes from /proc (the proxy's process tree, the upstream apart);
the generators' CPU too. ``--tokens N`` sends N distinct tokens in rotation (wrk by a
Lua script, ratelat by a file) instead of one: with N above the gateway's verified-token
cache (10,000 by default) every request is a full signature check, as HAProxy does on
every request anyway.

Install the tools first (not part of CI):
  apt-get install -y haproxy wrk gcc libssl-dev

Example:
  .venv/bin/python bench/gateway.py                 # make bench-gateway
  .venv/bin/python bench/gateway.py --rounds 5 --duration 8 --latency-duration 10
  .venv/bin/python bench/gateway.py --only direct --only haproxy --rounds 1 --duration 2
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _api import ca_serve, free_port, init_home, stop_process
from _common import (
    FASTAPI_APP,
    PASSPHRASE,
    TRUST_DOMAIN,
    ClientCert,
    Tally,
    build_ratelat,
    build_shim,
    loadavg,
    need_tools,
    print_columns,
    print_machine,
    process_tree,
    ratio_line,
    run_ratelat,
    run_wrk,
    spread,
    start_haproxy,
    verdict,
    wait_ok,
    write_cert_dir,
    wrk_rotation_script,
)
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests._provider import Minter, ProviderServer, server_tls

from trustmesh.authority import CertificateAuthority

HOST = "127.0.0.1"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/gateway"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/svc/inventory"
AUDIENCE = "api"
SCOPE = "orders:read"
PATH = "/items/7"
BODY = b'{"item":"7"}'
SYSTEMS = ("direct", "trustmesh", "haproxy")
PROXIES = ("trustmesh", "haproxy")
TARGET_RATIO = 0.50
TARGET_ADDED_P99_MS = 2.0

UPSTREAM_POLICY = f"""\
mode: enforce
rules:
  - name: gateway-reads-inventory
    callers: ["{GATEWAY_ID}"]
    methods: [GET]
    paths: ["/items", "/items/*"]
"""

GATEWAY_CONFIG = """\
listen: {host}:{port}
id: {gateway_id}
ca: {ca_url}
issuers:
  - issuer: {issuer}
    audience: {audience}
    ca_bundle: {bundle}
    algorithms: [ES256]
routes:
  - path: /items
    upstream: {{urls: ["https://{host}:{upstream_port}"], id: "{server_id}"}}
    auth: {{scopes: ["{scope}"]}}
"""

# 401 for a token that is present but not acceptable (RFC 6750 section 3.1).
DENY_401 = (
    'http-request deny deny_status 401 hdr WWW-Authenticate "Bearer error=\\"invalid_token\\""'
)
HAPROXY_CONFIG = """\
global
    nbthread 1
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-server-options ssl-min-ver TLSv1.2

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 10s
    timeout http-keep-alive 60s
    option http-keep-alive

frontend gateway
    bind {host}:{port} ssl crt {dir}/public.pem alpn http/1.1
    http-request deny deny_status 404 unless {{ path /items }} or {{ path_beg /items/ }}
    http-request set-var(txn.bearer) http_auth_bearer
    http-request return status 401 hdr WWW-Authenticate "Bearer realm=\\"haproxy\\"" \
unless {{ var(txn.bearer) -m found }}
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    {deny401} unless {{ var(txn.alg) -m str ES256 }}
    {deny401} unless {{ var(txn.bearer),jwt_verify(txn.alg,"{dir}/issuer.pem") -m int 1 }}
    {deny401} unless {{ var(txn.bearer),jwt_payload_query('$.iss') -m str {issuer} }}
    {deny401} unless {{ var(txn.bearer),jwt_payload_query('$.aud') -m str {audience} }}
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date()
    {deny401} unless {{ var(txn.exp) -m found }}
    {deny401} if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}
    http-request deny deny_status 403 \
unless {{ var(txn.bearer),jwt_payload_query('$.scope') -m reg (^|\\ ){scope}(\\ |$) }}
    http-request del-header X-Forwarded-For
    http-request set-header X-Forwarded-Proto https
    option forwardfor
    http-response set-header Strict-Transport-Security "max-age=63072000"
    http-response set-header X-Content-Type-Options nosniff
    http-response set-header X-Frame-Options DENY
    http-response set-header Referrer-Policy no-referrer
    default_backend upstream

backend upstream
    http-reuse always
    server up {host}:{upstream_port} ssl verify required ca-file {dir}/bundle.pem \
crt {dir}/client.pem verifyhost localhost
"""


@dataclass
class System:
    name: str
    port: int
    pids: list[int]  # the proxy's process tree (empty for direct)
    cert: ClientCert | None  # what the load generators present (direct: mTLS)

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}{PATH}"


@dataclass
class Tokens:
    valid: str
    rotation: list[str]  # --tokens N distinct valid tokens (N = 1: [valid])
    wrong_key: str
    expired: str
    no_scope: str


def make_tokens(minter: Minter, count: int) -> Tokens:
    now = int(time.time())
    life = {"iat": now, "exp": now + 3600}  # the verifier caps lifetimes at 1 h
    valid = minter.token(**life)
    rotation = [valid] + [minter.token(**life) for _ in range(count - 1)]
    impostor = ECKey.generate_key("P-256", parameters={"kid": minter.ec.kid})
    return Tokens(
        valid=valid,
        rotation=rotation,
        wrong_key=minter.token(key=impostor, **life),
        expired=minter.token(iat=now - 900, exp=now - 300),
        no_scope=minter.token(scope="orders:write", **life),
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def check_proxy(system: System, tokens: Tokens, verify: ssl.SSLContext) -> None:
    """A proxy must pass the valid token through and refuse the others, each for its reason."""
    cases: list[tuple[str, dict[str, str], set[int]]] = [
        ("valid token", bearer(tokens.valid), {200}),
        ("no token", {}, {401}),
        ("token signed by another key", bearer(tokens.wrong_key), {401}),
        ("expired token", bearer(tokens.expired), {401}),
        ("token without the scope", bearer(tokens.no_scope), {403}),
    ]
    with httpx.Client(verify=verify, timeout=10) as client:
        for what, headers, expected in cases:
            r = client.get(system.url, headers=headers)
            if r.status_code not in expected or (r.status_code == 200 and r.content != BODY):
                raise SystemExit(
                    f"{system.name}: {what} answered {r.status_code} {r.text[:200]!r}, "
                    f"expected {sorted(expected)}: fix the setup before timing it"
                )
            if (
                r.status_code == 401
                and "bearer" not in r.headers.get("www-authenticate", "").lower()
            ):
                print(f"  note: {system.name} answers 401 for {what} without WWW-Authenticate")
    print(f"  {system.name}: valid 200, no token 401, wrong key 401, expired 401, no scope 403")


@contextlib.contextmanager
def running(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[Any]]:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_process(proc)


def haproxy_files(work: Path, gateway: ClientCert, minter: Minter) -> Path:
    """HAProxy reads everything from one directory: its listener's certificate and key,
    its client certificate and key for the upstream, the CA bundle, the issuer's key."""
    hdir = work / "haproxy"
    hdir.mkdir()
    both = gateway.chain.read_bytes() + gateway.key.read_bytes()
    (hdir / "public.pem").write_bytes(both)
    (hdir / "client.pem").write_bytes(both)
    shutil.copy(work / "bundle.pem", hdir / "bundle.pem")
    public = minter.ec.private_key.public_key()  # type: ignore[union-attr]
    (hdir / "issuer.pem").write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return hdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections")
    parser.add_argument("--rate", type=float, default=500, help="requests/s for the latency runs")
    parser.add_argument("--latency-duration", type=float, default=10, help="seconds per run")
    parser.add_argument("--tokens", type=int, default=1, help="distinct tokens in rotation")
    parser.add_argument("--only", action="append", choices=SYSTEMS, help="run only these systems")
    parser.add_argument("--skip", action="append", default=[], choices=["a", "b"])
    args = parser.parse_args()
    need_tools(
        ("wrk", "haproxy", "gcc", "setpriv"), "apt-get install -y haproxy wrk gcc libssl-dev"
    )
    print("# trustmesh gateway vs HAProxy vs direct (bench/gateway.py)")
    print_machine({"haproxy": ["haproxy", "-v"], "wrk": ["wrk", "-v"], "gcc": ["gcc", "--version"]})
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    systems_wanted = args.only or list(SYSTEMS)
    home = work / "home"
    bundle = init_home(home, None)
    shutil.copy(bundle, work / "bundle.pem")
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        upstream_id = write_cert_dir(
            ca, SERVER_ID, work / "upstream", dns=["localhost"], ips=["127.0.0.1"]
        )
        gateway_id = write_cert_dir(
            ca, GATEWAY_ID, work / "gateway", dns=["localhost"], ips=["127.0.0.1"]
        )
        issuer_tls, _ = server_tls(ca, work / "issuer")
    del upstream_id
    (work / "policy.yaml").write_text(UPSTREAM_POLICY)
    (work / "svc_app.py").write_text(FASTAPI_APP)
    shim, ratelat = build_shim(work), build_ratelat(work)
    verify = ssl.create_default_context(cafile=str(work / "bundle.pem"))
    mtls = ssl.create_default_context(cafile=str(work / "bundle.pem"))
    mtls.load_cert_chain(gateway_id.chain, gateway_id.key)

    issuer = ProviderServer(issuer_tls).start()
    minter = Minter(issuer=issuer.url, audience=AUDIENCE)
    issuer.routes["/.well-known/openid-configuration"] = {
        "issuer": issuer.url,
        "jwks_uri": issuer.url + "/jwks",
    }
    issuer.routes["/jwks"] = minter.jwks()
    tokens = make_tokens(minter, args.tokens)
    rotation = work / "tokens.lines"
    header_lines = [f"Authorization: Bearer {t}" for t in tokens.rotation]
    script = wrk_rotation_script(work / "tokens.lua", header_lines) if args.tokens > 1 else None
    print(f"token: {len(tokens.valid)} bytes, ES256; distinct tokens in rotation: {args.tokens}")

    stack = contextlib.ExitStack()
    with stack:
        stack.callback(issuer.stop)
        ca_server = stack.enter_context(ca_serve(home, work / "bundle.pem", work / "ca.log"))
        up_port = free_port()
        cmd = [sys.executable, "-m", "trustmesh", "run", "svc_app:app", "--app-dir", str(work)]
        cmd += ["--cert-dir", str(work / "upstream"), "--listen", f"{HOST}:{up_port}"]
        cmd += ["--policy", str(work / "policy.yaml"), "--ca", ca_server.url]
        cmd += ["--log-level", "warning"]
        upstream = stack.enter_context(running(cmd, work / "upstream.log"))
        wait_ok(
            f"https://{HOST}:{up_port}{PATH}", verify=mtls, proc=upstream, log=work / "upstream.log"
        )
        systems: list[System] = []
        if "direct" in systems_wanted:
            systems.append(System("direct", up_port, [], gateway_id))
        if "trustmesh" in systems_wanted:
            port = free_port()
            config = work / "gateway.yaml"
            config.write_text(
                GATEWAY_CONFIG.format(
                    host=HOST,
                    port=port,
                    gateway_id=GATEWAY_ID,
                    ca_url=ca_server.url,
                    issuer=issuer.url,
                    audience=AUDIENCE,
                    bundle=work / "bundle.pem",
                    upstream_port=up_port,
                    server_id=SERVER_ID,
                    scope=SCOPE,
                )
            )
            cmd = [sys.executable, "-m", "trustmesh", "gateway", "serve", "--config", str(config)]
            cmd += ["--cert-dir", str(work / "gateway"), "--log-level", "warning"]
            proc = stack.enter_context(running(cmd, work / "gateway.log"))
            url = f"https://{HOST}:{port}{PATH}"
            wait_ok(
                url,
                verify=verify,
                proc=proc,
                log=work / "gateway.log",
                headers=bearer(tokens.valid),
            )
            systems.append(System("trustmesh", port, process_tree(proc.pid), None))
        if "haproxy" in systems_wanted:
            port = free_port()
            hdir = haproxy_files(work, gateway_id, minter)
            conf = HAPROXY_CONFIG.format(
                host=HOST,
                port=port,
                dir=hdir,
                issuer=issuer.url,
                audience=AUDIENCE,
                scope=SCOPE,
                upstream_port=up_port,
                deny401=DENY_401,
            )
            proc = start_haproxy(hdir, conf, work=work)
            stack.callback(stop_process, proc)
            url = f"https://{HOST}:{port}{PATH}"
            wait_ok(
                url,
                verify=verify,
                proc=proc,
                log=hdir / "haproxy.log",
                headers=bearer(tokens.valid),
            )
            systems.append(System("haproxy", port, process_tree(proc.pid), None))
        print(f"systems: {', '.join(f'{s.name} :{s.port}' for s in systems)}; upstream :{up_port}")
        print("correctness (before timing):")
        for s in systems:
            if s.name != "direct":
                check_proxy(s, tokens, verify)
        if "direct" in systems_wanted:
            print("  direct: 200 over mTLS with the gateway's identity (it checks no token)")
        measure(args, systems, upstream.pid, shim, ratelat, tokens, rotation, script, header_lines)


def measure(
    args: argparse.Namespace,
    systems: Sequence[System],
    upstream_pid: int,
    shim: Path,
    ratelat: Path,
    tokens: Tokens,
    rotation: Path,
    script: Path | None,
    header_lines: Sequence[str],
) -> None:
    rotation.write_text("".join(f"{line}\n" for line in header_lines))
    fixed = [] if script is not None else [f"Authorization: Bearer {tokens.valid}"]

    def wrk(s: System, duration: float) -> Any:
        return run_wrk(
            s.url,
            s.pids,
            connections=args.connections,
            duration=duration,
            shim=shim,
            cert=s.cert,
            headers=fixed,
            script=script,
            upstream=upstream_pid,
        )

    def rate(s: System, duration: float) -> Any:
        return run_ratelat(
            ratelat,
            s.port,
            s.pids,
            rate=args.rate,
            duration=duration,
            path=PATH,
            tls=True,
            cert=s.cert,
            rotate=rotation,
            upstream=upstream_pid,
        )

    print("warm-up: 2 s of wrk and 2 s at the fixed rate per system (untimed)")
    for s in systems:
        wrk(s, 2)
        rate(s, 2)
    keep, lat = Tally(), Tally()
    for rnd in range(args.rounds):
        order = list(systems[rnd % len(systems) :]) + list(systems[: rnd % len(systems)])
        print(f"round {rnd + 1}: order {[s.name for s in order]}, load {loadavg()}", flush=True)
        for s in order:
            if "a" not in args.skip:
                keep.add(s.name, wrk(s, args.duration))
            if "b" not in args.skip:
                lat.add(s.name, rate(s, args.latency_duration))
    print(f"load average after the rounds: {loadavg()}")
    names = [s.name for s in systems]
    verdicts: list[str] = []
    print(f"\nmedians of {args.rounds} rounds, per-round values in brackets")
    if "a" not in args.skip:
        print_columns(
            f"a. keep-alive throughput: wrk -t1 -c{args.connections} -d{args.duration:g}s, "
            f"GET {PATH} with a bearer token ({args.tokens} distinct)",
            keep,
            names,
            [
                ("req/s", "rps", "{:.0f}"),
                ("p50 ms", "p50_ms", "{:.2f}"),
                ("p99 ms", "p99_ms", "{:.2f}"),
                ("proxy CPU µs/req", "server_cpu_us", "{:.0f}"),
                ("upstream CPU µs/req", "upstream_cpu_us", "{:.0f}"),
                ("wrk CPU µs/req", "wrk_cpu_us", "{:.0f}"),
            ],
        )
        if {"trustmesh", "haproxy"} <= set(names):
            ratio = ratio_line(keep, "trustmesh", "haproxy")
            verdicts.append(
                f"throughput trustmesh/haproxy >= {TARGET_RATIO:.2f}: {ratio:.2f} "
                f"{verdict(ratio >= TARGET_RATIO)}"
            )
        if "direct" in names:
            for name in PROXIES:
                if name in names:
                    ratio_line(keep, name, "direct")
    if "b" not in args.skip:
        print_columns(
            f"b. latency at a fixed {args.rate:g} req/s (open loop, ratelat, 16 connections, "
            f"{args.latency_duration:g} s; from the scheduled send time)",
            lat,
            names,
            [
                ("p50 ms", "p50_ms", "{:.2f}"),
                ("p90 ms", "p90_ms", "{:.2f}"),
                ("p99 ms", "p99_ms", "{:.2f}"),
                ("max ms", "max_ms", "{:.1f}"),
                ("p50 from write ms", "raw_p50_ms", "{:.2f}"),
                ("p99 from write ms", "raw_p99_ms", "{:.2f}"),
                ("achieved req/s", "rate", "{:.0f}"),
                ("proxy CPU µs/req", "server_cpu_us", "{:.0f}"),
                ("upstream CPU µs/req", "upstream_cpu_us", "{:.0f}"),
                ("generator CPU µs/req", "gen_cpu_us", "{:.0f}"),
                ("late send max ms", "late_max_ms", "{:.2f}"),
            ],
        )
        if "direct" in names:
            print(
                "\nadded latency over direct (median of the system - median of direct; "
                "per-round differences in brackets):"
            )
            print("| system | added p50 ms | added p99 ms |\n|---|---|---|")
            for name in PROXIES:
                if name not in names:
                    continue
                cells, added = [], {}
                for q in ("p50_ms", "p99_ms"):
                    per_round = [
                        a - b
                        for a, b in zip(lat.values(name, q), lat.values("direct", q), strict=True)
                    ]
                    added[q] = lat.med(name, q) - lat.med("direct", q)
                    cells.append(f"{added[q]:.2f} {spread(per_round, '{:.2f}')}")
                print(f"| {name} | {cells[0]} | {cells[1]} |")
                if name == "trustmesh":
                    ok = added["p99_ms"] <= TARGET_ADDED_P99_MS
                    verdicts.append(
                        f"trustmesh added p99 at {args.rate:g} req/s <= {TARGET_ADDED_P99_MS:g} "
                        f"ms: {added['p99_ms']:.2f} ms {verdict(ok)}"
                    )
    print(f"\nload average at the end: {loadavg()}")
    if verdicts:
        print("\nTargets (issue #6):")
        for line in verdicts:
            print(f"  {line}")


if __name__ == "__main__":
    main()
