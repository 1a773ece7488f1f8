"""Bundle fan-out (issue 17): time for a CA rotation step to reach 100 feed subscribers,
with the revocation event fan-out to the same subscribers as the baseline of the run.

Each round: a fresh CA (ec-p256, SQLite, ``rotation_auto = false``,
``rotation_min_overlap = 1s``), a real ``python -m trustmesh ca serve`` on 127.0.0.1,
and --subscribers (100) ``RevocationSet(on_bundle=...)`` objects in this process, each
with its own mTLS SSE stream (``/v1/revocations/stream?bundle=N``). Then, in the same
round and to the same subscribers:

- ``ca rotate intermediate prepare`` (in-process ``CertificateAuthority.rotate``, as the
  CLI does), then ``activate`` once the overlap has passed: two bundle events. The clock
  starts just before the step is called and stops in each subscriber's ``on_bundle``
  callback (its worker thread) for the new bundle sequence.
- --revocations (3) revocations of pre-issued certificates (in-process
  ``CertificateAuthority.revoke``, the same write path): the clock starts before the
  revoke and stops when each subscriber's ``wait_revoked`` wakes.

A fresh CA per round because an intermediate cannot be prepared again before the old one
is retired, which waits for every certificate it signed (the subscribers' own) to expire.
Reported: p50/p99/max over all (event, subscriber) samples, and the median over events of
the time until the last of the 100 subscribers had it.

Example:
  .venv/bin/python bench/bundle_fanout.py
  .venv/bin/python bench/bundle_fanout.py --rounds 5 --markdown
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from datetime import date, timedelta
from pathlib import Path

from _api import ca_serve, init_home, loadavg, ms, percentile, write_identity
from _common import PASSPHRASE

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import pem_certificates
from trustmesh.tls import BundleUpdate, RevocationSet, RotatingCredentials


class Subscriber:
    """One feed subscriber: records when each bundle sequence reached it."""

    def __init__(self, url: str, creds: RotatingCredentials, sequence: int) -> None:
        self.seen: dict[int, float] = {}
        self._changed = threading.Condition()
        self.revset = RevocationSet(
            url,
            creds.client_context,
            issuers=creds.intermediates,
            grace=timedelta(seconds=60),
            on_bundle=self._on_bundle,
            bundle_sequence=sequence,
        )

    def _on_bundle(self, update: BundleUpdate) -> None:
        now = time.perf_counter()
        with self._changed:
            self.seen.setdefault(update.sequence, now)
            self._changed.notify_all()

    def wait_bundle(self, sequence: int, timeout: float) -> float:
        with self._changed:
            if not self._changed.wait_for(lambda: sequence in self.seen, timeout):
                raise RuntimeError(f"bundle {sequence} not seen within {timeout} s")
            return self.seen[sequence]


def one_round(subscribers: int, revocations: int) -> tuple[list[list[float]], list[list[float]]]:
    """Return (per bundle event, per revocation) lists of per-subscriber latencies (s)."""
    bundle_events: list[list[float]] = []
    revocation_events: list[list[float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        work = Path(tmp)
        home = work / "home"
        bundle = init_home(home, None)
        config = (home / "config.toml").read_text()
        config = config.replace("rotation_auto = true", "rotation_auto = false")
        config = re.sub(r'rotation_min_overlap = "[^"]*"', 'rotation_min_overlap = "1s"', config)
        (home / "config.toml").write_text(config)
        sub = work / "subscriber"
        with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
            write_identity(ca, "spiffe://example.org/svc/subscriber", sub)
            (sub / "bundle.pem").write_bytes(pem_certificates(ca.bundle))
            targets = [
                ca.issue(f"spiffe://example.org/svc/t{i}", actor="bench").record.serial
                for i in range(revocations)
            ]
            sequence = ca.bundle_sequence
        creds = RotatingCredentials(sub)
        with ca_serve(home, bundle, work / "serve.log") as server, ExitStack() as stack:
            subs = [Subscriber(server.url, creds, sequence) for _ in range(subscribers)]
            for s in subs:
                stack.enter_context(s.revset)
            for s in subs:
                if not s.revset.wait_connected(60):
                    raise RuntimeError("a subscriber did not connect")
            time.sleep(1)  # let every stream settle past its first keep-alive
            with (
                CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca,
                ThreadPoolExecutor(subscribers) as pool,
            ):
                for step in ("prepare", "activate"):
                    if step == "activate":
                        time.sleep(1.2)  # rotation_min_overlap
                    start = time.perf_counter()
                    result = ca.rotate("intermediate", step, actor="bench")
                    arrived = [s.wait_bundle(result.version, 15) for s in subs]
                    bundle_events.append([t - start for t in arrived])
                    time.sleep(0.5)
                for serial in targets:
                    futures = [pool.submit(s.revset.wait_revoked, serial, 15) for s in subs]
                    time.sleep(0.05)  # every waiter is blocked before the clock starts

                    def timed(future: Future[bool], serial: str = serial) -> float:
                        if not future.result():
                            raise RuntimeError(f"revocation of {serial} not seen within 15 s")
                        return time.perf_counter()

                    start = time.perf_counter()
                    ca.revoke(serial, actor="bench")
                    stamps = [pool.submit(timed, f) for f in futures]
                    revocation_events.append([f.result() - start for f in stamps])
                    time.sleep(0.5)
            if any(s.revset.disconnects for s in subs):
                raise RuntimeError("a stream dropped during the round")
    return bundle_events, revocation_events


def commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--revocations", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="print a RESULTS.md section")
    args = parser.parse_args()

    bundles: list[list[float]] = []
    revokes: list[list[float]] = []
    for i in range(args.rounds):
        b, r = one_round(args.subscribers, args.revocations)
        bundles += b
        revokes += r
        print(
            f"round {i + 1}: bundle events reached all {args.subscribers} in "
            + ", ".join(ms(max(e)) for e in b)
            + " ms; revocations in "
            + ", ".join(ms(max(e)) for e in r)
            + " ms",
            file=sys.stderr,
        )
    rows = [
        ("bundle event (intermediate prepare / activate)", bundles),
        ("revocation event (baseline)", revokes),
    ]
    if args.markdown:
        print(f"## Bundle fan-out to {args.subscribers} feed subscribers ({date.today()})")
        print()
        print(
            f"`bench/bundle_fanout.py --rounds {args.rounds} --subscribers {args.subscribers} "
            f"--revocations {args.revocations}` at commit {commit()} on {platform.machine()}, "
            f"Python {platform.python_version()}, 2 cores shared with other work (load "
            f"average {loadavg()}), SQLite, one real `ca serve` on 127.0.0.1, "
            f"{args.subscribers} `RevocationSet(on_bundle=...)` streams in one process."
        )
        print()
        print("| event | events | p50 | p99 | max | all reached (median over events) |")
        print("|---|---|---|---|---|---|")
    for name, events in rows:
        flat = [v for e in events for v in e]
        last = statistics.median(max(e) for e in events)
        if args.markdown:
            print(
                f"| {name} | {len(events)} | {ms(percentile(flat, 50))} ms | "
                f"**{ms(percentile(flat, 99))} ms** | {ms(max(flat))} ms | {ms(last)} ms |"
            )
        else:
            print(
                f"{name}: {len(events)} events x {args.subscribers}: p50 "
                f"{ms(percentile(flat, 50))} ms, p99 {ms(percentile(flat, 99))} ms, max "
                f"{ms(max(flat))} ms; all reached (median) {ms(last)} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
