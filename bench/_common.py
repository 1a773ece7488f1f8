"""Helpers shared by the benchmarks: medians, CSRs, local databases, reporting, CPU and
memory accounting from /proc, and the HTTP load generators (wrk with a client-certificate
shim, the fixed-rate ``ratelat``) with their result tables.

Not a benchmark itself; the scripts next to it import it (``bench/`` is on
``sys.path`` when a script there is run as ``python bench/NAME.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import platform
import pstats
import random
import re
import resource
import shlex
import shutil
import sqlite3
import ssl
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import (
    REASONS,
    KeyType,
    PrivateKey,
    SpiffeID,
    dump_private_key,
    generate_private_key,
    pem_certificates,
    signature_hash_for,
)
from trustmesh.store import normalize_url

TRUST_DOMAIN = "example.org"
PASSPHRASE = b"bench passphrase, not a secret"
LOCAL_HOSTS = {"127.0.0.1"}


@dataclass(frozen=True)
class BenchCSR:
    """A pre-generated CSR and what it asks for (so a baseline can skip parsing it)."""

    pem: bytes
    spiffe_id: SpiffeID
    dns: tuple[str, ...]


def make_csrs(key_type: KeyType, count: int, *, pool: int, tag: str = "bench") -> list[BenchCSR]:
    """Return ``count`` distinct CSRs signed by a pool of ``pool`` keys of ``key_type``.

    Each CSR has its own SPIFFE ID and DNS SAN (both allowed by the default profile);
    keys are reused round-robin because RSA key generation is slow and the CA's work
    does not depend on the key being unique.
    """
    keys: list[PrivateKey] = [generate_private_key(key_type) for _ in range(max(1, pool))]
    out = []
    for i in range(count):
        key = keys[i % len(keys)]
        sid = SpiffeID.parse(f"spiffe://{TRUST_DOMAIN}/ns/{tag}/sa/svc-{i}")
        dns = (f"svc-{i}.{tag}.svc",)
        builder = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(sid.uri), *(x509.DNSName(d) for d in dns)]
                ),
                critical=False,
            )
        )
        csr = builder.sign(key, signature_hash_for(key))
        out.append(BenchCSR(csr.public_bytes(serialization.Encoding.PEM), sid, dns))
    return out


def timed(fn: Callable[[], object]) -> float:
    """Run ``fn`` once (after a GC pass) and return the elapsed seconds."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """Render the per-round values, e.g. ``[812 790 801 830 799]``."""
    return "[" + " ".join(fmt.format(v) for v in values) + "]"


def check_local_url(url: str) -> None:
    """Refuse database URLs that do not point at 127.0.0.1 (the benchmarks write)."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise SystemExit(f"--db must be a postgresql://...@127.0.0.1 URL, got {url!r}")
    host = make_url(normalize_url(url)).host
    if host not in LOCAL_HOSTS:
        raise SystemExit(f"--db must point at 127.0.0.1 (got host {host!r}); refusing.")


@contextlib.contextmanager
def pg_schema(base_url: str, prefix: str = "bench") -> Iterator[str]:
    """Create a fresh schema, yield a URL whose search_path is that schema, drop it after."""
    check_local_url(base_url)
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = create_engine(normalize_url(base_url))
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        sep = "&" if "?" in base_url else "?"
        yield f"{base_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def synthetic_certificate_rows(
    count: int,
    *,
    issuer: str,
    now: int,
    pem: str,
    revoked_every: int,
    start: int = 0,
    seed: int = 1,
) -> Iterator[tuple[object, ...]]:
    """Yield ``certificates`` rows (columns as in :data:`CERT_INSERT`), unique serials.

    Serials are random 159-bit values like real ones (so they land all over the
    unique index), made unique by the row number in their low 24 bits; ``not_after``
    spreads over the past and next few days; every ``revoked_every``-th row is
    revoked (0: none) with a reason cycling through all RFC 5280 reasons.
    """
    if start + count > 1 << 24:
        raise ValueError("at most 16,777,216 synthetic rows")
    rng = random.Random(seed)
    reasons = list(REASONS)
    for i in range(start, start + count):
        serial = format((1 << 158) | (rng.getrandbits(134) << 24) | i, "x")
        issued = now - rng.randrange(7 * 86400)
        revoked = revoked_every and i % revoked_every == 0
        yield (
            issuer,
            serial,
            f"spiffe://{TRUST_DOMAIN}/ns/ns{i % 500}/sa/svc{i % 20000}",
            f"svc{i % 20000}.ns{i % 500}.svc",
            "",
            "service",
            "ec-p256",
            format(rng.getrandbits(256), "064x"),
            issued - 60,
            issued + 7 * 86400,
            issued,
            issued + 3600 if revoked else None,
            reasons[i % len(reasons)] if revoked else None,
            pem,
        )


