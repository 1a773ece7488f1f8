"""The same ACME client runs against Debian's pebble and against `ca serve`: lego (http-01,
tls-alpn-01, a wildcard over dns-01, revoke), certbot (issue, renew, revoke) and the `acme`
package with bad input. Where the outcomes agree the test asserts both; where they differ it
pins each server's answer, as listed in docs/acme.md ("Compared with pebble").

Both servers resolve and answer dns-01 through one pebble-challtestsrv (its DNS on
127.0.0.1: every A query is 127.0.0.1, TXT records set over its management API), so lego's
dns-01 hook is the same script for both."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from acme import challenges, client, jws, messages
from cryptography import x509
from josepy import jwa, jwk
from josepy.json_util import decode_b64jose

from trustmesh.authority import CertificateAuthority

from ._acme import (
    ACMEServerUnderTest,
    ChallengeServer,
    acme_ca_server,
    close_networks,
    make_csr,
    network,
    new_key,
)
from ._pebble import CHALLTESTSRV, MISSING, PEBBLE, Pebble, running_challtestsrv, running_pebble
from ._server import free_port
from .conftest import PASSPHRASE

CERTBOT = Path(sys.executable).parent / "certbot"
LEGO = shutil.which("lego")

pytestmark = pytest.mark.skipif(PEBBLE is None or CHALLTESTSRV is None, reason=MISSING)

_REASONS = {"unspecified": 0, "keyCompromise": 1, "superseded": 4, "cessationOfOperation": 5}


@dataclass
class Target:
    """One ACME server as the clients see it."""

    name: str
    directory: str  # http-01 and tls-alpn-01, EAB required
    dns_directory: str  # dns-01 (and wildcards); the clients send EAB to both
    listener_bundle: Path  # trusts the ACME HTTPS endpoint
    roots: Path  # verifies issued chains
    http_port: int
    tls_port: int
    eab: Callable[[str], tuple[str, str]]  # directory -> (kid, HMAC key)
    revocation: Callable[[x509.Certificate], int | None]  # reason code, None when not revoked


@pytest.fixture(scope="module")
def challtest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    with running_challtestsrv(tmp_path_factory.mktemp("challtestsrv")) as running:
        yield running


def _pebble_target(peb: Pebble, work: Path) -> Target:
    roots = work / "pebble-root.pem"
    roots.write_bytes(peb.root_pem())

    def revocation(cert: x509.Certificate) -> int | None:
        status = peb.cert_status(cert.serial_number)
        return int(status.get("Reason") or 0) if status["Status"] == "Revoked" else None

    return Target(
        "pebble",
        peb.directory,
        peb.directory,
        peb.bundle,
        roots,
        peb.http_port,
        peb.tls_port,
        lambda _directory: peb.eab(),
        revocation,
    )


@pytest.fixture(scope="module")
def pebble(
    tmp_path_factory: pytest.TempPathFactory, challtest: tuple[int, str]
) -> Iterator[Target]:
    work = tmp_path_factory.mktemp("pebble")
    with running_pebble(
        work,
        http_port=free_port(),
        tls_port=free_port(),
        dns_port=challtest[0],
        challtestsrv=challtest[1],
        eab_keys=40,
    ) as peb:
        yield _pebble_target(peb, work)


@pytest.fixture(scope="module")
def trustmesh_server(
    tmp_path_factory: pytest.TempPathFactory, challtest: tuple[int, str]
) -> Iterator[ACMEServerUnderTest]:
    with acme_ca_server(tmp_path_factory.mktemp("acme-pebble"), dns_port=challtest[0]) as running:
        yield running


@pytest.fixture(scope="module")
def trustmesh(trustmesh_server: ACMEServerUnderTest) -> Target:
    under_test = trustmesh_server

    def eab(directory: str) -> tuple[str, str]:
        return under_test.eab(directory.rsplit("/", 2)[-2])

    def revocation(cert: x509.Certificate) -> int | None:
        with CertificateAuthority.open(under_test.server.home, passphrase=PASSPHRASE) as ca:
            record = ca.store.get_certificate(format(cert.serial_number, "x"))
        if record.revoked_at is None:
            return None
        return _REASONS[record.revocation_reason or "unspecified"]

    return Target(
        "trustmesh",
        under_test.directory("web"),
        under_test.directory("dns"),
        under_test.server.bundle,
        under_test.server.bundle,
        under_test.http_port,
        under_test.tls_port,
        eab,
        revocation,
    )


@pytest.fixture(autouse=True)
def _close_networks() -> Iterator[None]:
    yield
    close_networks()


def _leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def _verifies(chain: Path, roots: Path) -> bool:
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(roots), "-untrusted", str(chain), str(chain)],
        capture_output=True,
        text=True,
    )
    return done.returncode == 0


def _dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sorted(san.get_values_for_type(x509.DNSName))


# -- lego -----------------------------------------------------------------------------


def _lego(
    target: Target, work: Path, directory: str, *args: str, env: dict[str, str] | None = None
) -> str:
    assert LEGO is not None
    kid, key = target.eab(directory)
    done = subprocess.run(
        [
            LEGO,
            "--server",
            directory,
            "--accept-tos",
            "--email",
            "ops@example.org",
            "--eab",
            "--kid",
            kid,
            "--hmac",
            key,
            "--path",
            str(work),
            *args,
        ],
        env={**os.environ, "LEGO_CA_CERTIFICATES": str(target.listener_bundle), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"lego against {target.name}: {done.stdout}{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.skipif(LEGO is None, reason="lego is not installed (apt-get install lego)")
@pytest.mark.parametrize("challenge", ["http", "tls"])
def test_lego_http01_and_tls_alpn01_agree(
    pebble: Target, trustmesh: Target, tmp_path: Path, challenge: str
) -> None:
    """The same `lego --http|--tls run` and `lego revoke` against both: each issues a
    certificate for the name with a leaf + one intermediate chain that verifies to its
    root, and each marks it revoked. pebble's leaf lives years, trustmesh's the profile's
    TTL (pinned: pebble has no profiles)."""
    name = f"lego-{challenge}.localhost"
    leaves = {}
    for target in (pebble, trustmesh):
        work = tmp_path / target.name
        port = target.http_port if challenge == "http" else target.tls_port
        output = _lego(
            target,
            work,
            target.directory,
            "--domains",
            name,
            f"--{challenge}",
            f"--{challenge}.port",
            f"127.0.0.1:{port}",
            "run",
        )
        assert ("HTTP-01" if challenge == "http" else "TLS-ALPN-01") in output
        cert_path = work / "certificates" / f"{name}.crt"
        assert len(x509.load_pem_x509_certificates(cert_path.read_bytes())) == 2
        assert _verifies(cert_path, target.roots), target.name
        leaves[target.name] = leaf = _leaf(cert_path)
        assert _dns_names(leaf) == [name]
        assert target.revocation(leaf) is None
        _lego(target, work, target.directory, "--domains", name, "revoke")
        assert target.revocation(leaf) == 0
    lifetime = {k: v.not_valid_after_utc - v.not_valid_before_utc for k, v in leaves.items()}
    assert lifetime["pebble"] > dt.timedelta(days=365)
    assert lifetime["trustmesh"] <= dt.timedelta(days=90)


#: lego's `--dns exec` hook publishing the TXT value in pebble-challtestsrv, which both
#: servers ask: `present|cleanup FQDN VALUE`.
LEGO_EXEC = """#!/bin/sh
set -eu
case "$1" in
  present) curl -sf -d "{\\"host\\":\\"$2\\",\\"value\\":\\"$3\\"}" "$CHALLTESTSRV/set-txt" ;;
  cleanup) curl -sf -d "{\\"host\\":\\"$2\\"}" "$CHALLTESTSRV/clear-txt" ;;
