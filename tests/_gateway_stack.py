"""Real processes for the gateway tests: a CA, the identity server, services, the gateway.

Usage (one stack per test module; every part is a process started from the CLI)::

    @pytest.fixture(scope="module")
    def stack(tmp_path_factory):
        with running_stack(tmp_path_factory.mktemp("gw"), echoes=("echo",)) as s:
            yield s

    gateway = stack.start_gateway(stack.config([stack.route("/public", "echo", public=True)]))
    answer = gateway.http().get("/public/x")            # httpx over TLS, our CA trusted
    sent = gateway.raw(raw_request("GET", "/public/y", [("X-User", "admin")]))  # exact bytes
    stack.echo_seen("y")                                 # what the echo upstream received

The stack: `trustmesh ca serve` on a fresh CA (``TRUST_DOMAIN`` demo.example), identities
enrolled with join tokens through `trustmesh agent`, `trustmesh idp serve` with a code-flow
client and users, the example services (inventory, orders) under `trustmesh run`
verifying user tokens with the gateway policies of ``examples/gateway/``, header-echo
upstreams (``tests/_echo_app.py``) under `trustmesh run`, and gateways from generated
YAML (`trustmesh gateway serve --config`), whose JSON log lines are parsed for the
decision reasons.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from trustmesh.authority import CertificateAuthority
from trustmesh.demo import (
    GATEWAY_EXAMPLE,
    TRUST_DOMAIN,
    GatewayMesh,
    forge,
    resign,
    sign_in_user,
)
from trustmesh.serving import issue_server_identity

from ._provider import PEERS, NodeProvider, running_oidc_provider
from ._server import free_port
from .conftest import PASSPHRASE

TESTS = Path(__file__).parent
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/gateway"
ORDERS_ID = f"spiffe://{TRUST_DOMAIN}/orders"
INVENTORY_ID = f"spiffe://{TRUST_DOMAIN}/inventory"
ECHO_ID = f"spiffe://{TRUST_DOMAIN}/echo"
PASSWORD = "correct horse battery staple"
AUDIENCE = "api"


# -- raw HTTP/1.1 over TLS: nothing normalises the bytes -------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    host: str = "127.0.0.1",
    body: bytes = b"",
) -> bytes:
    """An HTTP/1.1 request exactly as written: HEADERS in order, names as given (any case,
    ``_``, repeats, empty values); Host and ``Connection: close`` are added."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def read_to_close(tls: ssl.SSLSocket) -> bytes:
    """Everything the server sends on TLS until it closes the connection."""
    received = b""
    while True:
        try:
            chunk = tls.recv(65536)
        except (ssl.SSLZeroReturnError, ConnectionResetError):
            break
        if not chunk:
            break
        received += chunk
    return received


def raw_exchange(
    host: str, port: int, context: ssl.SSLContext, data: bytes, timeout: float = 30
) -> RawResponse:
    """Send DATA over a new TLS connection; read the whole response (the server closes)."""
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        tls.sendall(data)
        received = read_to_close(tls)
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in header_lines)]
    response = RawResponse(int(status_line.split(" ")[1]), headers, body)
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        response.body = _dechunk(body)
    return response


# -- a running gateway -----------------------------------------------------------------