CERT_INSERT = (
    "INSERT INTO certificates (issuer, serial, spiffe_id, dns, ips, profile, key_type, "
    "fingerprint, not_before, not_after, issued_at, revoked_at, revocation_reason, pem) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def fill_connection(db_path: Path) -> sqlite3.Connection:
    """A connection for bulk fills: WAL and synchronous=NORMAL like the store, plus a
    256 MiB page cache for this connection only; transactions are explicit."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA cache_size=-262144")
    return conn


class Progress:
    """``\r``-updated progress on stderr."""

    def __init__(self, label: str, total: int, *, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.start = time.perf_counter()

    def update(self, done: int) -> None:
        if self.enabled:
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            print(
                f"\r  {self.label}: {done:,}/{self.total:,} ({rate:,.0f}/s)",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def done(self) -> float:
        if self.enabled:
            print(file=sys.stderr)
        return time.perf_counter() - self.start


def fill_sqlite(
    db_path: Path,
    rows: Iterator[tuple[object, ...]],
    total: int,
    *,
    sql: str = CERT_INSERT,
    batch: int = 50_000,
    label: str = "rows",
    progress: bool = True,
) -> float:
    """Insert ``rows`` with executemany, one transaction per batch; return seconds."""
    conn = fill_connection(db_path)
    bar = Progress(f"filling {label}", total, enabled=progress)
    try:
        done = 0
        while done < total:
            chunk = list(itertools.islice(rows, min(batch, total - done)))
            if not chunk:
                break
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, chunk)
            conn.execute("COMMIT")
            done += len(chunk)
            bar.update(done)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return bar.done()
    finally:
        conn.close()


# -- CPU and memory accounting (from /proc) ------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy() -> float:
    """CPU seconds all cores spent busy since boot (total minus idle and iowait)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(parts[:8]) - parts[3] - parts[4]) / CLK_TCK


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


class CPUMeter:
    """CPU used by some processes and by the whole machine over a window."""

    def __init__(self, pids: dict[str, int], *, trees: bool = False) -> None:
        """``trees``: count each process's children too (a supervisor's workers, which
        must live through the window)."""
        self.pids = pids
        self.trees = trees
        self.start_proc = {k: self._cpu(p) for k, p in pids.items()}
        self.start_sys = system_busy()
        self.start_wall = time.monotonic()

    def _cpu(self, pid: int) -> float:
        if not self.trees:
            return process_cpu(pid)
        return sum(process_cpu(p) for p in process_tree(pid))

    def stop(self) -> dict[str, float]:
        """Seconds of CPU per named process, ``machine`` (all busy CPU) and ``wall``."""
        out = {k: self._cpu(p) - self.start_proc[k] for k, p in self.pids.items()}
        out["machine"] = system_busy() - self.start_sys
        out["wall"] = time.monotonic() - self.start_wall
        return out


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_or_skip(
    name: str,
    cmd: list[str],
    log: Path,
    stack: contextlib.ExitStack,
    ready: Callable[[subprocess.Popen[Any], Path], None],
) -> subprocess.Popen[Any] | None:
    """Start a system under test (output to ``log``, stopped when ``stack`` closes) and wait
    with ``ready(proc, log)``; when it cannot start, say why and return None, so the other
    systems are still measured."""
    shown = ["python", *cmd[1:]] if cmd[0] == sys.executable else cmd
    print(f"{name}: {shlex.join(shown)}")
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    stack.callback(stop_process, proc)
    try:
        ready(proc, log)
    except RuntimeError as exc:
        print(f"{name}: NOT MEASURED, it did not start: {str(exc)[-600:]}")
        stop_process(proc)
        return None
    return proc


