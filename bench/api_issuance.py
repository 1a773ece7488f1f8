"""Issuance over the HTTP API: `trustmesh ca serve` renewals vs `cfssl serve` signing.

Setup (untimed): for each caller --csrs-per-caller CSRs, each with its own freshly
generated ec-p256 key, a URI SAN equal to the caller's SPIFFE ID and one DNS SAN;
each caller cycles through its CSRs. Every trustmesh measurement runs on a fresh
ec-p256 CA (SQLite file in a temporary CA home, or a fresh PostgreSQL schema with
--db) with --callers identities issued by it (no admin rights) and its own
`ca serve` process, so every round starts from the same store size. For the
baseline, `cfssl genkey -initca` makes an ec-p256 CA and `cfssl serve` runs with
it; its callers present identities from one more trustmesh CA.

Load: --callers concurrent callers, each on its own keep-alive HTTPS connection
(opened before the clock starts), each sending its next request as soon as the
previous answer arrives (closed loop). A request is timed from just before its
bytes are written until its whole answer is read. The first --warmup seconds are
not counted; then every request that completes within --duration seconds counts.
The load generator is a small asyncio client (httptools' parser, no httpx) in
--client-procs separate processes, so the server and not the client is measured.

Targets, each round in alternating order:

  trustmesh    POST /v1/renew {csr} over mTLS with the caller's certificate
               (`python -m trustmesh ca serve`): verify the client chain and its
               revocation status, check the CSR and policy, sign, record the
               certificate + audit event in one committed transaction, answer 201
               with certificate, chain and bundle
  cfssl-mtls   `cfssl serve -tls-cert -tls-key -mutual-tls-ca` (client certificates
               required and verified in the handshake, the same callers' certificates)
               POST /api/v1/cfssl/sign {certificate_request}: parse the CSR, sign,
               answer 200; no database (cfssl without -db-config records nothing),
               no policy (the old cfssl in Debian also drops URI SANs)
  cfssl-http   the same cfssl without TLS (the command in issue #3); --no-cfssl-http
               skips it

It prints certs/s and p50/p99 latency per target (median over rounds, per-round
values in brackets), the ratios trustmesh/cfssl, CPU seconds per certificate of
each server and of the load generator, and whether the target holds: at least
cfssl's rate (mTLS) with p99 <= 50 ms.

In a closed loop the mean latency is callers / rate (Little's law), so 50 callers
with p99 <= 50 ms needs well over 1,000 certs/s. --rate R adds a paced phase at an
offered rate of R certs/s in total (each caller on its own schedule; latency counted
from the scheduled send time, so a backlog is not hidden), to show the latency at a
load the server can carry.

Where the time goes: a probe before and after the rounds measures the trustmesh
server's CPU per request for one caller sending one request at a time, on three
routes (GET /healthz: HTTP + TLS + ASGI; GET /v1/revocations past the end: + the
mTLS caller check and one query; POST /v1/renew), and --breakdown times the
renewal's stages in-process (single thread) at the end, plus the cost of one
revocation lookup for an old and for the newest certificate, with the query plan.
Every renewal is checked to be recorded, the audit chain to verify, and sample
answers to parse and chain.

Example:
  .venv/bin/python bench/api_issuance.py
  .venv/bin/python bench/api_issuance.py --rate 200
  .venv/bin/python bench/api_issuance.py --db postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from _api import (
    HOST,
    CPUMeter,
    Identity,
    RawConnection,
    ca_serve,
    client_ssl,
    csr_pem,
    free_port,
    init_home,
    loadavg,
    median_or_nan,
    ms,
    percentile,
    stop_process,
    write_identity,
)
from _common import PASSPHRASE, TRUST_DOMAIN, check_local_url, pg_schema, spread, verdict
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import trustmesh.authority as authority
from trustmesh.authority import CertificateAuthority
from trustmesh.ca_server._app import _issued_json

try:
    from trustmesh.ca_server._app import _load_peer
except ImportError:  # code before issue 18 (the "before" rows): parsed per request

    def _load_peer(pem: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(pem.encode())


from trustmesh.ca_server._serve import CA_SERVER_PATH
from trustmesh.pki import spiffe_id_of, verify_chain
from trustmesh.serving import issue_server_identity

P99_TARGET = 0.050
RENEW = "/v1/renew"
CFSSL_SIGN = "/api/v1/cfssl/sign"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--callers", type=int, default=50, help="concurrent callers (50)")
    p.add_argument("--duration", type=float, default=10.0, help="counted seconds per round (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds first (2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians quoted (3)")
    p.add_argument("--csrs-per-caller", type=int, default=20, help="fresh-key CSRs per caller (20)")
    p.add_argument("--client-procs", type=int, default=1, help="load generator processes (1)")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="also run a paced phase at this total offered rate (certs/s)",
    )
    p.add_argument(
        "--breakdown",
        type=int,
        default=200,
        help="afterwards, time the renew stages in-process over N renewals (200; 0: skip)",
    )
    p.add_argument(
        "--probe",
        type=int,
        default=300,
        help="requests per route of the one-caller server-CPU probe (300; 0: skip)",
    )
    p.add_argument(
        "--paced-half",
        action="store_true",
        help="also run a paced phase at half of trustmesh's closed-loop rate (issue 18's "
        "latency target: p99 <= 50 ms there)",
    )
    p.add_argument("--workers", type=int, default=1, help="`ca serve --workers N` (1: one process)")
    p.add_argument("--no-cfssl-http", action="store_true", help="skip the plain-HTTP cfssl run")
    p.add_argument(
        "--db",
        default=None,
        help="postgresql://USER@127.0.0.1:PORT/DB (default: SQLite file in the CA home)",
    )
    p.add_argument("--tmpdir", default=None, help="where the temporary CA home goes")
    args = p.parse_args(argv)
    if not 1 <= args.callers <= 500 or not 1 <= args.rounds <= 20:
        p.error("--callers must be 1..500 and --rounds 1..20")
    if not 0.5 <= args.duration <= 120 or not 0 <= args.warmup <= 30:
        p.error("--duration must be 0.5..120 s and --warmup 0..30 s")
    if not 1 <= args.client_procs <= min(args.callers, 8):
        p.error("--client-procs must be 1..min(callers, 8)")
    if not 1 <= args.csrs_per_caller <= 1000:
        p.error("--csrs-per-caller must be 1..1000")
    if args.rate is not None and not 1 <= args.rate <= 20_000:
        p.error("--rate must be 1..20000")
    if args.rate is not None and args.paced_half:
        p.error("give --rate or --paced-half, not both")
    if not 1 <= args.workers <= 16:
        p.error("--workers must be 1..16")
    if args.db:
        check_local_url(args.db)
    return args


# -- the load generator (runs in worker processes) -------------------------------------


@dataclass(frozen=True)
class CallerSpec:
    chain: str
    key: str
    bodies: tuple[bytes, ...]


@dataclass(frozen=True)
class LoadSpec:
    port: int
    path: str
    tls: bool
    bundle: str
    callers: tuple[CallerSpec, ...]
    start_at: float  # time.monotonic() (system-wide clock) when the load starts
    warmup: float
    duration: float
    ok_status: int
    period: float | None = None  # seconds between one caller's requests (paced); None: closed


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    counted_errors: int = 0
    sent_ok: int = 0  # every OK answer, warmup and overrun included
    errors: dict[str, int] = field(default_factory=dict)
    cpu: float = 0.0
    sample: bytes = b""


def _ctx(spec: LoadSpec, caller: CallerSpec) -> Any:
    if not spec.tls:
        return None
    ident = Identity("", "", Path(caller.chain), Path(caller.key))
    return client_ssl(Path(spec.bundle), ident)


async def _caller(
    spec: LoadSpec, caller: CallerSpec, conn: RawConnection, out: LoadResult, phase: float
) -> None:
    count_from = spec.start_at + spec.warmup
    end = count_from + spec.duration
    i = random.randrange(len(caller.bodies))
    n = 0
    while True:
        if spec.period is not None:
            scheduled = spec.start_at + phase + n * spec.period
            n += 1
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            scheduled = None
        t0 = time.monotonic()
        if t0 >= end:
            return
        body = caller.bodies[i % len(caller.bodies)]
        i += 1
        try:
            status, answer = await conn.post(spec.path, body)
        except (OSError, ConnectionError) as exc:
            key = type(exc).__name__
            out.errors[key] = out.errors.get(key, 0) + 1
            if t0 >= count_from:
                out.counted_errors += 1
            await conn.close()
            await asyncio.sleep(0.05)
            await conn.connect()
            continue
        t1 = time.monotonic()
        if status == spec.ok_status:
            out.sent_ok += 1
            if not out.sample:
                out.sample = answer
        else:
            key = f"HTTP {status}"
            out.errors[key] = out.errors.get(key, 0) + 1
        if count_from <= t1 < end:
            if status == spec.ok_status:
                out.latencies.append(t1 - (scheduled if scheduled is not None else t0))
            else:
                out.counted_errors += 1


async def _load(spec: LoadSpec) -> LoadResult:
    out = LoadResult()
    conns = [RawConnection(HOST, spec.port, _ctx(spec, c)) for c in spec.callers]
    await asyncio.gather(*(c.connect() for c in conns))
    delay = spec.start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    cpu0 = time.process_time()
    period = spec.period or 0.0
    await asyncio.gather(
        *(
            _caller(spec, caller, conn, out, random.uniform(0, period))
            for caller, conn in zip(spec.callers, conns, strict=True)
        )
    )
    out.cpu = time.process_time() - cpu0
    await asyncio.gather(*(c.close() for c in conns))
    return out


def load_worker(spec: LoadSpec) -> LoadResult:
    """Entry point of a load generator process."""
    return asyncio.run(_load(spec))


# -- servers ---------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    pid: int
    path: str
    tls: bool
    ok_status: int


def cfssl_ca(directory: Path) -> tuple[Path, Path]:
    """`cfssl genkey -initca` an ec-p256 CA into ``directory``."""
    request = json.dumps({"CN": "bench cfssl CA", "key": {"algo": "ecdsa", "size": 256}})
    out = subprocess.run(
        ["cfssl", "genkey", "-initca", "-"],
        input=request.encode(),
        capture_output=True,
        check=True,
    )
    doc = json.loads(out.stdout)
    cert, key = directory / "cfssl-ca.pem", directory / "cfssl-ca-key.pem"
    cert.write_text(doc["cert"])
    key.write_text(doc["key"])
    key.chmod(0o600)
    return cert, key


@contextlib.contextmanager
def cfssl_serve(
    ca_cert: Path, ca_key: Path, log_file: Path, tls: tuple[Path, Path, Path] | None
) -> Iterator[tuple[int, int]]:
    """Run `cfssl serve` on a free port; yield (port, pid)."""
    port = free_port()
    cmd = ["cfssl", "serve", "-ca", str(ca_cert), "-ca-key", str(ca_key)]
    cmd += ["-address", HOST, "-port", str(port), "-loglevel", "2"]
    if tls is not None:
        chain, key, clients_ca = tls
        cmd += ["-tls-cert", str(chain), "-tls-key", str(key), "-mutual-tls-ca", str(clients_ca)]
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with contextlib.closing(socket.create_connection((HOST, port))):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"cfssl serve did not start:\n{log_file.read_text()}"
                        ) from None
                    time.sleep(0.1)
            yield port, proc.pid
        finally:
            stop_process(proc)


# -- one measurement -------------------------------------------------------------------


@dataclass
class Measurement:
    rate: float
    p50: float
    p99: float
    errors: int
    ok_total: int
    server_cpu_per_cert: float
    client_cpu_per_req: float
    machine_busy: float  # cores busy on average during the counted window
    foreign: float  # cores busy with something else than server and load generator
    error_kinds: dict[str, int]
    sample: bytes
    rows_after: int = 0


def measure(
    pool: ProcessPoolExecutor,
    target: Target,
    bundle: Path,
    callers: list[CallerSpec],
    args: argparse.Namespace,
    *,
    period: float | None = None,
) -> Measurement:
    procs = args.client_procs
    start_at = time.monotonic() + 1.5 + 0.02 * len(callers)  # time to connect everybody
    specs = [
        LoadSpec(
            port=target.port,
            path=target.path,
            tls=target.tls,
            bundle=str(bundle),
            callers=tuple(callers[i::procs]),
            start_at=start_at,
            warmup=args.warmup,
            duration=args.duration,
            ok_status=target.ok_status,
            period=period,
        )
        for i in range(procs)
    ]
    futures = [pool.submit(load_worker, s) for s in specs]
    time.sleep(max(0.0, start_at + args.warmup - time.monotonic()))
    meter = CPUMeter({"server": target.pid}, trees=True)
    time.sleep(max(0.0, start_at + args.warmup + args.duration - time.monotonic()))
    cpu = meter.stop()
    results = [f.result() for f in futures]
    latencies = [x for r in results for x in r.latencies]
    kinds: dict[str, int] = {}
    for r in results:
        for k, v in r.errors.items():
            kinds[k] = kinds.get(k, 0) + v
    client_cpu = sum(r.cpu for r in results)
    # the load generators' CPU covers warmup + window (+ the last answers): scale to the window
    client_share = client_cpu * args.duration / (args.duration + args.warmup)
    n = max(len(latencies), 1)
    wall = cpu["wall"]
    return Measurement(
        rate=len(latencies) / args.duration,
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        errors=sum(r.counted_errors for r in results),
        ok_total=sum(r.sent_ok for r in results),
        server_cpu_per_cert=cpu["server"] / n,
        client_cpu_per_req=client_share / n,
        machine_busy=cpu["machine"] / wall,
        foreign=max(0.0, (cpu["machine"] - cpu["server"] - client_share) / wall),
        error_kinds=kinds,
        sample=next((r.sample for r in results if r.sample), b""),
    )


# -- main ------------------------------------------------------------------------------


@contextlib.contextmanager
def database(db: str | None) -> Iterator[str | None]:
    if db is None:
        yield None
    else:
        with pg_schema(db, "bench_api") as url:
            yield url


def check_renewal_sample(sample: bytes, ca: CertificateAuthority) -> None:
    """The answer is a certificate for the caller's identity that chains to the CA."""
    doc = json.loads(sample)
    cert = x509.load_pem_x509_certificate(doc["certificate"].encode())
    sid = verify_chain(cert, [ca.intermediate], list(ca.bundle), usage="client")
    if str(sid) != doc["spiffe_id"] or not str(sid).startswith(
        f"spiffe://{TRUST_DOMAIN}/ns/bench/"
    ):
        raise AssertionError(f"unexpected renewal answer for {sid}")
    spiffe_id_of(cert)


