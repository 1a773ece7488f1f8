"""Token dates that are not dates (NaN, Infinity, 1e309, huge or negative integers,
booleans) are a refused claim at every door: the verifier, `trustmesh token verify`, the
gateway (a real server) and `trustmesh run` (a real process), never a crash or a 503.

The tokens carry a real ES256 signature by a key the provider publishes: the JWS is
written by hand, since no JOSE library encodes NaN.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.pki import KeyType
from trustmesh.tokens import (
    REASONS,
    IntrospectionConfig,
    InvalidTokenError,
    IssuerConfig,
    TokenVerifierUnavailableError,
    Verifier,
)

from ._provider import Minter, ProviderServer, server_tls, sign_es256_raw
from .conftest import PASSPHRASE

DISCOVERY = "/.well-known/openid-configuration"
MARK = "__raw_value__"
#: Numbers Python's json parser turns into something no date comparison survives, and
#: values that are numbers to Python but no NumericDate (RFC 7519 §2).
BAD_DATES = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e309",
    "-1e309",
    "1" + "0" * 400,
    "-1",
    "-1e-3",
    "253402300800",
    "1e300",
    "true",
    "false",
]
DATE_CLAIMS = ["exp", "iat", "nbf"]


@dataclass
class Issuer:
    ca: CertificateAuthority
    provider: ProviderServer
    minter: Minter
    bundle: Path
    workdir: Path

    def crafted(self, claim: str, raw: str, **claims: object) -> str:
        """A signed token whose ``claim`` is the JSON text ``raw``, written verbatim."""
        payload = json.dumps(self.minter.claims(**{claim: MARK}, **claims))
        payload = payload.replace(json.dumps(MARK), raw)
        header: dict[str, object] = {"alg": "ES256", "typ": "at+jwt", "kid": self.minter.ec.kid}
        return sign_es256_raw(header, payload, self.minter.ec)

    def config(self, **kw: object) -> IssuerConfig:
        kw.setdefault("audiences", ["orders"])
        return IssuerConfig(self.provider.url, ca_bundle=self.bundle, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issuer]:
    base = tmp_path_factory.mktemp("token-dates")
    ca = CertificateAuthority.init(
        base / "home", trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    )
    ctx, bundle = server_tls(ca, base / "provider")
    provider = ProviderServer(ctx).start()
    minter = Minter(issuer=provider.url)
    provider.routes[DISCOVERY] = {"issuer": provider.url, "jwks_uri": provider.url + "/jwks"}
    provider.routes["/jwks"] = minter.jwks()
    yield Issuer(ca, provider, minter, bundle, base)
    provider.stop()
    ca.close()


@pytest.fixture(scope="module")
def verifier(issuer: Issuer) -> Iterator[Verifier]:
    with Verifier(issuer.config()) as v:
        yield v


def _refused(verifier: Verifier, token: str) -> InvalidTokenError:
    with pytest.raises(InvalidTokenError) as info:
        verifier.verify_access_token(token)
    assert not isinstance(info.value, TokenVerifierUnavailableError), info.value.message
    assert info.value.reason in REASONS
    return info.value


# -- the verifier ------------------------------------------------------------------------


@pytest.mark.parametrize("claim", DATE_CLAIMS)
@pytest.mark.parametrize("raw", BAD_DATES)
def test_non_dates_are_a_bad_claim(
    issuer: Issuer, verifier: Verifier, claim: str, raw: str
) -> None:
    """Every date claim holding a non-date is refused as bad_claim, naming the claim."""
    error = _refused(verifier, issuer.crafted(claim, raw))
    assert error.reason == "bad_claim", error.message
    assert claim in error.message
    assert "\n" not in error.message


def test_dates_at_the_bounds_are_dates(issuer: Issuer, verifier: Verifier) -> None:
    """0 and 9999-12-31T23:59:59Z are dates: other checks (expiry, lifetime) decide."""
    now = int(time.time())
    assert _refused(verifier, issuer.crafted("exp", "0", iat=now)).reason == "expired"
    far = issuer.crafted("exp", "253402300799", iat=now)
    assert _refused(verifier, far).reason == "lifetime_too_long"
    assert verifier.verify_access_token(issuer.crafted("nbf", "0")).not_before == 0
    fractional = issuer.crafted("iat", f"{now}.5")
    assert verifier.verify_access_token(fractional).issued_at == now


def test_non_standard_constants_elsewhere_are_refused(issuer: Issuer, verifier: Verifier) -> None:
    """NaN or Infinity anywhere in the payload (a custom claim too) is not JSON: refused."""
    for raw in ("NaN", "-Infinity", "[1, Infinity]", '{"x": NaN}'):
        error = _refused(verifier, issuer.crafted("tenant", raw))
        assert error.reason == "bad_claim", error.message
        assert "RFC 8259" in error.message


def test_introspected_dates_are_checked_too(issuer: Issuer) -> None:
    """An introspection answer with a non-date exp/iat/nbf refuses the token (bad_claim);
    one that is not JSON (NaN) is the provider's fault: unavailable, not a crash."""
    now = int(time.time())
    good = {"active": True, "aud": "orders", "sub": "svc", "exp": now + 60, "iat": now}
    answers = {
        "huge-exp": {**good, "exp": 10**400},
        "bool-iat": {**good, "iat": True},
        "negative-nbf": {**good, "nbf": -5},
        "far-exp": {**good, "exp": 253402300800},
        "nan-exp": {**good, "exp": float("nan")},  # json.dumps writes NaN
        "good": good,
    }
    server = ProviderServer(issuer.provider.context).start()
    try:
        server.serve_introspection(answers, "rs", "secret")
        server.routes["/jwks"] = issuer.minter.jwks()
        config = IssuerConfig(
            server.url,
            audiences=["orders"],
            ca_bundle=issuer.bundle,
            introspection=IntrospectionConfig("rs", "secret"),
        )
        with Verifier(config) as v:
            assert v.verify_access_token("good").subject == "svc"
            for token, claim in (
                ("huge-exp", "exp"),
                ("bool-iat", "iat"),
                ("negative-nbf", "nbf"),
                ("far-exp", "exp"),
            ):
                error = _refused(v, token)
                assert error.reason == "bad_claim", (token, error.message)
                assert claim in error.message
            with pytest.raises(TokenVerifierUnavailableError) as info:
                v.verify_access_token("nan-exp")
            assert info.value.reason == "introspection_unavailable"
    finally:
        server.stop()


