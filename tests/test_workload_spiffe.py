"""Standard SPIFFE consumers against the node agent, as real processes (issue 16's proof).

One `ca serve`, one `trustmesh workload-agent` and one `trustmesh run` (its identity from
the agent in its process, `run --id`) per module. py-spiffe's `X509Source`/`JwtSource` and
spiffe-tls run in their own processes (tests/_spiffe_client.py; py-spiffe and our proto
share protobuf's default pool, see docs/workload.md), as other uids when we are root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.client import mtls_client
from trustmesh.pki import KeyType
from trustmesh.tls import client_context

from ._server import Server, free_port, running_server, stop
from ._services import bundle_pem, issue
from .conftest import PASSPHRASE

NODE = "spiffe://example.org/node/host1"
OTHER_NODE = "spiffe://example.org/node/host2"
CALLER = "spiffe://example.org/svc/caller"  # the test's own uid, 15 s SVIDs
ALPHA = "spiffe://example.org/svc/alpha"  # uid 1001
BETA = "spiffe://example.org/svc/beta"  # uid 1002
ELSEWHERE = "spiffe://example.org/svc/elsewhere"  # our uid, but on another node
ORDERS = "spiffe://example.org/svc/orders"  # the service under `trustmesh run --id`
FRONTEND = "spiffe://example.org/svc/frontend"  # a trustmesh client with a CA-issued identity
REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "runtimes" / "py-spiffe.md"
CLIENT = REPO / "tests" / "_spiffe_client.py"
NO_ENTRY_UID = 1003

needs_root = pytest.mark.skipif(
    os.getuid() != 0, reason="needs root to run the client under uids 1001-1003"
)


@dataclass
class Stack:
    server: Server
    socket: Path
    agent: subprocess.Popen[str]
    service: str  # 127.0.0.1:PORT of `trustmesh run`
    workdir: Path
    entry_ids: dict[str, str]


def _start_agent(server: Server, workdir: Path, token: str, sock: Path) -> subprocess.Popen[str]:
    log = workdir / "agent.log"
    with log.open("w") as out:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "trustmesh", "workload-agent", "--ca", server.url),
                *("--node", NODE, "--data", str(workdir / "data")),
                *("--bundle", str(server.bundle), "--token", token),
                *("--socket", f"unix://{sock}", "--refresh", "1s"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _start_run(server: Server, workdir: Path, token: str, port: int) -> subprocess.Popen[str]:
    log = workdir / "run.log"
    with log.open("w") as out:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "trustmesh", "run", "_echo_app:app"),
                *("--id", ORDERS, "--ca", server.url, "--token", token),
                *("--bundle", str(server.bundle), "--listen", f"127.0.0.1:{port}"),
                *("--no-policy", "--app-dir", str(REPO / "tests")),
            ],
            env={**os.environ, "ECHO_NAME": "orders", "ECHO_LOG": str(workdir / "echo.jsonl")},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _wait_for(check: object, what: str, process: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not check():  # type: ignore[operator]
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {log.read_text()}")
        time.sleep(0.1)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("spiffe")
    CertificateAuthority.init(
        workdir / "home",
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
    ).close()
    with running_server(workdir / "home", workdir) as server:
        entry_ids = {}
        with server.ca() as ca:
            node_token = ca.create_join_token(NODE, actor="test")
            run_token = ca.create_join_token(ORDERS, actor="test")
            for spiffe_id, node, uid, ttl in (
                (CALLER, NODE, os.getuid(), timedelta(seconds=15)),  # renewed at ~10 s
                (ALPHA, NODE, 1001, None),
                (BETA, NODE, 1002, None),
                (ELSEWHERE, OTHER_NODE, os.getuid(), None),  # never served by host1's agent
            ):
                entry = ca.create_entry(
                    spiffe_id, node_id=node, selectors=[f"unix:uid:{uid}"], ttl=ttl, actor="test"
                )
                entry_ids[spiffe_id] = entry.entry_id
        # Outside pytest's 0700 tmp tree: the uid-1001..1003 clients must reach the socket.
        public = Path(tempfile.mkdtemp(prefix="trustmesh-spiffe-test-"))
        public.chmod(0o755)
        sock = public / "agent.sock"
        agent = _start_agent(server, workdir, node_token, sock)
        port = free_port()
        service = _start_run(server, workdir, run_token, port)
        try:
            _wait_for(sock.exists, "workload-agent", agent, workdir / "agent.log")
            _wait_for(lambda: _listening(port), "trustmesh run", service, workdir / "run.log")
            yield Stack(server, sock, agent, f"127.0.0.1:{port}", workdir, entry_ids)
        finally:
            stop(service)
            stop(agent)
            shutil.rmtree(public, ignore_errors=True)


def spiffe_client(*args: str, timeout: float = 60) -> dict[str, object]:
    """Run tests/_spiffe_client.py and return its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-m", "tests._spiffe_client", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- 1. X509Source and JwtSource ------------------------------------------------------------


