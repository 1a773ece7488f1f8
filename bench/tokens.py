"""Access-token verification per second: trustmesh.tokens beside raw cryptography.

For ES256 (P-256) and RS256 (RSA-2048) it measures, median of several rounds,
over the same set of distinct, realistic RFC 9068 tokens:

  raw          cryptography's public_key.verify() on each token's signature alone
               (R||S already converted to DER for ECDSA): the ceiling
  cold         Verifier.verify_access_token() with the token cache off: parse,
               pinned-key lookup, signature, every claim check, revocation, binding
  cold async   AsyncVerifier.verify_access_token() awaited in a loop, cache off
  cached       Verifier with the verified-token cache, every token seen before
  joserfc      joserfc.jwt.decode() + JWTClaimsRegistry.validate() (for comparison:
               why the hot path calls cryptography directly)

raw, cold, cold async and joserfc alternate every --chunk tokens within a round,
so a noisy shared machine slows them alike; "cold / raw" is the median of the
per-round ratios. The keys come over real HTTPS from a local provider (certificate from a
throwaway trustmesh CA), as in production; fetching is not timed.

Targets (issue 4): cold >= 80% of raw; cached >= 100,000/s.

Example:
  .venv/bin/python bench/tokens.py
  .venv/bin/python bench/tokens.py --tokens 2000 --rounds 7 --markdown
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from _common import PASSPHRASE, TRUST_DOMAIN, median, spread, timed, verdict
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests._provider import Minter, ProviderServer, server_tls

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType
from trustmesh.tokens import AsyncVerifier, IssuerConfig, Verifier
from trustmesh.tokens._keys import b64url_decode


def raw_checks(alg: str, tokens: list[str], key: ECKey | RSAKey) -> Callable[[range], None]:
    """One verify() per token on pre-decoded inputs: the cryptography ceiling."""
    public = key.public_key
    items = []
    for token in tokens:
        h, p, s = token.split(".")
        sig = b64url_decode(s)
        if alg == "ES256":
            r, t = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            sig = encode_dss_signature(r, t)
        items.append((f"{h}.{p}".encode(), sig))
    if isinstance(public, ec.EllipticCurvePublicKey):
        ec_key, scheme = public, ec.ECDSA(hashes.SHA256())

        def run(indexes: range) -> None:
            for i in indexes:
                data, sig = items[i]
                ec_key.verify(sig, data, scheme)

        return run
    assert isinstance(public, rsa.RSAPublicKey)
    rsa_key, pkcs, sha = public, padding.PKCS1v15(), hashes.SHA256()

    def run_rsa(indexes: range) -> None:
        for i in indexes:
            data, sig = items[i]
            rsa_key.verify(sig, data, pkcs, sha)

    return run_rsa


def paired(variants: dict[str, Callable[[range], None]], n: int, chunk: int) -> dict[str, float]:
    """Seconds per variant over all n tokens, alternating variants every ``chunk`` tokens.

    Fine-grained alternation puts the noise of a shared machine on every variant
    alike, so the ratios between them hold even when absolute rates wobble.
    """
    totals = dict.fromkeys(variants, 0.0)
    gc.collect()
    for start in range(0, n, chunk):
        indexes = range(start, min(n, start + chunk))
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(indexes)
            totals[name] += time.perf_counter() - t0
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2000, help="distinct tokens per algorithm")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=50, help="tokens per alternation")
    parser.add_argument(
        "--cached-passes", type=int, default=20, help="passes over the tokens when cached"
    )
    parser.add_argument("--markdown", action="store_true", help="also print a RESULTS.md section")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.init(
            Path(tmp) / "home",
            trust_domain=TRUST_DOMAIN,
            passphrase=PASSPHRASE,
            key_type=KeyType.EC_P256,
        )
        ctx, bundle = server_tls(ca, Path(tmp) / "srv")
        ca.close()
        provider = ProviderServer(ctx).start()
        minter = Minter(issuer=provider.url)
        provider.routes["/.well-known/openid-configuration"] = {
            "issuer": provider.url,
            "jwks_uri": provider.url + "/jwks",
        }
        provider.routes["/jwks"] = minter.jwks()
        config = IssuerConfig(provider.url, audiences=["orders"], ca_bundle=bundle)
        rows: list[tuple[str, dict[str, list[float]], list[float]]] = []
        try:
            for alg in ("ES256", "RS256"):
                key = minter.ec if alg == "ES256" else minter.rsa
                tokens = [minter.token(alg) for _ in range(args.tokens)]
                n = len(tokens)
                raw = raw_checks(alg, tokens, key)
                cold = Verifier(config, token_cache_size=0)
                cached = Verifier(config, token_cache_size=n)
                cold.verify_access_token(tokens[0])  # fetch the keys (not timed)
                for t in tokens:
                    cached.verify_access_token(t)
                loop = asyncio.new_event_loop()
                averifier = loop.run_until_complete(_make_async(config))
                loop.run_until_complete(averifier.verify_access_token(tokens[0]))

                async def async_cold(
                    ix: range, av: AsyncVerifier = averifier, ts: list[str] = tokens
                ) -> None:
                    for i in ix:
                        await av.verify_access_token(ts[i])

                keyset = KeySet([key])
                registry = jwt.JWTClaimsRegistry(
                    iss={"essential": True, "value": provider.url},
                    aud={"essential": True, "value": "orders"},
                )

                def joserfc_run(
                    ix: range,
                    ts: list[str] = tokens,
                    ks: KeySet = keyset,
                    a: str = alg,
                    reg: jwt.JWTClaimsRegistry = registry,
                ) -> None:
                    for i in ix:
                        reg.validate(jwt.decode(ts[i], ks, algorithms=[a]).claims)

                def cold_run(ix: range, v: Verifier = cold, ts: list[str] = tokens) -> None:
                    for i in ix:
                        v.verify_access_token(ts[i])

                def async_run(ix: range, lp: asyncio.AbstractEventLoop = loop) -> None:
                    lp.run_until_complete(async_cold(ix))

                def cached_run(
                    v: Verifier = cached, ts: list[str] = tokens, k: int = args.cached_passes
                ) -> None:
                    for _ in range(k):
                        for t in ts:
                            v.verify_access_token(t)

                variants = {
                    "raw": raw,
                    "cold": cold_run,
                    "cold async": async_run,
                    "joserfc": joserfc_run,
                }
                rates: dict[str, list[float]] = {k: [] for k in (*variants, "cached")}
                ratios: list[float] = []
                for _ in range(args.rounds):
                    seconds = paired(variants, n, args.chunk)
                    for name, spent in seconds.items():
                        rates[name].append(n / spent)
                    ratios.append(seconds["raw"] / seconds["cold"])
                    rates["cached"].append(n * args.cached_passes / timed(cached_run))
                loop.run_until_complete(averifier.aclose())
                loop.close()
                cold.close()
                cached.close()
                rows.append((alg, rates, ratios))
        finally:
            provider.stop()

    print(
        f"\ntokens.py: {args.tokens} tokens per algorithm, {args.rounds} rounds, "
        f"median (per-round values)"
    )
    results = []
    for alg, rates, ratios in rows:
        raw_rate = median(rates["raw"])
        print(f"\n{alg}")
        for name, values in rates.items():
            rate = median(values)
            share = f"{rate / raw_rate:7.1%} of raw" if name not in ("raw", "cached") else ""
            print(f"  {name:<11} {rate:>11,.0f}/s  {share:<15} {spread(values)}")
        cold_ratio = median(ratios)
        print(f"  cold / raw per round: {spread([100 * r for r in ratios])} %")
        cached_rate = median(rates["cached"])
        print(
            f"  target cold >= 80% of raw: {verdict(cold_ratio >= 0.8)} ({cold_ratio:.1%}); "
            f"cached >= 100,000/s: {verdict(cached_rate >= 100_000)} ({cached_rate:,.0f}/s)"
        )
        results.append((alg, rates, cold_ratio, cached_rate))
    if args.markdown:
        _markdown(args, results)


async def _make_async(config: IssuerConfig) -> AsyncVerifier:
    return AsyncVerifier(config, token_cache_size=0)


def _markdown(
    args: argparse.Namespace, results: list[tuple[str, dict[str, list[float]], float, float]]
) -> None:
    import cryptography

    today = datetime.now(UTC).strftime("%Y-%m-%d")
    print(f"\n## Token verification ({today})\n")
    print(
        f"`make bench-tokens` (`bench/tokens.py --tokens {args.tokens} --rounds {args.rounds}`), "
        f"{platform.machine()}, {os.cpu_count()} cores shared with two other engineers' runs, "
        f"Python {platform.python_version()}, cryptography {cryptography.__version__}. "
        f"Medians of {args.rounds} rounds; per-round values in brackets.\n"
    )
    print("| alg | raw | cold (cache off) | cold / raw | cold async | cached | joserfc |")
    print("|---|---|---|---|---|---|---|")
    for alg, rates, ratio, cached in results:
        m = {k: median(v) for k, v in rates.items()}
        cells = [
            alg,
            f"{m['raw']:,.0f}/s",
            f"{m['cold']:,.0f}/s",
            f"**{ratio:.1%}**",
            f"{m['cold async']:,.0f}/s",
            f"**{cached:,.0f}/s** {spread(rates['cached'])}",
            f"{m['joserfc']:,.0f}/s",
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    for alg, _, ratio, cached in results:
        cold_ok, cached_ok = verdict(ratio >= 0.8), verdict(cached >= 100_000)
        print(f"- {alg}: cold >= 80% of raw {cold_ok}; cached >= 100,000/s {cached_ok}.")


if __name__ == "__main__":
    main()
