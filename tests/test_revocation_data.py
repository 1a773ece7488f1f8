"""Revocation data for the whole chain, checked by real peers: openssl, HAProxy and the
agent's --crl file, against a real `ca serve` with its plain-HTTP OCSP/CRL listener."""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from trustmesh.authority import ROOT_CRL_NAME, CertificateAuthority
from trustmesh.cli import main
from trustmesh.pki import KeyType

from ._runtimes import serial_of, write_identity
from ._server import Server, free_port, running_server, stop
from .conftest import PASSPHRASE

pytestmark = pytest.mark.slow

needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (apt install haproxy)"
)


@dataclass
class Stack:
    """A running `ca serve --ocsp-listen`, a good and a revoked leaf."""

    server: Server
    plain: str
    work: Path
    good: Path
    revoked: Path


def _cli(stack: Stack, argv: tuple[str, ...]) -> int:
    """Run a CA command in-process on the stack's CA home."""
    return main([argv[0], "--home", str(stack.server.home), *argv[1:]])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("revdata")
    plain_port = free_port()
    plain = f"http://127.0.0.1:{plain_port}"
    CertificateAuthority.init(
        work / "home",
        trust_domain="example.org",
        passphrase=PASSPHRASE,
        key_type=KeyType.EC_P256,
        crl_urls=[f"{plain}/crl"],
        ocsp_urls=[f"{plain}/"],
    ).close()
    with CertificateAuthority.open(work / "home", passphrase=PASSPHRASE) as ca:
        good = write_identity(ca.issue("spiffe://example.org/good"), work / "good")
        revoked = write_identity(ca.issue("spiffe://example.org/revoked"), work / "revoked")
        ca.revoke(serial_of(revoked / "cert.pem"), reason="keyCompromise")
    with running_server(
        work / "home", work, extra_args=("--ocsp-listen", f"127.0.0.1:{plain_port}")
    ) as server:
        yield Stack(server, plain, work, good, revoked)


def _openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, check=check, timeout=30
    )


def _split(pem: bytes, directory: Path) -> list[Path]:
    marker = b"-----BEGIN X509 CRL-----"
    paths = []
    for i, body in enumerate(pem.split(marker)[1:]):
        path = directory / f"crl{i}.pem"
        path.write_bytes(marker + body)
        paths.append(path)
    return paths


def test_chain_pem_holds_both_crls_each_verified_by_openssl(stack: Stack, tmp_path: Path) -> None:
    """`crl --chain --pem` and GET /v1/crl/chain give the intermediate's and the root's CRL,
    which `openssl crl -verify` checks against their issuers."""
    home = stack.server.home
    out = tmp_path / "chain.pem"
    assert _cli(stack, ("crl", "--chain", "--pem", "--out", str(out))) == 0
    ctx = ssl.create_default_context(cafile=str(stack.server.bundle))
    served = httpx.get(f"{stack.server.url}/v1/crl/chain", verify=ctx)
    assert served.status_code == 200
    assert served.headers["content-type"] == "application/x-pem-file"
    for pem in (out.read_bytes(), served.content):
        leaf_crl, root_crl = _split(pem, tmp_path)
        leaf = _openssl(
            "crl",
            "-in",
            str(leaf_crl),
            "-CAfile",
            str(home / "intermediate.pem"),
            "-noout",
            "-verify",
            "-issuer",
        )
        assert "verify OK" in leaf.stderr + leaf.stdout
        assert "Intermediate" in leaf.stdout
        root = _openssl(
            "crl",
            "-in",
            str(root_crl),
            "-CAfile",
            str(home / "root.pem"),
            "-noout",
            "-verify",
            "-issuer",
        )
        assert "verify OK" in root.stderr + root.stdout
        assert "Root CA" in root.stdout
    root_der = httpx.get(f"{stack.server.url}/v1/crl/root", verify=ctx)
    assert (
        "CN=trustmesh Root CA" in x509.load_der_x509_crl(root_der.content).issuer.rfc4514_string()
    )


