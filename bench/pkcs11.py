"""Issuance rate with the CA key in a PKCS#11 token (SoftHSM2) vs in a file, same run.

Two CAs are created in temporary homes: one with ``ca init`` (keys in files), one
with ``ca init --pkcs11`` on a fresh SoftHSM2 token (its own SOFTHSM2_CONF in a
temp directory). Each round signs the same number of pre-generated CSRs with
``CertificateAuthority.sign()`` on both (CSR checks, leaf signature, SQLite record
and audit event), alternating which goes first, and prints the median certs/s
of each, the ratio token/file, and a bare signature rate (``key.sign()`` alone)
to show what the token adds per signature.

Example:
  .venv/bin/python bench/pkcs11.py --rounds 5 --count 300
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import PASSPHRASE, TRUST_DOMAIN, make_csrs, median, need_tools, spread, timed
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "bench-pin"


def main() -> int:
    # This file is named like the python-pkcs11 package, which trustmesh.hsm imports on
    # first use: drop bench/ from the path so that 'import pkcs11' finds the package.
    here = Path(__file__).parent.resolve()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=300, help="certificates per round")
    parser.add_argument("--key-type", default="ec-p256", choices=["ec-p256", "ec-p384", "rsa-2048"])
    args = parser.parse_args()
    need_tools(["softhsm2-util"], "apt-get install softhsm2")
    key_type = KeyType.parse(args.key_type)
    with tempfile.TemporaryDirectory(prefix="tm-bench-pkcs11-") as tmp:
        work = Path(tmp)
        (work / "tokens").mkdir()
        conf = work / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {work / 'tokens'}\nobjectstore.backend = file\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN,
             "--so-pin", PIN],
            check=True,
            capture_output=True,
        )  # fmt: skip
        (work / "pin").write_text(PIN)
        uri = f"pkcs11:token=bench;object=ca?module-path={MODULE}&pin-source=file:{work / 'pin'}"
        cas = {
            "file": CertificateAuthority.init(
                work / "file", trust_domain=TRUST_DOMAIN, passphrase=PASSPHRASE, key_type=key_type
            ),
            "pkcs11": CertificateAuthority.init(
                work / "pkcs11", trust_domain=TRUST_DOMAIN, passphrase=None, key_type=key_type,
                pkcs11=uri,
            ),
        }  # fmt: skip
        csrs = make_csrs(key_type, args.count * args.rounds * 2, pool=8)
        rates: dict[str, list[float]] = {"file": [], "pkcs11": []}
        raw: dict[str, list[float]] = {"file": [], "pkcs11": []}
        digest = b"x" * 64
        used = 0
        for r in range(args.rounds):
            order = ["file", "pkcs11"] if r % 2 == 0 else ["pkcs11", "file"]
            for name in order:
                ca = cas[name]
                batch = csrs[used : used + args.count]
                used += args.count

                def run(ca: CertificateAuthority = ca, batch: list = batch) -> None:  # type: ignore[type-arg]
                    for c in batch:
                        ca.sign(c.pem)

                rates[name].append(args.count / timed(run))
                key = ca.signing_key

                def sig(key: object = key) -> None:
                    for _ in range(args.count):
                        if isinstance(key, ec.EllipticCurvePrivateKey):
                            key.sign(digest, ec.ECDSA(hashes.SHA256()))
                        else:
                            from cryptography.hazmat.primitives.asymmetric import padding

                            key.sign(digest, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[attr-defined]

                raw[name].append(args.count / timed(sig))
        for ca in cas.values():
            ca.close()
    print(f"key type {args.key_type}, {args.rounds} rounds of {args.count} certificates")
    print(f"{'':8} {'ca.sign certs/s':>16} {'rounds':<36} {'key.sign()/s':>13} rounds")
    for name in ("file", "pkcs11"):
        print(
            f"{name:8} {median(rates[name]):16.0f} {spread(rates[name]):<36} "
            f"{median(raw[name]):13.0f} {spread(raw[name])}"
        )
    print(f"ratio pkcs11/file (issuance): {median(rates['pkcs11']) / median(rates['file']):.2f}")
    print(f"ratio pkcs11/file (signature): {median(raw['pkcs11']) / median(raw['file']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
