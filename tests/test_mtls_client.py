"""mtls_client / async_mtls_client over real TLS: the server's SPIFFE ID checked before any
byte is sent, rotation of RotatingCredentials under traffic, and the inbound user token
propagated from a request handler (FastAPI and Flask) to an upstream mTLS service."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from trustmesh.authority import CertificateAuthority
from trustmesh.client import async_mtls_client, mtls_client
from trustmesh.context import using_inbound_token
from trustmesh.errors import ConfigError
from trustmesh.files import atomic_write
from trustmesh.middleware import MTLSMiddleware, MTLSWSGIMiddleware, RequestIdentity
from trustmesh.middleware.fastapi import CallerDep, UserDep
from trustmesh.middleware.flask import current_caller
from trustmesh.pki import KeyType, dump_private_key, pem_certificates
from trustmesh.tls import RotatingCredentials, client_context, server_context

from ._idp import Idp, running_idp
from ._services import (
    SERVER_ID,
    Identity,
    RevokedSerials,
    allow_all,
    bundle_pem,
    client,
    issue,
    serve_asgi,
    serve_wsgi,
)
from .conftest import PASSPHRASE

ORDERS = "spiffe://example.org/svc/orders"
BILLING = "spiffe://example.org/svc/billing"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("home")
    CertificateAuthority.init(
        path, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    return path


@pytest.fixture(scope="module")
def ca(home: Path) -> Iterator[CertificateAuthority]:
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as authority:
        yield authority


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ids")


@pytest.fixture(scope="module")
def inventory(ca: CertificateAuthority, workdir: Path) -> Identity:
    """The upstream service's server identity."""
    return issue(ca, SERVER_ID, workdir, dns=["localhost"], ips=["127.0.0.1"])


@pytest.fixture(scope="module")
def orders(ca: CertificateAuthority, workdir: Path) -> Identity:
    return issue(ca, ORDERS, workdir, dns=["localhost"], ips=["127.0.0.1"])


def context_of(ca: CertificateAuthority, identity: Identity) -> ssl.SSLContext:
    return client_context(cadata=bundle_pem(ca), chain=identity.chain, key=identity.key)


async def _whoami(request: Request) -> JSONResponse:
    who: RequestIdentity = request.scope["trustmesh"]
    return JSONResponse(
        {
            "caller": str(who.caller),
            "serial": who.caller.serial_hex,
            "user": who.user.subject if who.user else None,
        }
    )


async def _slow(_request: Request) -> StreamingResponse:
    async def body() -> Any:
        for i in range(5):
            yield f"{i}\n".encode()
            await asyncio.sleep(0.1)

    return StreamingResponse(body())


def closing(verifier: Any) -> Any:
    """A lifespan that closes the app's AsyncVerifier in the server's event loop."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        if verifier is not None:
            await verifier.aclose()

    return lifespan


def upstream_app(**options: Any) -> MTLSMiddleware:
    app = Starlette(
        routes=[Route("/whoami", _whoami), Route("/slow", _slow)],
        lifespan=closing(options.get("verifier")),
    )
    options.setdefault("policy", allow_all())
    options.setdefault("revocation", RevokedSerials())
    return MTLSMiddleware(app, trust_domain="example.org", **options)


# -- expect_id ----------------------------------------------------------------------------


def test_expect_id_exact_and_glob_are_accepted(
    ca: CertificateAuthority, inventory: Identity, orders: Identity
) -> None:
    """The server's SPIFFE ID matches exactly or by glob; the caller is our identity."""
    with serve_asgi(upstream_app(), ca, inventory) as url:
        for expected in (SERVER_ID, "spiffe://example.org/svc/*", "spiffe://example.org/**"):
            with mtls_client(context_of(ca, orders), expect_id=expected, base_url=url) as http:
                r = http.get("/whoami")
            assert r.status_code == 200, r.text
            assert r.json()["caller"] == ORDERS


def test_wrong_server_id_is_refused_before_anything_is_sent(
    ca: CertificateAuthority, inventory: Identity, orders: Identity
) -> None:
    """A server with another SPIFFE ID gets a handshake and then nothing: no header, no token,
    no body; the error names both IDs."""
    received: list[bytes] = []
    ready = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    ctx = server_context(inventory.chain, inventory.key, cadata=bundle_pem(ca))

    def serve() -> None:
        ready.set()
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(5)
            try:
                while chunk := tls.recv(65536):
                    received.append(chunk)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(5)
    try:
        with mtls_client(
            context_of(ca, orders), expect_id=BILLING, base_url=f"https://127.0.0.1:{port}"
        ) as http:
            with using_inbound_token("secret-user-token"):
                with pytest.raises(httpx.ConnectError) as refused:
                    http.post("/pay", content=b"card=4111111111111111")
    finally:
        thread.join(timeout=10)
        listener.close()
    message = str(refused.value)
    assert SERVER_ID in message
    assert BILLING in message
    assert "expects" in message
    assert received == []