def process_tree(pid: int) -> list[int]:
    """``pid`` and its child processes (nginx's master and its worker)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return [pid, *kids]


def children_cpu() -> float:
    """CPU seconds used by this process's finished children (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of process ``pid`` in KiB, from /proc/PID/smaps_rollup."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def as_nobody(
    cmd: list[str], *, dirs: Sequence[Path] = (), files: Sequence[Path] = ()
) -> list[str]:
    """``cmd`` run as ``nobody`` when we are root (never a network server as root).

    ``dirs`` become traversable and ``files`` readable by everyone (throwaway benchmark
    keys in a private temp dir); the last of ``dirs`` is handed to nobody (logs, pid).
    """
    if os.getuid() != 0:
        return cmd
    for path in dirs:
        path.chmod(0o755)
    for path in files:
        path.chmod(0o644)
    if dirs:
        os.chown(dirs[-1], 65534, 65534)
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]


def need_tools(tools: Sequence[str], install: str) -> None:
    """Exit with the install command when one of ``tools`` is missing."""
    for tool in tools:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} not found: {install}")


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return f"{cmd[0]}: not installed"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0] if lines else cmd[0]


def print_machine(tools: Mapping[str, list[str]]) -> None:
    """Print the date, CPU model and cores, Python/OpenSSL and each tool's version."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"machine: {model}, {os.cpu_count()} cores (nproc), kernel {platform.release()}")
    print(f"python {platform.python_version()} ({ssl.OPENSSL_VERSION})")
    for name, cmd in tools.items():
        print(f"{name}: {_version(cmd)}")
    repo = Path(__file__).resolve().parent.parent
    commit = _version(["git", "-C", str(repo), "log", "-1", "--format=%h %cI %s"])
    dirty = _version(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    print(f"code: {repo} at {commit}{' (with uncommitted changes)' if dirty != 'git' else ''}")
    print(f"load average at start: {loadavg()}")


# -- load generators -----------------------------------------------------------------

WRK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <openssl/ssl.h>
/* Give every SSL_CTX wrk creates the client certificate named in the environment. */
SSL_CTX *SSL_CTX_new(const SSL_METHOD *method) {
    static SSL_CTX *(*real)(const SSL_METHOD *) = NULL;
    if (!real) real = (SSL_CTX *(*)(const SSL_METHOD *))dlsym(RTLD_NEXT, "SSL_CTX_new");
    SSL_CTX *ctx = real(method);
    const char *cert = getenv("WRK_CLIENT_CERT"), *key = getenv("WRK_CLIENT_KEY");
    if (ctx && cert && key) {
        if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
            fprintf(stderr, "wrk client-cert shim: cannot load %s / %s\n", cert, key);
            exit(70);
        }
    }
    return ctx;
}
"""
RATELAT_SOURCE = Path(__file__).with_name("_ratelat.c")


def build_shim(work: Path) -> Path:
    """Compile the ``LD_PRELOAD`` shim that gives wrk a client certificate."""
    src, lib = work / "wrkcert.c", work / "wrkcert.so"
    src.write_text(WRK_SHIM)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"], check=True)
    return lib


def build_ratelat(work: Path) -> Path:
    """Compile the fixed-rate generator (``bench/_ratelat.c``; gcc, libssl-dev)."""
    exe = work / "ratelat"
    cmd = ["gcc", "-O2", "-Wall", "-o", str(exe), str(RATELAT_SOURCE), "-lssl", "-lcrypto"]
    subprocess.run(cmd, check=True)
    return exe