esac
"""


@pytest.mark.slow
@pytest.mark.skipif(LEGO is None, reason="lego is not installed (apt-get install lego)")
def test_lego_wildcard_over_dns01_agrees(
    pebble: Target, trustmesh: Target, challtest: tuple[int, str], tmp_path: Path
) -> None:
    """The same `lego --dns exec` run for *.wild.example.internal and wild.example.internal
    gets both names from both servers over dns-01 (the TXT record in challtestsrv)."""
    hook = tmp_path / "txt-hook.sh"
    hook.write_text(LEGO_EXEC)
    hook.chmod(0o755)
    env = {
        "EXEC_PATH": str(hook),
        "EXEC_POLLING_INTERVAL": "1",
        "EXEC_PROPAGATION_TIMEOUT": "30",
        "EXEC_SEQUENCE_INTERVAL": "1",
        "CHALLTESTSRV": challtest[1],
    }
    names = ["*.wild.example.internal", "wild.example.internal"]
    for target in (pebble, trustmesh):
        work = tmp_path / target.name
        output = _lego(
            target,
            work,
            target.dns_directory,
            *[arg for name in names for arg in ("--domains", name)],
            "--dns",
            "exec",
            "--dns.resolvers",
            f"127.0.0.1:{challtest[0]}",
            "--dns.disable-cp",
            "run",
            env=env,
        )
        assert "DNS-01" in output
        cert_path = work / "certificates" / "_.wild.example.internal.crt"
        assert _dns_names(_leaf(cert_path)) == sorted(names), target.name
        assert _verifies(cert_path, target.roots), target.name


# -- certbot ----------------------------------------------------------------------------


def _certbot(target: Target, work: Path, *args: str) -> str:
    dirs = ["--config-dir", str(work / "config"), "--work-dir", str(work / "work")]
    dirs += ["--logs-dir", str(work / "logs")]
    done = subprocess.run(
        [str(CERTBOT), *args, "--non-interactive", *dirs],
        env={**os.environ, "REQUESTS_CA_BUNDLE": str(target.listener_bundle)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"certbot against {target.name}: {done.stdout}{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not CERTBOT.exists(), reason="certbot is not installed (pip install certbot)")
def test_certbot_issue_renew_revoke_agree(
    pebble: Target, trustmesh: Target, tmp_path: Path
) -> None:
    """The same certbot certonly (standalone http-01, EAB), renew --force-renewal and revoke
    --reason keycompromise: both issue, both renew to a new serial, both record reason 1."""
    for target in (pebble, trustmesh):
        work = tmp_path / target.name
        kid, hmac_key = target.eab(target.directory)
        _certbot(
            target,
            work,
            "certonly",
            "--server",
            target.directory,
            "--agree-tos",
            "--email",
            "ops@example.org",
            "--eab-kid",
            kid,
            "--eab-hmac-key",
            hmac_key,
            "--standalone",
            "--http-01-address",
            "127.0.0.1",
            "--http-01-port",
            str(target.http_port),
            "-d",
            "certbot.localhost",
        )
        live = work / "config" / "live" / "certbot.localhost"
        first = _leaf(live / "cert.pem")
        _certbot(target, work, "renew", "--force-renewal", "--no-random-sleep-on-renew")
        second = _leaf(live / "cert.pem")
        assert second.serial_number != first.serial_number, target.name
        assert _verifies(live / "fullchain.pem", target.roots), target.name
        _certbot(
            target,
            work,
            "revoke",
            "--server",
            target.directory,
            "--cert-path",
            str(live / "cert.pem"),
            "--reason",
            "keycompromise",
            "--no-delete-after-revoke",
        )
        assert target.revocation(second) == 1, target.name
        assert target.revocation(first) is None, target.name


# -- the same bad input through the `acme` package ----------------------------------------


def _account(target: Target, directory: str | None = None) -> tuple[client.ClientV2, jwk.JWK]:
    directory = directory or target.directory
    key = new_key()
    net = network(key, target.listener_bundle)
    acme = client.ClientV2(client.ClientV2.get_directory(directory, net), net)
    kid, hmac_key = target.eab(directory)
    binding = messages.ExternalAccountBinding.from_data(
        account_public_key=key.public_key(), kid=kid, hmac_key=hmac_key, directory=acme.directory
    )
    acme.new_account(
        messages.NewRegistration.from_data(
            email="ops@example.org", terms_of_service_agreed=True, external_account_binding=binding
        )
    )
    return acme, key


def _problem(call: Callable[..., object], *args: object) -> str:
    """The problem type ``call(*args)`` fails with (short form), or "accepted"."""
    try:
        call(*args)
    except messages.Error as error:
        return str(error.typ).rsplit(":", 1)[-1]
    return "accepted"


def _order_problem(target: Target, names: list[str]) -> str:
    acme, _ = _account(target)
    return _problem(acme.new_order, make_csr(names)[1])


#: (bad newOrder identifiers, pebble's problem, trustmesh's problem)
ORDER_CASES = [
    # Not a host name (RFC 1123 letters, digits, hyphens): malformed on both.
    (["bad_name.localhost"], "malformed", "malformed"),
    # '*' other than as the whole leftmost label (RFC 8555 7.1.3): malformed on both.
    (["a.*.wild.localhost"], "malformed", "malformed"),
    (["*.*.wild.localhost"], "malformed", "malformed"),
    # An IP address as a dns identifier (RFC 8738 3 wants type ip): malformed on both.
    (["10.1.2.3"], "malformed", "malformed"),
    # A name no profile allows: pebble has no policy and takes any name.
    (["www.example.com"], "accepted", "rejectedIdentifier"),
]


@pytest.mark.parametrize(("names", "on_pebble", "on_trustmesh"), ORDER_CASES)
def test_new_order_problems_for_bad_identifiers(
    pebble: Target, trustmesh: Target, names: list[str], on_pebble: str, on_trustmesh: str
) -> None:
    """The same bad newOrder on both: the problem types agree for names that are not valid
    identifiers; for a name outside the CA's policy pebble accepts (it has none)."""
    assert _order_problem(pebble, names) == on_pebble
    assert _order_problem(trustmesh, names) == on_trustmesh


