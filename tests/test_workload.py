"""The node agent end to end: `ca serve` + `trustmesh workload-agent` + py-spiffe and raw gRPC,
all real processes on a real Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType
from trustmesh.workload._proto import workload_pb2 as pb
from trustmesh.workload._proto import workload_pb2_grpc as pb_grpc

from ._server import Server, running_server, stop
from .conftest import PASSPHRASE

NODE = "spiffe://example.org/node/host1"
ROOT_APP = "spiffe://example.org/svc/root-app"
REPO = Path(__file__).resolve().parents[1]
META = (("workload.spiffe.io", "true"),)


@dataclass
class Stack:
    server: Server
    socket: Path
    agent: subprocess.Popen[str]
    log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("workload")
    CertificateAuthority.init(
        workdir / "home",
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
    ).close()
    with running_server(workdir / "home", workdir) as server:
        with server.ca() as ca:
            token = ca.create_join_token(NODE, actor="test")
            # 20 s SVIDs: renewed (at 2/3) while a stream is open.
            ca.create_entry(
                ROOT_APP, node_id=NODE, selectors=[f"unix:uid:{os.getuid()}"], actor="test"
            )
            ca.create_entry(
                "spiffe://example.org/svc/short",
                node_id=NODE,
                selectors=[
                    f"unix:uid:{os.getuid()}",
                    f"unix:path:{os.path.realpath(sys.executable)}",
                ],
                ttl=timedelta(seconds=20),
                actor="test",
            )
        # Outside pytest's 0700 tmp tree: the uid-1001 client must reach the socket.
        public = Path(tempfile.mkdtemp(prefix="trustmesh-wl-test-"))
        public.chmod(0o755)
        socket = public / "run" / "agent.sock"
        log = workdir / "agent.log"
        with log.open("w") as out:
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trustmesh",
                    "workload-agent",
                    "--ca",
                    server.url,
                    "--node",
                    NODE,
                    "--data",
                    str(workdir / "data"),
                    "--bundle",
                    str(server.bundle),
                    "--token",
                    token,
                    "--socket",
                    f"unix://{socket}",
                    "--refresh",
                    "1s",
                    "--log-level",
                    "info",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        deadline = time.monotonic() + 30
        while not socket.exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"workload-agent did not start: {log.read_text()}")
            time.sleep(0.1)
        try:
            yield Stack(server, socket, agent, log)
        finally:
            stop(agent)
            shutil.rmtree(public, ignore_errors=True)


def py_spiffe(stack: Stack, *extra: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "tests._workload_client", str(stack.socket), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def channel(stack: Stack) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{stack.socket}")


def stub(ch: grpc.Channel) -> pb_grpc.SpiffeWorkloadAPIStub:
    return pb_grpc.SpiffeWorkloadAPIStub(ch)  # type: ignore[no-untyped-call]


@pytest.mark.slow
def test_py_spiffe_fetches_svid_bundles_and_jwt(stack: Stack) -> None:
    """py-spiffe gets the X.509-SVID, bundles and a JWT-SVID, and validates the JWT-SVID."""
    got = py_spiffe(stack)
    assert "error" not in got, got
    assert got["x509"]["spiffe_id"] in {ROOT_APP, "spiffe://example.org/svc/short"}  # type: ignore[index]
    assert got["x509"]["chain"] == 2  # type: ignore[index]
    assert got["bundles"] == ["example.org"]
    assert got["jwt_bundles"] == ["example.org"]
    assert got["jwt"]["aud"] == ["spiffe://example.org/db"]  # type: ignore[index]
    assert got["validated"] == got["jwt"]["spiffe_id"]  # type: ignore[index]
    assert got["wrong_audience"] != "accepted"
    assert stat_mode(stack.socket) == 0o666


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.slow
def test_uid_without_entry_gets_permission_denied(stack: Stack) -> None:
    """A caller whose uid (from SO_PEERCRED) matches no entry gets PermissionDenied."""
    if os.getuid() != 0:
        pytest.skip("needs root to run the client under another uid")
    got = py_spiffe(stack, "--uid", "1001")
    assert got["uid"] == 1001
    assert got.get("code") == "PERMISSION_DENIED", got
    assert "x509" not in got


@pytest.mark.slow
def test_missing_security_header_is_invalid_argument(stack: Stack) -> None:
    """Every method refuses a call without `workload.spiffe.io: true`, as SPIRE does."""
    with channel(stack) as ch:
        api = stub(ch)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(api.FetchX509SVID(pb.X509SVIDRequest(), timeout=5)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "security header missing" in info.value.details()
        bad = (("workload.spiffe.io", "false"),)
        with pytest.raises(grpc.RpcError) as info:
            api.FetchJWTSVID(pb.JWTSVIDRequest(audience=["x"]), metadata=bad, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            api.FetchJWTSVID(pb.JWTSVIDRequest(), metadata=META, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no audience


@pytest.mark.slow
def test_reflection_lists_the_workload_api(stack: Stack) -> None:
    """gRPC reflection names SpiffeWorkloadAPI and describes its methods."""
    with channel(stack) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert "SpiffeWorkloadAPI" in services
        assert "grpc.reflection.v1alpha.ServerReflection" in services
        from google.protobuf.descriptor_pool import DescriptorPool

        service = DescriptorPool(db).FindServiceByName("SpiffeWorkloadAPI")
        assert {m.name for m in service.methods} == {
            "FetchX509SVID",
            "FetchX509Bundles",
            "FetchJWTSVID",
            "FetchJWTBundles",
            "ValidateJWTSVID",
        }


def _serials(response: pb.X509SVIDResponse) -> dict[str, str]:
    found = {}
    for svid in response.svids:
        leaf = x509.load_der_x509_certificate(svid.x509_svid[: _der_length(svid.x509_svid)])
        found[svid.spiffe_id] = format(leaf.serial_number, "x")
    return found


def _der_length(data: bytes) -> int:
    # DER SEQUENCE header: 0x30, then a short or long length.
    first = data[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    return 2 + count + int.from_bytes(data[2 : 2 + count], "big")


@pytest.mark.slow
def test_revocation_reaches_open_stream_within_one_second(stack: Stack) -> None:
    """Revoking an SVID at the CA pushes a re-issued one on an open FetchX509SVID stream < 1 s."""
    with channel(stack) as ch:
        stream = stub(ch).FetchX509SVID(pb.X509SVIDRequest(), metadata=META, timeout=30)
        first = _serials(next(stream))
        assert ROOT_APP in first
        with stack.server.ca() as ca:
            ca.revoke(first[ROOT_APP], reason="keyCompromise", actor="test")
        # as `trustmesh revoke` on the CA host does; the feed carries it to the agent
        revoked_at = time.monotonic()
        while True:
            update = _serials(next(stream))
            if update.get(ROOT_APP) not in (None, first[ROOT_APP]):
                break
        elapsed = time.monotonic() - revoked_at
        stream.cancel()
    assert elapsed < 1.0, f"revocation took {elapsed:.2f}s to reach the stream"
    with stack.server.ca() as ca:
        new = ca.store.get_certificate(update[ROOT_APP])
        assert new.revoked_at is None
        assert new.spiffe_id == ROOT_APP


@pytest.mark.slow
def test_renewal_pushes_a_new_svid_on_the_stream(stack: Stack) -> None:
    """The 20 s SVID is renewed at 2/3 of its life and the new one arrives on the stream."""
    short = "spiffe://example.org/svc/short"
    with channel(stack) as ch:
        stream = stub(ch).FetchX509SVID(pb.X509SVIDRequest(), metadata=META, timeout=40)
        response = next(stream)
        first = _serials(response)[short]
        leaf = (
            x509.load_der_x509_certificate(
                response.svids[[s.spiffe_id for s in response.svids].index(short)].x509_svid[
                    : _der_length(response.svids[0].x509_svid)
                ]
            )
            if False
            else None
        )
        del leaf
        started = time.monotonic()
        while True:
            update = _serials(next(stream))
            if update.get(short) not in (None, first):
                break
        stream.cancel()
    assert time.monotonic() - started < 25


@pytest.mark.slow
def test_cancelled_streams_free_their_worker_at_once(stack: Stack) -> None:
    """Streams a client cancels at once (300, more than the 256 workers) do not hold their
    worker thread until the next poll: the next call is still served."""
    with channel(stack) as ch:
        api = stub(ch)
        for _ in range(300):
            stream = api.FetchX509SVID(pb.X509SVIDRequest(), metadata=META, timeout=10)
            assert next(stream).svids
            stream.cancel()
        response = next(
            iter(api.FetchX509Bundles(pb.X509BundlesRequest(), metadata=META, timeout=10))
        )
        assert response.bundles
