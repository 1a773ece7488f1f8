"""The revocation set client: lookups per second, and revoke -> is_revoked latency.

1. Lookups. A ``RevocationSet`` holding --revoked (100,000) random 159-bit serials,
   in the state it is in while its stream is connected, answers ``is_revoked`` for a
   pre-built list of integer serials (``cert.serial_number``, as the middleware
   passes them), half of them revoked. Rates for 1 thread and for 2 threads together
   (total lookups/s; the GIL serialises them), median over --rounds.

2. Latency. A real ``python -m trustmesh ca serve`` on 127.0.0.1 (SQLite); a
   ``RevocationSet`` subscribed to its feed with a ``RotatingCredentials`` identity;
   an admin revokes --revocations certificates one by one over a keep-alive mTLS
   connection (the CA client). The clock starts just before each revoke request is
   sent (from a second thread) and stops when ``wait_revoked`` wakes in the main
   thread, i.e. when ``is_revoked`` would answer True: p50/p99/max, with the revoke
   request's own round trip as the baseline of the same run.

Target (issue 5): revoke -> next request refused, p99 <= 1 s. This measures the
revocation-set half (the middleware's lookup is part 1).

Example:
  .venv/bin/python bench/revocation_set.py
  .venv/bin/python bench/revocation_set.py --markdown
"""

from __future__ import annotations

import argparse
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

from _api import ADMIN, ca_serve, init_home, loadavg, ms, percentile, write_identity
from _common import PASSPHRASE

from trustmesh.authority import CertificateAuthority
from trustmesh.client import CAClient
from trustmesh.pki import pem_certificates
from trustmesh.tls import RevocationSet, RotatingCredentials


def lookup_rates(revoked: int, lookups: int, rounds: int) -> tuple[float, float]:
    """Return median lookups/s with 1 thread and with 2 threads (total)."""
    serials = [secrets.randbits(159) | (1 << 158) for _ in range(revoked)]
    revset = RevocationSet("https://ca.invalid", lambda: None)  # type: ignore[arg-type,return-value]
    revset._revoked.update(format(s, "x") for s in serials)
    revset._stale_since = None  # as while the stream is connected
    queries = [
        serials[i % revoked] if i % 2 else secrets.randbits(159) | (1 << 158)
        for i in range(lookups)
    ]
    assert sum(map(revset.is_revoked, queries)) == lookups // 2

    def run(chunk: list[int]) -> None:
        check = revset.is_revoked
        for serial in chunk:
            check(serial)

    one, two = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        run(queries)
        one.append(lookups / (time.perf_counter() - start))
        threads = [threading.Thread(target=run, args=(queries,)) for _ in range(2)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        two.append(2 * lookups / (time.perf_counter() - start))
    return statistics.median(one), statistics.median(two)


def latencies(count: int, gap: float) -> tuple[list[float], list[float]]:
    """Return (revoke -> is_revoked True, revoke round trip) in seconds, per revocation."""
    with tempfile.TemporaryDirectory(prefix="bench-revset-") as tmp:
        work = Path(tmp)
        home = work / "home"
        bundle = init_home(home, None)
        with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
            admin = write_identity(ca, ADMIN, work / "admin")
            sub = work / "subscriber"
            write_identity(ca, "spiffe://example.org/svc/subscriber", sub)
            (sub / "bundle.pem").write_bytes(pem_certificates(ca.bundle))
            targets = [
                ca.issue(f"spiffe://example.org/svc/t{i}", actor="bench").record.serial
                for i in range(count)
            ]
        creds = RotatingCredentials(sub)
        with ca_serve(home, bundle, work / "serve.log") as server:
            revset = RevocationSet(
                server.url,
                creds.client_context,
                issuers=creds.intermediates,
                grace=timedelta(seconds=30),
            )
            observed, round_trips = [], []
            with (
                revset,
                CAClient(server.url, bundle=bundle, cert=admin.chain, key=admin.key) as client,
                ThreadPoolExecutor(1) as pool,
            ):
                if not revset.wait_connected(30):
                    raise RuntimeError("the revocation set did not connect")
                client.bundle()  # open the keep-alive connection before the clock runs
                for serial in targets:

                    def revoke(serial: str = serial) -> float:
                        begin = time.perf_counter()
                        client.revoke(serial)
                        return time.perf_counter() - begin

                    start = time.perf_counter()
                    future = pool.submit(revoke)
                    if not revset.wait_revoked(serial, 10):
                        raise RuntimeError(f"revocation of {serial} not seen within 10 s")
                    observed.append(time.perf_counter() - start)
                    round_trips.append(future.result())
                    time.sleep(gap)
                if revset.disconnects:
                    raise RuntimeError("the stream dropped during the run")
    return observed, round_trips


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revoked", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--revocations", type=int, default=50)
    parser.add_argument("--gap", type=float, default=0.05)
    parser.add_argument("--markdown", action="store_true", help="print a RESULTS.md section")
    args = parser.parse_args()

    one, two = lookup_rates(args.revoked, args.lookups, args.rounds)
    seen, rtt = latencies(args.revocations, args.gap)
    rows = [
        ("revoke -> is_revoked True", seen),
        ("revoke request round trip (baseline)", rtt),
    ]
    if not args.markdown:
        print(
            f"is_revoked with {args.revoked:,} revoked: {one:,.0f}/s (1 thread), "
            f"{two:,.0f}/s (2 threads, total)"
        )
        for name, values in rows:
            print(
                f"{name}: p50 {ms(percentile(values, 50))} ms, p99 "
                f"{ms(percentile(values, 99))} ms, max {ms(max(values))} ms"
            )
        return 0
    p99 = percentile(seen, 99)
    print(f"## Revocation set client: lookups and revoke -> is_revoked latency ({date.today()})")
    print()
    print(
        f"`bench/revocation_set.py --rounds {args.rounds} --revocations {args.revocations}` on "
        f"{platform.machine()}, Python {platform.python_version()}, 2 cores shared with "
        f"other work (load average {loadavg()}), SQLite, a real `ca serve` on 127.0.0.1."
    )
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| `is_revoked`, {args.revoked:,} revoked, 1 thread | **{one:,.0f}/s** |")
    print(f"| `is_revoked`, {args.revoked:,} revoked, 2 threads (total) | **{two:,.0f}/s** |")
    for name, values in rows:
        print(
            f"| {name}, {len(values)} revocations | p50 {ms(percentile(values, 50))} ms, "
            f"**p99 {ms(percentile(values, 99))} ms**, max {ms(max(values))} ms |"
        )
    print()
    verdict = "MET" if p99 <= 1.0 else "MISSED"
    print(f"- **Revoke -> revocation set p99 <= 1 s: {verdict} ({ms(p99)} ms).**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
