"""A real gateway for tests: its identity from a test CA, its YAML written from dicts,
served in a thread (its own event loop, real uvicorn + TLS on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from trustmesh.authority import CertificateAuthority
from trustmesh.files import atomic_write
from trustmesh.gateway import Gateway, load_config
from trustmesh.pki import dump_private_key, pem_certificates
from trustmesh.tls import RotatingCredentials, client_context

from ._server import free_port
from ._services import bundle_pem

GATEWAY_ID = "spiffe://example.org/gateway"


def gateway_identity(ca: CertificateAuthority, workdir: Path, spiffe_id: str = GATEWAY_ID) -> Path:
    """An identity directory (key.pem, chain.pem, bundle.pem) as the agent writes it.

    The certificate also names 127.0.0.1, so tests can verify the public listener with
    host name checks when it presents this identity.
    """
    directory = workdir / "gateway-identity"
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue(spiffe_id, dns=["localhost"], ips=["127.0.0.1"], actor="test")
    assert issued.key is not None
    atomic_write(directory / "bundle.pem", pem_certificates(ca.bundle))
    atomic_write(directory / "key.pem", dump_private_key(issued.key), mode=0o600)
    atomic_write(directory / "chain.pem", pem_certificates(issued.chain))
    return directory


def route(path: str, urls: list[str], upstream_id: str, **extra: Any) -> dict[str, Any]:
    """One ``routes:`` entry (public unless ``auth`` is given)."""
    entry: dict[str, Any] = {"path": path, "upstream": {"urls": urls, "id": upstream_id}}
    entry["auth"] = extra.pop("auth", {"public": True})
    upstream = extra.pop("upstream", {})
    entry["upstream"].update(upstream)
    entry.update(extra)
    return entry


def write_config(path: Path, routes: list[dict[str, Any]], **top: Any) -> Path:
    """Write a gateway YAML file (atomically, as an editor or deploy tool would)."""
    document: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "id": GATEWAY_ID,
        "ca": "https://127.0.0.1:1",
    }
    document.update(top)
    document["routes"] = routes
    atomic_write(path, yaml.safe_dump(document, sort_keys=False).encode())
    return path


@dataclass
class RunningGateway:
    """A gateway serving in a thread."""

    gateway: Gateway
    url: str
    bundle: str
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    def client(self, **kw: Any) -> httpx.Client:
        """An HTTPS client trusting the test CA (as a public client with that root would)."""
        kw.setdefault("timeout", 20)
        return httpx.Client(verify=client_context(cadata=self.bundle), base_url=self.url, **kw)

    def metrics(self) -> str:
        assert self.gateway.metrics_url is not None
        return httpx.get(self.gateway.metrics_url, timeout=10).text

    @property
    def generation(self) -> int:
        app = self.gateway.app
        assert app is not None
        return app.state.generation


@contextmanager
def running_gateway(
    ca: CertificateAuthority,
    config_path: Path,
    cert_dir: Path,
    *,
    revocations: Any = None,
    reload_interval: float = 0.1,
) -> Iterator[RunningGateway]:
    """Serve ``config_path`` until the block ends (then stop and drain)."""
    config = load_config(config_path)
    credentials = RotatingCredentials(cert_dir, expect_id=config.id)
    ready = threading.Event()
    gateway = Gateway(
        config,
        credentials=credentials,
        cert_dir=cert_dir,
        revocations=revocations,
        config_path=config_path,
        ready=lambda _url: ready.set(),
        reload_interval=reload_interval,
    )
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            asyncio.run(gateway.serve())
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=serve, name="test-gateway", daemon=True)
    thread.start()
    ready.wait(30)
    if errors:
        raise errors[0]
    assert gateway.url is not None, "the gateway did not start"
    running = RunningGateway(gateway, gateway.url, bundle_pem(ca), thread, errors)
    try:
        yield running
    finally:
        gateway.stop()
        thread.join(30)
        assert not thread.is_alive(), "the gateway did not stop"
        if errors:
            raise errors[0]


def wait_for(condition: Any, timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``condition()`` until true or the timeout; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(interval)
