"""A real HTTPS server on 127.0.0.1 playing a token provider's key endpoints.

It serves JSON documents by path (discovery, JWKS, revocation list,
introspection), records every request, and can answer 503 or stop listening, so
the verifier's caches are tested against real sockets and real TLS with
certificates from our CA. Also mints tokens with joserfc, an independent JOSE
implementation. Shared by the token tests and ``bench/tokens.py``. And starts Node's
oidc-provider (``tests/peers``), a real provider we did not write, for the token and
gateway tests.
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import pem_certificates
from trustmesh.serving import issue_server_identity

from ._server import free_port

Handler = Callable[[str, dict[str, str], bytes], tuple[int, object]]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ProviderServer:
    """Serve ``routes`` (path -> JSON document or handler) over HTTPS (or plain HTTP)."""

    context: ssl.SSLContext | None
    port: int = 0
    routes: dict[str, object] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    status: int = 200
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)

    def start(self) -> ProviderServer:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path
                server.requests.append(Recorded(self.command, path, dict(self.headers), body))
                route = server.routes.get(path.split("?")[0])
                doc: object
                if server.status != 200:
                    status, doc = server.status, {"error": "unavailable"}
                elif route is None:
                    status, doc = 404, {"error": "not found"}
                elif callable(route):
                    status, doc = route(self.command, dict(self.headers.items()), body)
                else:
                    status, doc = 200, route
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _answer  # noqa: N815 - http.server naming
            do_POST = _answer  # noqa: N815

        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        httpd.daemon_threads = True
        if self.context is not None:
            httpd.socket = self.context.wrap_socket(httpd.socket, server_side=True)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_introspection(
        self, answers: Mapping[str, object], client_id: str, client_secret: str
    ) -> None:
        """Advertise and serve ``/introspect`` (RFC 7662, HTTP Basic): token -> answer."""
        expected = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()

        def introspect(method: str, headers: dict[str, str], body: bytes) -> tuple[int, object]:
            from urllib.parse import parse_qs

            if method != "POST" or headers.get("Authorization") != expected:
                return 401, {"error": "invalid_client"}
            token = parse_qs(body.decode())["token"][0]
            return 200, answers.get(token, {"active": False})

        self.routes["/.well-known/openid-configuration"] = {
            "issuer": self.url,
            "jwks_uri": self.url + "/jwks",
            "introspection_endpoint": self.url + "/introspect",
        }
        self.routes["/introspect"] = introspect

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def server_tls(ca: CertificateAuthority, workdir: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate from ``ca`` for 127.0.0.1, and the CA bundle file."""
    workdir.mkdir(parents=True, exist_ok=True)
    chain, key = issue_server_identity(ca, "127.0.0.1", workdir, path="/test-idp")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    bundle = workdir / "bundle.pem"
    bundle.write_bytes(pem_certificates(ca.bundle))
    return ctx, bundle


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Minter:
    """Signs access tokens for ``issuer`` with its keys (joserfc)."""

    issuer: str
    audience: str = "orders"
    ec: ECKey = field(
        default_factory=lambda: ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
    )
    rsa: RSAKey = field(
        default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
    )

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        return {"keys": [self.ec.as_dict(private=False), self.rsa.as_dict(private=False)]}

    def claims(self, **overrides: Any) -> dict[str, object]:
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "svc-billing",
            "client_id": "svc-billing",
            "iat": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
            "scope": "orders:read orders:write",
            "roles": ["reader"],
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        alg: str = "ES256",
        *,
        header: dict[str, object] | None = None,
        key: ECKey | RSAKey | OKPKey | None = None,
        **claims: Any,
    ) -> str:
        signer = key or (self.ec if alg.startswith("ES") else self.rsa)
        kid = signer.kid
        hdr: dict[str, object] = {"alg": alg, "typ": "at+jwt", "kid": kid}
        hdr.update(header or {})
        hdr = {k: v for k, v in hdr.items() if v is not None}
        return jwt.encode(hdr, self.claims(**claims), signer, algorithms=[alg])


def unsigned(header: dict[str, object], claims: dict[str, object], signature: bytes = b"") -> str:
    """A compact JWS built by hand, for tokens no JOSE library would produce."""
    h = b64(json.dumps(header).encode())
    p = b64(json.dumps(claims).encode())
    return f"{h}.{p}.{b64(signature)}"


