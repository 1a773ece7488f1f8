"""The sidecar hop (issue #7): ``trustmesh proxy inbound`` vs HAProxy 2.6 vs the plain app.

Everything runs on 127.0.0.1, on this machine, in one run. Setup (untimed): a fresh
ec-p256 CA and a real ``trustmesh ca serve`` for it (the sidecar's revocation feed);
from it the service's identity (``spiffe://example.org/svc/inventory``, DNS localhost,
IP 127.0.0.1) that the sidecars present, and the caller's
(``spiffe://example.org/svc/orders``) that the load generators present.

The app (one process, shared by all systems): a plain Node.js ``http`` server (the
fastest honest plain app at hand; ``node`` from Debian), ``GET /items/7`` ->
``{"item":"7"}`` with Content-Length, keep-alive; ``GET /items/whoami`` echoes the request
headers (and the PROXY v2 header's TLVs) for the correctness checks. It listens twice:
plain HTTP, and plain HTTP behind a PROXY protocol v2 header (for the TCP-mode rows).

Systems, each request ``GET /items/7``:

  direct          wrk over plain HTTP straight to the app: the floor
  trustmesh-http  ``python -m trustmesh proxy inbound --http --id ID --listen ...
                  --to 127.0.0.1:APP --cert-dir DIR --policy FILE`` (+ ``--ca URL`` and
                  ``--log-level warning`` when the command has them): mTLS with client
                  certificates required, the policy (the caller may GET /items/*)
                  evaluated per request, caller headers set for the app
  haproxy-http    HAProxy 2.6 (Debian), ``nbthread 1``: ``bind ssl crt ... ca-file
                  bundle.pem verify required``; HAProxy 2.6 has no fetch for a URI SAN,
                  so the caller's SPIFFE ID comes from a map of certificate SHA-256
                  fingerprints (``ssl_c_der,sha2(256),hex,map(...)``); the same rule
                  (that ID, GET, /items or /items/*) as an ACL, else 403; then the
                  headers the sidecar sets (``X-Trustmesh-Caller``, ``Client-Cert`` with
                  the leaf as base64 DER, ``X-Forwarded-For``/``-Proto``), incoming copies
                  and a few other identity headers removed; keep-alive to the app
  trustmesh-tcp   ``proxy inbound --allow-id CALLER`` without ``--http`` (TCP mode: the
                  caller checked per connection, PROXY v2 with its SPIFFE ID to the app)
  haproxy-tcp     HAProxy ``mode tcp``, the same TLS, the caller's fingerprint checked
                  per connection, ``send-proxy-v2`` to the app

Both mTLS systems are driven by wrk with the client-certificate shim (bench/_common.py)
and by ratelat with the caller's certificate. Before timing, each proxy is checked: the
caller gets 200 and the app sees its identity; a certificate from another CA and no
certificate are refused (handshake or 403); a caller the policy does not name is refused.

Measurements, each round in rotated order of the systems:

  a. throughput  wrk -t1 -c CONN -dD (keep-alive): req/s, CPU per request of the proxy
                 and of the app; target: trustmesh-http/haproxy-http >= 0.50
  b. latency     ratelat (bench/_ratelat.c) open loop at --rate req/s (500): p50/p99 from
                 the scheduled send time; added = system - direct; target: trustmesh-http
                 added p50 <= 0.5 ms
  c. memory      RSS and PSS of the sidecar process (and HAProxy's, the app's) at idle
                 (after start-up and the checks), the peak sampled every 100 ms during
                 the timed runs, and 2 s after the last run (compare: Linkerd's proxy, 26 MB)

Install the tools first (not part of CI):
  apt-get install -y haproxy wrk gcc libssl-dev nodejs

Example:
  .venv/bin/python bench/sidecar.py                  # make bench-sidecar
  .venv/bin/python bench/sidecar.py --rounds 5 --duration 8 --latency-duration 10
  .venv/bin/python bench/sidecar.py --only direct --only haproxy-http --rounds 1 --duration 2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _api import ca_serve, free_port, init_home, stop_process
from _common import (
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
    memory_kib,
    need_tools,
    print_machine,
    print_rate_tables,
    print_targets,
    print_wrk_table,
    process_tree,
    ratio_target,
    start_haproxy,
    start_or_skip,
    wait_ok,
    write_cert_dir,
)
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType

HOST = "127.0.0.1"
SERVICE_ID = f"spiffe://{TRUST_DOMAIN}/svc/inventory"
CALLER_ID = f"spiffe://{TRUST_DOMAIN}/svc/orders"
STRANGER_ID = f"spiffe://{TRUST_DOMAIN}/svc/stranger"  # valid certificate, not in the policy
PATH = "/items/7"
BODY = b'{"item":"7"}'
SYSTEMS = ("direct", "trustmesh-http", "haproxy-http", "trustmesh-tcp", "haproxy-tcp")
TARGET_RATIO = 0.50
TARGET_ADDED_P50_MS = 0.5
LINKERD_PROXY_MB = 26
TARGET_IDLE_RSS_MB = 50

POLICY = f"""\
mode: enforce
rules:
  - name: orders-reads-inventory
    callers: ["{CALLER_ID}"]
    methods: [GET]
    paths: ["/items", "/items/*"]
