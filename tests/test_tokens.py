"""trustmesh.tokens: every check, the attack suite, and the caches against a real HTTPS provider.

The provider is a real TLS server on 127.0.0.1 (tests/_provider.py) with a
certificate from our CA; tokens are minted with joserfc, or by hand for tokens
no JOSE library would sign.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from joserfc.jwk import ECKey, OKPKey, RSAKey

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError, TokenError, TokenExpiredError
from trustmesh.pki import KeyType, dump_private_key, pem_certificates
from trustmesh.tokens import (
    MAX_TOKEN_BYTES,
    REASONS,
    AsyncVerifier,
    ExpiredTokenError,
    IntrospectionConfig,
    InvalidTokenError,
    IssuerConfig,
    TokenVerifierUnavailableError,
    Verifier,
    certificate_thumbprint,
    load_jwk,
    load_jwks,
)

from ._provider import Minter, ProviderServer, b64, server_tls, sign_es256, unsigned
from .conftest import PASSPHRASE

DISCOVERY = "/.well-known/openid-configuration"
FAST = timedelta(milliseconds=200)


@pytest.fixture(scope="module")
def tls(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[CertificateAuthority, ssl.SSLContext, Path]]:
    base = tmp_path_factory.mktemp("tokens-ca")
    ca = CertificateAuthority.init(
        base / "home", trust_domain="example.org", passphrase=PASSPHRASE, key_type=KeyType.EC_P256
    )
    ctx, bundle = server_tls(ca, base / "server")
    yield ca, ctx, bundle
    ca.close()


@pytest.fixture(scope="module")
def keys() -> tuple[ECKey, RSAKey]:
    return (
        ECKey.generate_key("P-256", parameters={"kid": "ec-1"}),
        RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}),
    )


@pytest.fixture
def provider(tls: tuple[CertificateAuthority, ssl.SSLContext, Path]) -> Iterator[ProviderServer]:
    server = ProviderServer(tls[1]).start()
    yield server
    server.stop()


@pytest.fixture
def bundle(tls: tuple[CertificateAuthority, ssl.SSLContext, Path]) -> Path:
    return tls[2]


@pytest.fixture
def minter(provider: ProviderServer, keys: tuple[ECKey, RSAKey]) -> Minter:
    m = Minter(issuer=provider.url, ec=keys[0], rsa=keys[1])
    provider.routes[DISCOVERY] = {"issuer": provider.url, "jwks_uri": provider.url + "/jwks"}
    provider.routes["/jwks"] = m.jwks()
    return m


def config(provider: ProviderServer, bundle: Path, **kwargs: object) -> IssuerConfig:
    kwargs.setdefault("audiences", ["orders"])
    return IssuerConfig(provider.url, ca_bundle=bundle, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def verifier(provider: ProviderServer, bundle: Path, minter: Minter) -> Iterator[Verifier]:
    with Verifier(config(provider, bundle)) as v:
        yield v


def refused(
    verifier: Verifier, token: str | bytes, reason: str, **kwargs: object
) -> InvalidTokenError:
    """Assert ``token`` is refused with ``reason`` and return the error."""
    with pytest.raises(InvalidTokenError) as info:
        verifier.verify_access_token(token, **kwargs)  # type: ignore[arg-type]
    assert info.value.reason == reason, info.value.message
    assert info.value.reason in REASONS
    assert isinstance(info.value, TokenError)
    return info.value


# -- accepted tokens --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256"])
def test_valid_token_returns_typed_claims(verifier: Verifier, minter: Minter, alg: str) -> None:
    """A token signed with a published key and carrying RFC 9068 claims is accepted."""
    token = minter.token(alg, roles=["reader", "auditor"])
    claims = verifier.verify_access_token(token)
    assert claims.issuer == minter.issuer
    assert claims.subject == "svc-billing"
    assert claims.client_id == "svc-billing"
    assert claims.audience == ("orders",)
    assert claims.scopes == frozenset({"orders:read", "orders:write"})
    assert claims.has_scope("orders:read")
    assert not claims.has_scope("admin")
    assert claims.roles == ("reader", "auditor")
    assert claims.certificate_thumbprint is None
    assert claims.source == "jwt"
    assert claims.to_dict()["jti"] == claims.jwt_id


def test_audience_list_with_one_expected_value_is_accepted(
    verifier: Verifier, minter: Minter
) -> None:
    """aud may be a list; one expected audience in it is enough."""
    claims = verifier.verify_access_token(minter.token(aud=["other", "orders"]))
    assert claims.audience == ("other", "orders")


def test_token_as_bytes_and_jwks_url_configuration(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """An issuer configured by JWKS URL (no discovery) verifies tokens given as bytes."""
    with Verifier(config(provider, bundle, jwks_url=provider.url + "/jwks")) as v:
        assert v.verify_access_token(minter.token().encode()).subject == "svc-billing"
    assert provider.count(DISCOVERY) == 0


def test_async_verifier(provider: ProviderServer, bundle: Path, minter: Minter) -> None:
    """AsyncVerifier verifies concurrently and fetches the JWKS once for all callers."""

    async def run() -> None:
        async with AsyncVerifier(config(provider, bundle)) as v:
            tokens = [minter.token() for _ in range(20)]
            results = await asyncio.gather(*(v.verify_access_token(t) for t in tokens))
            assert {r.jwt_id for r in results} == {json.loads(_payload(t))["jti"] for t in tokens}
            with pytest.raises(InvalidTokenError) as info:
                await v.verify_access_token(minter.token(aud="billing"))
            assert info.value.reason == "bad_audience"

    asyncio.run(run())
    assert provider.count("/jwks") == 1


def test_sync_verifier_shared_by_threads(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """Threads share one Verifier: one JWKS fetch, every token verified, the cache bounded."""
    from concurrent.futures import ThreadPoolExecutor

    tokens = [minter.token() for _ in range(200)]
    with Verifier(config(provider, bundle), token_cache_size=5) as v:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(v.verify_access_token, tokens * 2))
        assert len(v._async._cache) <= 5
    assert [r.jwt_id for r in results] == [json.loads(_payload(t))["jti"] for t in tokens * 2]
    assert provider.count("/jwks") == 1


def _payload(token: str) -> bytes:
    import base64

    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# -- attack suite (issue 4, "Attack suite against the verifier") -----------------------------


def test_alg_none_is_refused(verifier: Verifier, minter: Minter) -> None:
    """alg none, with or without a signature, is refused before any key is looked up."""
    claims = minter.claims()
    for alg in ("none", "None", "NONE"):
        refused(
            verifier,
            unsigned({"alg": alg, "typ": "at+jwt", "kid": "ec-1"}, claims),
            "alg_not_allowed",
        )
        refused(
            verifier,
            unsigned({"alg": alg, "typ": "at+jwt", "kid": "ec-1"}, claims, b"x"),
            "alg_not_allowed",
        )


@pytest.mark.parametrize("which", ["ec", "rsa"])
@pytest.mark.parametrize("form", ["pem", "der", "jwk"])
def test_hs256_signed_with_the_public_key_is_refused(
    verifier: Verifier, minter: Minter, which: str, form: str
) -> None:
    """HS256 keyed with the provider's public key (PEM, DER or JWK text) is refused."""
    key = minter.ec if which == "ec" else minter.rsa
    public = key.public_key
    secret = {
        "pem": public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        "der": public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        "jwk": json.dumps(key.as_dict(private=False)).encode(),
    }[form]
    header = {"alg": "HS256", "typ": "at+jwt", "kid": key.kid}
    h = b64(json.dumps(header).encode())
    p = b64(json.dumps(minter.claims()).encode())
    sig = hmac.new(secret, f"{h}.{p}".encode(), hashlib.sha256).digest()
    error = refused(verifier, f"{h}.{p}.{b64(sig)}", "alg_not_allowed")
    assert "HMAC" in error.message