def sign_es256(header: dict[str, object], claims: dict[str, object], key: ECKey) -> str:
    """Sign exactly ``header`` (joserfc would add or refuse parameters) with ES256."""
    return sign_es256_raw(header, json.dumps(claims), key)


def sign_es256_raw(header: dict[str, object], payload: str, key: ECKey) -> str:
    """Sign ``payload`` exactly as given (text no JSON encoder writes: ``1e309``, ``NaN``)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    h = b64(json.dumps(header).encode())
    p = b64(payload.encode())
    private = key.private_key
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    r, s = decode_dss_signature(private.sign(f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{h}.{p}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


PEERS = Path(__file__).parent / "peers"
#: The client_credentials client of tests/peers/oidc_provider.mjs (scopes orders:read/write).
NODE_CLIENT = ("svc-billing", "billing-secret-0123456789abcdef")
#: The resource server that may introspect its opaque tokens.
NODE_RESOURCE_SERVER = ("rs-orders", "rs-secret-0123456789abcdef")


@dataclass
class NodeProvider:
    """A running ``node tests/peers/oidc_provider.mjs``: tokens for audience ``orders``."""

    issuer: str
    bundle: Path
    client_certs: list[tuple[x509.Certificate, Path, Path]] = field(default_factory=list)

    def token(
        self,
        resource: str,
        scope: str = "orders:read",
        *,
        client: tuple[str, str] = NODE_CLIENT,
        tls_identity: tuple[Path, Path] | None = None,
    ) -> str:
        """A client_credentials access token for RESOURCE (an RFC 8707 resource indicator:
        ``https://orders.example/es256``, ``/rs256`` or ``/opaque``)."""
        ctx = ssl.create_default_context(cafile=str(self.bundle))
        if tls_identity is not None:
            ctx.load_cert_chain(*tls_identity)
        response = httpx.post(
            f"{self.issuer}/token",
            data={"grant_type": "client_credentials", "scope": scope, "resource": resource},
            auth=client,
            verify=ctx,
            timeout=10,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["token_type"].lower() == "bearer"
        token: str = body["access_token"]
        return token


@contextmanager
def running_oidc_provider(
    chain: Path, key: Path, bundle: Path, workdir: Path
) -> Iterator[NodeProvider]:
    """Run oidc-provider over HTTPS with CHAIN/KEY (for 127.0.0.1) and BUNDLE (the CA that
    issued them); skips when node is missing, fails when `make peers` was not run."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH (Node.js runs oidc-provider, the peer provider)")
    if not (PEERS / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("tests/peers/node_modules is missing: run `make peers` (npm ci)")
    ctx = ssl.create_default_context(cafile=str(bundle))
    failures: list[str] = []
    # Node has been seen (once, in CI on a loaded machine) to print its start-up warning and
    # then never answer; a second process on a fresh port is tried before failing. The port is
    # chosen here and the URL polled, so nothing depends on reading node's own output.
    for attempt in (1, 2):
        port = free_port()
        log_path = workdir / f"node-{attempt}.log"
        script = PEERS / "oidc_provider.mjs"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [node, str(script), str(port), str(chain), str(key), str(bundle)],
                cwd=PEERS,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        issuer = f"https://127.0.0.1:{port}"
        try:
            answered = _answers(process, f"{issuer}/.well-known/openid-configuration", ctx, 120)
        except BaseException:
            _stop(process)
            raise
        if answered:
            try:
                yield NodeProvider(issuer, bundle)
            finally:
                _stop(process)
            return
        _stop(process)
        state = f"exited ({process.returncode})" if process.returncode else "not answering"
        failures.append(f"attempt {attempt} {state}: {log_path.read_text().strip()!r}")
    pytest.fail(f"oidc-provider did not start: {'; '.join(failures)}")


def _answers(process: subprocess.Popen[bytes], url: str, ctx: ssl.SSLContext, wait: float) -> bool:
    """True once URL answers 200; False if PROCESS exits or WAIT seconds pass first."""
    deadline = time.monotonic() + wait  # node loads oidc-provider slowly on a busy machine
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url, verify=ctx, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