@dataclass(frozen=True)
class ClientCert:
    """A client certificate chain and key (PEM files) a load generator presents."""

    chain: Path
    key: Path


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    bad: int
    server_cpu_us: float  # per request
    wrk_cpu_us: float  # per request
    machine_busy: float  # share of all cores busy
    upstream_cpu_us: float = 0.0  # per request, the process behind a proxy


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _latency_ms(text: str, pct: str) -> float:
    m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if m is None:
        raise RuntimeError(f"no {pct}% latency in wrk output:\n{text}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(
    url: str,
    pids: Sequence[int],
    *,
    connections: int,
    duration: float,
    shim: Path | None = None,
    cert: ClientCert | None = None,
    headers: Sequence[str] = (),
    script: Path | None = None,
    upstream: int | None = None,
) -> WrkResult:
    """One ``wrk -t1`` run against ``url``; server CPU is summed over ``pids``.

    With ``cert`` (and the ``shim``), every connection presents that client certificate.
    ``script`` is a wrk Lua script (see :func:`wrk_rotation_script`). The CPU of an
    ``upstream`` process behind a proxy is reported apart. Non-2xx/3xx answers and socket
    errors are counted in ``bad``.
    """
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "5s"]
    for header in headers:
        cmd += ["-H", header]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    env = dict(os.environ)
    if cert is not None:
        assert shim is not None, "a client certificate needs the wrk shim"
        env.update(
            LD_PRELOAD=str(shim), WRK_CLIENT_CERT=str(cert.chain), WRK_CLIENT_KEY=str(cert.key)
        )
    meter = CPUMeter(_watched(pids, upstream))
    before = children_cpu()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    wrk_cpu = children_cpu() - before
    cpu = meter.stop()
    server_cpu = sum(cpu[str(pid)] for pid in pids)
    total = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if total is None or rps is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests = int(total.group(1))
    bad = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        bad += int(non2xx.group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        bad += sum(int(x) for x in errors.groups())
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(out, "50"),
        p99_ms=_latency_ms(out, "99"),
        requests=requests,
        bad=bad,
        server_cpu_us=server_cpu / max(requests, 1) * 1e6,
        wrk_cpu_us=wrk_cpu / max(requests, 1) * 1e6,
        machine_busy=cpu["machine"] / ((os.cpu_count() or 1) * cpu["wall"]),
        upstream_cpu_us=cpu.get("upstream", 0.0) / max(requests, 1) * 1e6,
    )


def _watched(pids: Sequence[int], upstream: int | None) -> dict[str, int]:
    watched = {str(pid): pid for pid in pids}
    if upstream is not None:
        watched["upstream"] = upstream
    return watched


def wrk_rotation_script(path: Path, header_lines: Sequence[str]) -> Path:
    """Write a wrk Lua script whose request k carries ``header_lines[k % N]`` (e.g. N
    distinct bearer tokens); the lines go to ``path``.lines, the script to ``path``."""
    lines = path.with_suffix(".lines")
    lines.write_text("".join(f"{line}\n" for line in header_lines))
    path.write_text(
        f"""local names, values = {{}}, {{}}
for line in io.lines("{lines}") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  names[#names + 1], values[#values + 1] = name, value
end
local i = 0
request = function()
  i = i % #names + 1
  return wrk.format(nil, nil, {{[names[i]] = values[i]}})
end
"""
    )
    return path


@dataclass
class RateResult:
    """One fixed-rate ``ratelat`` run (latencies from the scheduled send time)."""

    rate: float  # achieved answers per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    raw_p50_ms: float  # from the actual write instead of the schedule
    raw_p99_ms: float
    requests: int
    bad: int  # not answered, or answered non-2xx/3xx
    server_cpu_us: float  # per request
    gen_cpu_us: float  # the generator's, per request
    late_max_ms: float  # worst delay of a send behind its schedule
    reconnects: int  # connections the server closed (reopened by the generator)
    upstream_cpu_us: float = 0.0  # per request, the process behind a proxy


