"""The node agent through a root rotation, with real processes: `ca serve` and
`trustmesh workload-agent` (polling the CA only every 10 minutes), an open
FetchX509SVID stream on its Unix socket. Bundle events of the feed reach the stream at
once; the agent verifies the CA with the bundle the CA last sent, not its first
--bundle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType, SpiffeID, pem_certificates
from trustmesh.workload import WorkloadAgent
from trustmesh.workload._proto import workload_pb2 as pb
from trustmesh.workload._proto import workload_pb2_grpc as pb_grpc

from ._server import running_server, stop
from .conftest import PASSPHRASE
from .test_workload import META, _der_length, _serials

NODE = "spiffe://example.org/node/host1"
APP = "spiffe://example.org/svc/app"

pytestmark = pytest.mark.slow


def _roots(response: pb.X509SVIDResponse) -> int:
    """How many certificates the first SVID's bundle holds."""
    data, count = response.svids[0].bundle, 0
    while data:
        data = data[_der_length(data) :]
        count += 1
    return count


def test_bundle_events_reach_streams_and_the_ca_stays_reachable_after_retire(
    tmp_path: Path,
) -> None:
    """A root `prepare` reaches an open FetchX509SVID stream within seconds (the feed's
    bundle event, not the 10-minute poll) and the node's bundle.pem."""
    home = tmp_path / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    config = home / "config.toml"
    config.write_text(
        config.read_text().replace('rotation_min_overlap = "1h"', 'rotation_min_overlap = "1s"')
    )
    public = Path(tempfile.mkdtemp(prefix="trustmesh-wlrot-test-"))
    socket = public / "agent.sock"
    with running_server(home, tmp_path) as server:
        with server.ca() as ca:
            token = ca.create_join_token(NODE, actor="test")
            ca.create_entry(APP, node_id=NODE, selectors=[f"unix:uid:{os.getuid()}"], actor="test")
        log = tmp_path / "agent.log"
        with log.open("w") as out:
            agent = subprocess.Popen(
                [
                    *(sys.executable, "-m", "trustmesh", "workload-agent"),
                    *("--ca", server.url, "--node", NODE, "--data", str(tmp_path / "data")),
                    *("--bundle", str(server.bundle), "--token", token),
                    *("--socket", f"unix://{socket}", "--refresh", "600s"),
                    *("--log-level", "info"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:
            deadline = time.monotonic() + 30
            while not socket.exists():
                assert agent.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            with grpc.insecure_channel(f"unix:{socket}") as ch:
                stub = pb_grpc.SpiffeWorkloadAPIStub(ch)  # type: ignore[no-untyped-call]
                stream = stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=META, timeout=40)
                first = next(stream)
                assert _roots(first) == 1
                assert APP in _serials(first)

                now = datetime.now(UTC).replace(microsecond=0)
                with server.ca() as ca:
                    ca.rotate("root", "prepare", now=now)
                started = time.monotonic()
                update = next(stream)
                while _roots(update) != 2:
                    update = next(stream)
                elapsed = time.monotonic() - started
                assert elapsed < 5.0, f"the new bundle took {elapsed:.1f}s to reach the stream"

                stream.cancel()
        finally:
            stop(agent)
            shutil.rmtree(public, ignore_errors=True)
    assert _pem_count(tmp_path / "data" / "node" / "bundle.pem") == 2
    assert "bundle_updated" in log.read_text() or "applied" in log.read_text()


def _pem_count(path: Path) -> int:
    return len(x509.load_pem_x509_certificates(path.read_bytes()))


def test_the_ca_is_verified_with_the_bundle_it_last_sent(tmp_path: Path) -> None:
    """Once the CA has sent a bundle (node/bundle.pem), the agent's CA client uses it: a
    first --bundle that no longer verifies the CA (as after a root retire) does not cut
    the agent off."""
    home = tmp_path / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    with running_server(home, tmp_path) as server:
        with server.ca() as ca:
            token = ca.create_join_token(NODE, actor="test")
            ca.create_entry(APP, node_id=NODE, selectors=[f"unix:uid:{os.getuid()}"], actor="test")
        first = tmp_path / "first-bundle.pem"
        shutil.copy(server.bundle, first)
        agent = WorkloadAgent(
            server.url, SpiffeID.parse(NODE), tmp_path / "data", bundle=first, token=token
        )
        try:
            agent.node.ensure()
            agent.sync()
            assert _pem_count(tmp_path / "data" / "node" / "bundle.pem") == 1
            # The old root is gone from the CA's chain: the first bundle trusts another CA.
            foreign = CertificateAuthority.init(
                tmp_path / "foreign", trust_domain="example.org", passphrase=PASSPHRASE
            )
            with foreign:
                first.write_bytes(pem_certificates(foreign.bundle))
            agent.sync()
            assert {s.spiffe_id for s in agent.cache.snapshot().svids} == {APP}
        finally:
            agent.close()
