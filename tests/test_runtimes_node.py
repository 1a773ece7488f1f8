"""Node.js natively in the mesh, with the files `trustmesh agent` keeps (against a real
`ca serve`): a plain `https` server (tests/peers/spiffe_server.js) that requires our client
certificates, reads the caller's SPIFFE ID and reloads on renewal; and a plain `https`
client (tests/peers/mtls_client.js) calling a service under `trustmesh run`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.client import mtls_client
from trustmesh.tls import RotatingCredentials, client_context

from ._runtimes import PEERS, needs_node, peer, peer_serial, run_tool, running_service, serial_of
from ._server import Server, new_ca_server
from ._services import issue
from .conftest import PASSPHRASE

NODE_SERVICE = "spiffe://example.org/node/catalog"
PYTHON_CALLER = "spiffe://example.org/svc/orders"

pytestmark = [pytest.mark.slow, needs_node]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with new_ca_server(tmp_path_factory.mktemp("node-ca")) as running:
        yield running


def enroll(server: Server, spiffe_id: str, out: Path, *extra: str) -> Path:
    """`trustmesh agent --once` for ``spiffe_id`` into ``out`` (with a fresh join token)."""
    argv = server.agent(spiffe_id, out, "--bundle", str(server.bundle), "--once", *extra)
    assert main([*argv, "--token", server.join_token(spiffe_id)]) == 0
    return out


def python_client(ident: Path, url: str, expect_id: str) -> httpx.Client:
    """Our own client with the agent's files, checking the server by its SPIFFE ID."""
    return mtls_client(RotatingCredentials(ident), expect_id=expect_id, base_url=url, timeout=10)


def test_node_server_identifies_mesh_callers_refuses_others_and_reloads(
    server: Server, tmp_path: Path
) -> None:
    """The Node server (agent files, requestCert + rejectUnauthorized) answers a trustmesh
    client with its SPIFFE ID, refuses a client of a foreign CA and one without a
    certificate, and after `agent --renew-now` serves its new certificate."""
    node_dir = enroll(server, NODE_SERVICE, tmp_path / "node")
    caller = enroll(server, PYTHON_CALLER, tmp_path / "orders")
    bundle = node_dir / "bundle.pem"
    with peer(["node", str(PEERS / "spiffe_server.js"), str(node_dir)]) as node:
        port = int(node.expect("listening ").split()[1])
        url = f"https://127.0.0.1:{port}"
        with python_client(caller, url, NODE_SERVICE) as http:
            answer = http.get("/")
            first = peer_serial(answer)

        foreign = CertificateAuthority.init(
            tmp_path / "foreign", trust_domain="example.org", passphrase=PASSPHRASE
        )
        stranger = issue(foreign, PYTHON_CALLER, tmp_path)
        foreign.close()
        ctx = client_context(cadata=bundle.read_text(), chain=stranger.chain, key=stranger.key)
        ctx.check_hostname = False  # the server's certificate names no host, only its ID
        with httpx.Client(verify=ctx, timeout=10) as http, pytest.raises(httpx.TransportError):
            http.get(url)
        anonymous = run_tool("curl", "--silent", "--cacert", str(bundle), "--insecure", url)

        assert main(server.agent(NODE_SERVICE, node_dir, "--once", "--renew-now")) == 0
        second, calls = serial_of(node_dir / "cert.pem"), 1
        for _ in range(4):  # a reload between two of the agent's renames still serves the old one
            node.expect("reloaded")
            with python_client(caller, url, NODE_SERVICE) as http:
                renewed = http.get("/")
                serving = peer_serial(renewed)
            node.expect("served ")
            calls += 1
            if serving == second:
                break
    assert answer.status_code == 200
    assert answer.json() == {"caller": PYTHON_CALLER}
    # the foreign client never reached the handler: only the real calls were served
    served = [line for line in node.seen if line.startswith("served ")]
    assert served == [f"served {PYTHON_CALLER}"] * calls
    assert anonymous.returncode != 0
    assert serving == second
    assert second != first
    assert renewed.json() == {"caller": PYTHON_CALLER}


def test_curl_checks_host_names_that_agent_certificates_do_not_carry(
    server: Server, tmp_path: Path
) -> None:
    """An agent-issued certificate names only its SPIFFE ID: curl (which checks host names)
    refuses it with exit 60 even with the right CA, while the SPIFFE-ID check accepts it."""
    node_dir = enroll(server, NODE_SERVICE, tmp_path / "node")
    caller = enroll(server, PYTHON_CALLER, tmp_path / "orders")
    with peer(["node", str(PEERS / "spiffe_server.js"), str(node_dir)]) as node:
        url = f"https://127.0.0.1:{int(node.expect('listening ').split()[1])}/"
        curl = run_tool(
            *("curl", "--silent", "--show-error", "--cert", str(caller / "chain.pem")),
            *("--key", str(caller / "key.pem"), "--cacert", str(caller / "bundle.pem"), url),
        )
        with python_client(caller, url, NODE_SERVICE) as http:
            answer = http.get("/")
    assert curl.returncode == 60, curl.stderr
    assert curl.stderr.startswith("curl: (60) SSL")
    assert answer.status_code == 200


def test_node_client_calls_a_service_under_trustmesh_run(server: Server, tmp_path: Path) -> None:
    """The Node client with its agent's PEM files calls a service that `trustmesh run` enrolled
    itself (an agent-issued certificate, no host name): it checks the service by SPIFFE ID,
    the service sees the client's SPIFFE ID, and a wrong expected ID is refused."""
    service_id = "spiffe://example.org/svc/inventory"
    client_id = "spiffe://example.org/node/frontend"
    node = enroll(server, client_id, tmp_path / "node")
    workdir = tmp_path / "service"
    workdir.mkdir()
    with running_service(
        workdir,
        *("--id", service_id, "--ca", server.url, "--token", server.join_token(service_id)),
        *("--bundle", str(server.bundle), "--cert-dir", str(workdir / "certs"), "--no-policy"),
    ) as service:
        files = [str(node / "chain.pem"), str(node / "key.pem"), str(node / "bundle.pem")]
        called = run_tool("node", str(PEERS / "mtls_client.js"), service.url(), *files, service_id)
        wrong = run_tool(
            "node", str(PEERS / "mtls_client.js"), service.url(), *files, "spiffe://example.org/x"
        )
    assert called.returncode == 0, called.stderr
    status, _, body = called.stdout.strip().partition(" ")
    assert status == "200"
    assert json.loads(body) == {"caller": client_id, "serial": serial_of(node / "cert.pem")}
    assert wrong.returncode == 1
    assert "expected spiffe://example.org/x" in wrong.stderr