"""

APP_JS = r"""
// A plain Node.js HTTP app: argv[2] plain HTTP port, argv[3] the same behind PROXY v2.
const http = require('http');
const net = require('net');
const body = '{"item":"7"}';
function handler(req, res) {
  if (req.url === '/items/whoami') {
    const out = JSON.stringify({headers: req.headers, proxy: req.socket.proxyInfo || null});
    res.writeHead(200, {'Content-Type': 'application/json',
                        'Content-Length': Buffer.byteLength(out)});
    res.end(out);
    return;
  }
  res.writeHead(200, {'Content-Type': 'application/json', 'Content-Length': body.length});
  res.end(body);
}
const server = http.createServer(handler);
server.keepAliveTimeout = 120000;
server.headersTimeout = 125000;
server.listen(+process.argv[2], '127.0.0.1');
const SIG = Buffer.from('0d0a0d0a000d0a515549540a', 'hex');
net.createServer((sock) => {
  let buf = Buffer.alloc(0);
  const onData = (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    if (buf.length < 16) return;
    if (!buf.subarray(0, 12).equals(SIG)) { sock.destroy(); return; }
    const len = buf.readUInt16BE(14);
    if (buf.length < 16 + len) return;
    sock.removeListener('data', onData);
    sock.pause();
    const info = {command: buf[12] & 0x0f, family: buf[13], tlvs: {}};
    let off = 16;
    if (buf[13] === 0x11) {
      info.source = `${buf[16]}.${buf[17]}.${buf[18]}.${buf[19]}:${buf.readUInt16BE(24)}`;
      off += 12;
    } else if (buf[13] === 0x21) {
      off += 36;
    }
    while (off + 3 <= 16 + len) {
      const type = buf[off], size = buf.readUInt16BE(off + 1);
      info.tlvs[type] = buf.subarray(off + 3, off + 3 + size).toString('latin1');
      off += 3 + size;
    }
    sock.proxyInfo = info;
    const rest = buf.subarray(16 + len);
    if (rest.length) sock.unshift(rest);
    server.emit('connection', sock);
    sock.resume();
  };
  sock.on('data', onData);
}).listen(+process.argv[3], '127.0.0.1');
"""

HAPROXY_CONFIG = """\
global
    nbthread 1
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    timeout connect 2s
    timeout client 60s
    timeout server 10s
    timeout http-keep-alive 60s

frontend sidecar_http
    mode http
    option http-keep-alive
    bind {host}:{http_port} ssl crt {dir}/server.pem ca-file {dir}/bundle.pem verify required \
alpn http/1.1
    acl items path /items
    acl items path_beg /items/
    http-request set-var(txn.caller) ssl_c_der,sha2(256),hex,map({dir}/callers.map)
    http-request deny deny_status 403 unless {{ var(txn.caller) -m str {caller} }} METH_GET items
    http-request del-header X-Forwarded-Client-Cert
    http-request del-header X-Spiffe-Id
    http-request del-header Forwarded
    http-request del-header X-Real-IP
    http-request del-header X-Forwarded-For
    http-request set-header X-Trustmesh-Caller %[var(txn.caller)]
    http-request set-header Client-Cert :%[ssl_c_der,base64]:
    http-request set-header X-Forwarded-Proto https
    option forwardfor
    default_backend app_http

backend app_http
    mode http
    http-reuse always
    server app {host}:{app_port}

frontend sidecar_tcp
    mode tcp
    bind {host}:{tcp_port} ssl crt {dir}/server.pem ca-file {dir}/bundle.pem verify required
    tcp-request session reject unless {{ ssl_c_der,sha2(256),hex,map({dir}/callers.map) \
-m str {caller} }}
    default_backend app_pp

backend app_pp
    mode tcp
    server app {host}:{pp_port} send-proxy-v2 proxy-v2-options ssl
