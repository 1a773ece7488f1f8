"""ACME orders per second and finalize latency, beside direct renewal, on one `ca serve`.

Setup (untimed): a fresh ec-p256 CA (SQLite in a temporary home) with one ACME
provisioner (no EAB, http-01 on a local challenge server), served by `python -m
trustmesh ca serve` on 127.0.0.1; one ACME account (the `acme` package, ES256) and
one workload identity for renewals.

Each round, in alternating order:

  acme     --orders complete orders one after another with the `acme` package:
           newOrder, answer http-01 (the CA fetches the token from the challenge
           server), poll the authorization, finalize (CSR checks, sign, record +
           audit, order valid in one transaction), download the chain. Orders/s is
           orders / wall time; finalize latency is the finalize POST alone (until the
           order answers valid), p50/p99 over the round.
  renew    --renewals POST /v1/renew {csr} over mTLS (httpx, one keep-alive
           connection), one after another: the same signing and recording path
           without ACME.

  pebble   with --pebble: the same order loop as `acme`, same client, against Debian's
           pebble (EAB off, PEBBLE_VA_NOSLEEP=1, no nonce rejection, no authorization
           reuse; names resolved by pebble-challtestsrv to the same challenge server).
           pebble finalizes in the background, so finalize latency there runs until the
           order answers valid (polled every 10 ms; trustmesh answers valid at once).
           Both print phases_p50_ms: newOrder, validation (answer + polls until the
           authorization is valid) and the download.
           The ratio printed is trustmesh orders/s over pebble's.

Figures are medians over --rounds. Everything is on 127.0.0.1; counts are bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.server
import itertools
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

# This script is bench/acme.py: without bench/ on sys.path, `acme` is the ACME client package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
from acme import challenges, client, crypto_util, messages  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from josepy import jwa, jwk  # noqa: E402

from trustmesh.authority import CertificateAuthority  # noqa: E402
from trustmesh.pki import KeyType, pem_certificates  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests._pebble import (  # noqa: E402
    CHALLTESTSRV,
    MISSING,
    PEBBLE,
    running_challtestsrv,
    running_pebble,
)

PASSPHRASE = b"bench passphrase"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Answers(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[dict[str, str]] = {}

    def do_GET(self) -> None:
        body = self.answers.get(self.path.rsplit("/", 1)[-1], "")
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


def key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


_NAMES = itertools.count()


#: Per-phase latencies (ms) of every timed ACME order, by server: where an order's time goes.
PHASES: dict[str, dict[str, list[float]]] = {}


def acme_round(
    acme: client.ClientV2, key: jwk.JWK, orders: int, server: str = "warm-up"
) -> tuple[float, list[float]]:
    finalize: list[float] = []
    phases = PHASES.setdefault(server, {"new_order": [], "validate": [], "download": []})
    start = time.perf_counter()
    for _ in range(orders):
        t_order = time.perf_counter()
        # A name no earlier order used: pebble may reuse a valid authorization for a name
        # (even with PEBBLE_AUTHZREUSE=0, about one in a hundred), which skips validation.
        csr = crypto_util.make_csr(key_pem(), [f"bench{next(_NAMES)}.localhost"])
        order = acme.new_order(csr)
        t_validate = time.perf_counter()
        phases["new_order"].append((t_validate - t_order) * 1000)
        for authz in order.authorizations:
            body = next(c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01))
            response, validation = body.response_and_validation(key)
            Answers.answers[body.chall.encode("token")] = validation
            acme.answer_challenge(body, response)
        # The acme package's poll_* helpers sleep a whole second between polls; poll
        # every 10 ms instead so the client's pauses do not hide the server.
        while True:
            states = {acme.poll(a)[0].body.status.name for a in order.authorizations}
            if states == {"valid"}:
                break
            if "invalid" in states:
                raise SystemExit("an http-01 validation failed")
            time.sleep(0.01)
        t0 = time.perf_counter()
        phases["validate"].append((t0 - t_validate) * 1000)
        done = acme.begin_finalization(order)
        while done.body.status.name == "processing":  # pebble signs in the background
            time.sleep(0.01)
            done = done.update(body=messages.Order.from_json(acme._post_as_get(done.uri).json()))
        finalize.append((time.perf_counter() - t0) * 1000)
        if done.body.status.name != "valid" or done.body.certificate is None:
            raise SystemExit(f"finalize answered {done.body.status}, not valid")
        t_download = time.perf_counter()
        chain = acme._post_as_get(done.body.certificate).text  # the download, POST-as-GET
        phases["download"].append((time.perf_counter() - t_download) * 1000)
        if "BEGIN CERTIFICATE" not in chain:
            raise SystemExit("an ACME order finished without a certificate")
    return orders / (time.perf_counter() - start), finalize


def renew_round(http: httpx.Client, url: str, csrs: list[str]) -> tuple[float, list[float]]:
    latencies: list[float] = []
    start = time.perf_counter()
    for csr in csrs:
        t0 = time.perf_counter()
        answer = http.post(f"{url}/v1/renew", json={"csr": csr})
        latencies.append((time.perf_counter() - t0) * 1000)
        if answer.status_code != 201:
            raise SystemExit(f"renew answered {answer.status_code}: {answer.text}")
    return len(csrs) / (time.perf_counter() - start), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--orders", type=int, default=30)
    parser.add_argument("--renewals", type=int, default=60)
    parser.add_argument(
        "--pebble", action="store_true", help="also run the order loop against Debian's pebble"
    )
    args = parser.parse_args()
    if args.pebble and (PEBBLE is None or CHALLTESTSRV is None):
        raise SystemExit(f"--pebble: {MISSING}")
    with tempfile.TemporaryDirectory(prefix="bench-acme-") as tmp:
        work = Path(tmp)
        home = work / "home"
        ca = CertificateAuthority.init(
            home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
        )
        http_port, api_port = free_port(), free_port()
        with (home / "config.toml").open("a") as config:
            config.write(
                f'\n[acme.provisioners.bench]\neab_required = false\nchallenges = ["http-01"]\n'
                f"http01_port = {http_port}\n"
            )
        identity = ca.issue("spiffe://example.org/bench/renewer")
        (work / "id.pem").write_bytes(pem_certificates(identity.chain))
        assert identity.key is not None
        (work / "id.key").write_bytes(
            identity.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (work / "bundle.pem").write_bytes(pem_certificates(ca.bundle))
        ca.close()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", http_port), Answers)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = {
            **os.environ,
            "TRUSTMESH_HOME": str(home),
            "TRUSTMESH_CA_PASSPHRASE": PASSPHRASE.decode(),
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "ca",
                "serve",
                "--listen",
                f"127.0.0.1:{api_port}",
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"https://127.0.0.1:{api_port}"
        verify = ssl.create_default_context(cafile=str(work / "bundle.pem"))
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", verify=verify).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
            if time.monotonic() > deadline:
                raise SystemExit("ca serve did not start")
        stack = contextlib.ExitStack()
        try:
            pebble_acme = None
            if args.pebble:
                dns_port, challtestsrv = stack.enter_context(running_challtestsrv(work))
                peb = stack.enter_context(
                    running_pebble(
                        work / "pebble",
                        http_port=http_port,
                        tls_port=free_port(),
                        dns_port=dns_port,
                        challtestsrv=challtestsrv,
                        eab_keys=0,
                    )
                )
                pebble_key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
                pebble_net = client.ClientNetwork(
                    pebble_key,
                    alg=jwa.ES256,
                    verify_ssl=str(peb.bundle),  # type: ignore[arg-type]
                )
                pebble_acme = client.ClientV2(
                    client.ClientV2.get_directory(peb.directory, pebble_net), pebble_net
                )
                pebble_acme.new_account(
                    messages.NewRegistration.from_data(terms_of_service_agreed=True)
                )
            key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
            # requests takes a CA file path for verify; acme annotates it as bool.
            bundle = str(work / "bundle.pem")
            net = client.ClientNetwork(key, alg=jwa.ES256, verify_ssl=bundle)  # type: ignore[arg-type]
            directory = client.ClientV2.get_directory(f"{url}/acme/bench/directory", net)
            acme = client.ClientV2(directory, net)
            acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))
            mtls = ssl.create_default_context(cafile=str(work / "bundle.pem"))
            mtls.load_cert_chain(work / "id.pem", work / "id.key")
            renew_key = ec.generate_private_key(ec.SECP256R1())
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(
                    x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "example.org")])
                )
                .add_extension(
                    x509.SubjectAlternativeName(
                        [x509.UniformResourceIdentifier("spiffe://example.org/bench/renewer")]
                    ),
                    critical=False,
                )
                .sign(renew_key, hashes.SHA256())
                .public_bytes(serialization.Encoding.PEM)
                .decode()
            )
            results: dict[str, list[tuple[float, list[float]]]] = {"acme": [], "renew": []}
            if pebble_acme is not None:
                results["pebble"] = []
            with httpx.Client(verify=mtls) as api:
                acme_round(acme, key, 3)  # warm-up
                renew_round(api, url, [csr] * 5)
                if pebble_acme is not None:
                    acme_round(pebble_acme, pebble_key, 3)
                for r in range(args.rounds):
                    order = list(results) if r % 2 == 0 else list(reversed(results))
                    for target in order:
                        if target == "acme":
                            results["acme"].append(acme_round(acme, key, args.orders, "acme"))
                        elif target == "pebble":
                            assert pebble_acme is not None
                            results["pebble"].append(
                                acme_round(pebble_acme, pebble_key, args.orders, "pebble")
                            )
                        else:
                            results["renew"].append(renew_round(api, url, [csr] * args.renewals))
        finally:
            stack.close()
            proc.terminate()
            proc.wait(timeout=15)
            server.shutdown()
        summary = {
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python "
            f"{platform.python_version()}",
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
            "rounds": args.rounds,
        }
        for name, runs in results.items():
            summary[name] = {
                "per_second": round(statistics.median(r for r, _ in runs), 1),
                "p50_ms": round(statistics.median(pct(lat, 50) for _, lat in runs), 1),
                "p99_ms": round(statistics.median(pct(lat, 99) for _, lat in runs), 1),
                "per_round_per_second": [round(r, 1) for r, _ in runs],
            }
            if name in PHASES:  # newOrder; answer + polls until valid; the chain download
                summary[name]["phases_p50_ms"] = {
                    phase: round(pct(values, 50), 1) for phase, values in PHASES[name].items()
                }
        if "pebble" in summary:
            summary["trustmesh_over_pebble_orders"] = round(
                summary["acme"]["per_second"] / summary["pebble"]["per_second"], 2
            )
        summary["load_average"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
