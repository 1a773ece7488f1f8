"""Issuance rate with a large store (default 1,000,000 certificates) vs an empty one.

Two CAs side by side, both SQLite files under one temporary directory:

  empty  a fresh CA
  full   a fresh CA whose store is first filled with --rows synthetic certificates
         (this CA's issuer, unique random 159-bit serials, 1 in --revoked-every
         revoked) and, unless --no-audit-fill, one valid hash-chained audit event
         per certificate, as a CA that issued them would have

The fill uses executemany in batches of --batch rows, one transaction per batch,
and shows progress. It then prints SQLite's query plans for the statements the
issuance path runs and fails if any of them scans a table instead of using an
index. Then it times CertificateAuthority.sign() of the same pre-generated CSRs
on both CAs in alternating order for several rounds and prints the median certs/s
of each and the ratio full/empty (target: >= 0.90, i.e. within 10%).

Example:
  .venv/bin/python bench/store_size.py                 # 1,000,000 rows
  .venv/bin/python bench/store_size.py --rows 100000   # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sqlite3
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from _common import (
    CERT_INSERT,
    PASSPHRASE,
    TRUST_DOMAIN,
    Progress,
    fill_connection,
    make_csrs,
    median,
    spread,
    synthetic_certificate_rows,
    timed,
    verdict,
)

from trustmesh.audit import GENESIS, AuditEvent, event_hash
from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType
from trustmesh.store._store import _HOT_SQL  # the statements the issuance path runs

TARGET = 0.90
ACTOR = "bench:fill"
#: AuditEvent.canonical() of a synthetic "sign" event, and the stored details column.
CANONICAL = (
    '{"action":"sign","actor":"' + ACTOR + '","at":%d,"details":{"fingerprint":"%s",'
    '"not_after":"%s","profile":"service","spiffe_id":"%s"},"prev_hash":"%s","seq":%d,'
    '"subject":"%s"}'
)
DETAILS = '{"fingerprint": "%s", "not_after": "%s", "profile": "service", "spiffe_id": "%s"}'
AUDIT_INSERT = (
    "INSERT INTO audit_events (seq, at, actor, action, subject, details, prev_hash, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=1_000_000, help="certificates in the full store")
    p.add_argument("--count", type=int, default=300, help="CSRs signed per round and CA (300)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; medians quoted (5)")
    p.add_argument("--warmup", type=int, default=20, help="untimed signings per CA first (20)")
    p.add_argument("--batch", type=int, default=50_000, help="rows per fill transaction")
    p.add_argument("--revoked-every", type=int, default=100, help="1 in N rows revoked (100)")
    p.add_argument("--no-audit-fill", action="store_true", help="fill certificates only")
    p.add_argument(
        "--verify-all", action="store_true", help="verify the whole audit chain at the end"
    )
    p.add_argument("--key-type", default="ec-p256", help="CA and CSR key type (ec-p256)")
    p.add_argument("--tmpdir", default=None, help="where the two CA homes go")
    args = p.parse_args(argv)
    if not 0 <= args.rows <= 5_000_000:
        p.error("--rows must be 0..5000000")
    if not 1 <= args.count <= 100_000 or not 1 <= args.rounds <= 50:
        p.error("--count must be 1..100000 and --rounds 1..50")
    if not 1_000 <= args.batch <= 500_000:
        p.error("--batch must be 1000..500000")
    return args


def fill(ca: CertificateAuthority, args: argparse.Namespace, pem: str) -> float:
    """Bulk-insert synthetic certificates (+ audit chain) into ``ca``'s SQLite file."""
    db = Path(ca.config.db.removeprefix("sqlite:///"))
    conn = fill_connection(db)
    now = int(datetime.now(UTC).timestamp())
    rows = synthetic_certificate_rows(
        args.rows, issuer=ca.issuer_id, now=now, pem=pem, revoked_every=args.revoked_every
    )
    last = conn.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (int(last[0]), str(last[1])) if last else (0, GENESIS)
    days: dict[int, str] = {}
    bar = Progress(
        "filling certificates" + ("" if args.no_audit_fill else " + audit events"), args.rows
    )
    try:
        done = 0
        while done < args.rows:
            chunk = list(itertools.islice(rows, min(args.batch, args.rows - done)))
            events = []
            if not args.no_audit_fill:
                for row in chunk:
                    seq += 1
                    # The canonical JSON AuditEvent.canonical() hashes, by template
                    # (all values are plain ASCII); checked against it below.
                    day, second = divmod(row[9], 86400)
                    not_after = days.get(day)
                    if not_after is None:
                        not_after = days[day] = datetime.fromtimestamp(day * 86400, UTC).strftime(
                            "%Y-%m-%dT"
                        )
                    h, m, sec = second // 3600, second // 60 % 60, second % 60
                    not_after += f"{h:02d}:{m:02d}:{sec:02d}Z"
                    fields = (row[7], not_after, row[2])
                    canonical = CANONICAL % (row[10], *fields, prev, seq, row[1])
                    digest = hashlib.sha256(canonical.encode()).hexdigest()
                    events.append(
                        (seq, row[10], ACTOR, "sign", row[1], DETAILS % fields, prev, digest)
                    )
                    prev = digest
                check = AuditEvent(
                    seq=events[0][0],
                    at=events[0][1],
                    actor=ACTOR,
                    action="sign",
                    subject=events[0][4],
                    details=json.loads(events[0][5]),
                    prev_hash=events[0][6],
                )
                if (
                    event_hash(check) != events[0][7]
                    or json.dumps(check.details, sort_keys=True) != events[0][5]
                ):
                    raise AssertionError("synthetic audit event does not match AuditEvent")
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(CERT_INSERT, chunk)
            if events:
                conn.executemany(AUDIT_INSERT, events)
                conn.execute("UPDATE counters SET value = ? WHERE name = 'audit_seq'", (seq,))
            conn.execute("COMMIT")
            done += len(chunk)
            bar.update(done)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return bar.done()
    finally:
        conn.close()