"""


def tree_memory(pids: Sequence[int]) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over ``pids``."""
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            r, p = memory_kib(pid)
            rss, pss = rss + r, pss + p
    return rss, pss


@dataclass
class Memory:
    """RSS/PSS in KiB of a process tree: idle before the load, the peak under load (sampled),
    idle again after it."""

    idle: tuple[int, int] = (0, 0)
    peak: tuple[int, int] = (0, 0)
    after: tuple[int, int] = (0, 0)


@dataclass
class Watched:
    """Memory of the proxies and the app, sampled every 100 ms while ``during`` runs."""

    pids: dict[str, list[int]]
    memory: dict[str, Memory] = field(default_factory=dict)

    def snapshot(self, when: str) -> None:
        for name, pids in self.pids.items():
            setattr(self.memory.setdefault(name, Memory()), when, tree_memory(pids))

    @contextlib.contextmanager
    def during(self, names: Sequence[str]) -> Iterator[None]:
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                for name in names:
                    mem = self.memory.setdefault(name, Memory())
                    rss, pss = tree_memory(self.pids[name])
                    mem.peak = (max(mem.peak[0], rss), max(mem.peak[1], pss))
                stop.wait(0.1)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def proxy_help() -> str:
    """``trustmesh proxy inbound --help`` ('' when the command does not exist yet)."""
    out = subprocess.run(
        [sys.executable, "-m", "trustmesh", "proxy", "inbound", "--help"],
        capture_output=True,
        text=True,
    )
    return out.stdout if out.returncode == 0 else ""


def sidecar_command(
    help_text: str, *, http: bool, port: int, app_port: int, work: Path, ca_url: str
) -> list[str]:
    """The sidecar's command line. TCP mode gets ``--allow-id CALLER`` (it refuses policies
    that narrow methods or paths), HTTP mode the policy file."""
    cmd = [sys.executable, "-m", "trustmesh", "proxy", "inbound"]
    cmd += ["--id", SERVICE_ID, "--listen", f"{HOST}:{port}", "--to", f"{HOST}:{app_port}"]
    cmd += ["--cert-dir", str(work / "service")]
    if http:
        cmd += ["--http", "--policy", str(work / "policy.yaml")]
    else:
        cmd += ["--allow-id", CALLER_ID]
    if re.search(r"--ca\b", help_text):
        cmd += ["--ca", ca_url]
    if "--log-level" in help_text:
        cmd += ["--log-level", "warning"]
    return cmd


def tls_context(bundle: Path, cert: ClientCert | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(bundle))
    if cert is not None:
        ctx.load_cert_chain(cert.chain, cert.key)
    return ctx


def client(bundle: Path, cert: ClientCert | None) -> httpx.Client:
    return httpx.Client(verify=tls_context(bundle, cert), timeout=10)


def check_proxy(
    system: Target, bundle: Path, caller: ClientCert, stranger: ClientCert, foreign: ClientCert
) -> None:
    """The caller passes and the app learns who it is; others are refused."""
    whoami = system.url.replace(PATH, "/items/whoami")
    with client(bundle, caller) as c:
        r = c.get(system.url)
        if r.status_code != 200 or r.content != BODY:
            raise SystemExit(f"{system.name}: the caller got {r.status_code} {r.text[:200]!r}")
        seen = c.get(whoami, headers={"X-Trustmesh-Caller": "spiffe://evil/forged"})
    if seen.status_code != 200:
        raise SystemExit(f"{system.name}: /items/whoami answered {seen.status_code}")
    seen_text = seen.text
    if "tcp" in system.name:
        if '"proxy":{' not in seen_text:
            raise SystemExit(f"{system.name}: the app got no PROXY v2 header: {seen_text[:300]}")
        shown = "PROXY v2 header"
        if CALLER_ID in seen_text:
            shown += " with the caller's SPIFFE ID"
    else:
        if "spiffe://evil/forged" in seen_text:
            raise SystemExit(f"{system.name}: a forged X-Trustmesh-Caller reached the app")
        if CALLER_ID not in seen_text:
            raise SystemExit(f"{system.name}: the app was not told the caller: {seen_text[:300]}")
        shown = "the app sees the caller's ID"
    refused = []
    for what, cert in (("no certificate", None), ("foreign CA", foreign), ("stranger", stranger)):
        try:
            with client(bundle, cert) as c:
                code = c.get(system.url).status_code
        except httpx.TransportError:
            code = 0
        if code == 200:
            raise SystemExit(f"{system.name}: {what} was let through (200)")
        refused.append(f"{what} {'refused (connection)' if code == 0 else code}")
    print(f"  {system.name}: caller 200 ({shown}); " + ", ".join(refused))