class StageTimer:
    """Exclusive CPU time of this thread per label (nested wrapped calls are charged to
    the innermost): what a stage costs, not what it waited for (the machine is shared,
    and PostgreSQL's own work is not in it)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self.stack = ["other"]
        self.last = time.thread_time()

    def _switch(self, push: str | None) -> None:
        now = time.thread_time()
        top = self.stack[-1]
        self.acc[top] = self.acc.get(top, 0.0) + now - self.last
        self.last = now
        if push is None:
            self.stack.pop()
        else:
            self.stack.append(push)

    def wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed_call(*a: Any, **kw: Any) -> Any:
            self._switch(label)
            try:
                return fn(*a, **kw)
            finally:
                self._switch(None)

        return timed_call

    @contextlib.contextmanager
    def block(self, label: str) -> Iterator[None]:
        self._switch(label)
        try:
            yield
        finally:
            self._switch(None)


def breakdown(
    ca: CertificateAuthority, ident: Identity, bodies: tuple[bytes, ...], n: int
) -> dict[str, float]:
    """Run the renew handler's work in-process ``n`` times with each stage timed (us/cert).

    Mirrors ``renew`` in ca_server/_app.py: load the peer certificate (cached per
    PEM), parse the JSON body, ``ca.renew`` (``verify_caller``: the chain, verified
    once per certificate, and its record read by serial on every call; then check the
    CSR, sign, record), build the answer. Single thread, no HTTP, no TLS.
    """
    st = StageTimer()
    pem = ident.chain.read_text()
    undo: list[Callable[[], None]] = []

    def patch(owner: Any, name: str, label: str) -> Callable[..., Any] | None:
        if not hasattr(owner, name):
            return None  # not in the code measured (the before rows)
        original = getattr(owner, name)
        wrapped = st.wrap(original, label)
        own = name in vars(owner)
        setattr(owner, name, wrapped)
        undo.append(lambda: setattr(owner, name, original) if own else delattr(owner, name))
        return wrapped

    patch(authority, "verify_chain", "verify_chain (first use of a certificate only)")
    patch(ca.store, "lookup_certificate", "store.lookup_certificate (caller's record, raw SQL)")
    patch(ca.store, "get_certificate", "store.get_certificate (Core SELECT by serial)")
    patch(authority, "check_csr", "check_csr (parse + verify CSR, policy)")
    patch(authority, "issue_leaf", "issue_leaf (build + sign)")
    patch(ca, "_record_for", "_record_for (PEM, fingerprint)")
    patch(ca.store, "add_certificate", "add_certificate + append_audit (INSERTs)")
    patch(ca.store, "append_audit", "add_certificate + append_audit (INSERTs)")
    original_tx = ca.store.transaction

    @contextlib.contextmanager
    def transaction() -> Iterator[Any]:
        with st.block("transaction begin + commit"), original_tx() as conn:
            with st.block("other"):
                yield conn

    ca.store.transaction = transaction  # type: ignore[method-assign]
    undo.append(lambda: delattr(ca.store, "transaction"))
    try:
        start = time.thread_time()
        st.last = start
        for i in range(n):
            with st.block("peer certificate: load PEM (cached)"):
                cert = _load_peer(pem)
            with st.block("JSON: parse request, build answer"):
                data = json.loads(bodies[i % len(bodies)])
            issued = ca.renew(cert, data["csr"].encode())
            with st.block("JSON: parse request, build answer"):
                json.dumps(_issued_json(issued))
        total = time.thread_time() - start
        st._switch("other")
    finally:
        for fn in reversed(undo):
            fn()
    out = {k: v / n * 1e6 for k, v in st.acc.items()}
    out.pop("other", None)
    out["other: renew() glue, audit details"] = total / n * 1e6 - sum(out.values())
    out["total in-process"] = total / n * 1e6
    return out


def probe(
    port: int, pid: int, bundle: Path, ident: Identity, body: bytes, n: int
) -> dict[str, float]:
    """Server CPU (us) per request of three routes, one caller, requests one after another."""
    routes = (
        ("GET /healthz: HTTP + TLS + ASGI", "GET", "/healthz", b""),
        (
            "GET /v1/revocations?since=END: + mTLS caller check, 1 query",
            "GET",
            "/v1/revocations?since=999999999",
            b"",
        ),
        ("POST /v1/renew", "POST", RENEW, body),
    )

    async def run() -> dict[str, float]:
        out = {}
        for label, method, path, data in routes:
            conn = RawConnection(HOST, port, client_ssl(bundle, ident))
            await conn.connect()
            for _ in range(10):
                await conn.request(method, path, data)
            meter = CPUMeter({"server": pid}, trees=True)
            for _ in range(n):
                status, _ = await conn.request(method, path, data)
                if status >= 300:
                    raise AssertionError(f"{method} {path} answered {status}")
            out[label] = meter.stop()["server"] / n * 1e6
            await conn.close()
        return out

    return asyncio.run(run())


def lookup_costs(ca: CertificateAuthority, ident: Identity, *, sqlite: bool) -> dict[str, Any]:
    """us per is_revoked() of the caller's (old) certificate and of the newest one."""
    old = x509.load_pem_x509_certificate(ident.chain.read_bytes())
    newest = ca.store.find_certificates(limit=1)
    new = x509.load_pem_x509_certificate(newest[0].pem.encode()) if newest else old
    out: dict[str, Any] = {"rows": ca.store.count_certificates()}
    for label, cert in (("old", old), ("new", new)):
        ca.is_revoked(cert)
        start = time.perf_counter()
        for _ in range(20):
            ca.is_revoked(cert)
        out[label] = (time.perf_counter() - start) / 20 * 1e6
    query = "SELECT * FROM certificates WHERE serial = 'ab' ORDER BY id DESC LIMIT 1"
    with ca.store.engine.connect() as conn:
        explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
        rows = conn.exec_driver_sql(explain + query).fetchall()
    out["plan"] = "; ".join(str(r[-1]).strip() for r in rows)
    return out


