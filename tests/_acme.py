"""A real `ca serve` with ACME provisioners, and small ACME helpers for the tests."""

from __future__ import annotations

import http.server
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from acme import challenges, client, crypto_util, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import jwa, jwk

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType

from ._server import Server, free_port, running_server
from .conftest import PASSPHRASE

#: A second profile offered through the ACME profiles extension: one-hour certificates.
SHORT_PROFILE = """
[profiles.short]
spiffe_ids = ["spiffe://example.org/acme/**"]
dns = ["**.localhost"]
ips = ["127.0.0.0/8"]
default_ttl = "1h"
max_ttl = "2h"
eku = ["server"]

[profiles.pinned]
spiffe_ids = ["spiffe://example.org/acme/**"]
dns = ["app*.pinned.localhost"]
eku = ["server"]
"""


@dataclass
class ACMEServerUnderTest:
    """`ca serve` with provisioners ``web`` (EAB required) and ``open`` (no EAB)."""

    server: Server
    http_port: int
    tls_port: int
    ocsp_url: str
    dns: TXTServer

    def directory(self, provisioner: str = "web") -> str:
        return f"{self.server.url}/acme/{provisioner}/directory"

    def eab(self, provisioner: str = "web") -> tuple[str, str]:
        """A fresh EAB key (kid, HMAC key) made the way `acme eab create` makes it."""
        from trustmesh.acme import create_eab_key

        with CertificateAuthority.open(self.server.home, passphrase=PASSPHRASE) as ca:
            return create_eab_key(ca, provisioner, actor="test")


def acme_config(http_port: int, tls_port: int, dns_port: int = 53) -> str:
    """The [acme] tables the test CA serves."""
    return f"""
[acme]
cleanup_interval = 1

[acme.provisioners.web]
profile = "service"
profiles = ["service", "short"]
http01_port = {http_port}
tlsalpn01_port = {tls_port}

[acme.provisioners.open]
eab_required = false
challenges = ["http-01"]
http01_port = {http_port}

[acme.provisioners.dns]
eab_required = false
profiles = ["service", "pinned"]
dns_resolvers = ["127.0.0.1:{dns_port}"]
http01_port = {http_port}
tlsalpn01_port = {tls_port}

[acme.provisioners.brief]
eab_required = false
order_lifetime = "2s"
http01_port = {http_port}
"""


@contextmanager
def acme_ca_server(workdir: Path, *, dns_port: int | None = None) -> Iterator[ACMEServerUnderTest]:
    """A new CA with ACME provisioners, served by `python -m trustmesh ca serve`. The ``dns``
    provisioner asks the test TXT server, or the DNS server on ``dns_port`` when given."""
    home = workdir / "home"
    CertificateAuthority.init(
        home, trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    ).close()
    http_port, tls_port, ocsp_port = free_port(), free_port(), free_port()
    with TXTServer(workdir / "dns-records") as txt:
        with (home / "config.toml").open("a") as config:
            config.write(SHORT_PROFILE + acme_config(http_port, tls_port, dns_port or txt.port))
        extra = ("--ocsp-listen", f"127.0.0.1:{ocsp_port}")
        with running_server(home, workdir, extra_args=extra) as server:
            yield ACMEServerUnderTest(
                server, http_port, tls_port, f"http://127.0.0.1:{ocsp_port}", txt
            )