def test_symmetric_keys_in_a_jwks_are_never_loaded() -> None:
    """An oct key in the JWKS is skipped, so no kid can ever select HMAC."""
    with pytest.raises(ValueError, match="symmetric"):
        load_jwk({"kty": "oct", "k": b64(b"secret"), "kid": "hmac"})
    with pytest.raises(ValueError, match="no usable"):
        load_jwks({"keys": [{"kty": "oct", "k": b64(b"secret")}]}, source="test")


def test_unknown_kid_is_refused(
    verifier: Verifier, minter: Minter, provider: ProviderServer
) -> None:
    """A kid not in the JWKS is refused after one (rate-limited) refetch."""
    stranger = ECKey.generate_key("P-256", parameters={"kid": "nobody"})
    refused(verifier, minter.token(key=stranger), "unknown_kid")
    refused(verifier, minter.token(key=stranger), "unknown_kid")
    # Loaded once; within the 10 s refetch interval an unknown kid causes no refetch.
    assert provider.count("/jwks") == 1


@pytest.mark.parametrize(
    "kid", ["../../../etc/passwd", "/jwks?x=1", "..%2f..%2fadmin", "a/b\\c", "ec-1/../rsa-1"]
)
def test_kid_with_path_characters_is_only_a_lookup_key(
    verifier: Verifier, minter: Minter, provider: ProviderServer, kid: str
) -> None:
    """A kid with path characters matches no key and never becomes part of a URL."""
    refused(verifier, minter.token(header={"kid": kid}), "unknown_kid")
    assert set(provider.paths()) <= {DISCOVERY, "/jwks"}


@pytest.mark.parametrize("param", ["jku", "x5u", "jwk"])
def test_key_location_headers_are_ignored(
    verifier: Verifier,
    minter: Minter,
    tls: tuple[CertificateAuthority, ssl.SSLContext, Path],
    param: str,
) -> None:
    """jku/x5u/jwk pointing at an attacker's key are never fetched nor used."""
    attacker_key = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
    https = ProviderServer(tls[1]).start()
    http = ProviderServer(None).start()
    try:
        attacker_jwks = {"keys": [attacker_key.as_dict(private=False)]}
        for server in (https, http):
            server.routes["/keys"] = attacker_jwks
            server.routes["/cert.pem"] = {"x5c": []}
        values = {
            "jku": https.url + "/keys",
            "x5u": http.url + "/cert.pem",
            "jwk": attacker_key.as_dict(private=False),
        }
        # Same kid as the provider's real key: only the provider's key is tried.
        refused(
            verifier, minter.token(key=attacker_key, header={param: values[param]}), "bad_signature"
        )
        # A fresh kid: the attacker's key is not found anywhere we look.
        fresh = ECKey.generate_key("P-256", parameters={"kid": "attacker"})
        refused(verifier, minter.token(key=fresh, header={param: values[param]}), "unknown_kid")
        assert https.requests == []
        assert http.requests == []
    finally:
        https.stop()
        http.stop()


