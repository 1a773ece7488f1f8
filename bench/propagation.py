"""Revocation propagation: revoke request start -> event on every SSE subscriber.

Setup (untimed): a fresh ec-p256 CA, --subscribers identities (one each, no admin
rights), an admin identity, and --revocations x --rounds target certificates.
`python -m trustmesh ca serve --admin spiffe://example.org/admin` runs as a real
process; every subscriber holds its own mTLS connection to
GET /v1/revocations/stream?since=<latest cursor> (opened before the clock starts).

Then the admin revokes the targets one by one over its own keep-alive mTLS
connection (POST /v1/revoke {serial}). For each revocation the clock starts just
before the request is written; each subscriber notes when the event carrying that
serial has been read and parsed. The next revocation follows once every subscriber
has it (or after --timeout), plus --gap seconds.

Figures per round: p50/p99 over all (subscriber, revocation) pairs of
"event received - revoke request start", the fan-out spread (last - first
subscriber per revocation), and, as the baseline measured in the same run, the
revoke request's own round trip (p50/p99). Medians over rounds are quoted, with
the ratio propagation/round trip.

Setups:
  sqlite-1   one replica, SQLite file in the CA home; subscribers and revokes on it
  pg-2       (only with --db) two replicas A and B on one PostgreSQL schema;
             revokes on A, subscribers on B (B hears of them by LISTEN/NOTIFY)

Target: p99 <= 1 s across replicas (pg-2).

The subscribers and the revoker run in one asyncio process with a small client
(asyncio streams + httptools' parser) so that reading 100 streams costs little.

Example:
  .venv/bin/python bench/propagation.py
  .venv/bin/python bench/propagation.py --db postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
from _api import (
    ADMIN,
    HOST,
    CPUMeter,
    Identity,
    RawConnection,
    Server,
    ca_serve,
    client_ssl,
    init_home,
    loadavg,
    median_or_nan,
    ms,
    percentile,
    write_identity,
)
from _common import PASSPHRASE, TRUST_DOMAIN, check_local_url, pg_schema, spread, verdict

from trustmesh.authority import CertificateAuthority

TARGET_P99 = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--subscribers", type=int, default=100, help="SSE subscribers (100)")
    p.add_argument("--revocations", type=int, default=20, help="revocations per round (20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians quoted (3)")
    p.add_argument("--gap", type=float, default=0.2, help="pause between revocations, s (0.2)")
    p.add_argument("--timeout", type=float, default=10.0, help="wait per revocation, s (10)")
    p.add_argument(
        "--db",
        default=None,
        help="postgresql://USER@127.0.0.1:PORT/DB: also run two replicas on PostgreSQL",
    )
    p.add_argument("--no-sqlite", action="store_true", help="skip the SQLite single-replica run")
    p.add_argument("--tmpdir", default=None, help="where the temporary CA homes go")
    args = p.parse_args(argv)
    if not 1 <= args.subscribers <= 500 or not 1 <= args.revocations <= 200:
        p.error("--subscribers must be 1..500 and --revocations 1..200")
    if not 1 <= args.rounds <= 20 or not 0 <= args.gap <= 10 or not 1 <= args.timeout <= 60:
        p.error("--rounds 1..20, --gap 0..10, --timeout 1..60")
    if args.db:
        check_local_url(args.db)
    if args.no_sqlite and not args.db:
        p.error("--no-sqlite needs --db")
    return args


# -- SSE subscribers -------------------------------------------------------------------


class _Stream:
    """httptools callbacks: dechunked body text split into SSE events."""

    def __init__(self, on_event: Any) -> None:
        self.on_event = on_event
        self.buffer = ""
        self.headers_done = asyncio.Event()

    def on_headers_complete(self) -> None:
        self.headers_done.set()

    def on_body(self, data: bytes) -> None:
        self.buffer += data.decode()
        while "\n\n" in self.buffer:
            block, self.buffer = self.buffer.split("\n\n", 1)
            for line in block.split("\n"):
                if line.startswith("data: "):
                    self.on_event(json.loads(line[6:]))


class Subscriber:
    """One SSE connection; records (arrival, serial, cursor) per revocation event."""

    def __init__(self, port: int, ctx: Any, since: int, hub: Arrivals) -> None:
        self.conn = RawConnection(HOST, port, ctx)
        self.since = since
        self.hub = hub
        self.cursors: list[int] = []
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def _on_event(self, data: dict[str, Any]) -> None:
        now = time.monotonic()
        self.cursors.append(int(data["cursor"]))
        self.hub.arrived(str(data["serial"]), now)

    async def start(self) -> None:
        await self.conn.connect()
        assert self.conn.writer is not None
        assert self.conn.reader is not None
        self.conn.writer.write(
            f"GET /v1/revocations/stream?since={self.since} HTTP/1.1\r\n"
            f"Host: {HOST}:{self.conn.port}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        stream = _Stream(self._on_event)
        parser = httptools.HttpResponseParser(stream)
        reader = self.conn.reader

        async def pump() -> None:
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionError("stream closed by the server")
                    parser.feed_data(data)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self.error = exc
                stream.headers_done.set()

        self.task = asyncio.create_task(pump())
        await asyncio.wait_for(stream.headers_done.wait(), 30)
        if self.error is not None:
            raise self.error
        status = parser.get_status_code()
        if status != 200:
            raise RuntimeError(f"stream answered {status}")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self.conn.close()


class Arrivals:
    """Arrival times per serial; an event fires when every subscriber has it."""

    def __init__(self, subscribers: int) -> None:
        self.n = subscribers
        self.times: dict[str, list[float]] = {}
        self.complete: dict[str, asyncio.Event] = {}

    def expect(self, serial: str) -> asyncio.Event:
        self.times.setdefault(serial, [])
        return self.complete.setdefault(serial, asyncio.Event())

    def arrived(self, serial: str, at: float) -> None:
        times = self.times.setdefault(serial, [])
        times.append(at)
        if len(times) >= self.n:
            self.complete.setdefault(serial, asyncio.Event()).set()


# -- one setup ---------------------------------------------------------------------------


@dataclass
class Round:
    pairs: list[float] = field(default_factory=list)
    rtts: list[float] = field(default_factory=list)
    spreads: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    missing: int = 0
    server_cpu: float = 0.0
    machine_busy: float = 0.0


async def run_setup(
    revoke_on: Server,
    subscribe_on: Server,
    bundle: Path,
    subs: list[Identity],
    admin: Identity,
    targets: list[list[str]],
    since: int,
    args: argparse.Namespace,
) -> list[Round]:
    hub = Arrivals(len(subs))
    sub_port = int(subscribe_on.url.rsplit(":", 1)[1])
    subscribers = [Subscriber(sub_port, client_ssl(bundle, s), since, hub) for s in subs]
    for i in range(0, len(subscribers), 20):  # connect in batches of 20
        await asyncio.gather(*(s.start() for s in subscribers[i : i + 20]))
    revoker = RawConnection(HOST, int(revoke_on.url.rsplit(":", 1)[1]), client_ssl(bundle, admin))
    await revoker.connect()
    pids = {"revoke": revoke_on.pid}
    if subscribe_on.pid != revoke_on.pid:
        pids["subscribe"] = subscribe_on.pid
    rounds = []
    try:
        await asyncio.sleep(0.5)
        for serials in targets:
            rnd = Round()
            meter = CPUMeter(pids)
            for serial in serials:
                done = hub.expect(serial)
                body = json.dumps({"serial": serial, "reason": "keyCompromise"}).encode()
                start = time.monotonic()
                status, answer = await revoker.post("/v1/revoke", body)
                rnd.rtts.append(time.monotonic() - start)
                if status != 200 or json.loads(answer)["revoked"][0]["serial"] != serial:
                    raise AssertionError(f"revoke answered {status}: {answer[:200]!r}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), args.timeout)
                times = hub.times[serial]
                rnd.pairs.extend(t - start for t in times)
                rnd.missing += len(subs) - len(times)
                if times:
                    rnd.spreads.append(max(times) - min(times))
                    rnd.firsts.append(min(times) - start)
                await asyncio.sleep(args.gap)
            cpu = meter.stop()
            rnd.server_cpu = sum(v for k, v in cpu.items() if k in pids) / len(serials)
            rnd.machine_busy = cpu["machine"] / cpu["wall"]
            rounds.append(rnd)
            print(
                f"    round {len(rounds)}: propagation p50 {ms(percentile(rnd.pairs, 50))} ms "
                f"p99 {ms(percentile(rnd.pairs, 99))} ms max {ms(max(rnd.pairs))} ms; revoke "
                f"round trip p50 {ms(percentile(rnd.rtts, 50))} ms; missing {rnd.missing}; "
                f"load {loadavg()}"
            )
        broken = [s for s in subscribers if s.error is not None]
        if broken:
            raise AssertionError(f"{len(broken)} streams failed: {broken[0].error!r}")
        for s in subscribers:
            if s.cursors != sorted(set(s.cursors)):
                raise AssertionError("a subscriber saw events out of order or twice")
    finally:
        await revoker.close()
        await asyncio.gather(*(s.close() for s in subscribers))
    return rounds


def summarize(name: str, rounds: list[Round], subscribers: int) -> dict[str, float]:
    p50 = [percentile(r.pairs, 50) for r in rounds]
    p99 = [percentile(r.pairs, 99) for r in rounds]
    mx = [max(r.pairs) for r in rounds]
    r50 = [percentile(r.rtts, 50) for r in rounds]
    r99 = [percentile(r.rtts, 99) for r in rounds]
    fan = [percentile(r.spreads, 50) for r in rounds]
    first = [percentile(r.firsts, 50) for r in rounds]
    row = {
        "p50": median_or_nan(p50),
        "p99": median_or_nan(p99),
        "max": max(mx),
        "rtt50": median_or_nan(r50),
        "rtt99": median_or_nan(r99),
        "fan": median_or_nan(fan),
        "first": median_or_nan(first),
        "missing": float(sum(r.missing for r in rounds)),
        "cpu": median_or_nan([r.server_cpu for r in rounds]),
        "busy": median_or_nan([r.machine_busy for r in rounds]),
    }

    def msl(values: list[float]) -> str:
        return spread([v * 1000 for v in values], "{:.1f}")

    pairs = sum(len(r.pairs) for r in rounds)
    print(f"  {name} ({pairs} (subscriber, revocation) pairs over {len(rounds)} rounds)")
    print(f"    propagation p50        {ms(row['p50']):>8} ms  {msl(p50)}")
    print(f"    propagation p99        {ms(row['p99']):>8} ms  {msl(p99)}")
    print(f"    propagation max        {ms(row['max']):>8} ms  {msl(mx)}")
    print(f"    first subscriber p50   {ms(row['first']):>8} ms  {msl(first)}")
    print(
        f"    fan-out spread p50     {ms(row['fan']):>8} ms  {msl(fan)}  (last - first subscriber)"
    )
    print(f"    revoke round trip p50  {ms(row['rtt50']):>8} ms  {msl(r50)}  (baseline)")
    print(f"    revoke round trip p99  {ms(row['rtt99']):>8} ms  {msl(r99)}")
    print(
        f"    ratio propagation / round trip: p50 {row['p50'] / row['rtt50']:.1f}x, "
        f"p99 {row['p99'] / row['rtt99']:.1f}x"
    )
    print(
        f"    server CPU per revocation (all replicas, incl. {subscribers} deliveries): "
        f"{row['cpu'] * 1000:.1f} ms; machine busy {row['busy']:.2f} of 2 cores"
    )
    print(f"    events missing after the timeout: {int(row['missing'])}")
    return row


def prepare(home: Path, db_url: str | None, args: argparse.Namespace, tmp: Path) -> Any:
    bundle = init_home(home, db_url)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        subs = [
            write_identity(ca, f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/reader-{i}", tmp / f"r{i}")
            for i in range(args.subscribers)
        ]
        admin = write_identity(ca, ADMIN, tmp / "admin")
        targets = [
            [
                ca.issue(
                    f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/t-{r}-{i}", actor="bench"
                ).record.serial
                for i in range(args.revocations)
            ]
            for r in range(args.rounds)
        ]
        since = ca.store.latest_revocation_cursor()
    return bundle, subs, admin, targets, since


@contextlib.contextmanager
def workdir(args: argparse.Namespace, name: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"tm-bench-prop-{name}-", dir=args.tmpdir) as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print(
        f"propagation: {args.subscribers} SSE subscribers, {args.revocations} revocations x "
        f"{args.rounds} rounds, one by one (gap {args.gap:g} s)"
    )
    print(f"load average at start: {loadavg()}\n")
    rows: dict[str, dict[str, float]] = {}
    if not args.no_sqlite:
        with workdir(args, "sqlite") as tmp:
            home = tmp / "home"
            bundle, subs, admin, targets, since = prepare(home, None, args, tmp)
            print("  sqlite-1: one replica, SQLite")
            with ca_serve(home, bundle, tmp / "a.log") as a:
                rounds = asyncio.run(run_setup(a, a, bundle, subs, admin, targets, since, args))
            rows["sqlite-1"] = summarize("sqlite-1", rounds, args.subscribers)
            print()
    if args.db:
        with workdir(args, "pg") as tmp, pg_schema(args.db, "bench_prop") as url:
            home = tmp / "home"
            bundle, subs, admin, targets, since = prepare(home, url, args, tmp)
            print("  pg-2: two replicas on PostgreSQL; revokes on A, subscribers on B")
            with (
                ca_serve(home, bundle, tmp / "a.log") as a,
                ca_serve(home, bundle, tmp / "b.log") as b,
            ):
                rounds = asyncio.run(run_setup(a, b, bundle, subs, admin, targets, since, args))
            rows["pg-2"] = summarize("pg-2", rounds, args.subscribers)
            print()
    for name, row in rows.items():
        ok = row["p99"] <= TARGET_P99 and row["missing"] == 0
        scope = "target (across replicas)" if name == "pg-2" else "same bar, one replica"
        print(
            f"{name}: propagation p99 {ms(row['p99'])} ms <= 1000 ms, none missing "
            f"({scope}): {verdict(ok)}"
        )
    if "pg-2" not in rows:
        print("pg-2 not run: pass --db postgresql://...@127.0.0.1/... for the cross-replica target")
    print(f"\nload average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
