"""Revocation at non-Python servers: `trustmesh revoke` -> the revoked client refused on
its next new connection at nginx, HAProxy and a Node.js `https` server (and the Java
`HttpsServer` with --java), beside the same figure for a `trustmesh run` service that
follows the revocation feed, measured in the same run (the baseline).

Setup (untimed): a fresh ec-p256 CA under `ca serve --ocsp-listen`; the servers from
tests/_peers_servers.py (the configs docs/runtimes shows), each with its identity (DNS
localhost, IP 127.0.0.1) and chain CRL file from a running `trustmesh agent` (--ttl 1h:
no renewal during the run); a `trustmesh run` whoami service with `--ca` (feed
subscriber); one client identity (`agent --once`) per revocation and server.

Per revocation and server: the client is accepted once; the clock starts; `trustmesh
revoke SERIAL` (the CLI on the CA home); nothing else is done: each server's agent
rewrites its --crl file from the revocation feed and runs its hook (nginx: --on-crl
`nginx -s reload`; HAProxy: --haproxy-socket, the runtime API; Node, Java: they watch the
file); the client opens a new connection every 20 ms until refused (bounded by
--timeout). The clock stops at the first refusal. For `trustmesh run` the feed carries it.

Figures: p50 and p99 per server over --revocations (30) revocations, and the ratio of
the p50 to the feed baseline's p50. The machine is small and shared: read medians.

Example:
  .venv/bin/python bench/revocation_peers.py
  .venv/bin/python bench/revocation_peers.py --revocations 10 --java
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import print_machine  # noqa: E402
from tests._peers_servers import (  # noqa: E402
    Client,
    PeerServer,
    mesh,
    peer_servers,
    wait_until,
)
from tests._runtimes import running_service  # noqa: E402
from tests.conftest import PASSPHRASE  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--revocations", type=int, default=30, help="revocations per server (30)")
    p.add_argument("--timeout", type=float, default=10.0, help="bound per revocation, s (10)")
    p.add_argument("--java", action="store_true", help="also the Java HttpsServer")
    args = p.parse_args()
    if not 1 <= args.revocations <= 200:
        p.error("--revocations must be 1..200")
    os.environ["TRUSTMESH_CA_PASSPHRASE"] = PASSPHRASE.decode()
    print_machine({"nginx": ["nginx", "-v"], "haproxy": ["haproxy", "-v"], "node": ["node", "-v"]})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["TRUSTMESH_HOME"] = str(work / "unused-home")
        (work / "ca").mkdir()
        with mesh(work / "ca") as ca:
            server = ca.server
            with peer_servers(ca, work / "peers", ttl="1h") as started:
                servers = [
                    s
                    for s in started.values()
                    if isinstance(s, PeerServer) and (args.java or s.kind != "java")
                ]
                for kind, why in started.items():
                    if isinstance(why, str):
                        print(f"{kind}: skipped ({why})")
                results: dict[str, list[float]] = {s.kind: [] for s in servers}
                timeouts: dict[str, int] = {s.kind: 0 for s in servers}
                service_dir = work / "run"
                service_dir.mkdir()
                svc_id = "spiffe://example.org/bench/whoami"
                ca.enroll(svc_id, service_dir / "certs", "--dns", "localhost", "--ip", "127.0.0.1")
                with running_service(
                    service_dir,
                    *("--cert-dir", str(service_dir / "certs"), "--no-policy"),
                    *("--ca", server.url),
                ) as service:
                    results["run (feed)"] = []
                    timeouts["run (feed)"] = 0
                    for i in range(args.revocations):
                        for target in [*servers, None]:
                            name = "run (feed)" if target is None else target.kind
                            ident = ca.enroll(
                                f"spiffe://example.org/bench/c{i}-{name.split()[0]}",
                                work / "clients" / f"{i}-{name.split()[0]}",
                            )
                            client = Client(ident, ident / "bundle.pem")
                            if target is None:

                                def refused(client: Client = client) -> bool:
                                    with httpx.Client(verify=client.context, timeout=10) as h:
                                        try:
                                            return h.get(service.url()).status_code != 200
                                        except httpx.TransportError:
                                            return True

                            else:

                                def refused(
                                    client: Client = client, target: PeerServer = target
                                ) -> bool:
                                    return client.refused(target)

                            assert not refused(), f"{name} refused a good client"
                            start = time.monotonic()
                            ca.revoke(ident)
                            took = wait_until(refused, args.timeout, step=0.02)
                            if took is None:
                                timeouts[name] += 1
                            else:
                                results[name].append(time.monotonic() - start)
    print()
    print(f"revoke -> refused on the next new connection, {args.revocations} revocations each")
    print()
    print("| server | p50 ms | p99 ms | max ms | timeouts | p50 / feed p50 |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = statistics.median(results["run (feed)"]) if results["run (feed)"] else float("nan")
    for name, values in results.items():
        if not values:
            print(f"| {name} | - | - | - | {timeouts[name]} | - |")
            continue
        p50 = statistics.median(values)
        print(
            f"| {name} | {p50 * 1000:.0f} | {percentile(values, 0.99) * 1000:.0f} | "
            f"{max(values) * 1000:.0f} | {timeouts[name]} | {p50 / base:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