def fingerprint(cert: ClientCert) -> str:
    """SHA-256 of the leaf's DER, as HAProxy's ``ssl_c_der,sha2(256),hex`` spells it."""
    leaf = x509.load_pem_x509_certificate(cert.chain.read_bytes())
    return hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest().upper()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    load_arguments(parser, SYSTEMS)
    args = parser.parse_args()
    need_tools(
        ("wrk", "haproxy", "gcc", "setpriv", "node"),
        "apt-get install -y haproxy wrk gcc libssl-dev nodejs",
    )
    print("# trustmesh proxy inbound vs HAProxy vs the plain app (bench/sidecar.py)")
    print_machine(
        {
            "haproxy": ["haproxy", "-v"],
            "wrk": ["wrk", "-v"],
            "node": ["node", "--version"],
            "gcc": ["gcc", "--version"],
        }
    )
    import trustmesh

    print(f"trustmesh package: {Path(trustmesh.__file__).parent}")
    with tempfile.TemporaryDirectory(prefix="bench-sidecar-") as tmp:
        run(args, Path(tmp))


def haproxy_files(
    work: Path, service: ClientCert, caller: ClientCert, stranger: ClientCert
) -> Path:
    hdir = work / "haproxy"
    hdir.mkdir()
    (hdir / "server.pem").write_bytes(service.chain.read_bytes() + service.key.read_bytes())
    shutil.copy(work / "bundle.pem", hdir / "bundle.pem")
    (hdir / "callers.map").write_text(
        f"{fingerprint(caller)} {CALLER_ID}\n{fingerprint(stranger)} {STRANGER_ID}\n"
    )
    return hdir


def run(args: argparse.Namespace, work: Path) -> None:
    wanted = list(args.only or SYSTEMS)
    help_text = proxy_help()
    if not help_text:
        missing = [s for s in wanted if s.startswith("trustmesh")]
        if missing:
            print(f"`trustmesh proxy inbound` does not exist in this checkout: skipping {missing}")
        wanted = [s for s in wanted if not s.startswith("trustmesh")]
    elif "--http" not in help_text and "trustmesh-tcp" in wanted:
        print("`proxy inbound` has no --http flag, so no separate TCP mode: skipping trustmesh-tcp")
        wanted.remove("trustmesh-tcp")
    home = work / "home"
    bundle = init_home(home, None)
    shutil.copy(bundle, work / "bundle.pem")
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        service = write_cert_dir(ca, SERVICE_ID, work / "service", dns=["localhost"], ips=[HOST])
        caller = write_cert_dir(ca, CALLER_ID, work / "caller")
        stranger = write_cert_dir(ca, STRANGER_ID, work / "stranger")
    other = CertificateAuthority.init(
        work / "other-home",
        trust_domain=TRUST_DOMAIN,
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
    )
    with other:
        foreign = write_cert_dir(other, CALLER_ID, work / "foreign")
    (work / "policy.yaml").write_text(POLICY)
    (work / "app.js").write_text(APP_JS)
    shim, ratelat = build_shim(work), build_ratelat(work)
    stack = contextlib.ExitStack()
    with stack:
        ca_server = stack.enter_context(ca_serve(home, work / "bundle.pem", work / "ca.log"))
        app_port, pp_port = free_port(), free_port()
        app_log = work / "app.log"
        app = subprocess.Popen(
            ["node", str(work / "app.js"), str(app_port), str(pp_port)],
            stdout=app_log.open("w"),
            stderr=subprocess.STDOUT,
        )
        stack.callback(stop_process, app)
        wait_ok(f"http://{HOST}:{app_port}{PATH}", verify=False, proc=app, log=app_log)
        systems: list[Target] = []
        watched: dict[str, list[int]] = {"app (node)": [app.pid]}
        if "direct" in wanted:
            systems.append(Target("direct", app_port, PATH, [], tls=False))
        for mode in ("http", "tcp"):
            name = f"trustmesh-{mode}"
            if name not in wanted:
                continue
            port = free_port()
            cmd = sidecar_command(
                help_text,
                http=mode == "http",
                port=port,
                app_port=app_port if mode == "http" else pp_port,
                work=work,
                ca_url=ca_server.url,
            )
            url = f"https://{HOST}:{port}{PATH}"
            ctx = tls_context(work / "bundle.pem", caller)
            proc = start_or_skip(
                name,
                cmd,
                work / f"{name}.log",
                stack,
                lambda p, log, url=url, ctx=ctx: wait_ok(url, verify=ctx, proc=p, log=log),
            )
            if proc is not None:
                systems.append(Target(name, port, PATH, process_tree(proc.pid), cert=caller))
        hap_wanted = [s for s in ("haproxy-http", "haproxy-tcp") if s in wanted]
        if hap_wanted:
            http_port, tcp_port = free_port(), free_port()
            hdir = haproxy_files(work, service, caller, stranger)
            config = HAPROXY_CONFIG.format(
                host=HOST,
                http_port=http_port,
                tcp_port=tcp_port,
                app_port=app_port,
                pp_port=pp_port,
                dir=hdir,
                caller=CALLER_ID,
            )
            proc = start_haproxy(hdir, config, work=work)
            stack.callback(stop_process, proc)
            ctx = tls_context(work / "bundle.pem", caller)
            url = f"https://{HOST}:{http_port}{PATH}"
            wait_ok(url, verify=ctx, proc=proc, log=hdir / "haproxy.log")
            pids = process_tree(proc.pid)
            for name, port in (("haproxy-http", http_port), ("haproxy-tcp", tcp_port)):
                if name in hap_wanted:
                    systems.append(Target(name, port, PATH, pids, cert=caller))
            watched["haproxy (both frontends)"] = pids
        for s in systems:
            if s.name.startswith("trustmesh"):
                watched[f"sidecar ({s.name})"] = s.pids
        print(f"systems: {', '.join(f'{s.name} :{s.port}' for s in systems)}; app :{app_port}")
        print("correctness (before timing):")
        for s in systems:
            if s.name != "direct":
                check_proxy(s, work / "bundle.pem", caller, stranger, foreign)
        memory = Watched(watched)
        time.sleep(1)
        memory.snapshot("idle")
        measure(args, systems, Load(shim, ratelat, app.pid, args.connections, args.rate), memory)