def test_expired_token_is_refused(verifier: Verifier, minter: Minter) -> None:
    """exp in the past beyond the leeway is refused; within the leeway it passes."""
    now = int(time.time())
    error = refused(verifier, minter.token(iat=now - 700, exp=now - 61), "expired")
    assert isinstance(error, ExpiredTokenError)
    assert isinstance(error, TokenExpiredError)
    assert verifier.verify_access_token(minter.token(iat=now - 600, exp=now - 30)).subject


def test_not_yet_valid_token_is_refused(verifier: Verifier, minter: Minter) -> None:
    """nbf or iat in the future beyond the leeway is refused."""
    now = int(time.time())
    refused(verifier, minter.token(nbf=now + 120), "not_yet_valid")
    refused(verifier, minter.token(iat=now + 120, exp=now + 600), "not_yet_valid")
    assert verifier.verify_access_token(minter.token(nbf=now + 30)).not_before == now + 30


def test_lifetime_over_the_cap_is_refused(verifier: Verifier, minter: Minter) -> None:
    """exp - iat over max_lifetime (1 h by default) is refused."""
    now = int(time.time())
    refused(verifier, minter.token(iat=now, exp=now + 3601), "lifetime_too_long")
    refused(verifier, minter.token(iat=now, exp=now + 10 * 365 * 86400), "lifetime_too_long")


def test_wrong_issuer_and_audience_are_refused(verifier: Verifier, minter: Minter) -> None:
    """iss must match exactly (no trailing slash games); aud must name this service."""
    refused(verifier, minter.token(iss="https://evil.example"), "bad_issuer")
    refused(verifier, minter.token(iss=minter.issuer + "/"), "bad_issuer")
    refused(verifier, minter.token(iss=minter.issuer.upper()), "bad_issuer")
    refused(verifier, minter.token(aud="billing"), "bad_audience")
    refused(verifier, minter.token(aud=["billing", "ORDERS"]), "bad_audience")


def test_missing_exp_and_aud_are_refused(verifier: Verifier, minter: Minter) -> None:
    """exp and aud are required; so are iat, sub, client_id and jti (RFC 9068)."""
    refused(verifier, minter.token(exp=None), "missing_exp")
    refused(verifier, minter.token(aud=None), "missing_aud")
    refused(verifier, minter.token(aud=[]), "missing_aud")
    for claim in ("iat", "sub", "client_id", "jti"):
        error = refused(verifier, minter.token(**{claim: None}), "missing_claim")  # type: ignore[arg-type]
        assert error.details["claim"] == claim
    refused(verifier, minter.token(exp="tomorrow"), "bad_claim")
    refused(verifier, minter.token(exp=True), "bad_claim")
    refused(verifier, minter.token(scope=["a"]), "bad_claim")
    refused(verifier, minter.token(roles="admin"), "bad_claim")


def test_id_token_as_access_token_is_refused(verifier: Verifier, minter: Minter) -> None:
    """An ID token (typ JWT or none, nonce/at_hash) is not an access token."""
    id_claims: dict[str, Any] = {
        "nonce": "n-0S6_WzA2Mj",
        "auth_time": int(time.time()),
        "azp": "svc-billing",
    }
    refused(verifier, minter.token(header={"typ": "JWT"}, **id_claims), "not_access_token")
    refused(
        verifier,
        sign_es256({"alg": "ES256", "kid": "ec-1"}, minter.claims(**id_claims), minter.ec),
        "not_access_token",
    )
    refused(verifier, minter.token(**id_claims), "not_access_token")
    refused(verifier, minter.token(at_hash="77QmUPtjPfzWtF2AnpK9RQ"), "not_access_token")


def test_pre_rfc9068_access_tokens_need_an_explicit_opt_in(
    provider: ProviderServer, bundle: Path, minter: Minter, caplog: pytest.LogCaptureFixture
) -> None:
    """typ JWT tokens without client_id/jti pass only with strict_rfc9068=False (logged)."""
    legacy: dict[str, Any] = {"client_id": None, "jti": None, "azp": "web-app"}
    token = minter.token(header={"typ": "JWT"}, **legacy)
    with Verifier(config(provider, bundle)) as strict:
        refused(strict, token, "not_access_token")
    with caplog.at_level(logging.WARNING, logger="trustmesh.tokens"):
        cfg = config(provider, bundle, strict_rfc9068=False)
    assert "need not be RFC 9068" in caplog.text
    with Verifier(cfg) as v:
        claims = v.verify_access_token(token)
        assert claims.client_id == "web-app"
        assert claims.jwt_id is None
        no_typ = sign_es256({"alg": "ES256", "kid": "ec-1"}, minter.claims(**legacy), minter.ec)
        assert v.verify_access_token(no_typ).subject == "svc-billing"
        # ID tokens are still refused, and so are other kinds of JWT.
        refused(v, minter.token(header={"typ": "JWT"}, nonce="n-0S6"), "not_access_token")
        refused(v, minter.token(header={"typ": "logout+jwt"}), "not_access_token")
        refused(v, minter.token(header={"typ": "JWT"}, aud="web-app"), "bad_audience")
        refused(v, minter.token(header={"typ": "JWT"}, **{**legacy, "sub": None}), "missing_claim")