def _register(target: Target, key: jwk.JWK, eab: tuple[str, str] | None) -> str:
    """newAccount for ``key`` with the binding ``eab`` (none when None): its outcome."""
    net = network(key, target.listener_bundle)
    acme = client.ClientV2(client.ClientV2.get_directory(target.directory, net), net)
    binding = None
    if eab is not None:
        binding = messages.ExternalAccountBinding.from_data(
            account_public_key=key.public_key(),
            kid=eab[0],
            hmac_key=eab[1],
            directory=acme.directory,
        )
    registration = messages.NewRegistration.from_data(
        terms_of_service_agreed=True, external_account_binding=binding
    )
    return _problem(acme.new_account, registration)


def test_account_problems(pebble: Target, trustmesh: Target) -> None:
    """newAccount without a binding is externalAccountRequired on both; a second account
    with a kid that bound one already: pebble accepts (its keys are reusable), trustmesh
    refuses with unauthorized (one key binds one account; RFC 8555 7.3.4 leaves it to the
    CA)."""
    found = {}
    for target in (pebble, trustmesh):
        eab = target.eab(target.directory)
        found[target.name] = (
            _register(target, new_key(), None),
            _register(target, new_key(), eab),
            _register(target, new_key(), eab),
        )
    assert found["pebble"] == ("externalAccountRequired", "accepted", "accepted")
    assert found["trustmesh"] == ("externalAccountRequired", "accepted", "unauthorized")