def test_revocation_entries_with_non_date_exp_stay_revoked(issuer: Issuer) -> None:
    """A revocation list entry whose exp is no date keeps the jti revoked (no crash)."""
    server = ProviderServer(issuer.provider.context).start()
    try:
        minter = Minter(issuer=server.url, ec=issuer.minter.ec, rsa=issuer.minter.rsa)
        server.routes[DISCOVERY] = {
            "issuer": server.url,
            "jwks_uri": server.url + "/jwks",
            "revocation_list_endpoint": server.url + "/revoked",
        }
        server.routes["/jwks"] = minter.jwks()
        server.routes["/revoked"] = {
            "revoked": [{"jti": "huge", "exp": 10**400}, {"jti": "bool", "exp": True}]
        }
        with Verifier(IssuerConfig(server.url, audiences=["orders"], ca_bundle=issuer.bundle)) as v:
            for jti in ("huge", "bool"):
                with pytest.raises(InvalidTokenError) as info:
                    v.verify_access_token(minter.token(jti=jti))
                assert info.value.reason == "revoked"
            assert v.verify_access_token(minter.token(jti="other")).jwt_id == "other"
    finally:
        server.stop()


# -- trustmesh token verify ---------------------------------------------------------------

CLI_CASES = [
    ("exp", "NaN"),
    ("iat", "Infinity"),
    ("nbf", "-Infinity"),
    ("exp", "1e309"),
    ("iat", "1" + "0" * 400),
]


