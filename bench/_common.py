"""Helpers shared by the benchmarks: medians, CSRs, local databases, reporting.

Not a benchmark itself; the scripts next to it import it (``bench/`` is on
``sys.path`` when a script there is run as ``python bench/NAME.py``).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import random
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from trustmesh.pki import (
    REASONS,
    KeyType,
    PrivateKey,
    SpiffeID,
    generate_private_key,
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