def _validated_order(
    target: Target, name: str
) -> tuple[client.ClientV2, jwk.JWK, messages.OrderResource]:
    """An order for ``name`` whose http-01 challenge was answered right, now ready."""
    acme, key = _account(target)
    order = acme.new_order(make_csr([name])[1])
    with ChallengeServer(target.http_port) as answers:
        for authz in order.authorizations:
            for body in authz.body.challenges:
                if isinstance(body.chall, challenges.HTTP01):
                    response, validation = body.response_and_validation(key)
                    answers.answers[body.chall.encode("token")] = validation
                    acme.answer_challenge(body, response)
        _wait_status(acme, order.uri, "ready")
    return acme, key, order


def _wait_status(acme: client.ClientV2, url: str, *wanted: str) -> dict[str, object]:
    deadline = time.monotonic() + 20
    while True:
        body = acme._post_as_get(url).json()
        if body["status"] in wanted or time.monotonic() > deadline:
            assert body["status"] in wanted, body
            return dict(body)
        time.sleep(0.2)


def _finalize_raw(acme: client.ClientV2, order: messages.OrderResource, csr_pem: bytes) -> str:
    csr = x509.load_pem_x509_csr(csr_pem)
    return _problem(acme._post, order.body.finalize, messages.CertificateRequest(csr=csr))


def test_finalize_problems(pebble: Target, trustmesh: Target) -> None:
    """finalize before the order is ready: orderNotReady on both. A CSR naming a name the
    order does not: pebble says unauthorized, trustmesh badCSR (RFC 8555 7.4: SHOULD use
    badCSR); trustmesh keeps the order ready for a corrected CSR, pebble too. Then a good
    CSR issues on both."""
    found = {}
    for target in (pebble, trustmesh):
        acme, _ = _account(target)
        pending = acme.new_order(make_csr(["notready.localhost"])[1])
        not_ready = _finalize_raw(acme, pending, make_csr(["notready.localhost"])[1])
        acme, _, order = _validated_order(target, "finalize.localhost")
        extra = _finalize_raw(acme, order, make_csr(["finalize.localhost", "x.localhost"])[1])
        other = _finalize_raw(acme, order, make_csr(["other.localhost"])[1])
        after = acme._post_as_get(order.uri).json()["status"]
        done = acme.finalize_order(
            order.update(csr_pem=make_csr(["finalize.localhost"])[1]),
            dt.datetime.now() + dt.timedelta(seconds=20),
        )
        assert done.fullchain_pem is not None
        found[target.name] = (not_ready, extra, other, after)
    assert found["pebble"] == ("orderNotReady", "unauthorized", "unauthorized", "ready")
    assert found["trustmesh"] == ("orderNotReady", "badCSR", "badCSR", "ready")