def run_ratelat(
    exe: Path,
    port: int,
    pids: Sequence[int],
    *,
    rate: float,
    duration: float,
    path: str,
    tls: bool,
    cert: ClientCert | None = None,
    headers: Sequence[str] = (),
    rotate: Path | None = None,
    connections: int = 16,
    host: str = "127.0.0.1",
    upstream: int | None = None,
) -> RateResult:
    """One open-loop run at ``rate`` requests/s for ``duration`` s; server CPU over ``pids``
    (and apart, of an ``upstream`` process behind a proxy). ``rotate``: a file of header
    lines, request k carrying line k mod N."""
    cmd = [str(exe), "-a", host, "-p", str(port), "-P", path, "-r", f"{rate:g}"]
    cmd += ["-d", f"{duration:g}", "-n", str(connections)]
    if tls:
        cmd.append("-s")
    if cert is not None:
        cmd += ["-c", str(cert.chain), "-k", str(cert.key)]
    for header in headers:
        cmd += ["-H", header]
    if rotate is not None:
        cmd += ["-F", str(rotate)]
    meter = CPUMeter(_watched(pids, upstream))
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    cpu = meter.stop()
    if out.returncode != 0:
        raise RuntimeError(f"ratelat failed ({out.returncode}): {out.stderr.strip()}")
    values = {k: float(v) for k, v in (line.split("=", 1) for line in out.stdout.split())}
    done = max(int(values["done"]), 1)
    return RateResult(
        rate=values["rate"],
        p50_ms=values["p50_us"] / 1000,
        p90_ms=values["p90_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        max_ms=values["max_us"] / 1000,
        raw_p50_ms=values["raw_p50_us"] / 1000,
        raw_p99_ms=values["raw_p99_us"] / 1000,
        requests=int(values["requests"]),
        bad=int(values["failed"] + values["non2xx"]),
        server_cpu_us=sum(cpu[str(pid)] for pid in pids) / done * 1e6,
        gen_cpu_us=values["cpu_us_per_req"],
        late_max_ms=values["late_max_us"] / 1000,
        reconnects=int(values["reconnects"]),
        upstream_cpu_us=cpu.get("upstream", 0.0) / done * 1e6,
    )


# -- tallies across rounds and their tables ------------------------------------------


@dataclass
class Tally:
    """Results per system across rounds (any dataclass with numeric fields)."""

    runs: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, name: str, result: Any) -> None:
        self.runs.setdefault(name, []).append(result)

    def med(self, name: str, attr: str) -> float:
        return median(self.values(name, attr))

    def values(self, name: str, attr: str) -> list[float]:
        return [float(getattr(r, attr)) for r in self.runs[name]]


def print_table(title: str, tally: Tally, unit: str, systems: Sequence[str]) -> None:
    """The wrk table: throughput, latency, CPU per request, errors; medians [per round]."""
    print(f"\n{title}")
    print(f"| system | {unit} | p50 ms | p99 ms | server CPU µs/req | wrk CPU µs/req | errors |")
    print("|---|---|---|---|---|---|---|")
    for name in systems:
        if name not in tally.runs:
            continue
        rps = tally.values(name, "rps")
        print(
            f"| {name} | {tally.med(name, 'rps'):.0f} {spread(rps)} "
            f"| {tally.med(name, 'p50_ms'):.2f} {spread(tally.values(name, 'p50_ms'), '{:.2f}')} "
            f"| {tally.med(name, 'p99_ms'):.2f} {spread(tally.values(name, 'p99_ms'), '{:.2f}')} "
            f"| {tally.med(name, 'server_cpu_us'):.0f} "
            f"{spread(tally.values(name, 'server_cpu_us'))} "
            f"| {tally.med(name, 'wrk_cpu_us'):.0f} "
            f"| {sum(int(v) for v in tally.values(name, 'bad'))} |"
        )


def ratio_line(tally: Tally, num: str, den: str, attr: str = "rps") -> float:
    """Print and return median(num)/median(den) of ``attr``, with the per-round ratios."""
    per_round = [
        a / b for a, b in zip(tally.values(num, attr), tally.values(den, attr), strict=True) if b
    ]
    value = tally.med(num, attr) / tally.med(den, attr)
    print(f"{num}/{den}: {value:.2f} (per round {spread(per_round, '{:.2f}')})")
    return value


def print_columns(
    title: str, tally: Tally, systems: Sequence[str], columns: Sequence[tuple[str, str, str]]
) -> None:
    """A markdown table: one row per system, one column per (header, attribute, format)
    with the median across rounds and the per-round values in brackets; then the summed
    ``bad`` as errors."""
    print(f"\n{title}")
    print("| system | " + " | ".join(h for h, _, _ in columns) + " | errors |")
    print("|---" * (len(columns) + 2) + "|")
    for name in systems:
        if name not in tally.runs:
            continue
        cells = [
            f"{fmt.format(tally.med(name, attr))} {spread(tally.values(name, attr), fmt)}"
            for _, attr, fmt in columns
        ]
        bad = sum(int(v) for v in tally.values(name, "bad"))
        print(f"| {name} | " + " | ".join(cells) + f" | {bad} |")


