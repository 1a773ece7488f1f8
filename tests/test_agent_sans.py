"""Host-name SANs on agent identities: `token create --dns/--ip` names what an enrollment may
claim, `agent`/`run --id` ask for `--dns/--ip` at enrollment and every renewal, the CA keeps
the allowance with each certificate (renewals may drop SANs, never add them), and curl and
Java (full host-name verification) accept a `trustmesh run --id` server, before and after a
renewal. Refusals: 403 problem+json naming the SAN and the fix, exit 2 from the agent,
nothing recorded and no file written."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from trustmesh.agent import new_key_and_csr
from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.errors import ConfigError, PolicyError, ScopeError
from trustmesh.pki import KeyType, SpiffeID

from ._runtimes import (
    PEERS,
    compile_java,
    needs_java,
    peer,
    run_tool,
    running_service,
    serial_of,
)
from ._server import Server, new_ca_server

TD = "spiffe://example.org"
PASSWORD = "store-password-123"


def sans_of(path: Path) -> list[x509.GeneralName]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def csr_for(spiffe_id: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> bytes:
    return new_key_and_csr(SpiffeID.parse(spiffe_id), KeyType.EC_P256, dns=dns, ips=ips)[1]


def served_serial(port: int, bundle: Path, client: Path) -> str:
    """The serial of the certificate a server on 127.0.0.1:``port`` presents now."""
    context = ssl.create_default_context(cafile=str(bundle))
    context.check_hostname = False
    context.load_cert_chain(client / "chain.pem", client / "key.pem")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


# -- the authority (in process, real SQLite) ---------------------------------------------


def test_enrollment_takes_only_the_sans_the_token_allows_and_gives_the_use_back(
    ca: CertificateAuthority,
) -> None:
    """A token without --dns/--ip allows no SAN (refused, the use given back, nothing
    recorded); one with patterns and a range allows matching names and addresses, and the
    certificate record and audit event carry the SANs and the allowance."""
    sid = f"{TD}/svc/web"
    bare = ca.create_join_token(sid, actor="test")
    before = ca.store.count_certificates()
    with pytest.raises(ScopeError, match=r"Refusing DNS SAN 'localhost'.*--dns localhost") as info:
        ca.enroll(bare, csr_for(sid, dns=("localhost",)))
    assert info.value.details["reason"] == "san_not_allowed"
    assert info.value.details["san"] == "DNS:localhost"
    with pytest.raises(ScopeError, match=r"Refusing IP SAN 127\.0\.0\.1.*--ip 127\.0\.0\.1"):
        ca.enroll(bare, csr_for(sid, ips=("127.0.0.1",)))
    assert ca.store.count_certificates() == before
    assert ca.enroll(bare, csr_for(sid)).record.dns == ()  # the use was given back

    token = ca.create_join_token(
        sid, dns=["localhost", "*.web.internal"], ips=["127.0.0.0/8", "::1"], actor="test"
    )
    issued = ca.enroll(token, csr_for(sid, dns=("localhost", "a.web.internal"), ips=("::1",)))
    record = issued.record
    assert record.dns == ("localhost", "a.web.internal")
    assert record.ips == ("::1",)
    assert record.allowed_dns == ("localhost", "*.web.internal")
    assert record.allowed_ips == ("127.0.0.0/8", "::1/128")
    stored = ca.store.get_certificate(record.serial)
    assert (stored.allowed_dns, stored.allowed_ips) == (record.allowed_dns, record.allowed_ips)
    enroll_event = ca.audit_tail(1)[0]
    assert enroll_event.action == "enroll"
    assert enroll_event.details["dns"] == ["localhost", "a.web.internal"]
    assert enroll_event.details["ips"] == ["::1"]
    token_events = [e for e in ca.store.audit_events() if e.action == "token"]
    assert token_events[-1].details["dns"] == ["localhost", "*.web.internal"]
    assert token_events[-1].details["ips"] == ["127.0.0.0/8", "::1/128"]
    names = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(names.value) == [
        x509.UniformResourceIdentifier(sid),
        x509.DNSName("localhost"),
        x509.DNSName("a.web.internal"),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]


def test_renewal_may_drop_sans_but_not_add_any_beyond_the_allowance(
    ca: CertificateAuthority,
) -> None:
    """The token's allowance lives on with each renewed certificate: a renewal keeps or drops
    SANs, one adding a SAN beyond it is a ScopeError naming the SAN (nothing recorded), and a
    SAN the profile refuses is a PolicyError naming the profile."""
    sid = f"{TD}/svc/api"
    token = ca.create_join_token(sid, dns=["localhost", "**.internal"], actor="test")
    first = ca.enroll(token, csr_for(sid, dns=("localhost",)))
    kept = ca.renew(first.certificate, csr_for(sid, dns=("localhost", "api.ns.internal")))
    assert kept.record.dns == ("localhost", "api.ns.internal")
    assert kept.record.allowed_dns == ("localhost", "**.internal")
    dropped = ca.renew(kept.certificate, csr_for(sid))
    assert dropped.record.dns == ()
    assert dropped.record.allowed_dns == ("localhost", "**.internal")  # still allowed later
    again = ca.renew(dropped.certificate, csr_for(sid, dns=("localhost",)))
    assert again.record.dns == ("localhost",)
    assert ca.audit_tail(1)[0].details["dns"] == ["localhost"]
    count = ca.store.count_certificates()
    with pytest.raises(ScopeError, match=r"'evil\.localhost'.*enroll again") as info:
        ca.renew(again.certificate, csr_for(sid, dns=("localhost", "evil.localhost")))
    assert info.value.details["san"] == "DNS:evil.localhost"
    with pytest.raises(ScopeError, match=r"Refusing IP SAN 10\.0\.0\.1"):
        ca.renew(again.certificate, csr_for(sid, ips=("10.0.0.1",)))
    with pytest.raises(PolicyError, match=r"profile 'service' allows DNS names.*config\.toml"):
        ca.renew(again.certificate, csr_for(sid, dns=("www.example.com",)))
    assert ca.store.count_certificates() == count


def test_hand_issued_certificates_may_keep_their_own_sans_on_renewal(
    ca: CertificateAuthority,
) -> None:
    """`trustmesh issue --dns` is the operator's own grant: renewals may keep those SANs
    (and only those)."""
    sid = f"{TD}/svc/legacy"
    issued = ca.issue(sid, dns=["legacy.internal"], ips=["10.1.2.3"], actor="test")
    assert issued.record.allowed_ips == ("10.1.2.3/32",)
    renewed = ca.renew(issued.certificate, csr_for(sid, ("legacy.internal",), ("10.1.2.3",)))
    assert renewed.record.ips == ("10.1.2.3",)
    with pytest.raises(ScopeError, match=r"other\.internal"):
        ca.renew(renewed.certificate, csr_for(sid, ("other.internal",)))


def test_token_create_refuses_bad_or_never_signable_sans(
    ca: CertificateAuthority,
) -> None:
    """Malformed patterns and ranges are ConfigErrors; a literal name, address or range the
    profile would never sign is refused at once, naming the profile, and nothing is stored."""
    sid = f"{TD}/svc/x"
    events = len(ca.store.audit_events())
    with pytest.raises(ConfigError, match=r"--ip '300\.1\.1\.1' is not an IP address or CIDR"):
        ca.create_join_token(sid, ips=["300.1.1.1"])
    with pytest.raises(ConfigError, match=r"--ip '10\.0\.0\.1/8'.*no host bits"):
        ca.create_join_token(sid, ips=["10.0.0.1/8"])
    with pytest.raises(ConfigError, match=r"--dns 'https://a\.internal' is not a host name"):
        ca.create_join_token(sid, dns=["https://a.internal"])
    with pytest.raises(PolicyError, match=r"Refusing DNS name 'www\.example\.com'"):
        ca.create_join_token(sid, dns=["www.example.com"])
    with pytest.raises(PolicyError, match=r"Refusing --ip 8\.0\.0\.0/8: profile 'service'"):
        ca.create_join_token(sid, ips=["8.0.0.0/8"])
    assert len(ca.store.audit_events()) == events


def test_migration_lets_recorded_certificates_keep_their_own_sans(tmp_path: Path) -> None:
    """Migration 0006 on a database with certificates (and tokens) from before it: each
    certificate is allowed exactly the SANs it carries (addresses as /32 and /128), old
    tokens allow none."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from trustmesh.store import open_store
    from trustmesh.store._store import _migration_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(_migration_config(conn), "0005")
        conn.execute(
            text(
                "INSERT INTO certificates (issuer, serial, spiffe_id, dns, ips, profile, "
                "key_type, fingerprint, not_before, not_after, issued_at, pem) VALUES "
                "('i', 'abc', 'spiffe://example.org/a', 'a.internal,localhost', "
                "'10.0.0.7,::1', 'service', 'ec-p256', 'f', 0, 1, 0, 'PEM')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO join_tokens (token_hash, spiffe_pattern, uses_left, expires_at, "
                "created_at, created_by) VALUES ('h', 'spiffe://example.org/a', 1, 9, 0, 't')"
            )
        )
    engine.dispose()
    store = open_store(url)
    record = store.get_certificate("abc")
    assert record.allowed_dns == ("a.internal", "localhost")
    assert record.allowed_ips == ("10.0.0.7/32", "::1/128")
    with store.reader() as conn:
        assert conn.execute(text("SELECT dns_patterns, ip_ranges FROM join_tokens")).one() == (
            "",
            "",
        )
    store.close()