def test_challenge_problems(pebble: Target, trustmesh: Target) -> None:
    """A wrong http-01 answer invalidates challenge, authorization and order on both; the
    error is unauthorized on pebble and incorrectResponse on trustmesh (RFC 8555 6.7:
    "response received didn't match the challenge's requirements"). Nothing listening on
    the http-01 port is connection on both."""
    found = {}
    for target in (pebble, trustmesh):
        acme, key = _account(target)
        errors = []
        for name, answer in (("wrong.localhost", "nope"), ("refused.localhost", None)):
            order = acme.new_order(make_csr([name])[1])
            body = next(
                b
                for b in order.authorizations[0].body.challenges
                if isinstance(b.chall, challenges.HTTP01)
            )
            if answer is None:
                acme.answer_challenge(body, body.response(key))
                state = _wait_status(acme, order.uri, "invalid")
            else:
                with ChallengeServer(target.http_port) as answers:
                    answers.answers[body.chall.encode("token")] = answer
                    acme.answer_challenge(body, body.response(key))
                    state = _wait_status(acme, order.uri, "invalid")
            authz = acme._post_as_get(order.authorizations[0].uri).json()
            assert authz["status"] == "invalid"
            challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
            assert challenge["status"] == "invalid"
            errors.append(str(challenge["error"]["type"]).rsplit(":", 1)[-1])
            assert state["status"] == "invalid"
        found[target.name] = tuple(errors)
    assert found["pebble"] == ("unauthorized", "connection")
    assert found["trustmesh"] == ("incorrectResponse", "connection")


def test_revocation_problems(pebble: Target, trustmesh: Target) -> None:
    """revokeCert with reason 7 (unused in RFC 5280) is badRevocationReason on both; a
    second revocation is alreadyRevoked on both."""
    found = {}
    for target in (pebble, trustmesh):
        acme, _, order = _validated_order(target, "revoke.localhost")
        done = acme.finalize_order(order, dt.datetime.now() + dt.timedelta(seconds=20))
        cert = x509.load_pem_x509_certificate(done.fullchain_pem.encode())
        found[target.name] = (
            _problem(acme.revoke, cert, 7),
            _problem(acme.revoke, cert, 1),
            _problem(acme.revoke, cert, 1),
        )
    assert found["pebble"] == ("badRevocationReason", "accepted", "alreadyRevoked")
    assert found["trustmesh"] == ("badRevocationReason", "accepted", "alreadyRevoked")


def test_directory_and_order_objects(pebble: Target, trustmesh: Target) -> None:
    """Both directories name the RFC 8555 resources and require EAB; only trustmesh has
    renewalInfo (RFC 9773) and profiles (pebble 2.4 has neither). A pending order expires in
    24 h on pebble, after order_lifetime (1 h) on trustmesh; pending authorizations in 1 h on
    both. pebble offers dns-01 and tls-alpn-01 on every DNS name; trustmesh what the
    provisioner lists (http-01 and tls-alpn-01 on `web`)."""
    found = {}
    for target in (pebble, trustmesh):
        directory = httpx.get(
            target.directory, verify=ssl.create_default_context(cafile=str(target.listener_bundle))
        ).json()
        for resource in ("newNonce", "newAccount", "newOrder", "revokeCert", "keyChange"):
            assert resource in directory, (target.name, resource)
        assert directory["meta"]["externalAccountRequired"] is True
        acme, _ = _account(target)
        order = acme.new_order(make_csr(["objects.localhost"])[1])
        now = dt.datetime.now(dt.UTC)
        authz = order.authorizations[0].body
        raw = acme._post_as_get(order.authorizations[0].uri).json()
        assert order.body.expires is not None
        assert authz.expires is not None
        found[target.name] = {
            "ari": "renewalInfo" in directory,
            "profiles": "profiles" in directory["meta"],
            "order_hours": round((order.body.expires - now).total_seconds() / 3600),
            "authz_hours": round((authz.expires - now).total_seconds() / 3600),
            "challenges": sorted(c["type"] for c in raw["challenges"]),
        }
    assert found["pebble"] == {
        "ari": False,
        "profiles": False,
        "order_hours": 24,
        "authz_hours": 1,
        "challenges": ["dns-01", "http-01", "tls-alpn-01"],
    }
    assert found["trustmesh"] == {
        "ari": True,
        "profiles": True,
        "order_hours": 1,
        "authz_hours": 1,
        "challenges": ["http-01", "tls-alpn-01"],
    }