def measure(
    args: argparse.Namespace, systems: Sequence[Target], load: Load, memory: Watched
) -> None:
    keep, lat = measure_load(args, systems, load, lambda: memory.during(list(memory.pids)))
    time.sleep(2)
    memory.snapshot("after")
    names = [s.name for s in systems]
    verdicts: list[str] = []
    if "a" not in args.skip:
        print_wrk_table(args, keep, names, f"GET {PATH}", "app", "{:.1f}")
        for num, den in (("trustmesh-http", "haproxy-http"), ("trustmesh-tcp", "haproxy-tcp")):
            if {num, den} <= set(names):
                line = ratio_target(keep, num, den, TARGET_RATIO)
                if num == "trustmesh-http":
                    verdicts.append(line)
    if "b" not in args.skip:
        added = print_rate_tables(args, lat, names, "app", "{:.3f}")
        line = added_target(
            lat, added, "trustmesh-http", "p50_ms", TARGET_ADDED_P50_MS, args.rate, "{:.3f}"
        )
        if line is not None:
            verdicts.append(line)
    print(
        "\nc. memory, KiB (RSS/PSS): idle = after start-up and the checks; peak = highest "
        "sample (every 100 ms) during the timed runs; after = 2 s after the last run. "
        f"Linkerd's proxy: {LINKERD_PROXY_MB} MB"
    )
    print("| process | idle RSS | idle PSS | peak RSS | peak PSS | after RSS | after PSS |")
    print("|---|---|---|---|---|---|---|")
    for name, mem in memory.memory.items():
        cells = [f"{v:,}" for v in (*mem.idle, *mem.peak, *mem.after)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    sidecar = memory.memory.get("sidecar (trustmesh-http)")
    if sidecar is not None:
        peak_mb = sidecar.peak[0] / 1024
        idle_mb = sidecar.idle[0] / 1024
        verdicts.append(
            f"sidecar idle RSS (HTTP mode) <= {TARGET_IDLE_RSS_MB} MB (issue #18): "
            f"{idle_mb:.1f} MB {'met' if idle_mb <= TARGET_IDLE_RSS_MB else 'MISSED'}"
        )
        verdicts.append(
            f"sidecar memory (HTTP mode): idle {sidecar.idle[0] / 1024:.1f} MB RSS "
            f"({sidecar.idle[1] / 1024:.1f} MB PSS), peak under load {peak_mb:.1f} MB RSS; "
            f"Linkerd's proxy {LINKERD_PROXY_MB} MB: "
            f"{'below' if peak_mb <= LINKERD_PROXY_MB else 'above'} (a reference, no target)"
        )
    print_targets("issues #7 and #18", verdicts)


if __name__ == "__main__":
    main()