def test_wrong_glob_is_refused_and_bad_expect_id_is_a_config_error(
    ca: CertificateAuthority, inventory: Identity, orders: Identity
) -> None:
    """A glob that does not match refuses; a malformed expect_id is refused up front."""
    with serve_asgi(upstream_app(), ca, inventory) as url:
        with mtls_client(
            context_of(ca, orders), expect_id="spiffe://example.org/db/*", base_url=url
        ) as http:
            with pytest.raises(httpx.ConnectError, match=r"spiffe://example\.org/db/\*"):
                http.get("/whoami")
    with pytest.raises(ConfigError, match=r"expect_id 'inventory'"):
        mtls_client(context_of(ca, orders), expect_id="inventory")
    with pytest.raises(TypeError, match="verify"):
        mtls_client(context_of(ca, orders), expect_id=SERVER_ID, verify=False)


def test_async_client_checks_the_server_id(
    ca: CertificateAuthority, inventory: Identity, orders: Identity
) -> None:
    """async_mtls_client accepts the expected server and refuses another ID."""

    async def scenario(url: str) -> str:
        async with async_mtls_client(
            context_of(ca, orders), expect_id=SERVER_ID, base_url=url
        ) as http:
            caller = str((await http.get("/whoami")).json()["caller"])
        async with async_mtls_client(
            context_of(ca, orders), expect_id=BILLING, base_url=url
        ) as http:
            with pytest.raises(
                httpx.ConnectError, match=r"expects spiffe://example\.org/svc/billing"
            ):
                await http.get("/whoami")
        return caller

    with serve_asgi(upstream_app(), ca, inventory) as url:
        assert asyncio.run(scenario(url)) == ORDERS


# -- rotation -----------------------------------------------------------------------------


def _write_identity(ca: CertificateAuthority, directory: Path, spiffe_id: str) -> int:
    issued = ca.issue(spiffe_id, actor="test")
    assert issued.key is not None
    atomic_write(directory / "bundle.pem", pem_certificates(ca.bundle))
    atomic_write(directory / "key.pem", dump_private_key(issued.key), mode=0o600)
    atomic_write(directory / "chain.pem", pem_certificates(issued.chain))
    return issued.certificate.serial_number


def _reload(credentials: RotatingCredentials) -> None:
    deadline = time.monotonic() + 10
    while not credentials.reload():
        assert time.monotonic() < deadline, credentials.last_error
        time.sleep(0.05)


def test_rotating_credentials_authenticate_a_server_by_its_spiffe_id_alone(
    ca: CertificateAuthority, orders: Identity, workdir: Path, tmp_path: Path
) -> None:
    """An agent-issued server certificate names no host; with RotatingCredentials and
    expect_id the client accepts it at 127.0.0.1 by its SPIFFE ID, and still refuses
    another ID."""
    hostless = issue(ca, SERVER_ID, workdir)  # only the SPIFFE ID, like the agent's
    directory = tmp_path / "creds"
    directory.mkdir()
    _write_identity(ca, directory, ORDERS)
    credentials = RotatingCredentials(directory, expect_id=ORDERS)
    with serve_asgi(upstream_app(), ca, hostless) as url:
        with mtls_client(credentials, expect_id=SERVER_ID, base_url=url, timeout=10) as http:
            r = http.get("/whoami")
        assert r.status_code == 200, r.text
        assert r.json()["caller"] == ORDERS
        wrong = "spiffe://example.org/svc/billing"
        with (
            mtls_client(credentials, expect_id=wrong, base_url=url, timeout=10) as http,
            pytest.raises(httpx.ConnectError, match="billing"),
        ):
            http.get("/whoami")


@pytest.mark.slow
def test_rotation_mid_traffic_switches_pools_without_failed_requests(
    ca: CertificateAuthority, inventory: Identity, tmp_path: Path
) -> None:
    """Three rotations under four threads of requests: no request fails, new connections
    present the new certificate, and a response streaming across a rotation completes."""
    directory = tmp_path / "creds"
    directory.mkdir()
    serials = [_write_identity(ca, directory, ORDERS)]
    credentials = RotatingCredentials(directory, expect_id=ORDERS)
    stop = threading.Event()
    failures: list[BaseException] = []
    seen: set[str] = set()

    with (
        serve_asgi(upstream_app(), ca, inventory) as url,
        mtls_client(credentials, expect_id=SERVER_ID, base_url=url, timeout=10) as http,
    ):

        def hammer() -> int:
            count = 0
            while not stop.is_set():
                try:
                    r = http.get("/whoami")
                    assert r.status_code == 200, r.text
                    seen.add(r.json()["serial"])
                    count += 1
                except BaseException as exc:  # every failure is collected and asserted
                    failures.append(exc)
            return count

        with ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(hammer) for _ in range(4)]
            with http.stream("GET", "/slow") as streaming:
                time.sleep(0.2)
                for _ in range(3):
                    serials.append(_write_identity(ca, directory, ORDERS))
                    _reload(credentials)
                    time.sleep(0.3)
                body = streaming.read()
            stop.set()
            counts = [w.result(timeout=30) for w in workers]
        after = http.get("/whoami").json()["serial"]
    assert failures == []
    assert body == b"0\n1\n2\n3\n4\n"
    assert sum(counts) > 20
    assert after == format(serials[-1], "x")
    assert format(serials[0], "x") in seen
    assert format(serials[-1], "x") in seen
    assert credentials.generation == 4


