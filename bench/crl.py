"""CRL build time: trustmesh.pki.build_crl and CertificateAuthority.crl() at 10k/100k entries.

For each size N (random 159-bit serials, revocation times over the last month,
reasons cycling through all RFC 5280 reasons) it times, median of several rounds:

  build_crl       trustmesh.pki.build_crl(intermediate, key, entries)  (target: 100k <= 2 s)
  empty CRL       build_crl with no entries: the fixed cost (sign + header)
  entry objects   cryptography's RevokedCertificateBuilder().serial_number()
                  .revocation_date()[.add_extension(CRLReason)].build() for every
                  entry: what using cryptography's per-entry API costs at least
  builder loop    the same plus CertificateRevocationListBuilder
                  .add_revoked_certificate per entry, then sign: the documented API
                  (and trustmesh's previous build_crl); only up to --legacy-max
                  entries, because it is quadratic
  ca.crl()        CertificateAuthority.crl() end to end with N revoked rows in the
                  SQLite store (read, build, sign, counter + audit in a transaction)

The CRLs built are checked: same entries as asked, signature valid, and (once per
size) ``openssl crl -inform DER -noout -text`` parses them with their reason codes.

Example:
  .venv/bin/python bench/crl.py
  .venv/bin/python bench/crl.py --sizes 10000,100000 --rounds 5
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _common import (
    PASSPHRASE,
    TRUST_DOMAIN,
    fill_sqlite,
    median,
    spread,
    synthetic_certificate_rows,
    timed,
    verdict,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import (
    REASONS,
    KeyType,
    PrivateKey,
    RevokedEntry,
    build_crl,
    signature_hash_for,
)

TARGET_SECONDS = {100_000: 2.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="10000,100000", help="entry counts (10000,100000)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; medians quoted (5)")
    p.add_argument(
        "--legacy-max",
        type=int,
        default=10_000,
        help="largest size for the quadratic builder-loop baseline (10000)",
    )
    p.add_argument("--legacy-rounds", type=int, default=3, help="rounds of the builder loop (3)")
    p.add_argument("--key-type", default="ec-p256", help="CA key type (ec-p256)")
    p.add_argument("--no-e2e", action="store_true", help="skip CertificateAuthority.crl()")
    p.add_argument("--tmpdir", default=None, help="where the temporary CA home goes")
    args = p.parse_args(argv)
    args.size_list = [int(x) for x in args.sizes.split(",") if x.strip()]
    if not args.size_list or any(not 1 <= n <= 1_000_000 for n in args.size_list):
        p.error("--sizes must be 1..1000000 each")
    if not 1 <= args.rounds <= 50 or not 1 <= args.legacy_rounds <= 20:
        p.error("--rounds must be 1..50 and --legacy-rounds 1..20")
    if args.legacy_max > 100_000:
        p.error("--legacy-max above 100000 takes too long (quadratic: ~1 min at 100000)")
    return args


def make_entries(n: int, now: datetime, seed: int = 3) -> list[RevokedEntry]:
    rng = random.Random(seed)
    reasons = list(REASONS)
    return [
        RevokedEntry(
            (1 << 158) | (i << 64) | rng.getrandbits(64),
            now - timedelta(seconds=rng.randrange(30 * 86400)),
            reasons[i % len(reasons)],
        )
        for i in range(n)
    ]


def entry_objects(entries: list[RevokedEntry]) -> list[x509.RevokedCertificate]:
    out = []
    for e in entries:
        b = (
            x509.RevokedCertificateBuilder()
            .serial_number(e.serial)
            .revocation_date(e.revoked_at.replace(microsecond=0))
        )
        if e.reason != "unspecified":
            b = b.add_extension(x509.CRLReason(REASONS[e.reason]), critical=False)
        out.append(b.build())
    return out


def builder_loop(
    issuer: x509.Certificate, key: PrivateKey, entries: list[RevokedEntry], now: datetime
) -> x509.CertificateRevocationList:
    """trustmesh's build_crl before this benchmark: the documented builder API."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now)
        .next_update(now + timedelta(hours=24))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
            critical=False,
        )
    )
    for revoked in entry_objects(entries):
        builder = builder.add_revoked_certificate(revoked)
    return builder.sign(key, signature_hash_for(key))