def check_cfssl_sample(sample: bytes) -> None:
    doc = json.loads(sample)
    if not doc.get("success"):
        raise AssertionError(f"cfssl answered {doc}")
    x509.load_pem_x509_certificate(doc["result"]["certificate"].encode())


def report(name: str, ms_list: list[Measurement]) -> dict[str, float]:
    rates = [m.rate for m in ms_list]
    p50s = [m.p50 for m in ms_list]
    p99s = [m.p99 for m in ms_list]
    row = {
        "rate": median_or_nan(rates),
        "p50": median_or_nan(p50s),
        "p99": median_or_nan(p99s),
        "server_cpu": median_or_nan([m.server_cpu_per_cert for m in ms_list]),
        "client_cpu": median_or_nan([m.client_cpu_per_req for m in ms_list]),
        "busy": median_or_nan([m.machine_busy for m in ms_list]),
        "foreign": median_or_nan([m.foreign for m in ms_list]),
        "errors": float(sum(m.errors for m in ms_list)),
    }
    print(f"  {name}")
    print(f"    certs/s      {row['rate']:8.0f}  {spread(rates)}")
    print(f"    p50 latency  {ms(row['p50']):>8} ms  {spread([x * 1000 for x in p50s], '{:.1f}')}")
    print(f"    p99 latency  {ms(row['p99']):>8} ms  {spread([x * 1000 for x in p99s], '{:.1f}')}")
    print(
        f"    CPU per cert: server {row['server_cpu'] * 1e6:.0f} us, load generator "
        f"{row['client_cpu'] * 1e6:.0f} us; machine busy {row['busy']:.2f} of 2 cores "
        f"(other processes, PostgreSQL included, ~{row['foreign']:.2f})"
    )
    kinds: dict[str, int] = {}
    for m in ms_list:
        for k, v in m.error_kinds.items():
            kinds[k] = kinds.get(k, 0) + v
    print(f"    errors in counted windows: {int(row['errors'])}; all errors: {kinds or 'none'}")
    return row