# -- token propagation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def idp(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    with running_idp(home, tmp_path_factory.mktemp("idp"), log_level="warning") as server:
        yield server


def _user_token(idp: Idp, name: str) -> tuple[str, str]:
    creds = idp.add_client(name, "--scope", "inventory:read", "--audience", "inventory")
    with idp.http() as http:
        r = http.post(
            idp.token_url,
            auth=(creds["client_id"], creds["client_secret"]),
            data={"grant_type": "client_credentials"},
        )
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"]), str(creds["client_id"])


def test_token_propagates_from_a_fastapi_handler_to_the_upstream(
    ca: CertificateAuthority,
    inventory: Identity,
    orders: Identity,
    workdir: Path,
    idp: Idp,
) -> None:
    """A caller's token reaches orders (FastAPI); orders' sync and async mTLS clients
    forward it to inventory, which verifies it again; no token, nothing forwarded."""
    from trustmesh.tokens import AsyncVerifier, IssuerConfig

    token, subject = _user_token(idp, "fast-user")
    issuer = IssuerConfig(issuer=idp.url, audiences=("inventory",), ca_bundle=idp.bundle)
    edge = issue(ca, "spiffe://example.org/svc/edge", workdir)
    upstream_verifier = AsyncVerifier(issuer)
    orders_verifier = AsyncVerifier(issuer)
    up = upstream_app(verifier=upstream_verifier)
    with serve_asgi(up, ca, inventory) as upstream_url:
        api = FastAPI(lifespan=closing(orders_verifier))
        orders_ctx = context_of(ca, orders)

        @api.get("/sync")
        def sync_call(caller: CallerDep, user: UserDep) -> dict[str, Any]:
            with mtls_client(orders_ctx, expect_id=SERVER_ID, base_url=upstream_url) as http:
                seen = http.get("/whoami").json()
                explicit = http.get(
                    "/whoami", headers={"Authorization": "Bearer not.a.token"}
                ).status_code
            return {"upstream": seen, "explicit": explicit, "caller": str(caller)}

        @api.get("/async")
        async def async_call(user: UserDep) -> dict[str, Any]:
            async with async_mtls_client(
                orders_ctx, expect_id=SERVER_ID, base_url=upstream_url
            ) as http:
                seen = (await http.get("/whoami")).json()
            return {"upstream": seen}

        app = MTLSMiddleware(
            api,
            trust_domain="example.org",
            policy=allow_all(),
            revocation=RevokedSerials(),
            verifier=orders_verifier,
        )
        with serve_asgi(app, ca, orders) as orders_url, client(ca, edge) as http:
            auth = {"Authorization": f"Bearer {token}"}
            sync_seen = http.get(f"{orders_url}/sync", headers=auth).json()
            async_seen = http.get(f"{orders_url}/async", headers=auth).json()
            anonymous = http.get(f"{orders_url}/async").json()
    for seen in (sync_seen, async_seen):
        assert seen["upstream"] == {
            "caller": ORDERS,
            "serial": format(orders.serial, "x"),
            "user": subject,
        }
    assert sync_seen["caller"] == "spiffe://example.org/svc/edge"
    assert sync_seen["explicit"] == 401  # the request's own Authorization wins
    assert anonymous["upstream"]["user"] is None


def test_token_propagates_from_a_flask_handler_under_werkzeug(
    ca: CertificateAuthority,
    inventory: Identity,
    orders: Identity,
    workdir: Path,
    idp: Idp,
) -> None:
    """Flask under werkzeug (SSL_CLIENT_CERT) sees its caller and forwards the user token."""
    from trustmesh.tokens import AsyncVerifier, IssuerConfig, Verifier

    token, subject = _user_token(idp, "flask-user")
    issuer = IssuerConfig(issuer=idp.url, audiences=("inventory",), ca_bundle=idp.bundle)
    edge = issue(ca, "spiffe://example.org/svc/edge", workdir)
    with serve_asgi(upstream_app(verifier=AsyncVerifier(issuer)), ca, inventory) as upstream:
        flask_app = Flask("orders")
        orders_ctx = context_of(ca, orders)

        @flask_app.get("/call")
        def call() -> dict[str, Any]:
            with mtls_client(orders_ctx, expect_id=SERVER_ID, base_url=upstream) as http:
                seen = http.get("/whoami").json()
            return {"caller": str(current_caller()), "upstream": seen}

        with Verifier(issuer) as verifier:
            flask_app.wsgi_app = MTLSWSGIMiddleware(  # type: ignore[method-assign]
                flask_app.wsgi_app,
                trust_domain="example.org",
                policy=allow_all(),
                revocation=RevokedSerials(),
                verifier=verifier,
            )
            with serve_wsgi(flask_app, ca, orders) as url, client(ca, edge) as http:
                r = http.get(f"{url}/call", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "caller": "spiffe://example.org/svc/edge",
        "upstream": {"caller": ORDERS, "serial": format(orders.serial, "x"), "user": subject},
    }