def test_chain_without_pem_to_a_file_is_refused(stack: Stack, tmp_path: Path) -> None:
    """DER cannot hold two CRLs: `crl --chain --out F` without --pem exits 2, writes nothing."""
    out = tmp_path / "chain.der"
    assert _cli(stack, ("crl", "--chain", "--out", str(out))) == 2
    assert not out.exists()


def test_openssl_verify_crl_check_all_accepts_good_refuses_revoked(
    stack: Stack, tmp_path: Path
) -> None:
    """With the chain file, `openssl verify -crl_check_all` accepts the good leaf and refuses
    the revoked one; the leaf CRL alone fails even the good leaf (the bug this fixes)."""
    home = stack.server.home
    chain = tmp_path / "chain.pem"
    assert _cli(stack, ("crl", "--chain", "--pem", "--out", str(chain))) == 0
    leaf_only = tmp_path / "leaf.pem"
    assert _cli(stack, ("crl", "--pem", "--out", str(leaf_only))) == 0

    def verify(crl: Path, cert: Path) -> subprocess.CompletedProcess[str]:
        return _openssl(
            "verify",
            "-crl_check_all",
            "-CRLfile",
            str(crl),
            "-CAfile",
            str(home / "root.pem"),
            "-untrusted",
            str(home / "intermediate.pem"),
            str(cert),
            check=False,
        )

    good = verify(chain, stack.good / "cert.pem")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = verify(chain, stack.revoked / "cert.pem")
    assert bad.returncode != 0
    assert "certificate revoked" in bad.stdout + bad.stderr
    before = verify(leaf_only, stack.good / "cert.pem")
    assert before.returncode != 0
    assert "unable to get certificate CRL" in before.stdout + before.stderr


def test_leaves_and_intermediate_carry_cdp_and_aia(stack: Stack) -> None:
    """`openssl x509 -text` shows the leaf's CDP and AIA-OCSP and the intermediate's CDP."""
    leaf = _openssl("x509", "-in", str(stack.good / "cert.pem"), "-noout", "-text").stdout
    assert f"URI:{stack.plain}/crl" in leaf
    assert f"OCSP - URI:{stack.plain}/" in leaf
    inter = _openssl(
        "x509", "-in", str(stack.server.home / "intermediate.pem"), "-noout", "-text"
    ).stdout
    assert f"URI:{stack.plain}/crl/root" in inter


def test_openssl_downloads_both_crls_from_the_distribution_points(stack: Stack) -> None:
    """`openssl verify -crl_download -crl_check` follows each CDP to the plain listener: the
    leaves' to /crl (good accepted, revoked refused), the intermediate's to /crl/root."""
    home = stack.server.home

    def verify(cert: Path, *untrusted: str) -> subprocess.CompletedProcess[str]:
        return _openssl(
            "verify",
            "-crl_download",
            "-crl_check",
            "-CAfile",
            str(home / "root.pem"),
            *untrusted,
            str(cert),
            check=False,
        )

    chain = ("-untrusted", str(home / "intermediate.pem"))
    ok = verify(stack.good / "cert.pem", *chain)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = verify(stack.revoked / "cert.pem", *chain)
    assert bad.returncode != 0
    assert "certificate revoked" in bad.stdout + bad.stderr
    inter = verify(home / "intermediate.pem")
    assert inter.returncode == 0, inter.stdout + inter.stderr