def test_tampered_payload_is_refused(verifier: Verifier, minter: Minter) -> None:
    """Changing one claim after signing breaks the signature."""
    for alg in ("ES256", "RS256"):
        h, _, s = minter.token(alg).split(".")
        forged = b64(json.dumps(minter.claims(roles=["admin"])).encode())
        refused(verifier, f"{h}.{forged}.{s}", "bad_signature")
    h, p, s = minter.token().split(".")
    refused(verifier, f"{h}.{p}.{s[:-4]}AAAA", "bad_signature")
    refused(verifier, f"{h}.{p}.{s}AAAA", "bad_signature")


def test_oversized_token_is_refused_before_parsing(verifier: Verifier, minter: Minter) -> None:
    """Anything over 8 KiB is refused unparsed, even well-signed tokens."""
    big = minter.token(padding="x" * MAX_TOKEN_BYTES)
    refused(verifier, big, "too_large")
    refused(verifier, "!" * (MAX_TOKEN_BYTES + 1), "too_large")
    refused(verifier, b"\xff" * (MAX_TOKEN_BYTES + 1), "too_large")


@pytest.fixture(scope="module")
def client_certs(tls: tuple[CertificateAuthority, ssl.SSLContext, Path]) -> tuple[object, object]:
    ca = tls[0]
    first = ca.issue("spiffe://example.org/ns/prod/sa/billing")
    second = ca.issue("spiffe://example.org/ns/prod/sa/attacker")
    return first, second


