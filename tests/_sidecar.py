"""Sidecar tests' parts: real `trustmesh proxy` processes, the Node.js apps behind them
(tests/peers/plain_app.js, proxy_v2_app.js), and identity directories written the way
the agent writes them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.files import atomic_write
from trustmesh.pki import dump_private_key, pem_certificates

from ._server import free_port, stop

PEERS = Path(__file__).parent / "peers"
ORDERS = "spiffe://example.org/svc/orders"
SIDECAR_ID = "spiffe://example.org/svc/legacy"
INTRUDER = "spiffe://example.org/svc/intruder"


def write_identity(ca: CertificateAuthority, directory: Path, spiffe_id: str) -> int:
    """Issue ``spiffe_id`` and write key, chain and bundle into ``directory`` as the
    agent does (each file atomically); return the new serial."""
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue(spiffe_id, dns=["localhost"], ips=["127.0.0.1"], actor="test")
    assert issued.key is not None
    atomic_write(directory / "bundle.pem", pem_certificates(ca.bundle))
    atomic_write(directory / "key.pem", dump_private_key(issued.key), mode=0o600)
    atomic_write(directory / "chain.pem", pem_certificates(issued.chain))
    return issued.certificate.serial_number


def json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@dataclass
class NodeApp:
    """A Node.js app from tests/peers listening on 127.0.0.1:``port``."""

    port: int
    record: Path
    process: subprocess.Popen[str]

    def records(self) -> list[dict[str, Any]]:
        return json_lines(self.record)


@contextmanager
def node_app(script: str, workdir: Path) -> Iterator[NodeApp]:
    """Start ``node tests/peers/SCRIPT RECORD`` and wait for its port."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH")
    record = workdir / f"{script}.records.jsonl"
    process = subprocess.Popen(
        [node, str(PEERS / script), str(record)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening "), line
        yield NodeApp(int(line.split()[1]), record, process)
    finally:
        stop(process, timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@dataclass
class Sidecar:
    """A running `trustmesh proxy inbound|outbound` process."""

    port: int
    log_path: Path
    process: subprocess.Popen[str]

    def logs(self) -> list[dict[str, Any]]:
        return json_lines(self.log_path)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs() if entry.get("event") == event]

    def wait_for(self, event: str, timeout: float = 20.0, **fields: Any) -> dict[str, Any]:
        """Wait until a log line with ``event`` (and ``fields``) appears; return it."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.events(event):
                if all(entry.get(k) == v for k, v in fields.items()):
                    return entry
            assert time.monotonic() < deadline, f"no {event} {fields}:\n{self.log_path.read_text()}"
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait, return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@contextmanager
def sidecar(
    direction: str, workdir: Path, *args: str, port: int | None = None, name: str = "sidecar"
) -> Iterator[Sidecar]:
    """Start `python -m trustmesh proxy DIRECTION --listen 127.0.0.1:PORT ARGS...` and wait
    for its ready line."""
    port = port or free_port()
    log_path = workdir / f"{name}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "proxy",
                direction,
                *("--listen", f"127.0.0.1:{port}"),
                *args,
            ],
            env={**os.environ},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 60
        while f"trustmesh proxy: {direction} on" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        yield Sidecar(port, log_path, process)
    finally:
        if process.poll() is None:
            stop(process, timeout=30)