def check_crl(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, n: int, tmp: Path
) -> str:
    """Assert the CRL has n entries and a valid signature; return openssl's verdict."""
    if len(crl) != n:
        raise AssertionError(f"CRL has {len(crl)} entries, expected {n}")
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise AssertionError("CRL signature does not verify")
    openssl = shutil.which("openssl")
    if openssl is None:
        return "openssl not found; not checked"
    path = tmp / "check.crl"
    path.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    out = subprocess.run(
        [openssl, "crl", "-inform", "DER", "-in", str(path), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    serials = out.count("Serial Number:")
    reasons = out.count("X509v3 CRL Reason Code:")
    if serials != n:
        raise AssertionError(f"openssl lists {serials} entries, expected {n}")
    return f"openssl crl -text: {serials} entries, {reasons} with a reason code"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    kt = KeyType.parse(args.key_type)
    now = datetime.now(UTC).replace(microsecond=0)
    print(f"crl: sizes {args.size_list}, {args.rounds} rounds, CA key {kt.value}")
    print("figures are medians over rounds (seconds); per-round values in brackets\n")
    missed = []
    with tempfile.TemporaryDirectory(prefix="tm-bench-crl-", dir=args.tmpdir) as tmpdir:
        tmp = Path(tmpdir)
        ca = CertificateAuthority.init(
            tmp / "home", trust_domain=TRUST_DOMAIN, passphrase=PASSPHRASE, key_type=kt
        )
        try:
            key, inter = ca.signing_key, ca.intermediate
            build_crl(inter, key, [], number=1, now=now)  # warm up
            empty = [timed(lambda: build_crl(inter, key, [], number=1, now=now)) for _ in range(5)]
            t_empty = median(empty)
            print(f"empty CRL (build_crl, 0 entries)     {t_empty * 1e3:8.2f} ms")
            sample = ca.issue(f"spiffe://{TRUST_DOMAIN}/bench/sample")
            pem = sample.record.pem
            db_rows = 0
            for n in args.size_list:
                entries = make_entries(n, now)
                print(f"\n{n:,} entries")
                crl = build_crl(inter, key, entries, number=1, now=now)
                status = check_crl(crl, inter, n, tmp)
                t_build = [
                    timed(lambda e=entries: build_crl(inter, key, e, number=1, now=now))
                    for _ in range(args.rounds)
                ]
                t_objs = [timed(lambda e=entries: entry_objects(e)) for _ in range(args.rounds)]
                b, o = median(t_build), median(t_objs)
                target = TARGET_SECONDS.get(n)
                goal = f"; target <= {target:.1f} s: {verdict(b <= target)}" if target else ""
                if target and b > target:
                    missed.append(f"build_crl {n}")
                print(
                    f"  build_crl                          {b:8.3f} s  {spread(t_build, '{:.3f}')}"
                )
                print(f"    {n / b:,.0f} entries/s; {b / t_empty:.1f}x the empty CRL{goal}")
                print(f"    {status}")
                print(
                    f"  entry objects (cryptography)       {o:8.3f} s  {spread(t_objs, '{:.3f}')}"
                )
                print(f"    build_crl / entry objects = {b / o:.2f}")
                if n <= args.legacy_max:
                    t_loop = [
                        timed(lambda e=entries: builder_loop(inter, key, e, now))
                        for _ in range(args.legacy_rounds)
                    ]
                    lp = median(t_loop)
                    print(
                        f"  builder loop (previous build_crl)  {lp:8.3f} s  "
                        f"{spread(t_loop, '{:.3f}')}"
                    )
                    print(f"    build_crl is {lp / b:.1f}x faster")
                else:
                    print(f"  builder loop: skipped above --legacy-max={args.legacy_max}")
                if args.no_e2e:
                    continue
                add = n - db_rows  # the store keeps the rows of the smaller sizes
                rows = synthetic_certificate_rows(
                    add,
                    issuer=ca.issuer_id,
                    now=int(now.timestamp()),
                    pem=pem,
                    revoked_every=1,
                    start=db_rows,
                )
                fill_sqlite(tmp / "home" / "trustmesh.db", rows, add, label="revoked rows")
                db_rows = n
                # the sample certificate is not revoked, so the CRL lists exactly n
                crl_e2e = ca.crl()
                status = check_crl(crl_e2e, inter, n, tmp)
                t_e2e = [timed(ca.crl) for _ in range(args.rounds)]
                e2e = median(t_e2e)
                print(
                    f"  ca.crl() from SQLite               {e2e:8.3f} s  {spread(t_e2e, '{:.3f}')}"
                )
                print(f"    ca.crl() / build_crl = {e2e / b:.2f}; {status}")
            if not ca.verify_audit().ok:
                raise AssertionError("audit chain broken")
        finally:
            ca.close()
    print()
    print("all targets met" if not missed else f"target missed: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