def test_dns_and_ip_need_the_in_process_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run --dns` without --id, `proxy inbound --ip` without a token and a malformed --ip
    with --id exit 2 naming the fix, before anything is enrolled or written."""
    base = ["--cert-dir", str(tmp_path / "id"), "--no-policy", "--no-revocation"]
    assert main(["run", "svc:app", *base, "--dns", "localhost"]) == 2
    assert "--dns needs --id" in capsys.readouterr().err
    proxy = ["proxy", "inbound", "--id", f"{TD}/p", "--cert-dir", str(tmp_path / "id")]
    assert main([*proxy, "--to", "127.0.0.1:1", "--allow-id", f"{TD}/*", "--ip", "::1"]) == 2
    assert "--ip is for the agent in this process" in capsys.readouterr().err
    run_id = ["run", "svc:app", "--id", f"{TD}/r", "--ca", "https://127.0.0.1:1"]
    argv = [*run_id, "--token", "tmj_x", "--no-policy", "--no-revocation", "--ip", "1.2.3"]
    assert main([*argv, "--cert-dir", str(tmp_path / "id"), "--app-dir", str(tmp_path)]) == 2
    assert "--ip '1.2.3' is not an IP address" in capsys.readouterr().err
    assert not (tmp_path / "id").exists()


# -- real processes: ca serve, the agent CLI, trustmesh run, curl, Java -------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with new_ca_server(tmp_path_factory.mktemp("sans-ca")) as running:
        yield running


def token(server: Server, spiffe_id: str, *args: str) -> str:
    """`trustmesh token create` on the CA host (the real CLI)."""
    done = run_cli(server, "token", "create", spiffe_id, *args)
    assert done[0] == 0, done
    return done[1].strip()


def run_cli(server: Server, *argv: str) -> tuple[int, str, str]:
    """`python -m trustmesh ARGV` with the CA's home; returns (exit code, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "trustmesh", *argv],
        env={**os.environ, "TRUSTMESH_HOME": str(server.home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def agent(server: Server, spiffe_id: str, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(
        server, *server.agent(spiffe_id, out, "--bundle", str(server.bundle), "--once", *extra)
    )


@pytest.mark.slow
def test_agent_cli_enrolls_and_renews_with_the_allowed_sans(server: Server, tmp_path: Path) -> None:
    """`agent --dns localhost --ip 127.0.0.1` with a token allowing them: the certificate's
    SAN extension holds the SPIFFE ID first, then the names; `--renew-now` keeps them; a
    restarted agent asking for one more allowed name renews at once to add it; one asking
    for a name beyond the allowance exits 2 with one line and leaves the files as they were."""
    sid = f"{TD}/svc/web-agent"
    out = tmp_path / "id"
    grant = token(server, sid, "--dns", "localhost", "--dns", "*.web.internal", "--ip", "::1")
    code, _, err = agent(server, sid, out, "--token", grant, "--dns", "localhost", "--ip", "::1")
    assert code == 0, err
    expected = [
        x509.UniformResourceIdentifier(sid),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    assert sans_of(out / "cert.pem") == expected
    first = serial_of(out / "cert.pem")
    code, said, err = agent(server, sid, out, "--renew-now", "--dns", "localhost", "--ip", "::1")
    assert code == 0, err
    assert said.startswith("renewed ")
    assert serial_of(out / "cert.pem") != first
    assert sans_of(out / "cert.pem") == expected

    more = ("--dns", "localhost", "--dns", "a.web.internal", "--ip", "::1")
    code, said, err = agent(server, sid, out, *more)
    assert code == 0, err
    assert said.startswith("renewed "), said  # not due, but a requested SAN was missing
    assert x509.DNSName("a.web.internal") in sans_of(out / "cert.pem")

    files = {p.name: p.read_bytes() for p in out.iterdir()}
    with server.ca() as ca:
        count = ca.store.count_certificates()
    code, said, err = agent(server, sid, out, "--dns", "localhost", "--dns", "evil.localhost")
    assert code == 2, (said, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Refusing DNS SAN 'evil.localhost'" in lines[0]
    assert "--dns evil.localhost" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    with server.ca() as ca:
        assert ca.store.count_certificates() == count
        assert ca.audit_tail(1)[0].details == {"route": "/v1/renew", "reason": "san_not_allowed"}


@pytest.mark.slow
def test_agent_cli_refusals_are_exit_2_with_nothing_written_or_recorded(
    server: Server, tmp_path: Path
) -> None:
    """A SAN the token does not allow, one the profile does not allow, and a malformed --ip
    each exit 2 with a one-line error; no file appears, no certificate is recorded, and the
    token is still usable afterwards."""
    sid = f"{TD}/svc/refused"
    out = tmp_path / "id"
    grant = token(server, sid, "--dns", "**.example.com")  # the profile never signs these
    with server.ca() as ca:
        count = ca.store.count_certificates()
    cases = [
        (("--ip", "127.0.0.1"), "Refusing IP SAN 127.0.0.1", "--ip 127.0.0.1"),
        (("--dns", "www.example.com"), "profile 'service' allows DNS names", "config.toml"),
        (("--ip", "300.1.2.3"), "--ip '300.1.2.3' is not an IP address", "127.0.0.1 or ::1"),
        (("--ip", "10.0.0.0/8"), "--ip '10.0.0.0/8' is not an IP address", "give one address"),
        (("--dns", "*.x.internal"), "--dns '*.x.internal' is not a host name", "no wildcard"),
    ]
    for extra, what, fix in cases:
        code, said, err = agent(server, sid, out, "--token", grant, *extra)
        assert code == 2, (extra, said, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert what in lines[0], lines[0]
        assert fix in lines[0], lines[0]
        assert not out.exists() or not any(out.iterdir())
    with server.ca() as ca:
        assert ca.store.count_certificates() == count
    # The refused enrollments gave the token's use back.
    code, _, err = agent(server, sid, out, "--token", grant)
    assert code == 0, err
    assert sans_of(out / "cert.pem") == [x509.UniformResourceIdentifier(sid)]


@pytest.mark.slow
def test_ca_serve_refusal_is_a_403_problem_naming_the_san(server: Server) -> None:
    """POST /v1/enroll with a CSR claiming a SAN the token does not allow: 403
    problem+json whose reason, san and detail say what and how to fix it."""
    sid = f"{TD}/svc/api-only"
    grant = token(server, sid)
    response = httpx.post(
        f"{server.url}/v1/enroll",
        json={"token": grant, "csr": csr_for(sid, dns=("localhost",)).decode()},
        verify=ssl.create_default_context(cafile=str(server.bundle)),
    )
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    doc = response.json()
    assert doc["reason"] == "san_not_allowed"
    assert doc["san"] == "DNS:localhost"
    assert f"'trustmesh token create {sid} --dns localhost'" in doc["detail"]


def curl(*argv: str) -> tuple[int, str]:
    done = run_tool("curl", "--silent", "--show-error", *argv)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
@needs_java
def test_curl_and_java_check_host_names_of_a_run_id_server_across_renewals(
    server: Server, tmp_path: Path
) -> None:
    """`trustmesh run --id ... --dns localhost --ip 127.0.0.1` enrolls through the agent;
    curl (--cacert bundle.pem, no --insecure) and a Java HttpClient reach it as localhost and
    127.0.0.1; a name it does not carry is refused by curl; after the in-process agent renews
    (short --ttl), the new certificate carries the SANs and both clients still get through."""
    service_id = f"{TD}/svc/hosted"
    grant = token(server, service_id, "--dns", "localhost", "--ip", "127.0.0.1")
    client_id = f"{TD}/java/caller"
    client = tmp_path / "client"
    keystore, truststore = client / "app.p12", client / "truststore.p12"
    password = tmp_path / "store.pass"
    password.write_text(PASSWORD + "\n")
    argv = server.agent(
        client_id,
        client,
        *("--bundle", str(server.bundle), "--once", "--token", token(server, client_id)),
        *("--pkcs12", str(keystore), "--truststore", str(truststore)),
        *("--store-password-file", str(password)),
    )
    assert main(argv) == 0
    classes = compile_java(PEERS / "ReloadingClient.java", tmp_path / "classes")
    certs = tmp_path / "service-id"
    with running_service(
        tmp_path,
        *("--id", service_id, "--ca", server.url, "--token", grant, "--cert-dir", str(certs)),
        *("--bundle", str(server.bundle), "--dns", "localhost", "--ip", "127.0.0.1"),
        *("--ttl", "15s", "--no-policy"),
    ) as service:
        files = [
            *("--cert", str(client / "chain.pem"), "--key", str(client / "key.pem")),
            *("--cacert", str(server.bundle)),
        ]
        first = serial_of(certs / "cert.pem")

        def java(host: str) -> tuple[int, dict[str, str]]:
            command = [
                *("java", "-XX:TieredStopAtLevel=1", "-cp", str(classes), "ReloadingClient"),
                service.url(host),
                *(str(keystore), str(truststore), str(password)),
            ]
            with peer(command, stdin=True) as running:
                running.send("call")
                status, _, body = running.expect("", timeout=120).partition(" ")
            return int(status), json.loads(body)

        def check_all() -> None:
            for host in ("localhost", "127.0.0.1"):
                code, said = curl(*files, service.url(host))
                assert code == 0, (host, said)
                assert json.loads(said)["caller"] == client_id
                assert java(host) == (
                    200,
                    {"caller": client_id, "serial": serial_of(client / "cert.pem")},
                )

        check_all()
        wrong = f"other.localhost:{service.port}:127.0.0.1"
        code, said = curl(*files, "--resolve", wrong, service.url("other.localhost"))
        assert code == 60, said  # curl: the peer's certificate does not match the name
        assert "other.localhost" in said
        deadline = time.monotonic() + 40
        while served_serial(service.port, server.bundle, client) == first:
            assert time.monotonic() < deadline, service.log.read_text()
            time.sleep(0.5)
        assert served_serial(service.port, server.bundle, client) == serial_of(certs / "cert.pem")
        assert sans_of(certs / "cert.pem") == [
            x509.UniformResourceIdentifier(service_id),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        check_all()
    with server.ca() as ca:
        renewals = [
            e
            for e in ca.store.audit_events()
            if e.action == "renew" and e.details["spiffe_id"] == service_id
        ]
    assert renewals
    assert renewals[0].details["dns"] == ["localhost"]
    assert renewals[0].details["ips"] == ["127.0.0.1"]
