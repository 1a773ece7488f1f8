"""The SPIFFE Workload API of `trustmesh workload-agent` (issue 16): FetchX509SVID latency
and SVIDs served per second, with baselines in the same run.

One `ca serve` and one `workload-agent` (one entry for this process's uid) on this machine.
Each round measures, alternating:

- ``fetch``: FetchX509SVID as a workload calls it (open the stream, take the first
  response, cancel), ``--calls`` times in a row on one channel; latency p50/p99, SVIDs/s;
- ``fetch, new connection``: the same, a new channel (Unix connection) per call, so the
  relay's accept and the SO_PEERCRED/``/proc`` attestation are in every call;
- ``concurrent``: ``--clients`` threads, each with its own channel, ``--per-client``
  calls each; SVIDs/s over all of them;
- baseline ``reflection``: a gRPC reflection ``list_services`` round trip on the same
  socket (relay + gRPC, no attestation, no SVID);
- baseline ``files``: reading and parsing the key, chain and bundle files the agent code
  (`trustmesh.agent.Agent`, as `trustmesh agent`) keeps on disk for the node identity.

Usage: python bench/workload_api.py [--rounds 5] [--calls 300] [--clients 8] [--per-client 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
from _api import ca_serve, init_home, percentile
from _common import PASSPHRASE, loadavg, median
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from trustmesh.authority import CertificateAuthority
from trustmesh.workload._proto import workload_pb2 as pb
from trustmesh.workload._proto import workload_pb2_grpc as pb_grpc

NODE = "spiffe://example.org/node/bench"
APP = "spiffe://example.org/svc/bench"
META = (("workload.spiffe.io", "true"),)


def fetch_once(ch: grpc.Channel) -> int:
    stream = pb_grpc.SpiffeWorkloadAPIStub(ch).FetchX509SVID(  # type: ignore[no-untyped-call]
        pb.X509SVIDRequest(), metadata=META, timeout=10
    )
    response = next(stream)
    stream.cancel()
    return len(response.svids)


def reflection_once(ch: grpc.Channel) -> int:
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)  # type: ignore[no-untyped-call]
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), timeout=10)
    return len(next(responses).list_services_response.service)


def files_once(node_dir: Path) -> int:
    chain = x509.load_pem_x509_certificates((node_dir / "chain.pem").read_bytes())
    serialization.load_pem_private_key((node_dir / "key.pem").read_bytes(), password=None)
    x509.load_pem_x509_certificates((node_dir / "bundle.pem").read_bytes())
    return len(chain[:1])


def timed_calls(call: Callable[[], int], count: int) -> tuple[list[float], float]:
    """Run ``call`` ``count`` times; return each latency and the calls per second."""
    latencies = []
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        if call() < 1:
            raise RuntimeError("a call returned nothing")
        latencies.append(time.perf_counter() - t0)
    return latencies, count / (time.perf_counter() - start)


def concurrent_rate(target: str, clients: int, per_client: int) -> float:
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def work() -> None:
        with grpc.insecure_channel(target) as ch:
            fetch_once(ch)  # connect before the clock starts
            barrier.wait()
            try:
                for _ in range(per_client):
                    fetch_once(ch)
            except BaseException as exc:  # reported below
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} concurrent clients failed: {errors[0]}")
    return clients * per_client / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-workload-"))
    try:
        run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> None:
    home = work / "home"
    bundle = init_home(home, None)
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        token = ca.create_join_token(NODE, actor="bench")
        ca.create_entry(APP, node_id=NODE, selectors=[f"unix:uid:{os.getuid()}"], actor="bench")
    sock = work / "run" / "agent.sock"
    with ca_serve(home, bundle, work / "serve.log") as server:
        log = (work / "agent.log").open("w")
        agent = subprocess.Popen(
            [
                *(sys.executable, "-m", "trustmesh", "workload-agent", "--ca", server.url),
                *("--node", NODE, "--data", str(work / "data"), "--bundle", str(bundle)),
                *("--token", token, "--socket", f"unix://{sock}", "--log-level", "warning"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            target = f"unix:{sock}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    with grpc.insecure_channel(target) as ch:
                        if fetch_once(ch):
                            break
                except grpc.RpcError:
                    pass
                if agent.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "workload-agent did not serve: " + (work / "agent.log").read_text()
                    )
                time.sleep(0.2)
            measure(target, work / "data" / "node", args)
        finally:
            agent.terminate()
            agent.wait(15)
            log.close()


def measure(target: str, node_dir: Path, args: argparse.Namespace) -> None:
    rows: dict[str, dict[str, list[float]]] = {}

    def record(name: str, latencies: list[float], rate: float) -> None:
        row = rows.setdefault(name, {"p50": [], "p99": [], "rate": []})
        row["p50"].append(percentile(latencies, 50) * 1000)
        row["p99"].append(percentile(latencies, 99) * 1000)
        row["rate"].append(rate)

    def fresh_channel_fetch() -> int:
        with grpc.insecure_channel(target) as ch:
            return fetch_once(ch)

    for round_no in range(args.rounds):
        with grpc.insecure_channel(target) as ch:
            fetch_once(ch)
            reflection_once(ch)
            record("fetch", *timed_calls(lambda: fetch_once(ch), args.calls))
            record("reflection", *timed_calls(lambda: reflection_once(ch), args.calls))
        record("fetch, new connection", *timed_calls(fresh_channel_fetch, args.calls // 3))
        record("files", *timed_calls(lambda: files_once(node_dir), args.calls))
        rate = concurrent_rate(target, args.clients, args.per_client)
        rows.setdefault("concurrent", {"p50": [], "p99": [], "rate": []})["rate"].append(rate)
        print(f"round {round_no + 1}/{args.rounds} done (load {loadavg()})", file=sys.stderr)

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"{datetime.now(UTC):%Y-%m-%d}, commit {commit}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"load {loadavg()}; {args.rounds} rounds, medians of rounds "
        f"[per-round rates in brackets]\n"
    )
    print("| what | p50 ms | p99 ms | per second |")
    print("|---|---|---|---|")
    labels = {
        "fetch": f"FetchX509SVID, one channel, {args.calls} in a row",
        "fetch, new connection": f"FetchX509SVID, new connection each, {args.calls // 3} in a row",
        "concurrent": f"FetchX509SVID, {args.clients} clients x {args.per_client} concurrently",
        "reflection": "baseline: reflection list_services, same socket",
        "files": "baseline: read + parse key, chain, bundle files",
    }
    for name, label in labels.items():
        row = rows[name]
        p50 = f"{median(row['p50']):.2f}" if row["p50"] else "-"
        p99 = f"{median(row['p99']):.2f}" if row["p99"] else "-"
        spread = ", ".join(f"{r:.0f}" for r in row["rate"])
        print(f"| {label} | {p50} | {p99} | {median(row['rate']):.0f} [{spread}] |")


if __name__ == "__main__":
    main()