def query_plans(db: Path) -> bool:
    """Print the plans of the issuance-path statements; return True if all use indexes."""
    sql = _HOT_SQL["sqlite"]
    conn = sqlite3.connect(db)
    ok = True
    try:
        checks = [
            ("next_counter", sql.next_counter, ("audit_seq",)),
            ("previous audit hash", sql.audit_hash, (1,)),
        ]
        for name, statement, params in checks:
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", params)]
            indexed = bool(plan) and all(
                "USING INDEX" in p or "USING PRIMARY KEY" in p or "USING INTEGER PRIMARY KEY" in p
                for p in plan
            )
            ok = ok and indexed
            print(f"  {name:22s} {'; '.join(plan)}  [{'index' if indexed else 'NO INDEX'}]")
        # INSERTs have no plan; their uniqueness checks probe the unique indexes.
        for table, columns in (("certificates", ["issuer", "serial"]), ("audit_events", ["seq"])):
            found = [
                row[1]
                for row in conn.execute(f"PRAGMA index_list('{table}')")
                if row[2]
                and [c[2] for c in conn.execute(f"PRAGMA index_info('{row[1]}')")] == columns
            ]
            ok = ok and bool(found)
            print(
                f"  insert into {table:12s} unique ({', '.join(columns)}) checked via "
                f"{found[0] if found else 'NO INDEX'}"
            )
    finally:
        conn.close()
    return ok


def check_tail(ca: CertificateAuthority, n: int) -> None:
    """Check the hash links and hashes of the last ``n`` audit events."""
    events = ca.store.audit_events(last=n + 1)
    for before, after in itertools.pairwise(events):
        if after.prev_hash != before.hash or event_hash(after) != after.hash:
            raise AssertionError(f"audit chain broken at {after.seq}")
    if events[-1].seq != ca.store.counter("audit_seq"):
        raise AssertionError("audit counter does not match the last event")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    kt = KeyType.parse(args.key_type)
    print(
        f"store_size: {args.rows:,} certificates in the full store; {args.count} CSRs x "
        f"{args.rounds} rounds per CA; key {kt.value}; SQLite"
    )
    csrs = make_csrs(kt, args.count, pool=8)
    warm = make_csrs(kt, max(args.warmup, 1), pool=1, tag="warmup")
    with tempfile.TemporaryDirectory(prefix="tm-bench-size-", dir=args.tmpdir) as tmpdir:
        tmp = Path(tmpdir)
        cas = {
            name: CertificateAuthority.init(
                tmp / name, trust_domain=TRUST_DOMAIN, passphrase=PASSPHRASE, key_type=kt
            )
            for name in ("empty", "full")
        }
        try:
            pem = cas["empty"].sign(warm[0].pem).record.pem
            seconds = fill(cas["full"], args, pem)
            db = tmp / "full" / "trustmesh.db"
            print(
                f"fill: {args.rows:,} rows in {seconds:.1f} s "
                f"({args.rows / max(seconds, 1e-9):,.0f} "
                f"rows/s, batches of {args.batch:,}); database {db.stat().st_size / 2**20:,.0f} MiB"
            )
            print("query plans on the full store:")
            indexed = query_plans(db)
            if not indexed:
                print("  WARNING: an issuance-path statement does not use an index")
            for ca in cas.values():
                _ = ca.signing_key  # decrypt before timing
                for c in warm[1 : args.warmup]:
                    ca.sign(c.pem)
            rates: dict[str, list[float]] = {"empty": [], "full": []}
            names = ["empty", "full"]
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    ca = cas[name]
                    t = timed(lambda ca=ca: [ca.sign(c.pem) for c in csrs])
                    rates[name].append(args.count / t)
            e, f = median(rates["empty"]), median(rates["full"])
            paired = median([fi / ei for fi, ei in zip(rates["full"], rates["empty"], strict=True)])
            print(f"empty store  {e:8.0f} certs/s  {spread(rates['empty'])}")
            print(f"full store   {f:8.0f} certs/s  {spread(rates['full'])}")
            print(
                f"full/empty = {f / e:.2f} (median of per-round ratios {paired:.2f}); "
                f"target >= {TARGET:.2f}: {verdict(f / e >= TARGET)}"
            )
            signed = args.rounds * args.count + max(args.warmup, 1)
            count = cas["full"].store.count_certificates()
            if count != args.rows + signed - 1:
                raise AssertionError(f"full store holds {count} certificates")
            check_tail(cas["full"], signed + 5)
            if args.verify_all:
                report = cas["full"].verify_audit()
                if not report.ok:
                    raise AssertionError(f"audit chain of the full store: {report}")
                print(f"verified the whole audit chain of the full store: {report.checked:,}")
            if not cas["empty"].verify_audit().ok:
                raise AssertionError("audit chain of the empty store is broken")
            print(f"checked: {count:,} certificates in the full store, audit chain tail intact")
        finally:
            for ca in cas.values():
                ca.close()
    return 0 if indexed else 1


if __name__ == "__main__":
    sys.exit(main())
