"""The CA client, `trustmesh agent` and `trustmesh revoke --ca`, against a real `ca serve`
process on 127.0.0.1 (real TLS, real mTLS, real files), plus the loop's pure scheduling."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

import trustmesh.agent._identity as identity_module
from trustmesh import files
from trustmesh.agent import (
    JITTER_FRACTION,
    Agent,
    Reload,
    backoff_delay,
    new_key_and_csr,
    next_renewal,
)
from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.client import AsyncCAClient, CAClient, EnrollResult
from trustmesh.errors import APIError, ConfigError, TransportError
from trustmesh.pki import KeyType, SpiffeID, dump_private_key, pem_certificates

from ._server import Server, free_port, new_ca_server, running_server
from .conftest import PASSPHRASE

WEB = "spiffe://example.org/web"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One CA server for the whole module: each test uses its own identities and dirs."""
    with new_ca_server(tmp_path_factory.mktemp("agent-ca")) as running:
        yield running


def token_for(server: Server, spiffe_id: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Create a join token through the CLI, which prints it alone on stdout."""
    capsys.readouterr()
    assert main(["token", "create", spiffe_id, "--home", str(server.home)]) == 0
    token = capsys.readouterr().out
    assert token.count("\n") == 1
    return token.strip()


def agent(server: Server, spiffe_id: str, out: Path, *extra: str) -> list[str]:
    return server.agent(spiffe_id, out, *extra)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def leaf(directory: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())


def enrolled(server: Server, spiffe_id: str, out: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    token = token_for(server, spiffe_id, capsys)
    argv = agent(server, spiffe_id, out, "--bundle", str(server.bundle), "--token", token)
    code, _, err = run([*argv, "--once"], capsys)
    assert code == 0, err
    return out


# -- scheduling: pure functions ---------------------------------------------------------


def test_next_renewal_is_at_two_thirds_moved_earlier_by_jitter() -> None:
    """Renewal falls at 2/3 of the lifetime, up to 1/12 earlier with jitter, never before now."""
    start, end, exact = T0, T0 + timedelta(hours=24), timedelta(0)
    assert next_renewal(start, end, T0, backdate=exact) == T0 + timedelta(hours=16)
    assert next_renewal(start, end, T0, jitter=1.0, backdate=exact) == T0 + timedelta(hours=14)
    assert next_renewal(start, end, T0, jitter=0.5, backdate=exact) == T0 + timedelta(hours=15)
    assert JITTER_FRACTION == pytest.approx(1 / 12)
    late = T0 + timedelta(hours=20)
    assert next_renewal(start, end, late) == late  # overdue: at once
    with pytest.raises(ValueError, match="timezone-aware"):
        next_renewal(start.replace(tzinfo=None), end, T0)
    with pytest.raises(ValueError, match="after not_before"):
        next_renewal(end, start, T0)
    with pytest.raises(ValueError, match="jitter"):
        next_renewal(start, end, T0, jitter=1.5)


def test_next_renewal_counts_the_lifetime_from_issuance_not_the_backdated_start() -> None:
    """The CA back-dates notBefore by a minute: a 9-second certificate renews after 6 s,
    not at once, and a 24-hour one still close to 16 h."""
    issued = T0
    short = next_renewal(issued - timedelta(minutes=1), issued + timedelta(seconds=9), issued)
    assert short == issued + timedelta(seconds=6)
    day = next_renewal(issued - timedelta(minutes=1), issued + timedelta(hours=24), issued)
    assert day == issued + timedelta(hours=16)
    # a certificate shorter than the back-dating counts from notBefore
    tiny = next_renewal(T0, T0 + timedelta(seconds=30), T0)
    assert tiny == T0 + timedelta(seconds=20)


def test_backoff_doubles_up_to_the_cap_and_jitter_shortens_it() -> None:
    """Retry waits double from the base, stop at the cap, and jitter takes off up to half."""
    assert [backoff_delay(n) for n in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(20) == 300.0
    assert backoff_delay(10_000, cap=30) == 30.0
    assert backoff_delay(3, base=0.5, cap=3.0) == 3.0
    assert backoff_delay(2, jitter=1.0) == 2.0
    assert backoff_delay(2, jitter=0.5) == 3.0
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1)
    with pytest.raises(ValueError, match="jitter"):
        backoff_delay(1, jitter=-0.1)
    with pytest.raises(ValueError, match="positive"):
        backoff_delay(1, cap=0)


# -- the client ---------------------------------------------------------------------------


def test_client_enrolls_and_maps_errors(server: Server, tmp_path: Path) -> None:
    """CAClient returns an EnrollResult, raises APIError with the problem on a refusal and
    TransportError (naming the URL and the fix) when the CA cannot be reached or verified."""
    with server.ca() as ca:
        token = ca.create_join_token("spiffe://example.org/client")
    _, csr = new_key_and_csr(SpiffeID.parse("spiffe://example.org/client"), KeyType.EC_P256)
    with CAClient(server.url, bundle=server.bundle) as client:
        assert client.bundle() == server.bundle.read_bytes()
        result = client.enroll(token, csr)
        assert isinstance(result, EnrollResult)
        assert result.spiffe_id == "spiffe://example.org/client"
        assert result.not_after.tzinfo is not None
        assert (
            format(x509.load_pem_x509_certificate(result.certificate.encode()).serial_number, "x")
            == result.serial
        )
        with pytest.raises(APIError, match="already used") as refused:
            client.enroll(token, csr)
        assert refused.value.status == 401
        assert refused.value.problem["reason"] == "token_used"
        with pytest.raises(APIError, match="client certificate") as anonymous:
            client.renew(csr)
        assert anonymous.value.status == 401
        with pytest.raises(ValueError, match="exactly one"):
            client.revoke()

    port = free_port()
    with (
        CAClient(f"https://127.0.0.1:{port}", bundle=server.bundle) as down,
        pytest.raises(
            TransportError, match=rf"Cannot reach the CA at https://127.0.0.1:{port}.*ca serve"
        ),
    ):
        down.bundle()

    foreign = CertificateAuthority.init(
        tmp_path / "foreign", trust_domain="example.org", passphrase=b"other passphrase"
    )
    foreign_bundle = tmp_path / "foreign.pem"
    foreign_bundle.write_bytes(pem_certificates(foreign.bundle))
    impostor = foreign.issue("spiffe://example.org/client")
    foreign.close()
    assert impostor.key is not None
    (tmp_path / "chain.pem").write_bytes(pem_certificates(impostor.chain))
    (tmp_path / "key.pem").write_bytes(dump_private_key(impostor.key))
    with (
        CAClient(server.url, bundle=server.bundle, cert_dir=tmp_path) as stranger,
        pytest.raises(TransportError, match="refused our client certificate"),
    ):
        stranger.renew(csr)
    with (
        CAClient(server.url, bundle=foreign_bundle) as wrong,
        pytest.raises(TransportError, match=r"failed TLS verification.*export bundle"),
    ):
        wrong.bundle()

    with pytest.raises(ConfigError, match="must use https"):
        CAClient(server.url.replace("https", "http"), bundle=server.bundle)
    with pytest.raises(ConfigError, match=r"Cannot load the CA trust bundle"):
        CAClient(server.url, bundle=tmp_path / "missing.pem")
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(ConfigError, match=r"Cannot load the CA trust bundle"):
        CAClient(server.url, bundle=tmp_path / "empty.pem")


def test_async_client_has_the_same_methods(server: Server) -> None:
    """AsyncCAClient fetches the bundle, enrolls, and raises the same errors as CAClient."""
    with server.ca() as ca:
        token = ca.create_join_token("spiffe://example.org/async")
    _, csr = new_key_and_csr(SpiffeID.parse("spiffe://example.org/async"), KeyType.ED25519)

    async def scenario() -> tuple[bytes, EnrollResult, APIError, TransportError]:
        async with AsyncCAClient(server.url, bundle=server.bundle) as client:
            pem = await client.bundle()
            result = await client.enroll(token, csr)
            try:
                await client.enroll(token, csr)
            except APIError as exc:
                refused = exc
        async with AsyncCAClient(f"https://127.0.0.1:{free_port()}", bundle=server.bundle) as down:
            try:
                await down.bundle()
            except TransportError as exc:
                unreachable = exc
        return pem, result, refused, unreachable

    pem, result, refused, unreachable = asyncio.run(scenario())
    assert pem == server.bundle.read_bytes()
    assert result.spiffe_id == "spiffe://example.org/async"
    assert refused.status == 401
    assert "Cannot reach the CA" in unreachable.message


# -- the agent, --once ---------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_once_enrolls_then_keeps_then_renews(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--once enrolls with a token (files valid, key 0600), does nothing while the
    certificate is fresh, and --renew-now renews it with a new key and serial."""
    out = tmp_path / "web"
    token = token_for(server, WEB, capsys)
    base = agent(server, WEB, out, "--bundle", str(server.bundle), "--once")
    code, stdout, err = run([*base, "--token", token], capsys)
    assert code == 0, err
    assert stdout.startswith(f"enrolled {WEB}: serial ")
    assert stdout.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "bundle.pem",
        "cert.pem",
        "chain.pem",
        "key.pem",
    ]
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    first = leaf(out)
    san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    intermediate = tmp_path / "intermediate.pem"
    intermediate.write_bytes(
        x509.load_pem_x509_certificates((out / "chain.pem").read_bytes())[1].public_bytes(
            serialization.Encoding.PEM
        )
    )
    verified = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(out / "bundle.pem"),
            "-untrusted",
            str(intermediate),
            str(out / "cert.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip().endswith(": OK")

    before = snapshot(out)
    code, stdout, err = run(base, capsys)  # no token needed: the files are valid
    assert code == 0, err
    assert stdout.startswith(f"unchanged {WEB}: serial {format(first.serial_number, 'x')}")
    assert snapshot(out) == before

    code, stdout, err = run([*base, "--renew-now", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["action"] == "renewed"
    assert report["serial"] == format(leaf(out).serial_number, "x")
    assert report["serial"] != format(first.serial_number, "x")
    assert (out / "key.pem").read_bytes() != before["key.pem"][0]
    assert leaf(out).public_key() != first.public_key()
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # the bundle.pem written by the first enrollment now stands in for --bundle
    code, stdout, err = run(agent(server, WEB, out, "--once"), capsys)
    assert code == 0, err
    assert stdout.startswith("unchanged")


def test_exec_and_signal_run_only_after_new_files(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--exec runs its command (no shell) with the new serial in the environment after
    enrolling, not when nothing changed; a failing command exits 1 with the files in
    place; --signal sends the signal to the workload."""
    spiffe_id = "spiffe://example.org/exec"
    out, marker = tmp_path / "exec", tmp_path / "marker"
    script = tmp_path / "reload.py"
    script.write_text(
        "import os, pathlib, sys\n"
        "pathlib.Path(sys.argv[1]).write_text(os.environ['TRUSTMESH_SERIAL'])\n"
    )
    reload = shlex.join([sys.executable, str(script), str(marker)])
    token = token_for(server, spiffe_id, capsys)
    base = agent(server, spiffe_id, out, "--bundle", str(server.bundle), "--once")
    code, stdout, err = run([*base, "--token", token, "--exec", reload], capsys)
    assert code == 0, err
    assert marker.read_text() == format(leaf(out).serial_number, "x")
    assert "; ran " in stdout
    marker.unlink()
    assert run([*base, "--exec", reload], capsys)[0] == 0
    assert not marker.exists()  # unchanged: no reload

    failing = shlex.join([sys.executable, "-c", "print('reload broke'); raise SystemExit(3)"])
    code, stdout, err = run([*base, "--renew-now", "--exec", failing], capsys)
    assert code == 1
    assert stdout.startswith("renewed ")
    assert stdout.rstrip().endswith("; reload failed")
    assert "exited with status 3: reload broke; the new files are in place" in err
    assert run(base, capsys)[0] == 0  # the renewed files are valid and in place

    workload = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, signal, sys, time\n"
            "def hup(*_):\n"
            f"    pathlib.Path({str(marker)!r}).write_text('reloaded')\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGHUP, hup)\n"
            f"pathlib.Path({str(marker)!r} + '.ready').touch()\n"
            "time.sleep(30)\n",
        ]
    )
    try:
        ready = Path(f"{marker}.ready")
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        code, stdout, err = run([*base, "--renew-now", "--signal", f"{workload.pid}:HUP"], capsys)
        assert code == 0, err
        assert f"sent SIGHUP to {workload.pid}" in stdout
        assert workload.wait(timeout=10) == 0
        assert marker.read_text() == "reloaded"
    finally:
        workload.kill()
        workload.wait()


def test_replayed_token_is_refused_and_writes_nothing(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A join token used once cannot enroll again: exit 1, the server's reason, no files."""
    token = token_for(server, "spiffe://example.org/replay", capsys)
    first = agent(server, "spiffe://example.org/replay", tmp_path / "a", "--once")
    assert run([*first, "--bundle", str(server.bundle), "--token", token], capsys)[0] == 0
    second = tmp_path / "b"
    code, stdout, err = run(
        [
            *agent(server, "spiffe://example.org/replay", second, "--once"),
            "--bundle",
            str(server.bundle),
            "--token",
            token,
        ],
        capsys,
    )
    assert code == 1
    assert stdout == ""
    assert err.startswith("error: The CA refused to enroll spiffe://example.org/replay: ")
    assert "already used" in err
    assert err.count("\n") == 1
    assert not second.exists() or not list(second.iterdir())


def test_bad_input_exits_2_with_one_line(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No token when enrollment is needed, a bad URL, an unreadable bundle, a missing
    bundle, a bad --exec/--signal or a directory holding another identity: exit 2."""
    out = tmp_path / "fresh"
    bundle = ["--bundle", str(server.bundle)]
    cases: list[tuple[list[str], str]] = [
        (
            agent(server, WEB, out, *bundle, "--once"),
            "no join token was given: create one on the CA with 'trustmesh token create spiffe://example.org/web'",
        ),
        (
            [
                "agent",
                "--ca",
                "http://127.0.0.1:1",
                "--id",
                WEB,
                "--out",
                str(out),
                *bundle,
                "--once",
            ],
            "must use https",
        ),
        (
            ["agent", "--ca", "https://", "--id", WEB, "--out", str(out), *bundle, "--once"],
            "must name a host",
        ),
        (
            agent(server, WEB, out, "--bundle", str(tmp_path / "nope.pem"), "--once"),
            "Cannot read the trust bundle",
        ),
        (
            agent(server, WEB, out, "--once", "--token", "x"),
            "No trust bundle to verify the CA with",
        ),
        (agent(server, "spiffe://Example.org/x", out, *bundle, "--once"), "Invalid SPIFFE ID"),
        (
            agent(server, WEB, out, *bundle, "--once", "--exec", "no-such-reload-cmd"),
            "not an executable",
        ),
        (agent(server, WEB, out, *bundle, "--once", "--signal", "abc"), "not PID:SIGNAL"),
        (agent(server, WEB, out, *bundle, "--once", "--signal", "1:NOPE"), "Unknown signal"),
        (
            agent(server, WEB, out, *bundle, "--once", "--exec", "true", "--signal", "1:HUP"),
            "not both",
        ),
        (
            agent(server, WEB, out, *bundle, "--once", "--token-file", str(tmp_path / "nope")),
            "Cannot read the join token",
        ),
    ]
    for argv, message in cases:
        code, stdout, err = run(argv, capsys)
        assert (code, stdout) == (2, ""), (argv, err)
        assert message in err, (argv, err)
        # one line, except click's usage errors (they add the usage and a --help hint)
        assert err.count("\n") == 1 or err.startswith("Usage: trustmesh agent"), err
    # a directory that holds another identity's files is not a valid identity for --id
    other = enrolled(server, "spiffe://example.org/other", tmp_path / "other", capsys)
    code, _, err = run(agent(server, WEB, other, "--once"), capsys)
    assert code == 2
    assert f"is for spiffe://example.org/other, not {WEB}" in err


def test_ca_down_exits_1_and_leaves_files_untouched(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the CA cannot be reached, --once exits 1 naming the URL; the files stay as they were."""
    out = enrolled(server, "spiffe://example.org/down", tmp_path / "down", capsys)
    before = snapshot(out)
    port = free_port()
    argv = ["agent", "--ca", f"https://127.0.0.1:{port}", "--id", "spiffe://example.org/down"]
    code, stdout, err = run([*argv, "--out", str(out), "--once", "--renew-now"], capsys)
    assert (code, stdout) == (1, "")
    assert err.startswith(f"error: Cannot reach the CA at https://127.0.0.1:{port}")
    assert "trustmesh ca serve" in err
    assert snapshot(out) == before
    # but a fresh certificate needs no CA: exit 0
    code, stdout, err = run([*argv, "--out", str(out), "--once"], capsys)
    assert code == 0, err
    assert stdout.startswith("unchanged")


def test_a_failed_write_leaves_the_previous_files(
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When writing the new files fails half-way (disk full), the old files stay whole and
    no temporary file is left behind."""
    spiffe_id = "spiffe://example.org/diskfull"
    out = enrolled(server, spiffe_id, tmp_path / "diskfull", capsys)
    before = snapshot(out)

    def stage_file(path: Path, data: bytes, *, mode: int = 0o644) -> Path:
        if path.name == "cert.pem":
            raise OSError(errno.ENOSPC, "No space left on device")
        return files.stage_file(path, data, mode=mode)

    monkeypatch.setattr(identity_module, "stage_file", stage_file)
    with pytest.raises(ConfigError, match=r"No space left on device.*previous files are still"):
        Agent(server.url, SpiffeID.parse(spiffe_id), out).ensure(force=True)
    assert snapshot(out) == before


def test_expired_certificate_needs_a_new_token(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past its notAfter a certificate cannot renew: the agent says to create a new token,
    and with one it enrolls afresh."""
    spiffe_id = "spiffe://example.org/expired"
    out = enrolled(server, spiffe_id, tmp_path / "expired", capsys)
    later = leaf(out).not_valid_after_utc + timedelta(hours=1)
    sleeper = Agent(server.url, SpiffeID.parse(spiffe_id), out)
    assert sleeper.bundle == out / "bundle.pem"
    with pytest.raises(
        ConfigError, match=r"expired .* cannot renew: create a new join token"
    ) as no_token:
        sleeper.ensure(now=later)
    assert f"trustmesh token create {spiffe_id}" in no_token.value.message
    due = sleeper.ensure(now=leaf(out).not_valid_before_utc + timedelta(hours=17))
    assert due.action == "renewed"  # past 2/3 of 24 h


def test_revoke_through_the_server(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`trustmesh revoke --ca` revokes as the holder, is refused (exit 1) for someone else's
    certificate, and a revoked identity cannot renew but re-enrolls with a new token."""
    web = enrolled(server, "spiffe://example.org/holder", tmp_path / "holder", capsys)
    api = enrolled(server, "spiffe://example.org/bystander", tmp_path / "bystander", capsys)
    web_serial = format(leaf(web).serial_number, "x")
    api_serial = format(leaf(api).serial_number, "x")

    def revoke(identity: Path, *args: str) -> tuple[int, str, str]:
        return run(
            [
                "revoke",
                "--ca",
                server.url,
                "--cert",
                str(identity / "chain.pem"),
                "--key",
                str(identity / "key.pem"),
                "--bundle",
                str(server.bundle),
                *args,
            ],
            capsys,
        )

    code, stdout, err = revoke(web, api_serial)
    assert (code, stdout) == (1, "")
    assert "may revoke only its own certificates" in err
    with server.ca() as ca:
        assert ca.store.get_certificate(api_serial).revoked_at is None

    code, stdout, err = revoke(web, web_serial, "--reason", "keyCompromise", "--json")
    assert code == 0, err
    assert json.loads(stdout)[0]["revocation_reason"] == "keyCompromise"
    with server.ca() as ca:
        assert ca.store.get_certificate(web_serial).revoked_at is not None

    holder = agent(server, "spiffe://example.org/holder", web, "--once", "--renew-now")
    code, _, err = run(holder, capsys)
    assert code == 1
    assert "The CA refused to renew spiffe://example.org/holder" in err
    assert "A revoked identity cannot renew" in err
    token = token_for(server, "spiffe://example.org/holder", capsys)
    code, stdout, err = run([*holder, "--token", token], capsys)
    assert code == 0, err
    assert stdout.startswith("enrolled spiffe://example.org/holder")

    assert run(["revoke", web_serial, "--cert", str(web / "chain.pem")], capsys)[0] == 2
    assert run(["revoke", web_serial, "--ca", server.url], capsys)[0] == 2

    # bad input is exit 2 with the local command's message, as without --ca
    code, _, err = revoke(web, web_serial, "--reason", "keycompromized")
    assert code == 2
    assert "Unknown revocation reason 'keycompromized'" in err
    code, _, err = revoke(web, "zz")
    assert code == 2
    assert "'zz' is not a certificate serial" in err


def test_reload_parsing() -> None:
    """--exec is split like a shell would but run without one; --signal takes PID:NAME or number."""
    command = Reload.from_command(f"{shlex.quote(sys.executable)} -c 'print(1)'")
    assert command.argv == (sys.executable, "-c", "print(1)")
    assert Reload.from_signal(f"{os.getpid()}:usr1").signum is signal.SIGUSR1
    assert Reload.from_signal(f"{os.getpid()}:SIGHUP").signum is signal.SIGHUP
    assert Reload.from_signal(f"{os.getpid()}:15").signum is signal.SIGTERM
    with pytest.raises(ConfigError, match="check the quotes"):
        Reload.from_command("echo 'unclosed")


# -- the agent, loop mode -------------------------------------------------------------------


def wait_for(predicate: object, timeout: float = 20) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_loop_renews_keeps_files_while_the_ca_is_down_and_stops_on_signals(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m trustmesh agent` without --once enrolls, renews a 6-second certificate
    by itself (new serial, its keystore rewritten before the reload runs each time) and
    stops with exit 0 on SIGTERM;
    against an unreachable CA it logs warnings and retries, leaving the files alone, and
    stops on SIGINT."""
    spiffe_id = "spiffe://example.org/loop"
    out, log, marker = tmp_path / "loop", tmp_path / "agent.log", tmp_path / "reloads"
    script = tmp_path / "reload.py"
    script.write_text(
        "import os, sys\n"
        "from cryptography.hazmat.primitives.serialization import pkcs12\n"
        "held = pkcs12.load_pkcs12(open(sys.argv[2], 'rb').read(), sys.argv[3].encode())\n"
        "in_store = format(held.cert.certificate.serial_number, 'x')\n"
        "with open(sys.argv[1], 'a') as f:\n"
        "    f.write(os.environ['TRUSTMESH_SERIAL'] + ' ' + in_store + '\\n')\n"
    )
    token = token_for(server, spiffe_id, capsys)
    env = {**os.environ, "TRUSTMESH_JOIN_TOKEN": token}
    keystore = tmp_path / "keystore.p12"
    command = [
        sys.executable,
        "-m",
        "trustmesh",
        *agent(server, spiffe_id, out, "--bundle", str(server.bundle), "--ttl", "6s"),
        *store_args(tmp_path),
        "--exec",
        shlex.join([sys.executable, str(script), str(marker), str(keystore), STORE_PASSWORD]),
    ]
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) >= 2)
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            process.kill()
    reloads = [line.split() for line in marker.read_text().splitlines()]
    assert all(new == in_store for new, in_store in reloads)  # the keystore was written first
    serials = [new for new, _ in reloads]
    assert len(set(serials)) == len(serials)  # every reload saw a new certificate
    assert format(leaf(out).serial_number, "x") == serials[-1]
    text = log.read_text()
    assert f"enrolled {spiffe_id}" in text
    assert f"renewed {spiffe_id}" in text
    assert "SIGTERM received, stopping" in text
    # The feed opens once there is an identity to open it with, not before.
    assert "cannot reach the revocation feed" not in text
    assert "CRL fallback failed" not in text

    steady = enrolled(server, "spiffe://example.org/steady", tmp_path / "steady", capsys)
    before = snapshot(steady)
    down = f"https://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "trustmesh", "agent", "--ca", down]
    command += ["--id", "spiffe://example.org/steady", "--out", str(steady), "--renew-now"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: log.read_text().count("WARNING") >= 2)  # retried with backoff
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0
        finally:
            process.kill()
    text = log.read_text()
    assert f"Cannot reach the CA at {down}" in text
    assert "Keeping certificate" in text
    assert snapshot(steady) == before


def test_loop_recovers_when_the_ca_comes_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kill the CA: the agent keeps its files and retries; restart the CA on the same
    address: the agent renews by itself, with no one touching it."""
    home = tmp_path / "ca"
    CertificateAuthority.init(home, trust_domain="example.org", passphrase=PASSPHRASE).close()
    port = free_port()
    spiffe_id = "spiffe://example.org/phoenix"
    out, log = tmp_path / "phoenix", tmp_path / "agent.log"
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with running_server(home, tmp_path / "first", port=port) as first:
        enrolled(first, spiffe_id, out, capsys)
        url = first.url
    before = snapshot(out)
    command = [sys.executable, "-m", "trustmesh", "agent", "--ca", url, "--id", spiffe_id]
    command += ["--out", str(out), "--renew-now"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: log.read_text().count("WARNING") >= 2)  # CA down: retrying
            assert snapshot(out) == before  # the files stay in place meanwhile
            with running_server(home, tmp_path / "second", port=port):
                wait_for(lambda: snapshot(out) != before, timeout=40)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            process.kill()
    assert f"renewed {spiffe_id}" in log.read_text()
    assert (
        leaf(out).serial_number
        != x509.load_pem_x509_certificate(before["cert.pem"][0]).serial_number
    )


# -- PKCS#12 keystore and Java truststore ---------------------------------------------------

STORE_PASSWORD = "store-password-123"


def store_args(tmp_path: Path, *extra: str) -> list[str]:
    """--pkcs12/--truststore in tmp_path with a password file."""
    password = tmp_path / "store.pass"
    password.write_text(STORE_PASSWORD + "\n")
    return [
        *("--pkcs12", str(tmp_path / "keystore.p12")),
        *("--truststore", str(tmp_path / "truststore.p12")),
        *("--store-password-file", str(password)),
        *extra,
    ]


def load_store(path: Path) -> pkcs12.PKCS12KeyAndCertificates:
    return pkcs12.load_pkcs12(path.read_bytes(), STORE_PASSWORD.encode())


def test_stores_follow_every_enrollment_and_renewal(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The keystore (key, leaf, chain; alias trustmesh; 0600) and the truststore (the CA
    roots) are written with the PEM files and rewritten on renewal; an up-to-date pair is
    left alone, a missing one is written by --once, and --exec runs after they are in place."""
    spiffe_id = "spiffe://example.org/java"
    out = tmp_path / "java"
    keystore, truststore = tmp_path / "keystore.p12", tmp_path / "truststore.p12"
    stores = store_args(tmp_path)
    token = server.join_token(spiffe_id)
    argv = server.agent(spiffe_id, out, "--bundle", str(server.bundle), "--once", *stores)
    code, stdout, err = run([*argv, "--token", token], capsys)
    assert code == 0, err
    assert stdout.startswith(f"enrolled {spiffe_id}")
    held = load_store(keystore)
    assert held.cert is not None
    assert held.cert.friendly_name == b"trustmesh"
    chain = x509.load_pem_x509_certificates((out / "chain.pem").read_bytes())
    assert [held.cert.certificate, *(c.certificate for c in held.additional_certs)] == chain
    assert held.key is not None
    assert held.key.public_key() == leaf(out).public_key()
    trusted = load_store(truststore)
    bundle = x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())
    assert [c.certificate for c in trusted.additional_certs] == bundle
    assert [c.friendly_name for c in trusted.additional_certs] == [b"trustmesh-ca-0"]
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o600

    # unchanged certificate, up-to-date stores: nothing is rewritten
    before = {p: p.stat().st_mtime_ns for p in (keystore, truststore)}
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert stdout.startswith("unchanged")
    assert "wrote" not in stdout
    assert {p: p.stat().st_mtime_ns for p in (keystore, truststore)} == before

    # renewal: the reload command sees the new serial in the keystore already
    check = tmp_path / "check.py"
    check.write_text(
        "import os, sys\n"
        "from cryptography.hazmat.primitives.serialization import pkcs12\n"
        "held = pkcs12.load_pkcs12(open(sys.argv[1], 'rb').read(), sys.argv[2].encode())\n"
        "serial = format(held.cert.certificate.serial_number, 'x')\n"
        "sys.exit(0 if serial == os.environ['TRUSTMESH_SERIAL'] else 7)\n"
    )
    reload = shlex.join([sys.executable, str(check), str(keystore), STORE_PASSWORD])
    code, stdout, err = run([*argv, "--renew-now", "--exec", reload, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["action"] == "renewed"
    assert report["reloaded"].startswith("ran ")
    assert report["files"][-2:] == [str(keystore), str(truststore)]
    renewed = load_store(keystore).cert
    assert renewed is not None
    assert renewed.certificate == leaf(out)
    assert format(renewed.certificate.serial_number, "x") == report["serial"]
    assert renewed.certificate.serial_number != held.cert.certificate.serial_number
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o600

    # a deleted keystore is written back by --once, from the PEM files in place
    keystore.unlink()
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert stdout.startswith("unchanged")
    assert f"wrote {keystore}" in stdout
    assert load_store(keystore).cert == renewed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_store_options_are_refused_without_a_usable_password(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No password file, an empty or unreadable one, stray store options, a directory that
    cannot be created or one file for both stores: exit 2 with one line, nothing written."""
    out = tmp_path / "refused"
    empty = tmp_path / "empty.pass"
    empty.write_text("\n")
    password = tmp_path / "good.pass"
    password.write_text("pw\n")
    p12 = str(tmp_path / "k.p12")
    base = server.agent(WEB, out, "--bundle", str(server.bundle), "--once", "--token", "x")
    cases: list[tuple[list[str], str]] = [
        (["--pkcs12", p12], "need --store-password-file FILE"),
        (["--truststore", p12], "there is no default password"),
        (["--pkcs12", p12, "--store-password-file", str(empty)], "is empty"),
        (
            ["--pkcs12", p12, "--store-password-file", str(tmp_path / "nope")],
            "Cannot read store password",
        ),
        (["--store-password-file", str(password)], "only used with --pkcs12"),
        (["--pkcs12-legacy"], "--pkcs12-legacy is only used"),
        (["--rekey-stores"], "--rekey-stores is only used"),
        (
            ["--pkcs12", str(password / "k.p12"), "--store-password-file", str(password)],
            f"Cannot create {password} for {password / 'k.p12'}",
        ),
        (["--truststore", str(tmp_path), "--store-password-file", str(password)], "a directory"),
        (
            ["--pkcs12", p12, "--truststore", p12, "--store-password-file", str(password)],
            "the same file",
        ),
        (
            ["--truststore", str(out / "bundle.pem"), "--store-password-file", str(password)],
            "is one of the agent's PEM files",
        ),
    ]
    for extra, message in cases:
        code, stdout, err = run([*base, *extra], capsys)
        assert (code, stdout) == (2, ""), (extra, err)
        assert message in err, (extra, err)
        assert err.count("\n") == 1 or err.startswith("Usage: trustmesh agent"), err
    assert not out.exists()


def test_a_failed_store_write_is_loud_and_repaired_by_the_next_run(
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A keystore that cannot be written fails the renewal (exit 2, no temporary files,
    no half-written store, the old keystore whole); the next --once rewrites the stores."""
    spiffe_id = "spiffe://example.org/storefail"
    out = tmp_path / "storefail"
    keystore = tmp_path / "keystore.p12"
    argv = server.agent(spiffe_id, out, "--bundle", str(server.bundle), "--once")
    argv += store_args(tmp_path)
    code, _, err = run([*argv, "--token", server.join_token(spiffe_id)], capsys)
    assert code == 0, err
    old = keystore.read_bytes()

    def stage_file(path: Path, data: bytes, *, mode: int = 0o644) -> Path:
        if path.name == "keystore.p12":
            raise OSError(errno.ENOSPC, "No space left on device")
        return files.stage_file(path, data, mode=mode)

    with monkeypatch.context() as patch:
        patch.setattr(identity_module, "stage_file", stage_file)
        code, stdout, err = run([*argv, "--renew-now"], capsys)
    assert (code, stdout) == (2, "")
    assert err.startswith(f"error: Cannot write the identity files ({keystore}): No space left")
    assert "previous files are still in place" in err
    assert err.count("\n") == 1
    assert keystore.read_bytes() == old
    assert not [p for p in (*tmp_path.iterdir(), *out.iterdir()) if p.name.endswith(".tmp")]

    # a keystore that no longer matches the PEM files (an earlier half-done update) is
    # rewritten by the next run
    keystore.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"trustmesh",
            None,
            x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())[0],
            None,
            serialization.BestAvailableEncryption(STORE_PASSWORD.encode()),
        )
    )
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert f"wrote {keystore}" in stdout
    held = load_store(keystore).cert
    assert held is not None
    assert held.certificate == leaf(out)


def keytool_opens(store: Path, password: str) -> bool:
    """Whether Java's keytool lists ``store`` with ``password`` (a JVM start each time)."""
    keytool = shutil.which("keytool")
    if keytool is None:
        pytest.skip("keytool is not on PATH")
    result = subprocess.run(
        [
            *(keytool, "-J-XX:TieredStopAtLevel=1", "-list", "-storetype", "PKCS12"),
            *("-keystore", str(store), "-storepass", password),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return result.returncode == 0 and "Your keystore contains" in result.stdout


@pytest.mark.slow
def test_stores_that_do_not_open_with_the_password_are_refused_unless_rekeyed(
    server: Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong --store-password-file over existing stores exits 2 with one line naming the
    store and --rekey-stores, renewing or not, and leaves every file as it was (keytool
    still opens both stores with the original password); --rekey-stores rewrites them
    with the new password and logs a warning."""
    spiffe_id = "spiffe://example.org/java-rekey"
    out = tmp_path / "java"
    keystore, truststore = tmp_path / "keystore.p12", tmp_path / "truststore.p12"
    argv = server.agent(spiffe_id, out, "--bundle", str(server.bundle), "--once")
    code, _, err = run(
        [*argv, *store_args(tmp_path), "--token", server.join_token(spiffe_id)], capsys
    )
    assert code == 0, err
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not-the-store-password\n")
    before = {
        **snapshot(out),
        **{p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (keystore, truststore)},
    }

    both = ["--pkcs12", str(keystore), "--truststore", str(truststore)]
    cases = [
        ([*both], keystore, "--pkcs12"),
        ([*both, "--renew-now"], keystore, "--pkcs12"),
        (["--truststore", str(truststore)], truststore, "--truststore"),
    ]
    for extra, refused, option in cases:
        code, stdout, err = run([*argv, *extra, "--store-password-file", str(wrong)], capsys)
        assert (code, stdout) == (2, ""), (extra, err)
        assert err == (
            f"error: {option} {refused} exists but does not open with the password in "
            f"--store-password-file (a different password, or not a PKCS#12 file): give the "
            f"password it was written with, or pass --rekey-stores to rewrite it with this "
            f"one.\n"
        )
    after = {
        **snapshot(out),
        **{p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (keystore, truststore)},
    }
    assert after == before
    assert keytool_opens(keystore, STORE_PASSWORD)
    assert keytool_opens(truststore, STORE_PASSWORD)

    # a file that is not PKCS#12 at all (e.g. a JKS store) is refused the same way
    foreign = tmp_path / "foreign.jks"
    foreign.write_bytes(b"\xfe\xed\xfe\xed not a PKCS#12 file")
    code, _, err = run(
        [
            *argv,
            "--truststore",
            str(foreign),
            "--store-password-file",
            str(tmp_path / "store.pass"),
        ],
        capsys,
    )
    assert code == 2
    assert f"--truststore {foreign} exists but does not open" in err
    assert foreign.read_bytes().startswith(b"\xfe\xed\xfe\xed")

    # the explicit flag re-keys both stores, and says so
    caplog.clear()
    code, stdout, err = run(
        [*argv, *both, "--store-password-file", str(wrong), "--rekey-stores"], capsys
    )
    assert code == 0, err
    assert stdout.startswith("unchanged")
    assert f"wrote {keystore}, {truststore}" in stdout
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.split(" does not open")[0] for w in warnings] == [
        f"--pkcs12 {keystore}",
        f"--truststore {truststore}",
    ]
    assert all("--rekey-stores: rewriting it with that password" in w for w in warnings)
    assert keytool_opens(keystore, "not-the-store-password")
    assert not keytool_opens(keystore, STORE_PASSWORD)
    held = pkcs12.load_pkcs12(truststore.read_bytes(), b"not-the-store-password")
    assert [c.certificate for c in held.additional_certs] == x509.load_pem_x509_certificates(
        (out / "bundle.pem").read_bytes()
    )
    # once re-keyed, the new password is simply the password
    code, stdout, err = run([*argv, *both, "--store-password-file", str(wrong)], capsys)
    assert (code, err) == (0, "")
    assert "wrote" not in stdout
