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

The keys come over real HTTPS from a local provider (certificate from a
throwaway trustmesh CA), as in production; fetching is not timed.

Targets (issue 4): cold >= 80% of raw; cached >= 100,000/s.

Example:
  .venv/bin/python bench/tokens.py
  .venv/bin/python bench/tokens.py --tokens 2000 --rounds 7 --markdown
"""

from __future__ import annotations

import argparse
import asyncio
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
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey, KeySet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests._provider import Minter, ProviderServer, server_tls  # noqa: E402

from trustmesh.authority import CertificateAuthority  # noqa: E402
from trustmesh.pki import KeyType  # noqa: E402
from trustmesh.tokens import AsyncVerifier, IssuerConfig, Verifier  # noqa: E402
from trustmesh.tokens._keys import b64url_decode  # noqa: E402


def raw_checks(alg: str, tokens: list[str], key: ECKey | RSAKey) -> Callable[[], None]:
    """One verify() per token on pre-decoded inputs: the cryptography ceiling."""
    public = key.public_key
    items = []
    for token in tokens:
        h, p, s = token.split(".")
        sig = b64url_decode(s)
        if alg == "ES256":
            sig = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        items.append((f"{h}.{p}".encode(), sig))
    if alg == "ES256":
        assert isinstance(public, ec.EllipticCurvePublicKey)
        scheme = ec.ECDSA(hashes.SHA256())

        def run() -> None:
            for data, sig in items:
                public.verify(sig, data, scheme)  # type: ignore[union-attr]

    else:
        pkcs, sha = padding.PKCS1v15(), hashes.SHA256()

        def run() -> None:
            for data, sig in items:
                public.verify(sig, data, pkcs, sha)  # type: ignore[call-arg]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000, help="distinct tokens per algorithm")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cached-passes", type=int, default=20, help="passes over the tokens when cached")
    parser.add_argument("--markdown", action="store_true", help="also print a RESULTS.md section")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.init(
            Path(tmp) / "home", trust_domain=TRUST_DOMAIN, passphrase=PASSPHRASE, key_type=KeyType.EC_P256
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
        rows: list[tuple[str, dict[str, list[float]]]] = []
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

                async def async_cold(av: AsyncVerifier = averifier, ts: list[str] = tokens) -> None:
                    for t in ts:
                        await av.verify_access_token(t)

                keyset = KeySet([key])
                registry = jwt.JWTClaimsRegistry(iss={"essential": True, "value": provider.url},
                                                 aud={"essential": True, "value": "orders"})

                def joserfc_run(ts: list[str] = tokens, ks: KeySet = keyset, a: str = alg) -> None:
                    for t in ts:
                        registry.validate(jwt.decode(t, ks, algorithms=[a]).claims)

                def cold_run(v: Verifier = cold, ts: list[str] = tokens) -> None:
                    for t in ts:
                        v.verify_access_token(t)

                def cached_run(v: Verifier = cached, ts: list[str] = tokens, k: int = args.cached_passes) -> None:
                    for _ in range(k):
                        for t in ts:
                            v.verify_access_token(t)

                rates: dict[str, list[float]] = {k: [] for k in ("raw", "cold", "cold async", "cached", "joserfc")}
                for _ in range(args.rounds):
                    # Interleaved so machine noise hits every variant alike.
                    rates["raw"].append(n / timed(raw))
                    rates["cold"].append(n / timed(cold_run))
                    rates["cold async"].append(n / timed(lambda: loop.run_until_complete(async_cold())))
                    rates["cached"].append(n * args.cached_passes / timed(cached_run))
                    rates["joserfc"].append(n / timed(joserfc_run))
                loop.run_until_complete(averifier.aclose())
                loop.close()
                cold.close()
                cached.close()
                rows.append((alg, rates))
        finally:
            provider.stop()

    print(f"\ntokens.py: {args.tokens} tokens per algorithm, {args.rounds} rounds, median (per-round values)")
    results = []
    for alg, rates in rows:
        raw_rate = median(rates["raw"])
        print(f"\n{alg}")
        for name, values in rates.items():
            rate = median(values)
            share = f"{rate / raw_rate:7.1%} of raw" if name != "raw" else ""
            print(f"  {name:<11} {rate:>11,.0f}/s  {share:<15} {spread(values)}")
        cold_ratio = median(rates["cold"]) / raw_rate
        cached_rate = median(rates["cached"])
        print(f"  target cold >= 80% of raw: {verdict(cold_ratio >= 0.8)} ({cold_ratio:.1%}); "
              f"cached >= 100,000/s: {verdict(cached_rate >= 100_000)} ({cached_rate:,.0f}/s)")
        results.append((alg, rates, cold_ratio, cached_rate))
    if args.markdown:
        _markdown(args, results)


async def _make_async(config: IssuerConfig) -> AsyncVerifier:
    return AsyncVerifier(config, token_cache_size=0)


def _markdown(args: argparse.Namespace, results: list[tuple[str, dict[str, list[float]], float, float]]) -> None:
    import cryptography

    today = datetime.now(UTC).strftime("%Y-%m-%d")
    print(f"\n## Token verification ({today})\n")
    print(f"`make bench-tokens` (`bench/tokens.py --tokens {args.tokens} --rounds {args.rounds}`), "
          f"{platform.machine()}, {os.cpu_count()} cores shared with two other engineers' test runs, "
          f"Python {platform.python_version()}, cryptography {cryptography.__version__}. "
          f"Medians of {args.rounds} interleaved rounds; per-round values in brackets.\n")
    print("| alg | raw cryptography | cold (cache off) | cold / raw | cold async | cached | joserfc decode+validate |")
    print("|---|---|---|---|---|---|---|")
    for alg, rates, ratio, cached in results:
        m = {k: median(v) for k, v in rates.items()}
        print(f"| {alg} | {m['raw']:,.0f}/s | {m['cold']:,.0f}/s {spread(rates['cold'])} | **{ratio:.1%}** "
              f"| {m['cold async']:,.0f}/s | **{cached:,.0f}/s** {spread(rates['cached'])} | {m['joserfc']:,.0f}/s |")
    print()
    for alg, _, ratio, cached in results:
        print(f"- {alg}: cold >= 80% of raw {verdict(ratio >= 0.8)}; cached >= 100,000/s {verdict(cached >= 100_000)}.")


if __name__ == "__main__":
    main()