@pytest.mark.parametrize(
    ("which", "expected"), [("good", "good"), ("revoked", "revoked"), ("unknown", "unknown")]
)
def test_openssl_ocsp_over_plain_http(stack: Stack, which: str, expected: str) -> None:
    """`openssl ocsp -url http://127.0.0.1:PORT` gets good, revoked and unknown answers,
    signed by the intermediate."""
    home = stack.server.home
    target = (
        ["-serial", "0x1234567890"]
        if which == "unknown"
        else ["-cert", str(getattr(stack, which) / "cert.pem")]
    )
    done = _openssl(
        "ocsp",
        "-issuer",
        str(home / "intermediate.pem"),
        *target,
        "-url",
        stack.plain,
        "-CAfile",
        str(home / "root.pem"),
    )
    assert "Response verify OK" in done.stderr + done.stdout
    assert f": {expected}" in done.stdout


def test_plain_listener_ocsp_get_and_crls(stack: Stack, tmp_path: Path) -> None:
    """The RFC 6960 GET form and /crl, /crl/root, /crl/chain answer on plain HTTP."""
    home = stack.server.home
    req = tmp_path / "req.der"
    _openssl(
        "ocsp",
        "-issuer",
        str(home / "intermediate.pem"),
        "-cert",
        str(stack.revoked / "cert.pem"),
        "-no_nonce",
        "-reqout",
        str(req),
    )
    encoded = base64.b64encode(req.read_bytes()).decode()
    quoted = encoded.replace("/", "%2F").replace("+", "%2B").replace("=", "%3D")
    answer = httpx.get(f"{stack.plain}/{quoted}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/ocsp-response"
    resp = tmp_path / "resp.der"
    resp.write_bytes(answer.content)
    done = _openssl(
        "ocsp",
        "-respin",
        str(resp),
        "-issuer",
        str(home / "intermediate.pem"),
        "-cert",
        str(stack.revoked / "cert.pem"),
        "-CAfile",
        str(home / "root.pem"),
    )
    assert ": revoked" in done.stdout
    leaf = x509.load_der_x509_crl(httpx.get(f"{stack.plain}/crl").content)
    assert int(serial_of(stack.revoked / "cert.pem"), 16) in {e.serial_number for e in leaf}
    root = x509.load_der_x509_crl(httpx.get(f"{stack.plain}/crl/root").content)
    assert "Root CA" in root.issuer.rfc4514_string()
    assert httpx.get(f"{stack.plain}/crl/chain").content.count(b"BEGIN X509 CRL") == 2


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 404),
        ("GET", "/", 404),
        ("GET", "/v1/bundle", 404),
        ("POST", "/v1/enroll", 405),
        ("POST", "/crl", 405),
        ("DELETE", "/", 405),
    ],
)
def test_plain_listener_serves_nothing_else(
    stack: Stack, method: str, path: str, status: int
) -> None:
    """Everything but OCSP and the CRLs is 404/405 problem+json on the plain listener."""
    answer = httpx.request(method, f"{stack.plain}{path}", content=b"{}")
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/problem+json"
    assert "only OCSP" in answer.json()["detail"]


def test_root_crl_is_resigned_at_half_life_and_kept(tmp_path: Path) -> None:
    """A root CRL past half its lifetime is re-signed with the root key and stored; with the
    root key gone it is served until nextUpdate, then refused with a ConfigError."""
    from datetime import UTC, datetime, timedelta

    from trustmesh.errors import ConfigError

    start = datetime(2030, 1, 1, tzinfo=UTC)
    with CertificateAuthority.init(
        tmp_path / "h", trust_domain="example.org", passphrase=PASSPHRASE, now=start
    ) as ca:
        first = ca.root_crl(now=start + timedelta(days=1))
        assert first.last_update_utc == start
        second = ca.root_crl(now=start + timedelta(days=16))
        assert second.last_update_utc == start + timedelta(days=16)
        stored = x509.load_der_x509_crl((tmp_path / "h" / ROOT_CRL_NAME).read_bytes())
        assert stored.last_update_utc == second.last_update_utc
        (tmp_path / "h" / "root.key").rename(tmp_path / "root.key.offline")
    with CertificateAuthority.open(tmp_path / "h", passphrase=PASSPHRASE) as ca:
        kept = ca.root_crl(now=start + timedelta(days=40))
        assert kept.last_update_utc == second.last_update_utc
        with pytest.raises(ConfigError, match="trustmesh crl --root"):
            ca.root_crl(now=start + timedelta(days=47))