@pytest.mark.slow
def test_sources_get_svid_bundle_jwt_and_see_a_renewal(stack: Stack) -> None:
    """X509Source and JwtSource get the SVID and bundles of the entry for our uid (only
    that one), a JWT-SVID that validates offline, and X509Source's svid changes on renewal."""
    got = spiffe_client("sources", str(stack.socket), "--renewal", "20")
    assert "error" not in got, got
    x509 = got["x509"]
    assert x509["spiffe_id"] == CALLER  # type: ignore[index]
    assert x509["chain"] == 2  # type: ignore[index]
    assert got["bundle"] == {"trust_domain": "example.org", "roots": 1, "verifies_leaf": True}
    assert got["all_ids"] == [CALLER]  # not ELSEWHERE: its entry names another node
    renewed = got["renewed"]
    assert renewed["spiffe_id"] == CALLER  # type: ignore[index]
    assert renewed["serial"] != x509["serial"], "no renewal reached the X509Source in 20 s"  # type: ignore[index]
    assert renewed["not_after"] > x509["not_after"]  # type: ignore[index]
    with stack.server.ca() as ca:  # both are real, unrevoked SVIDs the CA signed for the entry
        for serial in (x509["serial"], renewed["serial"]):  # type: ignore[index]
            cert = ca.store.get_certificate(serial)
            assert cert.spiffe_id == CALLER
            assert cert.revoked_at is None
    assert got["jwt"] == {"spiffe_id": CALLER, "aud": ["spiffe://example.org/db"]}
    assert got["jwt_validated"] == CALLER
    assert got["jwt_bundles"] == ["example.org"]
    assert got["jwt_wrong_audience"] != "accepted"


# -- 2. other uids ----------------------------------------------------------------------------


@pytest.mark.slow
@needs_root
@pytest.mark.parametrize(("uid", "expected"), [(1001, ALPHA), (1002, BETA)])
def test_each_uid_gets_only_its_own_identity(stack: Stack, uid: int, expected: str) -> None:
    """uid 1001 and uid 1002 each get exactly their own entry's X.509- and JWT-SVID."""
    got = spiffe_client("sources", str(stack.socket), "--uid", str(uid))
    assert got["uid"] == uid
    assert "error" not in got, got
    assert got["x509"]["spiffe_id"] == expected  # type: ignore[index]
    assert got["all_ids"] == [expected]
    assert got["jwt"]["spiffe_id"] == expected  # type: ignore[index]
    assert got["jwt_validated"] == expected


@pytest.mark.slow
@needs_root
def test_uid_without_entry_is_denied_everywhere(stack: Stack) -> None:
    """A uid with no entry gets PERMISSION_DENIED for SVIDs and bundles; X509Source fails."""
    got = spiffe_client("denied", str(stack.socket), "--uid", str(NO_ENTRY_UID))
    assert got["uid"] == NO_ENTRY_UID
    for method in ("x509_svid", "x509_bundles", "jwt_svid"):
        assert got[method]["code"] == "PERMISSION_DENIED", got  # type: ignore[index]
    assert "no identity issued" in got["x509_svid"]["error"], got  # type: ignore[index]
    assert "accepted" not in got["x509_source"], got  # type: ignore[operator]


# -- 3. spiffe-tls --------------------------------------------------------------------------