@dataclass
class Gateway:
    """A `trustmesh gateway serve` process: its URL, its clients, its log."""

    label: str
    url: str
    mesh: GatewayMesh
    context: ssl.SSLContext

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].rstrip("/"))

    def http(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.url, verify=self.context, **kwargs)

    def async_http(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 30)
        return httpx.AsyncClient(base_url=self.url, verify=self.context, **kwargs)

    def raw(self, data: bytes) -> RawResponse:
        return raw_exchange("127.0.0.1", self.port, self.context, data)

    def log_text(self) -> str:
        return self.mesh.log_text(self.label)

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far."""
        return self.mesh.gateway_events(self.label)

    def decisions(self, marker: str) -> list[dict[str, Any]]:
        """Access-log lines (one per request, with its decision ``reason``) that mention
        MARKER, e.g. in the path."""
        return [e for e in self.events() if e.get("event") == "access" and marker in json.dumps(e)]

    def reason(self, marker: str, timeout: float = 10) -> str:
        """The logged reason of the request whose path holds MARKER (waits for the line)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.decisions(marker)
            if found:
                return str(found[-1]["reason"])
            if time.monotonic() > deadline:
                raise AssertionError(f"no decision logged for {marker}:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.mesh.halt(self.label)


# -- the stack -------------------------------------------------------------------------


@dataclass
class Stack:
    mesh: GatewayMesh
    workdir: Path
    home: Path
    web: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    elsewhere: dict[str, Any] = field(default_factory=dict)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    edge: Path | None = None
    node: NodeProvider | None = None
    echo_logs: dict[str, Path] = field(default_factory=dict)

    @property
    def idp_url(self) -> str:
        return self.mesh.idp_url

    @property
    def bundle(self) -> Path:
        return self.mesh.bundle

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        """What a client of the gateway trusts: our CA."""
        ctx = ssl.create_default_context(cafile=str(self.bundle))
        ctx.check_hostname = check_hostname
        return ctx

    # tokens ---------------------------------------------------------------------------

    def user_token(self, user: str = "alice", scope: str = "openid orders:read") -> str:
        """USER signs in at the login page (code + PKCE); their access token."""
        with self.mesh.idp_http() as http:
            tokens = sign_in_user(http, self.idp_url, self.web, user, PASSWORD, scope)
        token: str = tokens["access_token"]
        return token

    def machine_token(self, client: dict[str, Any] | None = None, scope: str = "") -> str:
        """A client_credentials token (default: the ``reports`` client, orders:read)."""
        client = client or self.machine
        with self.mesh.idp_http() as http:
            answer = http.post(
                f"{self.idp_url}/token",
                auth=(client["client_id"], client["client_secret"]),
                data={"grant_type": "client_credentials", **({"scope": scope} if scope else {})},
            )
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["access_token"]
        return token

    def resigned(self, token: str, **claims: Any) -> str:
        """TOKEN with CLAIMS changed, signed again by the identity server's own key."""
        return resign(self.home, PASSPHRASE, token, **claims)

    def expired(self, token: str) -> str:
        """TOKEN signed again by the identity server's key, expired a minute ago."""
        now = int(time.time())
        return self.resigned(token, iat=now - 900, nbf=now - 900, exp=now - 60)

    def forged(self, token: str, *, kid: str | None = None, **claims: Any) -> str:
        """TOKEN (CLAIMS changed) signed by a key the identity server never had."""
        return forge(token, kid=kid, **claims)

    # upstreams and gateways -------------------------------------------------------------

    def echo_seen(self, marker: str) -> list[dict[str, Any]]:
        """Requests any echo upstream received whose path or query holds MARKER."""
        seen = []
        for log in self.echo_logs.values():
            if log.exists():
                for line in log.read_text().splitlines():
                    entry = json.loads(line)
                    if marker in entry["raw_path"] or marker in entry["query"]:
                        seen.append(entry)
        return seen

    def run_echo(self, label: str, port: int | None = None, *, wait: bool = True) -> str:
        """A header-echo upstream (identity ``echo``) under `trustmesh run`; its URL."""
        self.echo_logs[label] = self.workdir / f"{label}.jsonl"
        env = {"ECHO_NAME": label, "ECHO_LOG": str(self.echo_logs[label])}
        options = ("--no-policy", "--trusted-proxy", GATEWAY_ID)
        self.mesh.run_service(
            "echo",
            env,
            label=label,
            app="_echo_app:app",
            app_dir=TESTS,
            options=options,
            port=port,
            wait=wait,
        )
        return self.mesh.urls[label]

    def route(self, path: str, upstream: str | Sequence[str], **settings: Any) -> dict[str, Any]:
        """A route entry to UPSTREAM (labels of running services); SETTINGS are its other
        keys (``auth``, ``allow_ips``...) and ``upstream_settings`` more upstream keys."""
        labels = [upstream] if isinstance(upstream, str) else list(upstream)
        identity = {"orders": ORDERS_ID, "inventory": INVENTORY_ID}.get(labels[0], ECHO_ID)
        extra = settings.pop("upstream_settings", {})
        entry: dict[str, Any] = {"name": path.strip("/").replace("/", "-") or "root"}
        entry["path"] = path
        entry["upstream"] = {"urls": [self.mesh.urls[x] for x in labels], "id": identity, **extra}
        entry.update(settings)
        return entry

    def config(self, routes: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
        """A gateway.yaml as a dict: our CA, the identity server as issuer, ROUTES; TOP
        overrides or adds top-level keys."""
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{free_port()}",
            "id": GATEWAY_ID,
            "ca": self.mesh.ca_url,
            "issuers": [{"issuer": self.idp_url, "audience": AUDIENCE}],
        }
        if self.edge is not None:
            config["tls"] = {
                "cert": str(self.edge / "chain.pem"),
                "key": str(self.edge / "key.pem"),
            }
        config.update(top)
        config["routes"] = routes
        return config

    def start_gateway(self, config: dict[str, Any], label: str = "gateway") -> Gateway:
        url = self.mesh.start_gateway(config, label=label)
        context = self.client_context(check_hostname="tls" in config)
        return Gateway(label, url, self.mesh, context)


def _node_provider(stack: Stack, exits: ExitStack) -> NodeProvider | None:
    """oidc-provider with a certificate from the stack's CA, or None without node."""
    if shutil.which("node") is None or not (PEERS / "node_modules" / "oidc-provider").is_dir():
        return None
    work = stack.workdir / "node"
    work.mkdir()
    with CertificateAuthority.open(stack.home, passphrase=PASSPHRASE) as ca:
        chain, key = issue_server_identity(ca, "127.0.0.1", work, path="/oidc-provider")
    return exits.enter_context(running_oidc_provider(chain, key, stack.bundle, work))


@contextmanager
def running_stack(
    workdir: Path,
    *,
    services: bool = False,
    echoes: Sequence[str] = ("echo",),
    node: bool = False,
    edge: bool = True,
) -> Iterator[Stack]:
    """Start the stack in WORKDIR; stop every process on exit.

    Args:
        services: Run inventory and orders (examples/) behind the gateway's policies.
        echoes: Labels of header-echo upstreams to run (all with the ``echo`` identity).
        node: Also run Node's oidc-provider (None in ``stack.node`` without node).
        edge: Give gateways a provided certificate for 127.0.0.1 (``tls:``), so clients
            check the host name; otherwise they use the agent's certificate.
    """
    home = workdir / "home"
    env = {
        **os.environ,
        "TRUSTMESH_HOME": str(home),
        "TRUSTMESH_CA_PASSPHRASE": PASSPHRASE.decode(),
    }
    mesh = GatewayMesh(workdir, env, echo=False)
    mesh.cli("ca", "init", "--trust-domain", TRUST_DOMAIN, show=False)
    stack = Stack(mesh, workdir, home)
    with ExitStack() as exits, ThreadPoolExecutor() as pool:
        exits.callback(mesh.stop)
        # Everything that only needs the CA's files runs while `ca serve` starts.
        mesh.start_idp(wait=False)
        issued = None
        if edge:
            stack.edge = workdir / "edge"
            issued = pool.submit(
                mesh.cli,
                "issue",
                f"spiffe://{TRUST_DOMAIN}/edge",
                *("--dns", "localhost", "--ip", "127.0.0.1", "--ttl", "2h"),
                *("--out", str(stack.edge)),
                show=False,
            )
        web = pool.submit(
            mesh.add_client,
            "web",
            *("--redirect-uri", "https://app.demo.example/callback"),
            *("--scope", "openid", "--scope", "profile", "--scope", "orders:read"),
            *("--audience", AUDIENCE),
        )
        machine = pool.submit(
            mesh.add_client,
            *("reports", "--scope", "orders:read", "--scope", "profile", "--audience", AUDIENCE),
        )
        elsewhere = pool.submit(
            mesh.add_client, "billing-reports", "--scope", "orders:read", "--audience", "billing"
        )
        alice = pool.submit(mesh.add_user, "alice", PASSWORD, "--scope", "orders:read")
        mesh.start_ca()
        names = ["gateway", *(["inventory", "orders"] if services else []), "echo"]
        enrolled = pool.submit(mesh.enroll, *names)
        stack.web, stack.machine = web.result(), machine.result()
        stack.elsewhere, stack.users["alice"] = elsewhere.result(), alice.result()
        mesh.wait_idp()
        enrolled.result()
        labels = []
        if services:
            token_options = ("--issuer", mesh.idp_url, "--audience", AUDIENCE)
            policy = GATEWAY_EXAMPLE / "inventory-policy.yaml"
            mesh.run_service("inventory", options=("--policy", str(policy), *token_options))
            policy = GATEWAY_EXAMPLE / "orders-policy.yaml"
            mesh.run_orders(options=("--policy", str(policy), *token_options), wait=False)
            labels.append(("orders", "main:app"))
        for label in echoes:
            stack.run_echo(label, wait=False)
            labels.append((label, "_echo_app:app"))
        node_started = pool.submit(_node_provider, stack, exits) if node else None
        for label, app in labels:
            mesh.wait_service(label, app)
        stack.node = node_started.result() if node_started is not None else None
        if issued is not None:
            issued.result()
        yield stack


def problem(
    status: int, headers: httpx.Headers | RawResponse, body: bytes, reasons: Sequence[str]
) -> dict[str, Any]:
    """Check a gateway refusal: STATUS, an RFC 9457 problem+json body whose ``reason`` is
    one of REASONS; return the body."""
    content_type = (
        headers.header("content-type")
        if isinstance(headers, RawResponse)
        else headers.get("content-type")
    )
    assert (content_type or "").startswith("application/problem+json"), (content_type, body)
    document: dict[str, Any] = json.loads(body)
    assert document["status"] == status, document
    assert document["reason"] in reasons, document
    for member in ("type", "title", "detail"):
        assert isinstance(document.get(member), str), document
        assert document[member], document
    return document


def refused(answer: httpx.Response, status: int, *reasons: str) -> dict[str, Any]:
    """Check an httpx response is a gateway refusal with STATUS and one of REASONS."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    return problem(status, answer.headers, answer.content, reasons)


class TcpForwarder:
    """A TCP forwarder on 127.0.0.1 to TARGET (host, port) that a test can cut and restore:
    ``stop()`` closes the listener and every open connection (the target looks down),
    ``start()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpForwarder:
        listener = socket.socket()
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._listener is not None:
            try:  # wakes the thread blocked in accept(), which close() alone does not
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()
