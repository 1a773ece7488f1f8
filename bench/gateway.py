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
             the same certificate; bearer from ``http_auth_bearer``; ``alg`` must be
             ES256 and ``typ`` at+jwt (``jwt_header_query``); ``jwt_verify`` with the
             issuer's public key (PEM) must be 1; ``iss``, ``aud`` compared; ``exp``
             present, not before ``date()``; ``scope`` must hold the word orders:read (regex on
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
from collections.abc import Callable, Sequence
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
    Load,
    Target,
    added_target,
    build_ratelat,
    build_shim,
    load_arguments,
    measure_load,
    need_tools,
    print_cprofile,
    print_machine,
    print_rate_tables,
    print_targets,
    print_wrk_table,
    process_tree,
    ratio_line,
    ratio_target,
    start_haproxy,
    start_or_skip,
    under_cprofile,
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
    {deny401} unless {{ var(txn.bearer),jwt_header_query('$.typ') -m str at+jwt }}
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


def check_proxy(system: Target, tokens: Tokens, verify: ssl.SSLContext) -> None:
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
    load_arguments(parser, SYSTEMS)
    parser.add_argument("--tokens", type=int, default=1, help="distinct tokens in rotation")
    parser.add_argument(
        "--profile", action="store_true", help="then one wrk run against a gateway in cProfile"
    )
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
        write_cert_dir(ca, SERVER_ID, work / "upstream", dns=["localhost"], ips=["127.0.0.1"])
        gateway_id = write_cert_dir(
            ca, GATEWAY_ID, work / "gateway", dns=["localhost"], ips=["127.0.0.1"]
        )
        issuer_tls, _ = server_tls(ca, work / "issuer")
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
    header_lines = [f"Authorization: Bearer {t}" for t in tokens.rotation]
    script = wrk_rotation_script(work / "tokens.lua", header_lines) if args.tokens > 1 else None
    rotation = work / "tokens.lines"  # written by wrk_rotation_script, read by ratelat
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
        upstream = subprocess.Popen(
            cmd, stdout=(work / "upstream.log").open("w"), stderr=subprocess.STDOUT
        )
        stack.callback(stop_process, upstream)
        wait_ok(
            f"https://{HOST}:{up_port}{PATH}", verify=mtls, proc=upstream, log=work / "upstream.log"
        )
        systems: list[Target] = []

        def ready(port: int) -> Callable[[subprocess.Popen[Any], Path], None]:
            url = f"https://{HOST}:{port}{PATH}"
            return lambda proc, log: wait_ok(
                url, verify=verify, proc=proc, log=log, headers=bearer(tokens.valid)
            )

        if "direct" in systems_wanted:
            systems.append(Target("direct", up_port, PATH, [], cert=gateway_id))

        def gateway_command(port: int, config: Path) -> list[str]:
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
            return [*cmd, "--cert-dir", str(work / "gateway"), "--log-level", "warning"]

        if "trustmesh" in systems_wanted:
            port = free_port()
            cmd = gateway_command(port, work / "gateway.yaml")
            gateway = start_or_skip("trustmesh", cmd, work / "gateway.log", stack, ready(port))
            if gateway is not None:
                systems.append(Target("trustmesh", port, PATH, process_tree(gateway.pid)))
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
            ready(port)(proc, hdir / "haproxy.log")
            systems.append(Target("haproxy", port, PATH, process_tree(proc.pid)))
        print(f"systems: {', '.join(f'{s.name} :{s.port}' for s in systems)}; upstream :{up_port}")
        print("correctness (before timing):")
        for s in systems:
            if s.name != "direct":
                check_proxy(s, tokens, verify)
        if "direct" in systems_wanted:
            print("  direct: 200 over mTLS with the gateway's identity (it checks no token)")
        load = Load(
            shim,
            ratelat,
            upstream.pid,
            args.connections,
            args.rate,
            headers=[] if script else [f"Authorization: Bearer {tokens.valid}"],
            script=script,
            rotate=rotation if script else None,
        )
        measure(args, systems, load)
        if args.profile and any(s.name == "trustmesh" for s in systems):
            port, prof = free_port(), work / "gateway.prof"
            cmd = under_cprofile(gateway_command(port, work / "gateway-profiled.yaml"), prof)
            with contextlib.ExitStack() as profiled:
                proc = start_or_skip("profiled", cmd, work / "profiled.log", profiled, ready(port))
                if proc is not None:
                    result = load.wrk(Target("profiled", port, PATH, [proc.pid]), args.duration)
            print_cprofile(prof, f"cProfile of the gateway over {result.requests} wrk requests")


def measure(args: argparse.Namespace, systems: Sequence[Target], load: Load) -> None:
    keep, lat = measure_load(args, systems, load)
    names = [s.name for s in systems]
    verdicts: list[str] = []
    if "a" not in args.skip:
        what = f"GET {PATH} with a bearer token ({args.tokens} distinct)"
        print_wrk_table(args, keep, names, what, "upstream")
        if {"trustmesh", "haproxy"} <= set(names):
            verdicts.append(ratio_target(keep, "trustmesh", "haproxy", TARGET_RATIO))
        for name in PROXIES:
            if {name, "direct"} <= set(names):
                ratio_line(keep, name, "direct")
    if "b" not in args.skip:
        added = print_rate_tables(args, lat, names, "upstream")
        line = added_target(lat, added, "trustmesh", "p99_ms", TARGET_ADDED_P99_MS, args.rate)
        if line is not None:
            verdicts.append(line)
    print_targets("issue #6", verdicts)


if __name__ == "__main__":
    main()
