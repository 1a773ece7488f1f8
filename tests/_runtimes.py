"""Other runtimes against trustmesh: `trustmesh run` services as real processes, identity
files, and long-running peers from tests/peers (a Java client, a Node.js server) whose
output lines the tests wait for."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.authority import Issued
from trustmesh.pki import dump_private_key, pem_certificates

from ._server import free_port, stop

PEERS = Path(__file__).parent / "peers"

needs_java = pytest.mark.skipif(
    shutil.which("java") is None or shutil.which("javac") is None,
    reason="java and javac (a JDK) are not installed",
)
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")

#: A service that answers with the caller's SPIFFE ID and certificate serial (hex).
WHOAMI_APP = """\
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def whoami(request):
    caller = request.scope["trustmesh"].caller
    return JSONResponse({"caller": str(caller), "serial": caller.serial_hex})


app = Starlette(routes=[Route("/whoami", whoami)])
"""


def write_identity(issued: Issued, directory: Path) -> Path:
    """Write an identity from ``CertificateAuthority.issue`` as the agent lays it out."""
    directory.mkdir(parents=True, exist_ok=True)
    assert issued.key is not None
    (directory / "key.pem").write_bytes(dump_private_key(issued.key))
    (directory / "cert.pem").write_bytes(
        issued.certificate.public_bytes(serialization.Encoding.PEM)
    )
    (directory / "chain.pem").write_bytes(pem_certificates(issued.chain))
    (directory / "bundle.pem").write_bytes(pem_certificates(issued.bundle))
    return directory


def serial_of(cert_pem: Path) -> str:
    """The serial (lower-case hex) of the certificate in a PEM file."""
    return format(x509.load_pem_x509_certificate(cert_pem.read_bytes()).serial_number, "x")


def peer_serial(response: httpx.Response) -> str:
    """The serial (hex) of the certificate the server presented for ``response``."""
    ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
    return format(x509.load_der_x509_certificate(ssl_object.getpeercert(True)).serial_number, "x")


def _wait_for_port(port: int, alive: Callable[[], bool], what: str, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


@dataclass
class Service:
    """A `trustmesh run` process serving :data:`WHOAMI_APP` on 127.0.0.1."""

    port: int
    process: subprocess.Popen[str]
    log: Path

    def url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}/whoami"


@contextmanager
def running_service(workdir: Path, *args: str) -> Iterator[Service]:
    """Start `python -m trustmesh run` with the whoami app and ``args`` (the identity,
    policy and revocation options); stop it with SIGTERM afterwards."""
    (workdir / "whoami_app.py").write_text(WHOAMI_APP)
    port = free_port()
    log_path = workdir / "run.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "trustmesh", "run", "whoami_app:app"),
                *("--listen", f"127.0.0.1:{port}", "--app-dir", str(workdir), *args),
            ],
            env={**os.environ},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        try:
            _wait_for_port(
                port, lambda: process.poll() is None, "trustmesh run", time.monotonic() + 60
            )
        except RuntimeError:
            raise RuntimeError(f"trustmesh run did not start: {log_path.read_text()}") from None
        yield Service(port, process, log_path)
    finally:
        stop(process, timeout=20)


class LineProcess:
    """A peer process whose stdout lines are collected as they come (stderr kept apart)."""

    def __init__(
        self, argv: Sequence[str], *, stdin: bool = False, stderr: Path | None = None
    ) -> None:
        self.stderr_file = stderr
        with contextlib.ExitStack() as files:
            err = files.enter_context(stderr.open("w")) if stderr else subprocess.PIPE
            self.process = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float = 60) -> str:
        """Return the next line starting with ``prefix`` (other lines are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line starting with {prefix!r} within {timeout:g}s; saw {self.seen}; "
                    f"exit {self.process.poll()}; stderr: {self.stderr()}"
                ) from None
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stderr(self) -> str:
        if self.stderr_file is not None:
            return self.stderr_file.read_text()
        if self.process.poll() is None or self.process.stderr is None:
            return "(still running)"
        return self.process.stderr.read()

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # the peer already exited
                self.process.stdin.close()
        stop(self.process)
        self.reader.join(timeout=15)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def peer(argv: Sequence[str], *, stdin: bool = False) -> Iterator[LineProcess]:
    """Run a peer (``node script.js ...``, ``java ...``) for the length of the block."""
    running = LineProcess(argv, stdin=stdin)
    try:
        yield running
    finally:
        running.close()


def compile_java(source: Path, classes: Path, *more: Path) -> Path:
    """Compile a single-file program from tests/peers (and ``more``) once into ``classes``."""
    done = subprocess.run(
        ["javac", "-d", str(classes), str(source), *map(str, more)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return classes


def run_tool(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run keytool, openssl, curl or node once; output captured, never raising."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