# -- the agent's --crl file -------------------------------------------------------------


def _agent(stack: Stack, name: str, out: Path, *extra: str) -> subprocess.Popen[str]:
    token = stack.server.join_token(f"spiffe://example.org/{name}")
    with (stack.work / f"agent-{name}.log").open("w") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "agent",
                "--ca",
                stack.server.url,
                "--id",
                f"spiffe://example.org/{name}",
                "--out",
                str(out),
                "--bundle",
                str(stack.server.bundle),
                "--token",
                token,
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _wait(predicate, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start


def _revoke_cli(stack: Stack, cert: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "trustmesh", "revoke", serial_of(cert)],
        env={**os.environ, "TRUSTMESH_HOME": str(stack.server.home)},
        check=True,
        capture_output=True,
        timeout=30,
    )


def test_agent_rewrites_crl_file_within_a_second_and_runs_on_crl(
    stack: Stack, tmp_path: Path
) -> None:
    """After a real `trustmesh revoke`, the agent's --crl file lists the serial within 1 s
    (rewritten atomically) and --on-crl ran on the new file."""
    crl = tmp_path / "chain-crl.pem"
    copy = tmp_path / "copy.pem"
    with CertificateAuthority.open(stack.server.home, passphrase=PASSPHRASE) as ca:
        victim = write_identity(ca.issue("spiffe://example.org/victim"), tmp_path / "victim")
    agent = _agent(
        stack,
        "crl-agent",
        tmp_path / "id",
        "--crl",
        str(crl),
        "--on-crl",
        f"cp {crl} {copy}",
    )
    try:
        _wait(copy.exists, 30, "the first CRL file and its hook")
        assert copy.read_bytes() == crl.read_bytes()
        serial = int(serial_of(victim / "cert.pem"), 16)

        def listed() -> bool:
            data = crl.read_bytes()
            return any(
                serial in {e.serial_number for e in x509.load_pem_x509_crl(part)}
                for part in (
                    b"-----BEGIN X509 CRL-----" + p
                    for p in data.split(b"-----BEGIN X509 CRL-----")[1:]
                )
            )

        assert not listed()
        _revoke_cli(stack, victim / "cert.pem")
        took = _wait(listed, 5, "the revoked serial in the CRL file")
        assert took < 1.0, f"the CRL file was rewritten {took:.2f}s after the revocation"
        _wait(lambda: copy.read_bytes() == crl.read_bytes(), 5, "--on-crl on the new file")
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        leaf_crl, root_crl = _split(crl.read_bytes(), tmp_path)
        home = stack.server.home
        assert (
            "verify OK"
            in _openssl(
                "crl",
                "-in",
                str(leaf_crl),
                "-CAfile",
                str(home / "intermediate.pem"),
                "-noout",
                "-verify",
            ).stderr
        )
        assert (
            "verify OK"
            in _openssl(
                "crl", "-in", str(root_crl), "-CAfile", str(home / "root.pem"), "-noout", "-verify"
            ).stderr
        )
    finally:
        stop(agent)