def test_bound_token_without_or_with_another_certificate_is_refused(
    verifier: Verifier,
    minter: Minter,
    client_certs: tuple[object, object],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cnf.x5t#S256 token needs the caller's certificate, and exactly that one."""
    mine, other = (c.certificate for c in client_certs)  # type: ignore[attr-defined]
    token = minter.token(cnf={"x5t#S256": certificate_thumbprint(mine)})
    refused(verifier, token, "cnf_missing_cert")
    refused(verifier, token, "cnf_mismatch", client_cert=other)
    claims = verifier.verify_access_token(token, client_cert=mine)
    assert claims.certificate_thumbprint == certificate_thumbprint(mine)
    # The cached token is checked against the certificate each time too.
    refused(verifier, token, "cnf_mismatch", client_cert=other)
    refused(verifier, token, "cnf_missing_cert")
    assert verifier.verify_access_token(token, client_cert=mine, skip_binding=False)
    with caplog.at_level(logging.WARNING, logger="trustmesh.tokens"):
        assert verifier.verify_access_token(token, skip_binding=True).subject == "svc-billing"
    assert "binding (cnf) not checked" in caplog.text
    refused(verifier, minter.token(cnf={"jkt": "abc"}), "cnf_unsupported", client_cert=mine)


def test_bound_token_with_the_certificate_from_a_real_mtls_handshake(
    verifier: Verifier,
    minter: Minter,
    client_certs: tuple[object, object],
    tls: tuple[CertificateAuthority, ssl.SSLContext, Path],
    tmp_path: Path,
) -> None:
    """The DER certificate a TLS server sees from its client matches the token's binding."""
    ca = tls[0]
    issued = client_certs[0]
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(pem_certificates(issued.chain))  # type: ignore[attr-defined]
    key.write_bytes(dump_private_key(issued.key))  # type: ignore[attr-defined]
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_dir = tmp_path / "srv"
    server_dir.mkdir()
    from trustmesh.serving import issue_server_identity

    s_chain, s_key = issue_server_identity(ca, "127.0.0.1", server_dir, path="/svc")
    server_ctx.load_cert_chain(s_chain, s_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cadata=pem_certificates(ca.bundle).decode())
    seen: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
            der = tls_conn.getpeercert(binary_form=True)
            assert der is not None
            seen.append(der)
            tls_conn.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    client_ctx = ssl.create_default_context(cadata=pem_certificates(ca.bundle).decode())
    client_ctx.load_cert_chain(chain, key)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            assert conn.recv(2) == b"ok"
    thread.join(5)
    listener.close()
    token = minter.token(cnf={"x5t#S256": certificate_thumbprint(issued.certificate)})  # type: ignore[attr-defined]
    assert verifier.verify_access_token(token, client_cert=seen[0]).subject == "svc-billing"


def test_malformed_tokens_are_refused(verifier: Verifier, minter: Minter) -> None:
    """Not three base64url parts of JSON objects, or a crit header: refused with a reason."""
    good = minter.token()
    h, p, s = good.split(".")
    for token in (
        "",
        "abc",
        "a.b",
        f"{h}.{p}",
        f"{h}.{p}.{s}.x",
        f"{h} .{p}.{s}",
        "é.é.é",
        f"{h}.{p}.{s}==",
    ):
        refused(verifier, token, "malformed")
    refused(verifier, f"{b64(b'[1]')}.{p}.{s}", "malformed")
    refused(verifier, f"{h}.{b64(b'not json')}.{s}", "malformed")
    refused(
        verifier,
        sign_es256(
            {"alg": "ES256", "typ": "at+jwt", "kid": "ec-1", "crit": ["exp"], "exp": 1},
            minter.claims(),
            minter.ec,
        ),
        "bad_header",
    )
    refused(
        verifier,
        sign_es256({"alg": "ES256", "typ": "at+jwt", "kid": 7}, minter.claims(), minter.ec),
        "bad_header",
    )


def test_algorithm_is_pinned_by_the_key_not_the_header(verifier: Verifier, minter: Minter) -> None:
    """The EC P-256 key only verifies ES256; the RSA key never verifies an EC signature."""
    refused(
        verifier,
        minter.token(
            "ES384",
            header={"kid": "ec-1"},
            key=ECKey.generate_key("P-384", parameters={"kid": "ec-1"}),
        ),
        "alg_mismatch",
    )
    refused(verifier, minter.token("RS256", header={"kid": "ec-1"}), "alg_mismatch")
    refused(verifier, minter.token("ES256", header={"kid": "rsa-1"}), "alg_mismatch")


def test_other_key_types_verify_with_their_pinned_algorithm(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """ES384 (P-384), Ed25519 and a lone key without kid verify; each key only its own alg."""
    p384 = ECKey.generate_key("P-384", parameters={"kid": "p384"})
    ed = OKPKey.generate_key("Ed25519", parameters={"kid": "ed"})
    provider.routes["/jwks"] = {
        "keys": [*minter.jwks()["keys"], p384.as_dict(private=False), ed.as_dict(private=False)]
    }
    with Verifier(config(provider, bundle, algorithms=["ES384", "Ed25519", "ES256"])) as v:
        assert v.verify_access_token(minter.token("ES384", key=p384)).subject
        assert v.verify_access_token(minter.token("Ed25519", key=ed)).subject
        refused(v, minter.token("ES256", header={"kid": "p384"}), "alg_mismatch")
        refused(v, minter.token("ES384", header={"kid": "ed"}, key=p384), "alg_mismatch")
    lone = ECKey.generate_key("P-256")
    provider.routes["/jwks"] = {"keys": [lone.as_dict(private=False)]}
    with Verifier(config(provider, bundle)) as v:
        assert v.verify_access_token(minter.token(key=lone, header={"kid": None})).subject
        refused(v, minter.token(key=lone, header={"kid": "named"}), "unknown_kid")


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        ({"kty": "RSA", "n": b64(b"\x01" * 128), "e": "AQAB"}, "fewer than 2048"),
        ({"kty": "EC", "crv": "P-256", "x": b64(b"\x01" * 32), "y": b64(b"\x02" * 32)}, "EC key"),
        ({"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}, "P-256, P-384 or P-521"),
        ({"kty": "OKP", "crv": "X25519", "x": b64(b"\x01" * 32)}, "Ed25519 or Ed448"),
        ({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "use": "enc"}, "not 'sig'"),
        ({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "key_ops": ["encrypt"]}, "verify"),
        ({"kty": "unknown"}, "kty"),
        ({"kty": "EC", "crv": "P-256", "kid": 5}, "kid"),
    ],
)
def test_unusable_jwks_are_refused(jwk: dict[str, object], message: str) -> None:
    """Weak, off-curve, encryption-only, mismatched or unknown JWKs never become keys."""
    with pytest.raises(ValueError, match=message):
        load_jwk(jwk)


def test_published_alg_narrows_an_rsa_key(minter: Minter) -> None:
    """An RSA JWK with alg RS256 verifies RS256 only, without alg RS*/PS*; alg must fit."""
    with_alg = load_jwk({**minter.rsa.as_dict(private=False), "alg": "RS256"})
    assert with_alg.algorithms == {"RS256"}
    assert load_jwk(minter.rsa.as_dict(private=False)).algorithms == {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
    }
    assert load_jwk(minter.ec.as_dict(private=False)).algorithms == {"ES256"}
    with pytest.raises(ValueError, match="does not fit an EC P-256 key"):
        load_jwk({**minter.ec.as_dict(private=False), "alg": "RS256"})
    with pytest.raises(ValueError, match="'HS256' does not fit an RSA key"):
        load_jwk({**minter.rsa.as_dict(private=False), "alg": "HS256"})


def test_issuer_algorithm_allow_list(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """An issuer narrowed to ES256 refuses RS256 tokens even from its own RSA key."""
    with Verifier(config(provider, bundle, algorithms=["ES256"])) as v:
        assert v.verify_access_token(minter.token("ES256")).subject
        refused(v, minter.token("RS256"), "alg_not_allowed")


def test_messages_never_echo_the_token(verifier: Verifier, minter: Minter) -> None:
    """Refusal messages say which check failed without repeating the token or its signature."""
    token = minter.token(aud="billing")
    error = refused(verifier, token, "bad_audience")
    assert token.split(".")[2] not in str(error)
    assert "expected one of ['orders']" in error.message


def test_public_api_is_sorted_and_complete() -> None:
    """trustmesh.tokens exports a sorted __all__ of names that exist, the callables documented."""
    import trustmesh.tokens as tokens

    # isort-style, as ruff (RUF022) keeps it: CONSTANTS, then Classes, then functions.
    style = sorted(tokens.__all__, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
    assert tokens.__all__ == style
    for name in tokens.__all__:
        value = getattr(tokens, name)
        if callable(value):
            assert value.__doc__, name
    assert set(REASONS) >= {
        "expired",
        "bad_audience",
        "alg_not_allowed",
        "unknown_kid",
        "bad_signature",
        "revoked",
        "cnf_mismatch",
        "too_large",
    }


# -- configuration -------------------------------------------------------------------------


def test_configuration_refuses_insecure_settings(bundle: Path) -> None:
    """No audience, HMAC or none algorithms, plain HTTP or a huge leeway are refused."""
    with pytest.raises(ConfigError, match="no expected audience"):
        IssuerConfig("https://idp.example", audiences=[])
    for algs in (["HS256"], ["none"], []):
        with pytest.raises(ConfigError, match="algorithms"):
            IssuerConfig("https://idp.example", audiences=["a"], algorithms=algs)
    with pytest.raises(ConfigError, match="https://"):
        IssuerConfig("http://idp.example", audiences=["a"])
    with pytest.raises(ConfigError, match="leeway"):
        IssuerConfig("https://idp.example", audiences=["a"], leeway=timedelta(hours=1))
    with pytest.raises(ConfigError, match="export bundle"):
        IssuerConfig(
            "https://idp.example", audiences=["a"], ca_bundle=bundle.parent / "missing.pem"
        )
    with pytest.raises(ConfigError, match="not both"):
        IssuerConfig(
            "https://i.example",
            audiences=["a"],
            jwks_url="https://i.example/j",
            discovery_url="https://i.example/d",
        )
    assert IssuerConfig("https://idp.example", audiences="a").audiences == ("a",)


def test_plain_http_must_be_explicit_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """allow_insecure_http permits http:// URLs and says so in the log."""
    with caplog.at_level(logging.WARNING, logger="trustmesh.tokens"):
        cfg = IssuerConfig("http://127.0.0.1:1", audiences=["a"], allow_insecure_http=True)
    assert cfg.discovery_url == "http://127.0.0.1:1/.well-known/openid-configuration"
    assert "plain HTTP" in caplog.text


# -- JWKS cache -------------------------------------------------------------------------------


def test_unknown_kid_refetch_is_rate_limited(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """A rotated-in key is found by one refetch; a flood of unknown kids causes no more."""
    with Verifier(config(provider, bundle, jwks_min_refetch_interval=timedelta(seconds=1))) as v:
        assert v.verify_access_token(minter.token())
        assert provider.count("/jwks") == 1
        new = ECKey.generate_key("P-256", parameters={"kid": "ec-2"})
        provider.routes["/jwks"] = {"keys": [*minter.jwks()["keys"], new.as_dict(private=False)]}
        time.sleep(1.05)
        assert v.verify_access_token(minter.token(key=new)).subject
        assert provider.count("/jwks") == 2
        for i in range(50):
            stranger = ECKey.generate_key("P-256", parameters={"kid": f"forged-{i}"})
            refused(v, minter.token(key=stranger), "unknown_kid")
        assert provider.count("/jwks") == 2  # within the interval: no refetch at all
        time.sleep(1.05)
        refused(
            v,
            minter.token(key=ECKey.generate_key("P-256", parameters={"kid": "late"})),
            "unknown_kid",
        )
        assert provider.count("/jwks") == 3


def test_provider_down_at_start_then_recovering(
    tls: tuple[CertificateAuthority, ssl.SSLContext, Path], keys: tuple[ECKey, RSAKey]
) -> None:
    """The verifier starts while the provider is down, refuses as unavailable, then recovers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"https://127.0.0.1:{port}"
    m = Minter(issuer=url, ec=keys[0], rsa=keys[1])
    with Verifier(
        IssuerConfig(url, audiences=["orders"], ca_bundle=tls[2], jwks_min_refetch_interval=FAST)
    ) as v:
        with pytest.raises(TokenVerifierUnavailableError) as info:
            v.verify_access_token(m.token())
        assert info.value.reason == "keys_unavailable"
        server = ProviderServer(tls[1], port=port)
        server.routes[DISCOVERY] = {"issuer": url, "jwks_uri": url + "/jwks"}
        server.routes["/jwks"] = m.jwks()
        server.start()
        try:
            # Still inside the refetch interval: no new attempt yet.
            with pytest.raises(TokenVerifierUnavailableError):
                v.verify_access_token(m.token())
            time.sleep(0.25)
            assert v.verify_access_token(m.token()).subject == "svc-billing"
        finally:
            server.stop()


def test_stale_keys_are_used_when_the_provider_fails(
    provider: ProviderServer, bundle: Path, minter: Minter, caplog: pytest.LogCaptureFixture
) -> None:
    """After max age the JWKS is refetched; if that fails, the cached keys stay in use."""
    cfg = config(provider, bundle, jwks_max_age=FAST, jwks_min_refetch_interval=FAST)
    with Verifier(cfg, token_cache_size=0) as v:
        assert v.verify_access_token(minter.token())
        provider.status = 503
        time.sleep(0.25)
        with caplog.at_level(logging.WARNING, logger="trustmesh.tokens"):
            assert v.verify_access_token(minter.token()).subject
        assert "keys not refreshed" in caplog.text
        assert "HTTP 503" in caplog.text
        attempts = len(provider.requests)
        for _ in range(20):
            assert v.verify_access_token(minter.token())
        assert len(provider.requests) == attempts  # failures are rate-limited too
        provider.stop()
        time.sleep(0.25)
        assert v.verify_access_token(minter.token()).subject  # connection refused: still stale


def test_empty_key_set_is_never_cached(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """An empty JWKS neither becomes the cache at start nor replaces good keys later."""
    provider.routes["/jwks"] = {"keys": []}
    cfg = config(provider, bundle, jwks_max_age=FAST, jwks_min_refetch_interval=FAST)
    with Verifier(cfg, token_cache_size=0) as v:
        with pytest.raises(TokenVerifierUnavailableError):
            v.verify_access_token(minter.token())
        provider.routes["/jwks"] = minter.jwks()
        time.sleep(0.25)
        assert v.verify_access_token(minter.token())
        provider.routes["/jwks"] = {"keys": []}
        time.sleep(0.25)
        assert v.verify_access_token(minter.token()).subject
        assert provider.count("/jwks") == 3


def test_discovery_with_another_issuer_is_not_trusted(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """A discovery document naming a different issuer yields no keys."""
    provider.routes[DISCOVERY] = {
        "issuer": "https://evil.example",
        "jwks_uri": provider.url + "/jwks",
    }
    with Verifier(config(provider, bundle)) as v:
        with pytest.raises(TokenVerifierUnavailableError) as info:
            v.verify_access_token(minter.token())
        assert info.value.reason == "keys_unavailable"
    assert provider.count("/jwks") == 0


def test_provider_certificate_must_chain_to_the_bundle(
    provider: ProviderServer, minter: Minter
) -> None:
    """Without our CA bundle the provider's HTTPS certificate is not trusted: no keys."""
    with Verifier(IssuerConfig(provider.url, audiences=["orders"])) as v:
        with pytest.raises(TokenVerifierUnavailableError):
            v.verify_access_token(minter.token())


def test_withdrawn_key_invalidates_cached_tokens(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """When a kid disappears from the JWKS, tokens it verified are no longer served from cache."""
    cfg = config(provider, bundle, jwks_max_age=FAST, jwks_min_refetch_interval=FAST)
    with Verifier(cfg) as v:
        token = minter.token("RS256")
        assert v.verify_access_token(token)
        provider.routes["/jwks"] = {"keys": [minter.ec.as_dict(private=False)]}
        time.sleep(0.25)
        refused(v, token, "unknown_kid")


def test_replaced_key_under_the_same_kid_invalidates_cached_tokens(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """A JWKS that swaps the key behind a kid drops tokens the old key verified."""
    cfg = config(provider, bundle, jwks_max_age=FAST, jwks_min_refetch_interval=FAST)
    with Verifier(cfg) as v:
        token = minter.token()
        assert v.verify_access_token(token)
        swapped = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
        provider.routes["/jwks"] = {"keys": [swapped.as_dict(private=False)]}
        time.sleep(0.25)
        refused(v, token, "bad_signature")
        assert v.verify_access_token(minter.token(key=swapped)).subject


def test_jwks_still_refreshes_when_discovery_fails(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """Once jwks_uri is known, a failing discovery document does not stop key rotation."""
    cfg = config(provider, bundle, jwks_max_age=FAST, jwks_min_refetch_interval=FAST)
    with Verifier(cfg, token_cache_size=0) as v:
        assert v.verify_access_token(minter.token())
        del provider.routes[DISCOVERY]
        new = ECKey.generate_key("P-256", parameters={"kid": "ec-2"})
        provider.routes["/jwks"] = {"keys": [*minter.jwks()["keys"], new.as_dict(private=False)]}
        time.sleep(0.25)
        assert v.verify_access_token(minter.token(key=new)).subject
        assert provider.count(DISCOVERY) == 2


def test_token_cache_expires_and_is_bounded(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """A cached token is refused once expired, and the cache never exceeds its size."""
    with Verifier(config(provider, bundle), token_cache_size=3) as v:
        now = int(time.time())
        token = minter.token(iat=now, exp=now + 100)
        assert v.verify_access_token(token)
        assert v.verify_access_token(token, now=now + 150)  # within the 60 s leeway
        refused(v, token, "expired", now=now + 161)
        refused(v, token, "expired", now=datetime.fromtimestamp(now + 161, UTC))
        for _ in range(10):
            v.verify_access_token(minter.token())
        assert len(v._async._cache) == 3


# -- revocation list ------------------------------------------------------------------------


def test_revocation_list_is_polled(provider: ProviderServer, bundle: Path, minter: Minter) -> None:
    """A jti on the advertised revocation list is refused, also when already cached."""
    provider.routes[DISCOVERY] = {
        "issuer": provider.url,
        "jwks_uri": provider.url + "/jwks",
        "revocation_list_endpoint": provider.url + "/revoked",
    }
    listing: dict[str, object] = {
        "issuer": provider.url,
        "generated_at": int(time.time()),
        "revoked": [],
    }
    provider.routes["/revoked"] = listing
    token = minter.token()
    jti = json.loads(_payload(token))["jti"]
    with Verifier(config(provider, bundle, revocation_poll_interval=FAST)) as v:
        assert v.verify_access_token(token)
        assert provider.count("/revoked") == 1
        listing["revoked"] = [{"jti": jti, "exp": int(time.time()) + 600}]
        assert v.verify_access_token(token)  # not polled again yet
        time.sleep(0.25)
        error = refused(v, token, "revoked")
        assert error.details["jti"] == jti
        assert provider.count("/revoked") == 2
        assert v.verify_access_token(minter.token())


def test_unreachable_revocation_list_fails_closed_after_max_stale(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """Past revocation_max_stale without a fresh list, tokens are refused as undecidable."""
    provider.routes[DISCOVERY] = {
        "issuer": provider.url,
        "jwks_uri": provider.url + "/jwks",
        "revocation_list_endpoint": provider.url + "/revoked",
    }
    provider.routes["/revoked"] = {"issuer": provider.url, "revoked": []}
    cfg = config(
        provider,
        bundle,
        revocation_poll_interval=timedelta(milliseconds=100),
        revocation_max_stale=timedelta(milliseconds=400),
        jwks_min_refetch_interval=timedelta(milliseconds=100),
    )
    with Verifier(cfg) as v:
        token = minter.token()
        assert v.verify_access_token(token)
        provider.routes["/revoked"] = {"broken": True}
        time.sleep(0.15)
        assert v.verify_access_token(token)  # stale but within max_stale
        time.sleep(0.4)
        with pytest.raises(TokenVerifierUnavailableError) as info:
            v.verify_access_token(token)
        assert info.value.reason == "revocation_unavailable"


# -- introspection --------------------------------------------------------------------------


def test_opaque_tokens_are_introspected_and_cached(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """Opaque tokens go to the introspection endpoint (HTTP Basic); answers are cached until exp."""
    now = int(time.time())
    answers = {
        "opaque-active": {
            "active": True,
            "iss": provider.url,
            "aud": "orders",
            "sub": "u-1",
            "client_id": "web",
            "exp": now + 300,
            "scope": "orders:read",
        },
        "opaque-short": {"active": True, "aud": "orders", "client_id": "web", "exp": now + 1},
        "opaque-other-aud": {"active": True, "aud": "billing", "exp": now + 300},
        "opaque-refresh": {"active": True, "aud": "orders", "token_type": "refresh_token"},
    }

    provider.serve_introspection(answers, "rs", "rs-secret")
    cfg = config(provider, bundle, introspection=IntrospectionConfig("rs", "rs-secret"))
    with Verifier(cfg) as v:
        claims = v.verify_access_token("opaque-active")
        assert claims.source == "introspection"
        assert claims.subject == "u-1"
        assert claims.scopes == {"orders:read"}
        assert v.verify_access_token("opaque-active").subject == "u-1"
        assert provider.count("/introspect") == 1
        # A bytes token (a raw header value) is verified like a str one, here from the cache.
        assert v.verify_access_token(b"opaque-active").subject == "u-1"
        assert provider.count("/introspect") == 1
        assert v.verify_access_token(b"opaque-short").client_id == "web"
        assert provider.count("/introspect") == 2
        refused(v, "opaque-unknown", "inactive")
        refused(v, "opaque-other-aud", "bad_audience")
        refused(v, "opaque-refresh", "not_access_token")
        assert v.verify_access_token("opaque-short")
        assert provider.count("/introspect") == 5
        # The answer is never reused past the token's exp (+ leeway): asked again, expired.
        refused(v, "opaque-short", "expired", now=now + 62)
        assert provider.count("/introspect") == 6
        assert v.verify_access_token(minter.token()).source == "jwt"
    wrong = config(provider, bundle, introspection=IntrospectionConfig("rs", "wrong"))
    with Verifier(wrong) as v:
        with pytest.raises(TokenVerifierUnavailableError) as info:
            v.verify_access_token("opaque-active")
        assert info.value.reason == "introspection_unavailable"


def test_opaque_token_without_introspection_is_refused(verifier: Verifier) -> None:
    """With no introspection configured an opaque token is simply malformed."""
    refused(verifier, "2YotnFZFEjr1zCsicMWpAA", "malformed")


# -- trustmesh token verify ------------------------------------------------------------------


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", "token", "verify", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_verify_prints_claims_as_json(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """`python -m trustmesh token verify --json` prints the claims of a valid token, exit 0."""
    token = minter.token()
    result = _cli(
        token,
        "--issuer",
        provider.url,
        "--audience",
        "orders",
        "--ca-bundle",
        str(bundle),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["valid"] is True
    assert out["claims"]["sub"] == "svc-billing"
    assert out["claims"]["jti"] == json.loads(_payload(token))["jti"]


def test_cli_verify_refuses_with_reason_and_exit_1(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """A refused token (read from stdin) prints the reason on stderr and exits 1."""
    common = ["--issuer", provider.url, "--ca-bundle", str(bundle)]
    result = _cli("-", "--audience", "billing", *common, "--json", stdin=minter.token() + "\n")
    assert result.returncode == 1
    assert "refused (bad_audience)" in result.stderr
    assert json.loads(result.stdout)["reason"] == "bad_audience"
    result = _cli(minter.token(), "--audience", "orders", "--issuer", provider.url)
    assert result.returncode == 1
    assert "refused (keys_unavailable)" in result.stderr  # our CA is not in the system store


def test_cli_verify_table_binding_and_bad_input(
    provider: ProviderServer,
    bundle: Path,
    minter: Minter,
    client_certs: tuple[object, object],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The table shows the claims; binding needs --client-cert; bad options exit 2."""
    from trustmesh.cli import main

    mine = client_certs[0].certificate  # type: ignore[attr-defined]
    cert_file = tmp_path / "cert.pem"
    cert_file.write_bytes(pem_certificates([mine]))
    common = [
        "token",
        "verify",
        "--issuer",
        provider.url,
        "--audience",
        "orders",
        "--ca-bundle",
        str(bundle),
    ]
    assert main([*common, minter.token(tenant="acme")]) == 0
    out = capsys.readouterr().out
    assert "valid access token" in out
    assert "svc-billing" in out
    assert "acme" in out
    bound = minter.token(cnf={"x5t#S256": certificate_thumbprint(mine)})
    assert main([*common, bound]) == 1
    assert "cnf_missing_cert" in capsys.readouterr().err
    assert main([*common, bound, "--client-cert", str(cert_file)]) == 0
    assert certificate_thumbprint(mine) in capsys.readouterr().out
    assert main([*common, bound, "--ignore-binding"]) == 0
    assert "not checked" in capsys.readouterr().err
    assert main([*common, minter.token(), "--leeway", "soon"]) == 2
    assert main([*common, minter.token(), "--client-cert", str(tmp_path / "missing.pem")]) == 2
    assert main(["token", "verify", "x", "--issuer", "http://idp", "--audience", "a"]) == 2
    assert "https://" in capsys.readouterr().err