# -- pebble's deliberate quirks, each on a pebble of its own --------------------------------


def _pebble_with(
    tmp_path: Path, challtest: tuple[int, str], env: dict[str, str]
) -> contextlib.AbstractContextManager[Pebble]:
    return running_pebble(
        tmp_path / "quirky-pebble",
        http_port=free_port(),
        tls_port=free_port(),
        dns_port=challtest[0],
        challtestsrv=challtest[1],
        env=env,
    )


def _bad_nonces(directory: str, bundle: Path, tries: int) -> int:
    """How many of ``tries`` newAccount lookups (onlyReturnExisting), each signed with a
    fresh nonce from newNonce, come back badNonce."""
    key = new_key()
    rejected = 0
    with httpx.Client(verify=ssl.create_default_context(cafile=str(bundle))) as http:
        urls = http.get(directory).json()
        for _ in range(tries):
            nonce = http.head(urls["newNonce"]).headers["Replay-Nonce"]
            signed = jws.JWS.sign(
                b'{"onlyReturnExisting": true}',
                key=key,
                alg=jwa.ES256,
                nonce=decode_b64jose(nonce),
                url=urls["newAccount"],
            )
            answer = http.post(
                urls["newAccount"],
                content=signed.json_dumps(),
                headers={"Content-Type": "application/jose+json"},
            )
            assert answer.status_code >= 400  # no such account on either server
            rejected += answer.json()["type"].endswith(":badNonce")
    return rejected


def test_pebble_rejects_good_nonces_trustmesh_never(
    trustmesh: Target, challtest: tuple[int, str], tmp_path: Path
) -> None:
    """PEBBLE_WFE_NONCEREJECT (5 % by default, 99 % here) answers badNonce to nonces it
    handed out itself, to exercise client retries; trustmesh rejects only a nonce it did not
    hand out or that was used. Ten fresh nonces each: pebble rejects most, trustmesh none."""
    with _pebble_with(tmp_path, challtest, {"PEBBLE_WFE_NONCEREJECT": "99"}) as peb:
        assert _bad_nonces(peb.directory, peb.bundle, 10) >= 5
    assert _bad_nonces(trustmesh.directory, trustmesh.listener_bundle, 10) == 0


def test_authorization_reuse_and_alternate_chains(
    trustmesh: Target, challtest: tuple[int, str], tmp_path: Path
) -> None:
    """With PEBBLE_AUTHZREUSE=100 pebble puts the account's valid authorization into its next
    order for the same name (ready at once; 50 % of the time by default); trustmesh always
    makes a new pending one (RFC 8555 7.1.3 allows either). With PEBBLE_ALTERNATE_ROOTS=1
    pebble links an alternate chain (RFC 8555 7.4.2); trustmesh has one chain."""
    env = {"PEBBLE_AUTHZREUSE": "100", "PEBBLE_ALTERNATE_ROOTS": "1"}
    with _pebble_with(tmp_path, challtest, env) as peb:
        targets = (_pebble_target(peb, tmp_path), trustmesh)
        found = {}
        for target in targets:
            acme, _, order = _validated_order(target, "reuse.localhost")
            done = acme.finalize_order(
                order, dt.datetime.now() + dt.timedelta(seconds=20), fetch_alternative_chains=True
            )
            again = acme.new_order(make_csr(["reuse.localhost"])[1])
            found[target.name] = (
                again.body.status.name,
                again.authorizations[0].body.status.name,
                len(done.alternative_fullchains_pem),
            )
    assert found["pebble"] == ("ready", "valid", 1)
    assert found["trustmesh"] == ("pending", "pending", 0)