class TXTServer:
    """A tiny authoritative DNS server on 127.0.0.1 (UDP and TCP, one port) answering TXT
    queries from ``records`` (name -> values) and from files in ``directory`` (file
    ``_acme-challenge.NAME.``, one value per line: what lego's exec script writes).

    A UDP answer over 512 bytes goes out truncated (TC) with no records, so the
    client must retry over TCP. Every other query answers NXDOMAIN.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, list[str]] = {}
        self.queries: list[tuple[str, str]] = []  # (transport, name)
        owner = self

        class UDP(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                wire = owner.answer(data, "udp")
                if wire is not None:
                    sock.sendto(wire, self.client_address)

        class TCP(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                size = int.from_bytes(self.rfile.read(2), "big")
                wire = owner.answer(self.rfile.read(size), "tcp")
                if wire is not None:
                    self.wfile.write(len(wire).to_bytes(2, "big") + wire)

        self.udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), UDP)
        self.port = self.udp.server_address[1]
        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), TCP)
        self.threads = [
            threading.Thread(target=s.serve_forever, daemon=True) for s in (self.udp, self.tcp)
        ]

    def values(self, name: str) -> list[str] | None:
        name = name.lower().rstrip(".") + "."
        found = list(self.records.get(name, []))
        path = self.directory / name
        if path.exists():
            found += [line for line in path.read_text().splitlines() if line]
        return found if found or name in self.records or path.exists() else None

    def answer(self, data: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        self.queries.append((transport, question.name.to_text()))
        values = self.values(question.name.to_text())
        if values is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT and values:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 60, "IN", "TXT", [f'"{v}"' for v in values])
            )
        wire = response.to_wire()
        if transport == "udp" and len(wire) > 512:
            response.answer.clear()
            response.flags |= dns.flags.TC
            wire = response.to_wire()
        return wire

    def __enter__(self) -> TXTServer:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self.udp, self.tcp):
            server.shutdown()
            server.server_close()


class ChallengeServer:
    """A plain HTTP server answering http-01 challenges (RFC 8555 8.3) on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.answers: dict[str, str] = {}
        answers = self.answers

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = self.path.rsplit("/", 1)[-1]
                body = answers.get(token)
                self.send_response(200 if body else 404)
                self.end_headers()
                if body:
                    self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChallengeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


#: Client networks to close after each test (requests sessions keep TLS sockets open).
OPEN_NETWORKS: list[client.ClientNetwork] = []


def network(key: jwk.JWK, bundle: Path) -> client.ClientNetwork:
    """An `acme` client network trusting ``bundle``, closed after the test."""
    alg = jwa.ES256 if isinstance(key, jwk.JWKEC) else jwa.RS256
    # requests takes a CA file path for ``verify``; acme's annotation says bool only.
    net = client.ClientNetwork(
        key,
        alg=alg,
        verify_ssl=str(bundle),  # type: ignore[arg-type]
        user_agent="trustmesh-tests",
    )
    OPEN_NETWORKS.append(net)
    return net


def close_networks() -> None:
    while OPEN_NETWORKS:
        OPEN_NETWORKS.pop().session.close()


def new_key() -> jwk.JWKEC:
    return jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))


def acme_client(
    under_test: ACMEServerUnderTest,
    key: jwk.JWK | None = None,
    *,
    provisioner: str = "web",
    eab: bool = True,
) -> tuple[client.ClientV2, jwk.JWK, messages.RegistrationResource]:
    """A registered account on ``provisioner`` through the `acme` package."""
    key = key or new_key()
    net = network(key, under_test.server.bundle)
    directory = client.ClientV2.get_directory(under_test.directory(provisioner), net)
    acme = client.ClientV2(directory, net)
    binding = None
    if eab:
        kid, hmac_key = under_test.eab(provisioner)
        binding = messages.ExternalAccountBinding.from_data(
            account_public_key=key.public_key(), kid=kid, hmac_key=hmac_key, directory=directory
        )
    registration = acme.new_account(
        messages.NewRegistration.from_data(
            email="ops@example.org",
            terms_of_service_agreed=True,
            external_account_binding=binding,
        )
    )
    return acme, key, registration


def make_csr(names: list[str]) -> tuple[bytes, bytes]:
    """(private key PEM, CSR PEM) for ``names``."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, crypto_util.make_csr(key_pem, names)


def answer_http01(
    acme: client.ClientV2,
    key: jwk.JWK,
    order: messages.OrderResource,
    challenge_server: ChallengeServer,
) -> None:
    """Publish and answer the http-01 challenge of every authorization of ``order``."""
    for authz in order.authorizations:
        for body in authz.body.challenges:
            if isinstance(body.chall, challenges.HTTP01):
                response, validation = body.response_and_validation(key)
                challenge_server.answers[body.chall.encode("token")] = validation
                acme.answer_challenge(body, response)
