# ruff: noqa: F811 - the fixtures imported from test_tokens and test_idp_tokens
"""Gateway authentication (401/503) and route requirements (403).

Tokens come from two real sources: the embedded identity server (``idp serve``,
client_credentials, its introspection endpoint), and tokens signed with joserfc by keys a
local HTTPS provider publishes (tests/_provider.py), for the tokens no real server issues:
expired, forged, ``alg: none``, unknown kid, another issuer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from joserfc.jwk import ECKey

from trustmesh.errors import ConfigError
from trustmesh.gateway._auth import (
    Authenticator,
    AuthFailure,
    authorization_value,
    authorize,
    client_key,
    enforce,
    route_policy,
    token_checked,
    token_required,
)
from trustmesh.policy import PolicyConfigError, PolicyFile
from trustmesh.tokens import AccessTokenClaims, IntrospectionConfig, IssuerConfig

from ._idp import Idp
from ._provider import Minter, ProviderServer, unsigned
from .test_idp_tokens import _client_token, idp  # noqa: F401 - the module's real idp
from .test_tokens import DISCOVERY, bundle, keys, minter, provider, tls  # noqa: F401

T = TypeVar("T")
CHALLENGE = 'Bearer realm="trustmesh"'


def run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(make())  # type: ignore[arg-type]


def issuer(server: ProviderServer, bundle_path: Path, **kw: Any) -> IssuerConfig:
    kw.setdefault("audiences", ["orders"])
    return IssuerConfig(server.url, ca_bundle=bundle_path, **kw)


async def check(
    issuers: list[IssuerConfig], authorization: bytes | str | None, **kw: Any
) -> AccessTokenClaims | AuthFailure:
    """Authenticate once with a fresh Authenticator; return the claims or the refusal."""
    auth = Authenticator(issuers)
    try:
        return await auth.authenticate(authorization, **kw)
    except AuthFailure as failure:
        return failure
    finally:
        await auth.aclose()


def refused(result: AccessTokenClaims | AuthFailure, status: int, reason: str) -> AuthFailure:
    assert isinstance(result, AuthFailure), result
    assert (result.status, result.reason) == (status, reason), result.log_message
    return result


def invalid_token(result: AccessTokenClaims | AuthFailure, reason: str) -> AuthFailure:
    failure = refused(result, 401, reason)
    assert failure.www_authenticate.startswith(f'{CHALLENGE}, error="invalid_token", ')
    assert 'error_description="' in failure.www_authenticate
    assert failure.token_reason == reason
    assert failure.headers == [(b"www-authenticate", failure.www_authenticate.encode())]
    return failure


# -- JWTs from a provider we control ------------------------------------------------------


def test_valid_token_in_every_accepted_spelling(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    token = minter.token()
    cfg = [issuer(provider, bundle)]
    for header in (
        f"Bearer {token}",
        f"bearer {token}",
        f"BEARER  {token} ",
        token.join(["Bearer ", ""]),
    ):
        claims = run(lambda h=header: check(cfg, h))  # type: ignore[misc]
        assert isinstance(claims, AccessTokenClaims), claims
        assert claims.subject == "svc-billing"
        assert claims.scopes == {"orders:read", "orders:write"}
    claims = run(lambda: check(cfg, f"Bearer {token}".encode()))
    assert isinstance(claims, AccessTokenClaims)


def test_no_token_is_a_bare_challenge(provider: ProviderServer, bundle: Path) -> None:
    failure = refused(run(lambda: check([issuer(provider, bundle)], None)), 401, "token_missing")
    assert failure.www_authenticate == CHALLENGE
    assert failure.title == "Bearer token required"


@pytest.mark.parametrize(
    "header",
    [
        "",
        " ",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer a b",
        "Bearer a,b",
        "Bearer a, Bearer b",
        "Token abc",
        "Bearerabc",
        'Bearer "abc"',
        b"Bearer \xff\xfe",
    ],
)
def test_malformed_authorization_is_invalid_request(
    provider: ProviderServer, bundle: Path, header: str | bytes
) -> None:
    failure = refused(run(lambda: check([issuer(provider, bundle)], header)), 401, "token_invalid")
    assert failure.www_authenticate.startswith(f'{CHALLENGE}, error="invalid_request"')
    assert provider.requests == []  # refused before any key was fetched


def test_several_authorization_headers_are_invalid_request() -> None:
    assert authorization_value([(b"Authorization", b"Bearer a"), (b"accept", b"*")]) == b"Bearer a"
    assert authorization_value([(b"accept", b"*")]) is None
    with pytest.raises(AuthFailure) as info:
        authorization_value([(b"authorization", b"Bearer a"), (b"AUTHORIZATION", b"Bearer b")])
    assert info.value.status == 401
    assert 'error="invalid_request"' in info.value.www_authenticate


def test_refused_tokens_map_to_their_reason_codes(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    now = int(time.time())
    cfg = [issuer(provider, bundle)]
    other = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})  # same kid, other key
    stranger = ECKey.generate_key("P-256", parameters={"kid": "nobody"})
    header: dict[str, object] = {"alg": "none", "typ": "at+jwt"}
    cases = {
        "expired": minter.token(iat=now - 1200, exp=now - 600),
        "bad_audience": minter.token(aud="billing"),
        "bad_signature": minter.token(key=other),
        "alg_not_allowed": unsigned(header, minter.claims()),
        "unknown_kid": minter.token(key=stranger),
        "malformed": "a.b.c",
        "too_large": minter.token(pad="x" * 9000),
    }
    for reason, token in cases.items():
        failure = invalid_token(run(lambda t=token: check(cfg, f"Bearer {t}")), reason)  # type: ignore[misc]
        assert token not in failure.detail
        assert token not in failure.www_authenticate


def test_unknown_issuer_is_refused_without_contacting_anyone(
    provider: ProviderServer, bundle: Path, keys: tuple[ECKey, Any]
) -> None:
    stranger = Minter(issuer="https://127.0.0.1:1", ec=keys[0], rsa=keys[1])
    second = ProviderServer(provider.context).start()
    try:
        second.routes[DISCOVERY] = {"issuer": second.url, "jwks_uri": second.url + "/jwks"}
        cfg = [issuer(provider, bundle), issuer(second, bundle)]
        failure = invalid_token(run(lambda: check(cfg, f"Bearer {stranger.token()}")), "bad_issuer")
        assert "https://127.0.0.1:1" in failure.log_message
        assert provider.requests == []
        assert second.requests == []
    finally:
        second.stop()


def test_issuer_is_chosen_by_iss_and_routes_restrict_issuers(
    provider: ProviderServer, bundle: Path, minter: Minter, keys: tuple[ECKey, Any]
) -> None:
    second = ProviderServer(provider.context).start()
    try:
        other_keys = ECKey.generate_key("P-256", parameters={"kid": "second-ec"})
        minter2 = Minter(issuer=second.url, ec=other_keys, rsa=keys[1])
        second.routes[DISCOVERY] = {"issuer": second.url, "jwks_uri": second.url + "/jwks"}
        second.routes["/jwks"] = minter2.jwks()
        cfg = [issuer(provider, bundle), issuer(second, bundle)]

        async def scenario() -> None:
            auth = Authenticator(cfg)
            try:
                first = await auth.authenticate(f"Bearer {minter.token()}")
                assert first.issuer == provider.url
                assert second.requests == []  # only the named issuer was asked for keys
                other = await auth.authenticate(
                    f"Bearer {minter2.token()}", allowed_issuers=[second.url]
                )
                assert other.issuer == second.url
                with pytest.raises(AuthFailure) as info:
                    await auth.authenticate(
                        f"Bearer {minter.token()}", allowed_issuers=[second.url]
                    )
                assert info.value.reason == "issuer_not_allowed"
                assert info.value.status == 401
                assert 'error="invalid_token"' in info.value.www_authenticate
                # A token claiming the second issuer but signed by the first one's key.
                forged = minter.token(iss=second.url)
                with pytest.raises(AuthFailure) as info:
                    await auth.authenticate(f"Bearer {forged}")
                assert info.value.reason == "unknown_kid"
            finally:
                await auth.aclose()

        run(scenario)
    finally:
        second.stop()


def test_single_issuer_restricted_route(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    cfg = [issuer(provider, bundle)]
    ok = run(lambda: check(cfg, f"Bearer {minter.token()}", allowed_issuers={provider.url}))
    assert isinstance(ok, AccessTokenClaims)
    failure = run(
        lambda: check(cfg, f"Bearer {minter.token()}", allowed_issuers=["https://elsewhere"])
    )
    invalid_token(failure, "issuer_not_allowed")


def test_unreachable_issuer_is_503_never_401(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    cfg = [issuer(provider, bundle)]
    token = minter.token()
    provider.stop()
    failure = refused(run(lambda: check(cfg, f"Bearer {token}")), 503, "token_verifier_unavailable")
    assert failure.token_reason == "keys_unavailable"
    assert failure.headers == [(b"retry-after", b"5")]
    assert failure.title.startswith("Token issuer unreachable")


def test_provider_answering_errors_is_503(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    provider.status = 503
    failure = refused(
        run(lambda: check([issuer(provider, bundle)], f"Bearer {minter.token()}")),
        503,
        "token_verifier_unavailable",
    )
    assert failure.www_authenticate == ""


# -- opaque tokens ----------------------------------------------------------------------------


def test_opaque_tokens_go_to_introspecting_issuers(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    answers = {"opaque-1": {**minter.claims(client_id="web", scope="orders:read"), "active": True}}
    provider.serve_introspection(answers, "gw", "gw-secret")
    plain = issuer(provider, bundle)
    with_introspection = issuer(
        provider, bundle, introspection=IntrospectionConfig("gw", "gw-secret")
    )

    claims = run(lambda: check([with_introspection], "Bearer opaque-1"))
    assert isinstance(claims, AccessTokenClaims)
    assert claims.source == "introspection"
    assert client_key(claims) == "web"
    invalid_token(run(lambda: check([with_introspection], "Bearer opaque-2")), "inactive")
    invalid_token(run(lambda: check([plain], "Bearer opaque-1")), "opaque_unsupported")
    restricted = run(
        lambda: check([with_introspection], "Bearer opaque-1", allowed_issuers=["https://x"])
    )
    invalid_token(restricted, "opaque_unsupported")
    wrong_secret = issuer(provider, bundle, introspection=IntrospectionConfig("gw", "wrong"))
    refused(
        run(lambda: check([wrong_secret], "Bearer opaque-1")), 503, "token_verifier_unavailable"
    )


# -- the real identity server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_client(idp: Idp) -> dict[str, Any]:
    """The gateway registered as a client (for introspection)."""
    return idp.add_client("gateway-rs", "--scope", "introspect")


@pytest.mark.slow
def test_real_idp_tokens_scopes_and_introspection(
    idp: Idp,
    gateway_client: dict[str, Any],
) -> None:
    creds = idp.add_client(
        "orders-ui",
        "--scope", "orders:read", "--scope", "orders:write",
        "--audience", "api", "--role", "reader",
    )  # fmt: skip
    read_only = _client_token(idp, creds, scope="orders:read")
    both = _client_token(idp, creds, scope="orders:read orders:write")
    cfg = IssuerConfig(
        idp.url,
        audiences=["api"],
        ca_bundle=idp.bundle,
        introspection=IntrospectionConfig(
            gateway_client["client_id"], gateway_client["client_secret"]
        ),
    )
    wrong_aud = IssuerConfig(idp.url, audiences=["billing"], ca_bundle=idp.bundle)
    write = route_policy({"scopes": ["orders:write"]}, name="orders-write")
    read = route_policy({"scopes": ["orders:read"], "roles": ["reader"]}, name="orders-read")

    async def scenario() -> None:
        auth = Authenticator([cfg])
        try:
            claims = await auth.authenticate(f"Bearer {read_only}")
            assert claims.client_id == creds["client_id"] == client_key(claims)
            assert claims.scopes == {"orders:read"}
            assert enforce(read, "GET", "/orders/1", claims).allowed
            with pytest.raises(AuthFailure) as info:
                enforce(write, "POST", "/orders", claims)
            assert info.value.status == 403  # a valid token lacking a scope: not 401
            assert info.value.reason == "insufficient_scope"
            assert info.value.www_authenticate == (
                'Bearer realm="trustmesh", error="insufficient_scope", scope="orders:write"'
            )
            assert "missing scope 'orders:write'" in info.value.detail
            assert enforce(write, "POST", "/orders", await auth.authenticate(f"Bearer {both}"))
            # An opaque token goes to the idp's real introspection endpoint: not ours.
            with pytest.raises(AuthFailure) as info:
                await auth.authenticate("Bearer not-a-token-of-ours")
            assert (info.value.status, info.value.reason) == (401, "inactive")
        finally:
            await auth.aclose()
        other = Authenticator([wrong_aud])
        try:
            with pytest.raises(AuthFailure) as info:
                await other.authenticate(f"Bearer {read_only}")
            assert (info.value.status, info.value.reason) == (401, "bad_audience")
        finally:
            await other.aclose()

    run(scenario)


# -- route requirements -------------------------------------------------------------------------


def claims_with(**extra: Any) -> AccessTokenClaims:
    base: dict[str, Any] = {"sub": "u-1", "client_id": "web", "scope": "orders:read"}
    base.update(extra)
    scopes = frozenset(str(base.get("scope", "")).split())
    return AccessTokenClaims(
        issuer="https://idp",
        subject=str(base["sub"]),
        audience=("api",),
        client_id=base.get("client_id"),
        expires_at=0,
        issued_at=0,
        not_before=None,
        jwt_id="j",
        scopes=scopes,
        roles=tuple(base.get("roles", ())),
        certificate_thumbprint=None,
        claims=base,
    )


def test_roles_and_claim_rules_are_403() -> None:
    policy = route_policy(
        {"scopes": ["orders:read"], "roles": ["admin"], "claims": {"tenant": ["acme", "globex"]}},
        name="admin",
    )
    good = claims_with(roles=["admin"], tenant="acme")
    assert authorize(policy, "GET", "/admin", good).allowed
    for bad, problem in [
        (claims_with(tenant="acme"), "missing role 'admin'"),
        (claims_with(roles=["admin"], tenant="initech"), "claim 'tenant' not one of"),
        (claims_with(roles=["admin"]), "claim 'tenant' missing"),
        (claims_with(roles=["admin"], tenant="acme", scope="other"), "missing scope"),
    ]:
        with pytest.raises(AuthFailure) as info:
            enforce(policy, "GET", "/admin", bad)
        assert info.value.status == 403
        assert info.value.reason == "insufficient_scope"
        assert problem in info.value.detail
        assert info.value.www_authenticate.endswith(
            'error="insufficient_scope", scope="orders:read"'
        )
    # raw claims mappings work too (PolicyRequest.from_token_claims)
    assert authorize(policy, "GET", "/admin", dict(good.claims)).allowed


def test_route_policy_shapes() -> None:
    public = route_policy({"public": True}, name="health")
    assert authorize(public, "GET", "/health", None).allowed
    needs_token = route_policy({}, name="any-user")
    assert not authorize(needs_token, "GET", "/x", None).allowed
    assert authorize(needs_token, "GET", "/x", claims_with()).allowed
    restricted = route_policy({"issuers": ["https://idp"], "scopes": ["a"]}, name="r")
    assert not authorize(restricted, "GET", "/x", claims_with()).allowed
    by_method = route_policy({"scopes": ["orders:read"]}, name="m", methods=["GET", "head"])
    assert authorize(by_method, "HEAD", "/x", claims_with()).allowed
    assert not authorize(by_method, "DELETE", "/x", claims_with()).allowed
    no_scope = enforce(needs_token, "GET", "/x", claims_with())
    assert no_scope.rule == "any-user"
    with pytest.raises(AuthFailure) as info:
        enforce(route_policy({"claims": {"tenant": "acme"}}, name="c"), "GET", "/", claims_with())
    assert info.value.www_authenticate == 'Bearer realm="trustmesh", error="insufficient_scope"'


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"scope": ["a"]}, "unknown key 'scope'"),
        ({"public": "yes"}, "public must be true or false"),
        ({"public": True, "scopes": ["a"]}, "cannot be combined"),
        ({"scopes": "orders:read"}, "must be a list"),
        ({"scopes": ["a b"]}, "contains a space"),
        ({"claims": {"tenant": 1.5}}, "accepted values must be"),
        ({"issuers": "https://idp"}, "issuers must be a non-empty list"),
        ({"issuers": []}, "issuers must be a non-empty list"),
    ],
)
def test_bad_auth_blocks_name_the_route_and_key(auth: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyConfigError) as info:
        route_policy(auth, name="orders")
    assert "route 'orders'" in str(info.value)
    assert message in str(info.value)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="configured twice"):
        Authenticator(
            [IssuerConfig("https://a", audiences=["x"]), IssuerConfig("https://a", audiences=["y"])]
        )


def test_client_key_fallbacks() -> None:
    assert client_key(claims_with()) == "web"
    assert client_key(claims_with(client_id=None, azp="spa")) == "spa"
    assert client_key(claims_with(client_id=None)) == "u-1"


def test_descriptions_are_header_safe() -> None:
    from trustmesh.gateway import _auth

    for value in _auth._INVALID_TOKEN.values():
        inner = value.split('error_description="', 1)[1][:-1]
        assert '"' not in inner
        assert "\\" not in inner
        assert all(0x20 <= ord(c) <= 0x7E for c in value)


def test_token_required_and_checked() -> None:
    assert token_required({"scopes": ["a"]})
    assert token_checked({"scopes": ["a"]})
    assert not token_required({"public": True})
    assert not token_checked({"public": True})
    assert not token_required({"required": False, "scopes": ["a"]})
    assert token_checked({"required": False})
    optional = route_policy({"required": False, "scopes": ["orders:read"]}, name="opt")
    assert authorize(optional, "GET", "/", None).allowed
    assert not authorize(optional, "GET", "/", claims_with(scope="other")).allowed


def test_route_policy_file_refusal_is_policy_denied(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "rules:\n"
        "  - name: admins\n"
        "    callers: [anonymous]\n"
        "    paths: ['/admin/**']\n"
        "    user: {roles: [admin], scopes: [admin:all]}\n"
    )
    policy = PolicyFile(path)
    admin = claims_with(roles=["admin"], scope="admin:all")
    assert enforce(policy, "GET", "/admin/users", admin, reason="policy_denied").allowed
    for path_, claims in [("/admin/users", claims_with()), ("/other", admin)]:
        with pytest.raises(AuthFailure) as info:
            enforce(policy, "GET", path_, claims, reason="policy_denied")
        assert (info.value.status, info.value.reason) == (403, "policy_denied")
        assert info.value.www_authenticate.endswith('error="insufficient_scope", scope="admin:all"')
        assert info.value.detail == "The access token does not grant this request."
        assert "admins" in info.value.log_message


def test_refusals_the_grants_do_not_explain_are_policy_denied() -> None:
    policy = route_policy({"scopes": ["orders:read"]}, name="m", methods=["GET"])
    for method, path in [("DELETE", "/orders"), ("GET", "/orders/%2F..%2Fadmin")]:
        with pytest.raises(AuthFailure) as info:
            enforce(policy, method, path, claims_with())
        assert (info.value.status, info.value.reason) == (403, "policy_denied")


def test_concurrent_first_requests_wait_for_the_revocation_list(
    provider: ProviderServer, bundle: Path, minter: Minter
) -> None:
    """At start the revocation list is not fetched yet: requests arriving while the first
    fetch is in flight wait for it instead of being refused 503 (a stale list)."""
    provider.routes[DISCOVERY] = {
        "issuer": provider.url,
        "jwks_uri": provider.url + "/jwks",
        "revocation_list_endpoint": provider.url + "/revoked",
    }
    arrived, release = threading.Event(), threading.Event()

    def held_list(method: str, headers: dict[str, str], body: bytes) -> tuple[int, object]:
        arrived.set()
        release.wait(20)  # the list is on its way while the other requests arrive
        return 200, {"issuer": provider.url, "revoked": []}

    provider.routes["/revoked"] = held_list
    tokens = [minter.token() for _ in range(8)]

    async def scenario() -> list[AccessTokenClaims | AuthFailure]:
        auth = Authenticator([issuer(provider, bundle)])

        async def one(token: str) -> AccessTokenClaims | AuthFailure:
            try:
                return await auth.authenticate(f"Bearer {token}")
            except AuthFailure as failure:
                return failure

        try:
            first = asyncio.ensure_future(one(tokens[0]))
            await asyncio.to_thread(arrived.wait, 20)  # keys fetched, list in flight
            others = asyncio.ensure_future(asyncio.gather(*(one(t) for t in tokens[1:])))
            await asyncio.sleep(0.3)  # let them reach the revocation check
            release.set()
            return [await first, *await others]
        finally:
            release.set()
            await auth.aclose()

    results = run(scenario)
    assert all(isinstance(r, AccessTokenClaims) for r in results), results
    assert provider.count("/revoked") == 1