@pytest.mark.slow
def test_spiffe_tls_client_calls_trustmesh_run(stack: Stack) -> None:
    """spiffe-tls dials `trustmesh run` over mTLS with the X509Source's SVID; the app sees
    the caller's SPIFFE ID; a server with another ID than expected is refused."""
    got = spiffe_client("dial", str(stack.socket), stack.service, ORDERS)
    assert "error" not in got, got
    assert got["me"] == CALLER
    assert got["status"] == 200, got
    assert got["body"]["caller"] == CALLER  # type: ignore[index]
    assert got["body"]["name"] == "orders"  # type: ignore[index]
    assert got["wrong_server"] != "accepted"
    assert "TLS connection failed" in str(got["wrong_server"])


@pytest.mark.slow
def test_trustmesh_client_calls_spiffe_tls_server(stack: Stack, tmp_path: Path) -> None:
    """A spiffe-tls server (SVID from the agent) accepts a trustmesh mTLS client and sees its
    SPIFFE ID; a client from a foreign CA is refused in the handshake."""
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "tests._spiffe_client", "listen", str(stack.socket)),
            *(f"127.0.0.1:{port}", "2"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready = json.loads(server.stdout.readline() or "{}")
        assert ready.get("listening") == CALLER, server.stderr.read()  # type: ignore[union-attr]
        with stack.server.ca() as ca:
            frontend = issue(ca, FRONTEND, tmp_path)
            ctx = client_context(cadata=bundle_pem(ca), chain=frontend.chain, key=frontend.key)
            # SVIDs carry no DNS/IP SAN: expect_id checks the server's SPIFFE ID instead.
            ctx.check_hostname = False
            trust = bundle_pem(ca)
        url = f"https://127.0.0.1:{port}"
        with mtls_client(ctx, expect_id=CALLER, base_url=url, timeout=10) as http:
            answer = http.get("/whoami")
        assert answer.status_code == 200
        assert answer.json() == {"caller": FRONTEND}
        CertificateAuthority.init(
            tmp_path / "foreign", trust_domain="example.org", passphrase=PASSPHRASE
        ).close()
        with CertificateAuthority.open(tmp_path / "foreign", passphrase=PASSPHRASE) as foreign:
            stranger = issue(foreign, FRONTEND, tmp_path)
        bad = client_context(cadata=trust, chain=stranger.chain, key=stranger.key)
        bad.check_hostname = False
        with pytest.raises(Exception):  # noqa: B017, PT011 - httpx wraps the TLS alert variously
            with mtls_client(bad, expect_id=CALLER, base_url=url, timeout=10) as http:
                http.get("/whoami").raise_for_status()
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["served"] == [FRONTEND]


# -- 4. bad input ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    ["FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles", "FetchJWTSVID", "ValidateJWTSVID"],
)
def test_every_method_without_the_security_header_is_invalid_argument(
    stack: Stack, method: str
) -> None:
    """Each of the five methods refuses a call without `workload.spiffe.io: true`."""
    streaming = method in {"FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles"}
    with grpc.insecure_channel(f"unix:{stack.socket}") as ch:
        path = f"/SpiffeWorkloadAPI/{method}"

        def call() -> object:
            if streaming:
                return next(iter(ch.unary_stream(path)(b"", timeout=5)))
            return ch.unary_unary(path)(b"", timeout=5)

        with pytest.raises(grpc.RpcError) as info:
            call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "security header missing" in info.value.details()