@dataclass
class FreshCA:
    home: Path
    bundle: Path
    idents: list[Identity]
    callers: list[CallerSpec]
    db_url: str | None
    before: int
    revoked: Identity  # revoked before the server starts
    kept_alive: Identity  # renews once, is revoked, then renews on the same connection


@contextlib.contextmanager
def fresh_ca(
    tmp: Path, name: str, db: str | None, bodies: list[tuple[bytes, ...]]
) -> Iterator[FreshCA]:
    """A new CA (own SQLite file or PostgreSQL schema) with one identity per caller."""
    with database(db) as url:
        home = tmp / name
        bundle = init_home(home, url)
        with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
            idents = [
                write_identity(ca, caller_id(i), home / "callers" / str(i), dns=[caller_dns(i)])
                for i in range(len(bodies))
            ]
            revoked = write_identity(ca, refusal_id("revoked"), home / "callers" / "revoked")
            ca.revoke(revoked.serial, actor="bench")
            kept_alive = write_identity(ca, refusal_id("kept-alive"), home / "callers" / "kept")
            before = ca.store.count_certificates()
        callers = [
            CallerSpec(str(d.chain), str(d.key), b) for d, b in zip(idents, bodies, strict=True)
        ]
        yield FreshCA(home, bundle, idents, callers, url, before, revoked, kept_alive)