def test_agent_failing_on_crl_hook_is_logged_and_retried(stack: Stack, tmp_path: Path) -> None:
    """A failing --on-crl command is logged with its status and retried, not dropped."""
    agent = _agent(
        stack,
        "failing-hook",
        tmp_path / "id",
        "--crl",
        str(tmp_path / "c.pem"),
        "--on-crl",
        "false",
    )
    log = stack.work / "agent-failing-hook.log"
    try:
        _wait(
            lambda: log.read_text().count("CRL reload (ran false) failed") >= 2,
            20,
            "two failures of the hook",
        )
        line = next(x for x in log.read_text().splitlines() if "CRL reload" in x)
        assert "exited with status 1" in line
        assert "Retrying in" in line
        assert (tmp_path / "c.pem").exists()
        assert agent.poll() is None
    finally:
        stop(agent)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--crl", "/nonexistent-dir/chain.pem"), "Cannot write /nonexistent-dir/chain.pem"),
        (("--crl", "{tmp}"), "is a directory"),
        (
            ("--crl", "{tmp}/chain.pem", "--haproxy-socket", "{tmp}/no.sock"),
            "Cannot reach HAProxy's runtime API",
        ),
        (("--on-crl", "true"), "add --crl FILE"),
    ],
)
def test_agent_crl_bad_input_exits_2_before_enrolling(
    stack: Stack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    """An unwritable --crl path, a directory, an unreachable HAProxy socket: one line, exit 2,
    no identity enrolled, nothing written, the old CRL kept."""
    old = tmp_path / "chain.pem"
    old.write_bytes(b"old CRL")
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    out = tmp_path / "id"
    code = main(
        [
            "agent",
            "--ca",
            stack.server.url,
            "--id",
            "spiffe://example.org/bad-input",
            "--out",
            str(out),
            "--bundle",
            str(stack.server.bundle),
            "--token",
            "tmj_unused",
            "--once",
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    said = [line for line in err.splitlines() if line and not line.startswith(("Usage:", "Try "))]
    assert len(said) == 1, err  # one line (click usage errors add the usage hint)
    assert not (out / "cert.pem").exists()
    assert old.read_bytes() == b"old CRL"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.pem"]


def test_agent_crl_inside_an_out_directory_not_created_yet(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`agent --out DIR --crl DIR/chain-crl.pem --once` with DIR (and its parent) not there
    yet: the agent creates DIR, enrolls and writes the chain CRL file in it."""
    out = tmp_path / "run" / "orders"
    capsys.readouterr()
    home = str(stack.server.home)
    assert main(["token", "create", "spiffe://example.org/crl-in-out", "--home", home]) == 0
    token = capsys.readouterr().out.strip()
    code = main(
        [
            *("agent", "--ca", stack.server.url, "--bundle", str(stack.server.bundle)),
            *("--id", "spiffe://example.org/crl-in-out", "--out", str(out)),
            *("--crl", str(out / "chain-crl.pem"), "--token", token, "--once"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (out / "cert.pem").exists()
    pem = (out / "chain-crl.pem").read_bytes()
    assert pem.count(b"-----BEGIN X509 CRL-----") == 2
    x509.load_pem_x509_crl(pem)  # the first (leaf) CRL parses


@pytest.mark.parametrize(
    ("out", "crl"),
    [
        # --out cannot be created: its nearest existing ancestor is a file
        ("{tmp}/old.pem/id", "{tmp}/old.pem/id/chain-crl.pem"),
        # a directory under --out that the agent does not create
        ("{tmp}/id", "{tmp}/id/crl/chain-crl.pem"),
    ],
)
def test_agent_crl_in_an_uncreatable_directory_exits_2_before_enrolling(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str, crl: str
) -> None:
    """A --crl path whose directory the agent would not or could not create: one line,
    exit 2, nothing enrolled or created."""
    (tmp_path / "old.pem").write_bytes(b"old CRL")
    code = main(
        [
            *("agent", "--ca", stack.server.url, "--bundle", str(stack.server.bundle)),
            *("--id", "spiffe://example.org/bad-input", "--out", out.format(tmp=tmp_path)),
            *("--crl", crl.format(tmp=tmp_path), "--token", "tmj_unused", "--once"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"Cannot write {crl.format(tmp=tmp_path)}" in err
    assert len([line for line in err.splitlines() if line]) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pem"]
    assert (tmp_path / "old.pem").read_bytes() == b"old CRL"


# -- HAProxy through its runtime API ------------------------------------------------------


HAPROXY_CFG = """\
global
    stats socket {sock} level admin
    log stderr format raw local0 info

defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s

frontend mtls
    bind 127.0.0.1:{port} ssl crt {pem} ca-file {ca} verify required crl-file {crl}
    http-request return status 200 content-type text/plain string ok
"""


@needs_haproxy
def test_haproxy_refuses_revoked_client_after_runtime_api_update(
    stack: Stack, tmp_path: Path
) -> None:
    """HAProxy with crl-file and the agent's --haproxy-socket: a good client is served, a
    client revoked with `trustmesh revoke` is refused within 2 s, HAProxy never restarts,
    and the --exec reload (for certificates) is not run for new CRLs."""
    home = stack.server.home
    with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
        server = write_identity(
            ca.issue("spiffe://example.org/haproxy", dns=["localhost"], ips=["127.0.0.1"]),
            tmp_path / "server",
        )
        client = write_identity(ca.issue("spiffe://example.org/client"), tmp_path / "client")
    crl = tmp_path / "chain-crl.pem"
    assert _cli(stack, ("crl", "--chain", "--pem", "--out", str(crl))) == 0
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes((server / "chain.pem").read_bytes() + (server / "key.pem").read_bytes())
    sock = tmp_path / "haproxy.sock"
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(sock=sock, port=port, pem=pem, ca=home / "root.pem", crl=crl))
    with (tmp_path / "haproxy.log").open("w") as log:
        haproxy = subprocess.Popen(
            ["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT, text=True
        )
    agent = None
    try:
        _wait(sock.exists, 15, "the HAProxy stats socket")
        ctx = ssl.create_default_context(cafile=str(home / "root.pem"))
        ctx.load_cert_chain(client / "chain.pem", client / "key.pem")

        def served() -> bool:
            try:
                return httpx.get(f"https://127.0.0.1:{port}/", verify=ctx, timeout=3).text == "ok"
            except httpx.HTTPError:
                return False

        _wait(served, 15, "HAProxy serving the good client")
        marker = tmp_path / "exec-ran-for-crl"
        agent = _agent(
            stack,
            "haproxy-agent",
            tmp_path / "id",
            "--crl",
            str(crl),
            "--haproxy-socket",
            str(sock),
            # the certificate reload; it must not run for CRLs, which go through the socket
            "--exec",
            f"sh -c 'test -z \"$TRUSTMESH_CRL\" || touch {marker}'",
        )
        agent_log = stack.work / "agent-haproxy-agent.log"
        _wait(
            lambda: "revocation set bootstrapped" in agent_log.read_text(),
            30,
            "the agent following the feed",
        )
        _revoke_cli(stack, client / "cert.pem")
        took = _wait(lambda: not served(), 5, "HAProxy refusing the revoked client")
        assert took < 2.0, f"HAProxy refused the revoked client only after {took:.2f}s"
        assert "CRL reloaded (HAProxy runtime API" in agent_log.read_text()
        assert not marker.exists(), "--exec ran for a CRL that went through the socket"
        assert haproxy.poll() is None
        with CertificateAuthority.open(home, passphrase=PASSPHRASE) as ca:
            other = write_identity(ca.issue("spiffe://example.org/other"), tmp_path / "other")
        ctx2 = ssl.create_default_context(cafile=str(home / "root.pem"))
        ctx2.load_cert_chain(other / "chain.pem", other / "key.pem")
        assert httpx.get(f"https://127.0.0.1:{port}/", verify=ctx2, timeout=3).text == "ok"
    finally:
        if agent is not None:
            stop(agent)
        stop(haproxy)


def test_ocsp_listen_on_a_taken_port_exits_2(
    ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ca serve --ocsp-listen` on a port in use is one line and exit 2, before serving."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(
            [
                "ca",
                "serve",
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--ocsp-listen",
                f"127.0.0.1:{port}",
            ]
        )
    assert code == 2
    assert f"--ocsp-listen 127.0.0.1:{port}: cannot listen there" in capsys.readouterr().err