@pytest.mark.slow
@pytest.mark.parametrize(("claim", "raw"), CLI_CASES)
def test_cli_verify_refuses_non_dates(issuer: Issuer, claim: str, raw: str) -> None:
    """`token verify` exits 1 with one line on stderr and a JSON error object on --json."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trustmesh",
            "token",
            "verify",
            issuer.crafted(claim, raw),
            *("--issuer", issuer.provider.url, "--audience", "orders"),
            *("--ca-bundle", str(issuer.bundle), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("refused (bad_claim): ")
    assert claim in lines[0]
    out = json.loads(result.stdout)
    assert out["valid"] is False
    assert out["reason"] == "bad_claim"
    assert claim in out["message"]


# -- the gateway and `trustmesh run` --------------------------------------------------------


@pytest.mark.slow
def test_gateway_answers_401_for_non_dates(issuer: Issuer) -> None:
    """A real gateway refuses each such token with 401 invalid_token / bad_claim, not 503."""
    from ._echo import Upstream
    from ._gateway import gateway_identity, route, running_gateway, write_config
    from ._services import issue, serve_asgi

    orders_id = "spiffe://example.org/svc/orders"
    workdir = issuer.workdir / "gateway"
    workdir.mkdir()
    cert_dir = gateway_identity(issuer.ca, workdir)
    app = Upstream("orders")
    with serve_asgi(app, issuer.ca, issue(issuer.ca, orders_id, workdir)) as url:
        config = write_config(
            workdir / "gw.yaml",
            [route("/orders", [url], orders_id, auth={"scopes": ["orders:read"]})],
            issuers=[{"issuer": issuer.provider.url, "audience": "orders"}],
        )
        with running_gateway(issuer.ca, config, cert_dir) as gw, gw.client() as http:

            def get(token: str) -> httpx.Response:
                return http.get("/orders", headers={"Authorization": f"Bearer {token}"})

            ok = get(issuer.minter.token())
            answers = [
                (claim, raw, get(issuer.crafted(claim, raw)))
                for claim in DATE_CLAIMS
                for raw in ("NaN", "Infinity", "-Infinity", "1e309", "1" + "0" * 400, "true")
            ]
    assert ok.status_code == 201, ok.text
    for claim, raw, response in answers:
        assert response.status_code == 401, (claim, raw, response.text)
        assert response.json()["reason"] == "bad_claim", (claim, raw, response.text)
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert len(app.requests) == 1


APP = """\
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
"""


@pytest.mark.slow
def test_run_middleware_answers_401_for_non_dates(issuer: Issuer) -> None:
    """`trustmesh run --issuer --require-token` refuses each such token with 401."""
    from trustmesh.client import mtls_client
    from trustmesh.files import atomic_write
    from trustmesh.pki import dump_private_key, pem_certificates
    from trustmesh.tls import client_context

    from ._server import free_port
    from ._services import bundle_pem, issue

    service = "spiffe://example.org/svc/inventory"
    workdir = issuer.workdir / "run"
    cert_dir = workdir / "certs"
    cert_dir.mkdir(parents=True)
    issued = issuer.ca.issue(service, ips=["127.0.0.1"], actor="test")
    assert issued.key is not None
    atomic_write(cert_dir / "bundle.pem", pem_certificates(issuer.ca.bundle))
    atomic_write(cert_dir / "key.pem", dump_private_key(issued.key), mode=0o600)
    atomic_write(cert_dir / "chain.pem", pem_certificates(issued.chain))
    (workdir / "datesapp.py").write_text(APP)
    caller = issue(issuer.ca, "spiffe://example.org/svc/orders", workdir)
    port = free_port()
    log_path = workdir / "run.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "trustmesh", "run", "datesapp:app"),
                *("--cert-dir", str(cert_dir), "--listen", f"127.0.0.1:{port}"),
                *("--no-policy", "--no-revocation", "--app-dir", str(workdir)),
                *("--issuer", issuer.provider.url, "--audience", "orders", "--require-token"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    ctx = client_context(cadata=bundle_pem(issuer.ca), chain=caller.chain, key=caller.key)
    try:
        with mtls_client(
            ctx, expect_id=service, base_url=f"https://127.0.0.1:{port}", timeout=10
        ) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    http.get("/")
                    break
                except httpx.TransportError:
                    assert process.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.1)

            def get(token: str) -> httpx.Response:
                return http.get("/", headers={"Authorization": f"Bearer {token}"})

            ok = get(issuer.minter.token())
            answers = [
                (claim, raw, get(issuer.crafted(claim, raw)))
                for claim in DATE_CLAIMS
                for raw in ("NaN", "-Infinity", "1e309", "1" + "0" * 400)
            ]
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert ok.status_code == 200, (ok.text, log_path.read_text())
    for claim, raw, response in answers:
        assert response.status_code == 401, (claim, raw, response.text)
        assert response.json()["token_reason"] == "bad_claim", (claim, raw, response.text)
    assert "Traceback" not in log_path.read_text()