def refusal_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/refusal-{name}"


def csr_with_key(spiffe_id: str, key_file: Path) -> str:
    """A CSR for ``spiffe_id`` signed with the key in ``key_file`` (the caller's own)."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def check_refusals(port: int, run: FreshCA) -> int:
    """Before timing: the server refuses what it must, with every check on.

    A revoked caller, a CSR for another identity, a CSR reusing the caller's key, and
    a caller revoked while its kept-alive connection stays open (the next renewal on
    that connection). Returns the number of renewals it made that were answered 201.
    """

    def body(csr: str) -> bytes:
        return json.dumps({"csr": csr}).encode()

    async def expect(conn: RawConnection, csr: str, status: int, reason: str, what: str) -> None:
        got, answer = await conn.post(RENEW, body(csr))
        if got != status or (reason and json.loads(answer).get("reason") != reason):
            raise AssertionError(f"{what}: expected {status} {reason}, got {got} {answer[:300]!r}")

    async def run_checks() -> int:
        def connect(ident: Identity) -> RawConnection:
            return RawConnection(HOST, port, client_ssl(run.bundle, ident))

        revoked = connect(run.revoked)
        await revoked.connect()
        await expect(revoked, csr_pem(run.revoked.spiffe_id), 403, "revoked", "revoked caller")
        await revoked.close()
        caller = run.idents[0]
        conn = connect(caller)
        await conn.connect()
        await expect(conn, csr_pem(run.idents[1].spiffe_id), 403, "identity_change", "wrong ID")
        await expect(conn, csr_with_key(caller.spiffe_id, caller.key), 400, "same_key", "same key")
        await conn.close()
        kept = connect(run.kept_alive)
        await kept.connect()
        await expect(kept, csr_pem(run.kept_alive.spiffe_id), 201, "", "kept-alive caller")
        with CertificateAuthority.open(run.home, passphrase=PASSPHRASE) as ca:
            ca.revoke(run.kept_alive.serial, actor="bench")
        await expect(kept, csr_pem(run.kept_alive.spiffe_id), 403, "revoked", "kept-alive revoked")
        await kept.close()
        return 1

    return asyncio.run(run_checks())


def caller_id(i: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/caller-{i}"


def caller_dns(i: int) -> str:
    """The DNS SAN of caller ``i``: in its identity, so its renewals may keep it."""
    return f"caller-{i}.bench.svc"


def check_run(run: FreshCA, answered: int, sample: bytes) -> int:
    """Every renewal answered 201 is recorded, the audit chain verifies; return the count."""
    with CertificateAuthority.open(run.home) as ca:
        # Less the server's own certificates (one per worker with --workers N).
        own = ca.store.find_certificates(spiffe_id=f"spiffe://{TRUST_DOMAIN}{CA_SERVER_PATH}")
        recorded = ca.store.count_certificates() - run.before - len(own)
        audit = ca.verify_audit()
        check_renewal_sample(sample, ca)
    if recorded != answered or not audit.ok:
        raise AssertionError(f"{answered} renewals answered but {recorded} recorded; {audit}")
    return recorded


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if shutil.which("cfssl") is None:
        raise SystemExit("cfssl not found: apt-get install -y golang-cfssl")
    where = f"PostgreSQL {args.db} (fresh schema)" if args.db else "SQLite (file in the CA home)"
    print(
        f"api_issuance: ca serve --workers {args.workers}; "
        f"{args.callers} callers, keep-alive, closed loop; {args.rounds} rounds x "
        f"{args.duration:g} s (+{args.warmup:g} s warmup); db: {where}; every trustmesh "
        f"measurement on a fresh CA and store"
    )
    print(f"load average at start: {loadavg()}")
    with tempfile.TemporaryDirectory(prefix="tm-bench-api-", dir=args.tmpdir) as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        csrs = [
            [csr_pem(caller_id(i), dns=[caller_dns(i)]) for _ in range(args.csrs_per_caller)]
            for i in range(args.callers)
        ]
        tm_bodies = [tuple(json.dumps({"csr": c}).encode() for c in cs) for cs in csrs]
        cf_bodies = [
            tuple(json.dumps({"certificate_request": c}).encode() for c in cs) for cs in csrs
        ]
        # the cfssl runs: client identities and cfssl's TLS certificate from one CA
        setup_bundle = init_home(tmp / "setup", None)
        with CertificateAuthority.open(tmp / "setup", passphrase=PASSPHRASE) as ca:
            cf_idents = [
                write_identity(
                    ca, caller_id(i), tmp / "setup" / "callers" / str(i), dns=[caller_dns(i)]
                )
                for i in range(args.callers)
            ]
            srv_chain, srv_key = issue_server_identity(ca, HOST, tmp / "setup", path=CA_SERVER_PATH)
        cf_callers = [
            CallerSpec(str(d.chain), str(d.key), b)
            for d, b in zip(cf_idents, cf_bodies, strict=True)
        ]
        cf_cert, cf_key = cfssl_ca(tmp)
        print(
            f"setup: {args.callers * args.csrs_per_caller} CSRs (fresh ec-p256 keys), "
            f"{args.callers} caller identities, cfssl CA, in {time.perf_counter() - t0:.1f} s\n"
        )
        probes: list[tuple[int, dict[str, float]]] = []
        extras: dict[str, Any] = {}
        counter = iter(range(1000))

        def trustmesh(period: float | None, first: bool) -> Measurement:
            n = next(counter)
            with fresh_ca(tmp, f"tm-{n}", args.db, tm_bodies) as run:
                with ca_serve(
                    run.home, run.bundle, tmp / f"tm-{n}.log", workers=args.workers
                ) as srv:
                    port = int(srv.url.rsplit(":", 1)[1])
                    refusals_ok = check_refusals(port, run)
                    extras["refusals"] = extras.get("refusals", 0) + 1
                    target = Target("trustmesh", port, srv.pid, RENEW, True, 201)
                    body = tm_bodies[0][0]
                    if first and args.probe:
                        probes.append(
                            (
                                run.before + 1,
                                probe(port, srv.pid, run.bundle, run.idents[0], body, args.probe),
                            )
                        )
                    m = measure(pool, target, run.bundle, run.callers, args, period=period)
                    with CertificateAuthority.open(run.home) as ca:
                        m.rows_after = ca.store.count_certificates()
                    if first and args.probe:
                        probes.append(
                            (
                                m.rows_after,
                                probe(port, srv.pid, run.bundle, run.idents[0], body, args.probe),
                            )
                        )
                probed = (10 + args.probe) * 2 if first and args.probe else 0
                probed += refusals_ok
                extras["recorded"] = extras.get("recorded", 0) + check_run(
                    run, m.ok_total + probed, m.sample
                )
                if first and args.breakdown:
                    with CertificateAuthority.open(run.home, passphrase=PASSPHRASE) as ca:
                        _ = ca.signing_key
                        extras["lookups"] = lookup_costs(
                            ca, run.idents[0], sqlite=run.db_url is None
                        )
                        extras["stages"] = breakdown(
                            ca, run.idents[0], tm_bodies[0], args.breakdown
                        )
            return m

        with contextlib.ExitStack() as stack:
            cf_port, cf_pid = stack.enter_context(
                cfssl_serve(
                    cf_cert, cf_key, tmp / "cfssl-mtls.log", (srv_chain, srv_key, setup_bundle)
                )
            )
            others = [("cfssl-mtls", Target("cfssl-mtls", cf_port, cf_pid, CFSSL_SIGN, True, 200))]
            if not args.no_cfssl_http:
                port, pid = stack.enter_context(
                    cfssl_serve(cf_cert, cf_key, tmp / "cfssl-http.log", None)
                )
                others.append(
                    ("cfssl-http", Target("cfssl-http", port, pid, CFSSL_SIGN, False, 200))
                )
            pool = stack.enter_context(
                ProcessPoolExecutor(max_workers=args.client_procs, mp_context=get_context("spawn"))
            )
            names = ["trustmesh", *(n for n, _ in others)]
            targets = dict(others)
            results: dict[str, list[Measurement]] = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    if name == "trustmesh":
                        m = trustmesh(None, first=r == 0)
                        store = f"  (store grew to {m.rows_after} certs)"
                    else:
                        m = measure(pool, targets[name], setup_bundle, cf_callers, args)
                        store = ""
                    results[name].append(m)
                    print(
                        f"  round {r + 1} {name:11s} {m.rate:6.0f} certs/s  p50 {ms(m.p50)} ms  "
                        f"p99 {ms(m.p99)} ms  errors {m.errors}  load {loadavg()}{store}"
                    )
            paced: dict[str, list[Measurement]] = {}
            if args.paced_half:
                args.rate = median_or_nan([m.rate for m in results["trustmesh"]]) / 2
            if args.rate:
                period = args.callers / args.rate
                for r in range(args.rounds):
                    for name in names[:2] if r % 2 == 0 else names[1::-1]:
                        if name == "trustmesh":
                            m = trustmesh(period, first=False)
                        else:
                            m = measure(
                                pool, targets[name], setup_bundle, cf_callers, args, period=period
                            )
                        paced.setdefault(name, []).append(m)
                        print(
                            f"  paced round {r + 1} {name:11s} {m.rate:6.0f} certs/s  "
                            f"p50 {ms(m.p50)} ms  p99 {ms(m.p99)} ms  errors {m.errors}"
                        )

        check_cfssl_sample(results["cfssl-mtls"][0].sample)
        print(
            f"\nchecks: {extras['recorded']} renewals answered 201 = recorded; audit chains "
            f"verify; sample answers parse and chain; before each trustmesh run "
            f"({extras['refusals']} runs) a revoked caller, a CSR for another ID, a CSR "
            f"with the caller's key and a caller revoked on its kept-alive connection were "
            f"refused\n"
        )

        print(f"closed loop, {args.callers} callers (medians over {args.rounds} rounds):")
        rows = {name: report(name, ms_list) for name, ms_list in results.items()}
        tmr, cfr = rows["trustmesh"], rows["cfssl-mtls"]
        print("  ratios trustmesh / cfssl-mtls:")
        print(
            f"    certs/s {tmr['rate'] / cfr['rate']:.2f}   p50 {tmr['p50'] / cfr['p50']:.1f}x   "
            f"p99 {tmr['p99'] / cfr['p99']:.1f}x   server CPU per cert "
            f"{tmr['server_cpu'] / cfr['server_cpu']:.1f}x"
        )
        if "cfssl-http" in rows:
            h = rows["cfssl-http"]
            print(f"  ratio trustmesh / cfssl-http certs/s {tmr['rate'] / h['rate']:.2f}")
        little = args.callers / tmr["rate"]
        print(
            f"  Little's law: {args.callers} callers / {tmr['rate']:.0f} certs/s = "
            f"{ms(little)} ms mean latency for trustmesh"
        )
        ok_rate = tmr["rate"] >= cfr["rate"]
        ok_p99 = tmr["p99"] <= P99_TARGET
        print(
            f"  target (issue 3): rate >= cfssl-mtls's: {verdict(ok_rate)}; p99 <= 50 ms: "
            f"{verdict(ok_p99)}; errors: {int(tmr['errors'])}"
        )
        print(
            f"  target (issue 18): rate >= 0.5 of cfssl-mtls's: "
            f"{verdict(tmr['rate'] >= 0.5 * cfr['rate'])} "
            f"({tmr['rate'] / cfr['rate']:.2f}); p99 <= 50 ms at half of trustmesh's rate: "
            f"{'see the paced phase' if args.paced_half else 'run with --paced-half'}"
        )
        if paced:
            print(f"\npaced at {args.rate:g} certs/s offered (medians over {args.rounds} rounds):")
            prow = {name: report(name, ms_list) for name, ms_list in paced.items()}
            ptm = prow["trustmesh"]
            print(
                f"  trustmesh p99 at {args.rate:g} certs/s: {ms(ptm['p99'])} ms; p99 <= 50 ms: "
                f"{verdict(ptm['p99'] <= P99_TARGET)}"
            )
        if probes:
            print("\nserver CPU per request (us), one caller, one request at a time (round 1):")
            print(f"    {'':62s} " + "  ".join(f"{r:>6} certs" for r, _ in probes))
            for label in probes[0][1]:
                values = "  ".join(f"{p[label]:12.0f}" for _, p in probes)
                print(f"    {label:62s} {values}")
        if "stages" in extras:
            print(
                f"\nwhere a renewal's time goes (in-process on round 1's CA after its run, single "
                f"thread, {args.breakdown} renewals, us of CPU per cert):"
            )
            for label, us in extras["stages"].items():
                print(f"    {label:58s} {us:7.0f}")
            lookups = extras["lookups"]
            print(
                f"  revocation lookup (is_revoked) with {lookups['rows']:.0f} certificates stored:"
            )
            print(f"    caller's certificate (issued before all renewals) {lookups['old']:8.0f} us")
            print(f"    the newest certificate                            {lookups['new']:8.0f} us")
            print(f"    plan of get_certificate's SELECT: {lookups['plan']}")
    print(f"\nload average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
