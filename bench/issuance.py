"""Issuance throughput: CertificateAuthority.sign() vs the bare cryptography pipeline.

For each key type (CA key and CSR key of that type) this signs the same
pre-generated CSRs two ways, in alternating order, for several rounds:

  whole  ca.sign(csr_pem): parse + verify the CSR, SAN/policy checks, build and
         sign the leaf, record it and append the audit event in one committed
         transaction (default actor, default profile).
  bare   x509.load_pem_x509_csr + is_signature_valid, then trustmesh.pki.issue_leaf
         with a LeafRequest built directly (no policy, no database).

It prints the median certs/s of each and the ratio whole/bare (target >= 0.70).
With --floor it also times the raw database driver running the same statements
as one issuance (insert certificate, bump counter, read previous hash, insert
audit event, commit) on a scratch copy of the schema: the cost no Python-side
optimisation can remove.

The database is SQLite in a temporary CA home unless --db gives a PostgreSQL URL
on 127.0.0.1; then a fresh schema is created and dropped afterwards.

Example:
  .venv/bin/python bench/issuance.py
  .venv/bin/python bench/issuance.py --db postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from _common import (
    PASSPHRASE,
    TRUST_DOMAIN,
    BenchCSR,
    check_local_url,
    make_csrs,
    median,
    pg_schema,
    spread,
    timed,
    verdict,
)
from cryptography import x509

import trustmesh.authority as authority
from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, LeafRequest, PublicKey, issue_leaf, new_serial
from trustmesh.store import open_store

TARGET = 0.70


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--count", type=int, default=500, help="CSRs signed per round (500)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; medians are quoted (5)")
    p.add_argument(
        "--key-types",
        default="ec-p256,ed25519,rsa-2048",
        help="comma-separated key types (ec-p256,ed25519,rsa-2048)",
    )
    p.add_argument(
        "--db",
        default=None,
        help="postgresql://USER@127.0.0.1:PORT/DB (default: SQLite file in the CA home)",
    )
    p.add_argument("--warmup", type=int, default=20, help="untimed signings first (20)")
    p.add_argument("--key-pool", type=int, default=8, help="distinct CSR keys (8)")
    p.add_argument("--tmpdir", default=None, help="where the temporary CA home goes")
    p.add_argument("--floor", action="store_true", help="also time the raw-driver DB floor")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="after the rounds, sign the CSRs once more with each stage timed",
    )
    args = p.parse_args(argv)
    if not 1 <= args.count <= 100_000 or not 1 <= args.rounds <= 50:
        p.error("--count must be 1..100000 and --rounds 1..50")
    if args.db:
        check_local_url(args.db)
    return args


@contextlib.contextmanager
def database(db: str | None, prefix: str) -> Iterator[str | None]:
    """None (SQLite in the CA home) or a fresh PostgreSQL schema URL."""
    if db is None:
        yield None
    else:
        with pg_schema(db, prefix) as url:
            yield url


class Floor:
    """The same statements as one issuance, through the raw DBAPI driver."""

    def __init__(self, url: str, sample: dict[str, Any]) -> None:
        self.store = open_store(url)  # same migrations, so the same tables and indexes
        self.raw = self.store.engine.raw_connection()
        self.sqlite = self.store.dialect == "sqlite"
        self.sample = sample
        statements = {
            "insert_cert": (
                "INSERT INTO certificates (issuer, serial, spiffe_id, dns, ips, profile, "
                "key_type, fingerprint, not_before, not_after, issued_at, pem) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            "bump": (
                "UPDATE counters SET value = value + 1 WHERE name = 'audit_seq' RETURNING value"
            ),
            "prev": "SELECT hash FROM audit_events WHERE seq = ?",
            "insert_audit": (
                "INSERT INTO audit_events (seq, at, actor, action, subject, details, prev_hash, "
                "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            ),
        }
        if not self.sqlite:
            statements = {k: v.replace("?", "%s") for k, v in statements.items()}
        self.insert_cert = statements["insert_cert"]
        self.bump = statements["bump"]
        self.prev = statements["prev"]
        self.insert_audit = statements["insert_audit"]

    def run(self, count: int) -> None:
        s = self.sample
        raw = self.raw
        for _ in range(count):
            cur = raw.cursor()
            if self.sqlite:
                cur.execute("BEGIN IMMEDIATE")
            serial = format(new_serial(), "x")
            cur.execute(
                self.insert_cert,
                (
                    s["issuer"],
                    serial,
                    s["spiffe_id"],
                    s["dns"],
                    "",
                    "service",
                    s["key_type"],
                    s["fingerprint"],
                    s["not_before"],
                    s["not_after"],
                    s["issued_at"],
                    s["pem"],
                ),
            )
            cur.execute(self.bump)
            seq = int(cur.fetchone()[0])
            cur.execute(self.prev, (seq - 1,))
            cur.fetchone()
            cur.execute(
                self.insert_audit,
                (seq, s["issued_at"], "bench", "sign", serial, s["details"], "0" * 64, "1" * 64),
            )
            cur.close()
            raw.commit()

    def close(self) -> None:
        self.raw.close()
        self.store.close()


def breakdown(ca: CertificateAuthority, items: list[BenchCSR]) -> dict[str, float]:
    """Sign ``items`` once with the stages of the whole path timed; us/cert per stage.

    Wraps the functions ``CertificateAuthority.sign`` calls (the wrappers add about
    1 us each, counted in "rest").
    """
    acc: dict[str, float] = collections.defaultdict(float)
    undo: list[Callable[[], None]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed_call(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                acc[label] += time.perf_counter() - start

        own = name in vars(owner)  # a module function, or a method found on the class
        setattr(owner, name, timed_call)
        undo.append(
            (lambda: setattr(owner, name, original)) if own else (lambda: delattr(owner, name))
        )

    wrap(authority, "check_csr", "check_csr: parse + verify CSR, SANs, policy")
    wrap(authority, "issue_leaf", "issue_leaf: build + sign the leaf")
    wrap(ca, "_record_for", "_record_for: PEM, fingerprint, record")
    wrap(ca.store, "add_certificate", "add_certificate: INSERT")
    wrap(ca.store, "append_audit", "append_audit: counter, prev hash, seal, INSERT")
    begin_label = "transaction begin (pool checkout, BEGIN)"
    commit_label = "transaction commit (COMMIT, pool checkin)"
    original_tx = ca.store.transaction

    @contextlib.contextmanager
    def transaction() -> Iterator[Any]:
        start = time.perf_counter()
        cm = original_tx()
        conn = cm.__enter__()
        acc[begin_label] += time.perf_counter() - start
        try:
            yield conn
        except BaseException as exc:
            if not cm.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            start = time.perf_counter()
            cm.__exit__(None, None, None)
            acc[commit_label] += time.perf_counter() - start

    ca.store.transaction = transaction  # type: ignore[method-assign]
    undo.append(lambda: delattr(ca.store, "transaction"))
    try:
        total = timed(lambda: [ca.sign(c.pem) for c in items])
    finally:
        for fn in reversed(undo):
            fn()
    out = {k: v / len(items) * 1e6 for k, v in acc.items()}
    out["rest: sign()/_sign() glue, default actor, audit details"] = total / len(items) * 1e6 - sum(
        out.values()
    )
    out["total"] = total / len(items) * 1e6
    return out


def bench_key_type(kt: KeyType, args: argparse.Namespace) -> dict[str, Any]:
    csrs = make_csrs(kt, args.count, pool=args.key_pool)
    warm = make_csrs(kt, args.warmup, pool=1, tag="warmup") if args.warmup else []
    with (
        tempfile.TemporaryDirectory(prefix="tm-bench-", dir=args.tmpdir) as tmp,
        database(args.db, "bench_issue") as url,
        database(args.db if args.floor else None, "bench_floor") as floor_url,
    ):
        ca = CertificateAuthority.init(
            Path(tmp) / "home",
            trust_domain=TRUST_DOMAIN,
            passphrase=PASSPHRASE,
            key_type=kt,
            db_url=url,
        )
        floor: Floor | None = None
        try:
            profile = ca.config.profile(None)
            key = ca.signing_key  # decrypt the CA key before anything is timed
            inter = ca.intermediate
            crl_urls, ocsp_urls = ca.config.crl_urls, ca.config.ocsp_urls

            def bare(items: list[BenchCSR]) -> None:
                for c in items:
                    csr = x509.load_pem_x509_csr(c.pem)
                    if not csr.is_signature_valid:
                        raise AssertionError("bad CSR signature")
                    request = LeafRequest(
                        cast(PublicKey, csr.public_key()), c.spiffe_id, c.dns, (), profile.eku
                    )
                    issue_leaf(
                        request,
                        inter,
                        key,
                        ttl=profile.default_ttl,
                        crl_urls=crl_urls,
                        ocsp_urls=ocsp_urls,
                    )

            def whole(items: list[BenchCSR]) -> None:
                for c in items:
                    ca.sign(c.pem)

            bare(warm)
            whole(warm)
            if args.floor:
                rec = ca.store.find_certificates(limit=1)[0]
                details = {
                    "spiffe_id": rec.spiffe_id,
                    "profile": "service",
                    "not_after": "2026-11-23T00:00:00Z",
                    "fingerprint": rec.fingerprint,
                }
                sample = {
                    "issuer": rec.issuer,
                    "spiffe_id": rec.spiffe_id,
                    "dns": ",".join(rec.dns),
                    "key_type": rec.key_type,
                    "fingerprint": rec.fingerprint,
                    "not_before": int(rec.not_before.timestamp()),
                    "not_after": int(rec.not_after.timestamp()),
                    "issued_at": int(rec.issued_at.timestamp()),
                    "pem": rec.pem,
                    "details": json.dumps(details, sort_keys=True),
                }
                floor = Floor(floor_url or f"sqlite:///{Path(tmp) / 'floor.db'}", sample)
                floor.run(args.warmup)

            rates: dict[str, list[float]] = {"bare": [], "whole": [], "floor": []}
            jobs: list[tuple[str, Any]] = [("bare", bare), ("whole", whole)]
            for r in range(args.rounds):
                order = jobs if r % 2 == 0 else jobs[::-1]
                for name, fn in order:
                    rates[name].append(args.count / timed(lambda fn=fn: fn(csrs)))
                if floor is not None:
                    rates["floor"].append(args.count / timed(lambda: floor.run(args.count)))

            if args.breakdown:
                rates["breakdown"] = breakdown(ca, csrs)  # type: ignore[assignment]
            extra = args.count if args.breakdown else 0
            expected = 1 + args.warmup + args.rounds * args.count + extra  # + the init event
            report = ca.verify_audit()
            recorded = ca.store.count_certificates()
            if not report.ok or report.checked != expected:
                raise AssertionError(f"audit chain check failed: {report}")
            if recorded != args.warmup + args.rounds * args.count + extra:
                raise AssertionError(f"{recorded} certificates recorded")
        finally:
            if floor is not None:
                floor.close()
            ca.close()
    return rates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    key_types = [KeyType.parse(k.strip()) for k in args.key_types.split(",") if k.strip()]
    where = f"PostgreSQL {args.db} (fresh schema)" if args.db else "SQLite (file in the CA home)"
    print(f"issuance: {args.count} CSRs x {args.rounds} rounds per key type; db: {where}")
    print("figures are medians over rounds; per-round values in brackets\n")
    results = {}
    for kt in key_types:
        rates = bench_key_type(kt, args)
        results[kt] = rates
        b, w = median(rates["bare"]), median(rates["whole"])
        paired = median([wi / bi for wi, bi in zip(rates["whole"], rates["bare"], strict=True)])
        ratio = w / b
        print(f"{kt.value}")
        print(f"  bare  (parse+verify CSR, issue_leaf)   {b:8.0f} certs/s  {spread(rates['bare'])}")
        print(
            f"  whole (CertificateAuthority.sign)      {w:8.0f} certs/s  {spread(rates['whole'])}"
        )
        print(
            f"  whole/bare = {ratio:.2f} (median of per-round ratios {paired:.2f}); "
            f"target >= {TARGET:.2f}: {verdict(ratio >= TARGET)}"
        )
        per_cert_us = (1 / w - 1 / b) * 1e6
        print(f"  overhead of the whole path over bare: {per_cert_us:.0f} us/cert")
        if rates["floor"]:
            f = median(rates["floor"])
            print(
                f"  DB floor (raw driver, same statements + commit) "
                f"{f:8.0f} tx/s = {1e6 / f:.0f} us/tx  {spread(rates['floor'])}"
            )
        if "breakdown" in rates:
            print("  where the whole path's time goes (one extra instrumented pass, us/cert):")
            for label, us in rates["breakdown"].items():
                print(f"    {label:58s} {us:7.0f}")
        print()
    missed = [
        kt.value for kt, r in results.items() if median(r["whole"]) / median(r["bare"]) < TARGET
    ]
    print("all targets met" if not missed else f"target missed for: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