def _agent_cli(
    stack: Stack, tmp: Path, socket_url: str, *extra: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    data = tmp / "data"
    scratch = tmp / "tmpdir"  # the agent's private socket directory would appear here
    scratch.mkdir(exist_ok=True)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "trustmesh", "workload-agent", "--ca", stack.server.url),
            *("--node", NODE, "--data", str(data), "--bundle", str(stack.server.bundle)),
            *("--socket", socket_url, *extra),
        ],
        env={**os.environ, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, scratch


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("parent-is-a-file", "Cannot create the socket directory"),
        ("file-at-path", "exists and is not a socket: refusing to replace it"),
        ("unwritable-dir", "Cannot create the Workload API socket"),
        ("not-unix", "is not a unix:// URL with an absolute path"),
        ("relative", "is not a unix:// URL with an absolute path"),
    ],
)
def test_socket_that_cannot_be_created_fails_first_and_leaves_nothing(
    stack: Stack, tmp_path: Path, where: str, expected: str
) -> None:
    """A socket that cannot be created exits 2 with one line, before the node enrolls (its
    join token stays unused), and leaves no staged socket, private directory or file change."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    urls = {
        "parent-is-a-file": f"unix://{blocker}/agent.sock",
        "file-at-path": f"unix://{blocker}",
        "unwritable-dir": "unix:///proc/agent.sock",
        "not-unix": "tcp://127.0.0.1:9000",
        "relative": "unix://run/agent.sock",
    }
    with stack.server.ca() as ca:
        token = ca.create_join_token(NODE, actor="test")
    done, scratch = _agent_cli(stack, tmp_path, urls[where], "--token", token)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]
    assert blocker.read_text() == "not a directory\n"
    assert list(scratch.iterdir()) == []  # no private socket directory left behind
    assert not (tmp_path / "data" / "node" / "key.pem").exists()  # never enrolled
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_failed_enrollment_removes_the_socket_it_made(stack: Stack, tmp_path: Path) -> None:
    """A start that fails after the socket was made (a used-up join token) exits non-zero
    with one line and removes the socket and its private directory again."""
    sock = tmp_path / "run" / "agent.sock"
    done, scratch = _agent_cli(stack, tmp_path, f"unix://{sock}", "--token", "tm_bogus_token")
    assert done.returncode != 0
    assert done.stderr.strip(), "no error message"
    assert "Traceback" not in done.stderr, done.stderr
    assert not sock.exists(), "the failed agent left its socket behind"
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "data" / "node" / "key.pem").exists()


# -- the docs -------------------------------------------------------------------------------


def test_docs_show_exactly_the_snippets_the_tests_run() -> None:
    """Every Python block in docs/runtimes/py-spiffe.md is a `# doc:` block of
    tests/_spiffe_client.py, unchanged, and every such block is shown."""
    shown = [
        block.strip("\n")
        for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    ]
    source = CLIENT.read_text()
    blocks = {
        name: textwrap.dedent(body).strip("\n")
        for name, body in re.findall(
            r"^[ ]*# doc: ([\w-]+)\n(.*?)^[ ]*# end doc$", source, flags=re.DOTALL | re.MULTILINE
        )
    }
    assert set(blocks) == {
        "imports",
        "x509-source",
        "jwt-source",
        "spiffe-tls-dial",
        "spiffe-tls-listen",
    }
    assert sorted(shown) == sorted(blocks.values())


def test_spiffe_tls_installs_with_our_spiffe() -> None:
    """spiffe-tls (a dev dependency) is installed beside the py-spiffe version we test."""
    from importlib.metadata import requires, version

    assert version("spiffe-tls") >= "0.4.0"
    assert any(r.replace(" ", "").startswith("spiffe<0.4.0") for r in requires("spiffe-tls") or [])
    assert version("spiffe").startswith("0.3.")


@pytest.mark.slow
def test_cancelled_fetches_free_their_worker_at_once(stack: Stack) -> None:
    """Many open-first-response-cancel fetches (py-spiffe's `fetch_x509_svid`) in a burst
    never hit the 256-stream limit: a cancelled stream releases its thread at once."""
    from concurrent.futures import ThreadPoolExecutor

    from trustmesh.workload._proto import workload_pb2 as pb
    from trustmesh.workload._proto import workload_pb2_grpc as pb_grpc

    def burst(_: int) -> int:
        done = 0
        with grpc.insecure_channel(f"unix:{stack.socket}") as ch:
            api = pb_grpc.SpiffeWorkloadAPIStub(ch)  # type: ignore[no-untyped-call]
            for _ in range(60):
                stream = api.FetchX509SVID(
                    pb.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=10
                )
                assert next(stream).svids
                stream.cancel()
                done += 1
        return done

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(burst, range(8))) == 480