# -- identities and servers for the HTTP benchmarks ----------------------------------

#: The trivial app the Python servers serve (``svc_app.py``; ``trustmesh run svc_app:app``).
FASTAPI_APP = """\
from fastapi import FastAPI

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@app.get("/items/{item}")
async def item(item: str) -> dict[str, str]:
    return {"item": item}
"""


def write_cert_dir(
    ca: CertificateAuthority,
    spiffe_id: str,
    directory: Path,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> ClientCert:
    """Issue ``spiffe_id`` and write an identity directory as an agent keeps it
    (``chain.pem``, ``key.pem``, ``bundle.pem``): usable as ``--cert-dir``."""
    issued = ca.issue(spiffe_id, dns=dns, ips=ips, actor="bench")
    assert issued.key is not None
    directory.mkdir(parents=True, exist_ok=True)
    chain, key = directory / "chain.pem", directory / "key.pem"
    chain.write_bytes(pem_certificates(issued.chain))
    key.write_bytes(dump_private_key(issued.key))
    key.chmod(0o600)
    (directory / "bundle.pem").write_bytes(pem_certificates(ca.bundle))
    return ClientCert(chain, key)


def wait_ok(
    url: str,
    *,
    verify: ssl.SSLContext | bool,
    proc: subprocess.Popen[Any],
    log: Path,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> None:
    """Poll ``url`` until it answers 200; a dead ``proc`` or the timeout raise with its log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, verify=verify, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text() if log.exists() else "(no log)"
            raise RuntimeError(f"{url} did not answer 200:\n{text[-4000:]}")
        time.sleep(0.2)


def start_haproxy(hdir: Path, config: str, *, work: Path) -> subprocess.Popen[Any]:
    """Check and start ``haproxy -db`` (foreground) with ``config``, as nobody when root.

    Every file haproxy reads must be in ``hdir`` (made readable for nobody; throwaway
    benchmark keys); ``work`` is its parent temp dir (made traversable).
    """
    conf = hdir / "haproxy.cfg"
    conf.write_text(config)
    cmd = as_nobody(
        ["haproxy", "-db", "-f", str(conf)],
        dirs=(work, hdir),
        files=[p for p in hdir.iterdir() if p.is_file()],
    )
    check = subprocess.run([*cmd, "-c"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejects its config:\n{check.stdout}{check.stderr}")
    log = hdir / "haproxy.log"
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def rotated_rounds(
    systems: Sequence[Any], rounds: int, steps: Sequence[tuple[Tally, Callable[[Any], Any]]]
) -> None:
    """Run every step on every system (each has a ``.name``) per round, the order of the
    systems rotated by one each round; results go to each step's tally."""
    for rnd in range(rounds):
        k = rnd % len(systems)
        order = list(systems[k:]) + list(systems[:k])
        print(f"round {rnd + 1}: order {[s.name for s in order]}, load {loadavg()}", flush=True)
        for system in order:
            for tally, step in steps:
                tally.add(system.name, step(system))
    print(f"load average after the rounds: {loadavg()}")


def wrk_columns(upstream: str, cpu_fmt: str = "{:.0f}") -> list[tuple[str, str, str]]:
    """The columns of a wrk table for a proxy in front of ``upstream``."""
    return [
        ("req/s", "rps", "{:.0f}"),
        ("p50 ms", "p50_ms", "{:.2f}"),
        ("p99 ms", "p99_ms", "{:.2f}"),
        ("proxy CPU µs/req", "server_cpu_us", cpu_fmt),
        (f"{upstream} CPU µs/req", "upstream_cpu_us", cpu_fmt),
        ("wrk CPU µs/req", "wrk_cpu_us", cpu_fmt),
    ]


def rate_columns(upstream: str, ms_fmt: str = "{:.2f}") -> list[tuple[str, str, str]]:
    """The columns of a ratelat table for a proxy in front of ``upstream``."""
    return [
        ("p50 ms", "p50_ms", ms_fmt),
        ("p90 ms", "p90_ms", ms_fmt),
        ("p99 ms", "p99_ms", ms_fmt),
        ("max ms", "max_ms", "{:.1f}"),
        ("p50 from write ms", "raw_p50_ms", ms_fmt),
        ("p99 from write ms", "raw_p99_ms", ms_fmt),
        ("achieved req/s", "rate", "{:.0f}"),
        ("proxy CPU µs/req", "server_cpu_us", "{:.0f}"),
        (f"{upstream} CPU µs/req", "upstream_cpu_us", "{:.0f}"),
        ("generator CPU µs/req", "gen_cpu_us", "{:.0f}"),
        ("late send max ms", "late_max_ms", "{:.2f}"),
        ("reconnects", "reconnects", "{:.0f}"),
    ]


def print_added(
    lat: Tally, systems: Sequence[str], base: str, ms_fmt: str = "{:.2f}"
) -> dict[str, dict[str, float]]:
    """Print and return the added p50/p99 of each system over ``base``: median of the
    system's percentile minus median of the base's (per-round differences in brackets)."""
    print(
        f"\nadded latency over {base} (median of the system - median of {base}; "
        "per-round differences in brackets):"
    )
    print("| system | added p50 ms | added p99 ms |\n|---|---|---|")
    out: dict[str, dict[str, float]] = {}
    for name in systems:
        if name == base or name not in lat.runs:
            continue
        cells = []
        for q in ("p50_ms", "p99_ms"):
            pairs = zip(lat.values(name, q), lat.values(base, q), strict=True)
            per_round = [a - b for a, b in pairs]
            out.setdefault(name, {})[q] = lat.med(name, q) - lat.med(base, q)
            cells.append(f"{ms_fmt.format(out[name][q])} {spread(per_round, ms_fmt)}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    return out


@dataclass
class Target:
    """A system under load: where to send requests and whose CPU counts as the proxy's."""

    name: str
    port: int
    path: str
    pids: list[int]  # the proxy's process tree (empty when calling the app directly)
    tls: bool = True
    cert: ClientCert | None = None  # what the load generators present (mTLS)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{self.path}"


@dataclass
class Load:
    """The two load generators, set up once for a benchmark: wrk (keep-alive throughput)
    and ratelat (fixed-rate latency); the CPU of ``upstream`` is reported apart."""

    shim: Path
    ratelat: Path
    upstream: int
    connections: int
    rate: float
    headers: Sequence[str] = ()
    script: Path | None = None  # wrk Lua script (see wrk_rotation_script)
    rotate: Path | None = None  # ratelat: header lines in rotation

    def wrk(self, target: Target, duration: float) -> WrkResult:
        return run_wrk(
            target.url,
            target.pids,
            connections=self.connections,
            duration=duration,
            shim=self.shim,
            cert=target.cert,
            headers=self.headers,
            script=self.script,
            upstream=self.upstream,
        )

    def fixed_rate(self, target: Target, duration: float) -> RateResult:
        return run_ratelat(
            self.ratelat,
            target.port,
            target.pids,
            rate=self.rate,
            duration=duration,
            path=target.path,
            tls=target.tls,
            cert=target.cert,
            headers=() if self.rotate is not None else self.headers,
            rotate=self.rotate,
            host=target.host,
            upstream=self.upstream,
        )

    def warm_up(self, targets: Sequence[Target], seconds: float = 2) -> None:
        print(f"warm-up: {seconds:g} s of wrk and {seconds:g} s at the fixed rate per system")
        for target in targets:
            self.wrk(target, seconds)
            self.fixed_rate(target, seconds)


def load_arguments(parser: argparse.ArgumentParser, systems: Sequence[str]) -> None:
    """The options of the proxy benchmarks (rounds, wrk and ratelat settings, selection)."""
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections")
    parser.add_argument("--rate", type=float, default=500, help="requests/s for the latency runs")
    parser.add_argument("--latency-duration", type=float, default=10, help="seconds per run")
    parser.add_argument("--only", action="append", choices=systems, help="run only these systems")
    parser.add_argument(
        "--skip", action="append", default=[], choices=["a", "b"], help="skip a measurement"
    )


def measure_load(
    args: argparse.Namespace,
    targets: Sequence[Target],
    load: Load,
    around: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> tuple[Tally, Tally]:
    """Warm up, then the rotated rounds: wrk (a) and ratelat (b) per target unless skipped;
    ``around`` wraps every timed run (e.g. memory sampling)."""
    load.warm_up(targets)
    keep, lat = Tally(), Tally()

    def throughput(target: Target) -> WrkResult:
        with around():
            return load.wrk(target, args.duration)

    def fixed_rate(target: Target) -> RateResult:
        with around():
            return load.fixed_rate(target, args.latency_duration)

    steps: list[tuple[Tally, Callable[[Any], Any]]] = []
    if "a" not in args.skip:
        steps.append((keep, throughput))
    if "b" not in args.skip:
        steps.append((lat, fixed_rate))
    rotated_rounds(targets, args.rounds, steps)
    print(f"\nmedians of {args.rounds} rounds, per-round values in brackets")
    return keep, lat


def ratio_target(tally: Tally, num: str, den: str, target: float) -> str:
    """Print the req/s ratio ``num``/``den``; return its line for the targets."""
    ratio = ratio_line(tally, num, den)
    return f"throughput {num}/{den} >= {target:.2f}: {ratio:.2f} {verdict(ratio >= target)}"


def print_targets(issue: str, lines: Sequence[str]) -> None:
    print(f"\nload average at the end: {loadavg()}")
    if lines:
        print(f"\nTargets ({issue}):")
        for line in lines:
            print(f"  {line}")


def print_wrk_table(
    args: argparse.Namespace,
    keep: Tally,
    targets: Sequence[str],
    what: str,
    upstream: str,
    cpu_fmt: str = "{:.0f}",
) -> None:
    print_columns(
        f"a. keep-alive throughput: wrk -t1 -c{args.connections} -d{args.duration:g}s, {what}",
        keep,
        targets,
        wrk_columns(upstream, cpu_fmt),
    )


def print_rate_tables(
    args: argparse.Namespace,
    lat: Tally,
    targets: Sequence[str],
    upstream: str,
    ms_fmt: str = "{:.2f}",
    base: str = "direct",
) -> dict[str, dict[str, float]]:
    """The fixed-rate table, then the added latency over ``base`` (returned)."""
    print_columns(
        f"b. latency at a fixed {args.rate:g} req/s (open loop, ratelat, 16 connections, "
        f"{args.latency_duration:g} s; from the scheduled send time)",
        lat,
        targets,
        rate_columns(upstream, ms_fmt),
    )
    return print_added(lat, targets, base, ms_fmt) if base in targets else {}


def under_cprofile(cmd: list[str], out: Path) -> list[str]:
    """``python -m X ...`` run under cProfile, writing its stats to ``out`` at exit."""
    assert cmd[:2] == [sys.executable, "-m"], cmd
    return [sys.executable, "-m", "cProfile", "-o", str(out), *cmd[1:]]


def print_cprofile(path: Path, title: str, top: int = 30) -> None:
    """The functions with the most own time, then the most cumulative time."""
    if not path.exists():
        print(f"\n{title}: no profile written ({path})")
        return
    print(f"\n{title} (seconds; the profiler itself slows Python code several-fold):")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def added_target(
    lat: Tally,
    added: Mapping[str, Mapping[str, float]],
    name: str,
    q: str,
    target_ms: float,
    rate: float,
    ms_fmt: str = "{:.2f}",
) -> str | None:
    """The target line for ``name``'s added ``q`` (p50_ms/p99_ms) at the fixed rate; a
    system that left requests unanswered (could not sustain the rate) misses it whatever its
    percentiles of the answered ones say. None when ``name`` was not measured."""
    if name not in added:
        return None
    value = added[name][q]
    bad = sum(int(v) for v in lat.values(name, "bad"))
    line = (
        f"{name} added {q.removesuffix('_ms')} at {rate:g} req/s <= {target_ms:g} ms: "
        f"{ms_fmt.format(value)} ms"
    )
    if bad:
        sent = sum(int(v) for v in lat.values(name, "requests"))
        return f"{line} over the answered requests; {bad} of {sent} failed or unanswered: MISSED"
    return f"{line} {verdict(value <= target_ms)}"
