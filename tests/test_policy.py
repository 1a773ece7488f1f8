"""The authorization policy: loading and validation, matching, precedence, explanations,
audit mode, hot reload of the file, and `trustmesh policy check|lint` as a real process
(with a real token from a real `idp serve` for the user rules)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from trustmesh.authority import CertificateAuthority
from trustmesh.cli import main
from trustmesh.pki import glob_match
from trustmesh.policy import (
    Decision,
    PathRefused,
    Policy,
    PolicyConfigError,
    PolicyFile,
    PolicyRequest,
    normalize_path,
)

from ._idp import running_idp
from .conftest import PASSPHRASE

ORDERS = "spiffe://example.org/svc/orders"
BILLING = "spiffe://example.org/svc/billing"

# The shape from issue 5, byte for byte.
ISSUE_EXAMPLE = """\
mode: enforce            # or audit
rules:
  - name: orders-reads-inventory
    callers: ["spiffe://example.org/svc/orders"]   # exact or glob
    methods: [GET]
    paths: ["/items", "/items/*"]
    user: {scopes: ["inventory:read"]}             # optional
"""


def _policy(text: str, tmp_path: Path | None = None) -> Policy:
    if tmp_path is None:
        import yaml

        return Policy.from_mapping(yaml.safe_load(text), source="test.yaml")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return Policy.load(path)


def _req(
    caller: str | None = ORDERS,
    method: str = "GET",
    path: str = "/items",
    *,
    claims: dict[str, Any] | None = None,
    scopes: tuple[str, ...] = (),
    roles: tuple[str, ...] = (),
) -> PolicyRequest:
    return PolicyRequest(caller, method, path, claims, frozenset(scopes), roles)


def _user(*scopes: str, roles: tuple[str, ...] = (), **claims: Any) -> dict[str, Any]:
    return {"claims": {"sub": "alice", **claims}, "scopes": scopes, "roles": roles}


# --- loading and the issue's example -------------------------------------------------------


def test_issue_example_loads_and_decides(tmp_path: Path) -> None:
    """The policy shape written in issue 5 loads unchanged and allows exactly what it says."""
    policy = _policy(ISSUE_EXAMPLE, tmp_path)
    assert policy.mode == "enforce"
    assert [r.name for r in policy.rules] == ["orders-reads-inventory"]
    ok = policy.evaluate(_req(path="/items/42", **_user("inventory:read")))
    assert ok.allowed
    assert ok.rule == "orders-reads-inventory"
    assert not ok.would_deny
    assert "orders-reads-inventory" in ok.reason
    assert policy.evaluate(_req(path="/items", **_user("inventory:read"))).allowed
    # Every dimension, one at a time, turns the allow into a deny.
    assert not policy.evaluate(_req(BILLING, path="/items/42", **_user("inventory:read"))).allowed
    assert not policy.evaluate(
        _req(method="POST", path="/items/42", **_user("inventory:read"))
    ).allowed
    assert not policy.evaluate(_req(path="/items/42/x", **_user("inventory:read"))).allowed
    assert not policy.evaluate(_req(path="/items/42", **_user("inventory:write"))).allowed
    assert not policy.evaluate(_req(path="/items/42")).allowed


def test_default_deny_explains_the_closest_rule() -> None:
    """A deny names the caller, the request, the closest rule and what it missed."""
    policy = _policy(ISSUE_EXAMPLE)
    decision = policy.evaluate(_req(path="/items/7", **_user("other")))
    assert not decision.allowed
    assert decision.rule is None
    assert decision.mode == "enforce"
    assert ORDERS in decision.reason
    assert "GET /items/7" in decision.reason
    assert "'orders-reads-inventory' (rules[0]): missing scope 'inventory:read'" in decision.reason
    no_token = policy.evaluate(_req(path="/items/7"))
    assert "no user token" in no_token.reason
    wrong = policy.evaluate(_req(BILLING, "DELETE", "/orders", **_user("inventory:read")))
    assert "caller not in ['spiffe://example.org/svc/orders']" in wrong.reason
    assert "method DELETE not in ['GET']" in wrong.reason
    assert "path not in ['/items', '/items/*']" in wrong.reason


def test_explanation_is_bounded_to_the_closest_rules() -> None:
    """With 50 rules a deny names the 3 closest, ordered by how close they came."""
    rules = [
        {"name": f"r{i}", "callers": [f"spiffe://example.org/svc/s{i}"], "paths": [f"/p{i}"]}
        for i in range(50)
    ]
    rules[30]["callers"] = [ORDERS]  # matches the caller, misses only the path
    policy = Policy.from_mapping({"rules": rules})
    reason = policy.evaluate(_req(path="/nowhere")).reason
    assert reason.index("'r30'") < reason.index("'r0'")
    assert "47 more rules further off" in reason
    assert reason.count("(rules[") == 3
    assert len(reason) < 800


def test_policy_without_allow_rules_says_so() -> None:
    """A policy of deny rules only refuses everything and says there is nothing to allow."""
    policy = Policy.from_mapping(
        {"rules": [{"name": "block", "effect": "deny", "callers": [BILLING]}]}
    )
    assert "no allow rules" in policy.evaluate(_req()).reason


def test_deny_rule_wins_over_allow_rule_in_any_order() -> None:
    """A matching deny rule refuses even when an earlier allow rule also matches."""
    policy = _policy(
        """
rules:
  - name: everything
    callers: ["spiffe://example.org/**"]
  - name: no-admin
    effect: deny
    callers: ["*"]
    paths: ["/admin/**"]
"""
    )
    decision = policy.evaluate(_req(path="/admin/users"))
    assert not decision.allowed
    assert decision.rule == "no-admin"
    assert "deny rule 'no-admin' (rules[1]) matched" in decision.reason
    assert not policy.evaluate(_req(path="/admin")).allowed
    assert policy.evaluate(_req(path="/administrator")).allowed
    assert policy.evaluate(_req(path="/items/1")).rule == "everything"


def test_first_matching_allow_rule_is_named() -> None:
    """When several allow rules match, the decision names the first in file order."""
    policy = _policy(
        """
rules:
  - {name: a, callers: ["spiffe://example.org/svc/*"], paths: ["/x/**"]}
  - {name: b, callers: ["spiffe://example.org/svc/orders"]}
"""
    )
    assert policy.evaluate(_req(path="/x/1")).rule == "a"
    assert policy.evaluate(_req(path="/y")).rule == "b"


# --- audit mode ----------------------------------------------------------------------------


def test_audit_mode_lets_through_with_would_deny(caplog: pytest.LogCaptureFixture) -> None:
    """In audit mode a deny is allowed=True, would_deny=True with the enforce reason."""
    with caplog.at_level(logging.WARNING, logger="trustmesh.policy"):
        audit = _policy(ISSUE_EXAMPLE.replace("mode: enforce", "mode: audit"))
    assert any("audit mode" in r.getMessage() for r in caplog.records)
    enforce = _policy(ISSUE_EXAMPLE)
    request = _req(path="/secret")
    denied, audited = enforce.evaluate(request), audit.evaluate(request)
    assert not denied.allowed
    assert not denied.would_deny
    assert audited.allowed
    assert audited.would_deny
    assert audited.mode == "audit"
    assert audited.reason == denied.reason
    fields = audited.log_fields()
    assert fields["decision"] == "would_deny"
    assert fields["caller"] == ORDERS
    assert fields["path"] == "/secret"
    assert fields["method"] == "GET"
    allowed = audit.evaluate(_req(path="/items", **_user("inventory:read")))
    assert allowed.allowed
    assert not allowed.would_deny
    assert allowed.outcome == "allow"


def test_log_fields_carry_the_user_subject_not_the_token() -> None:
    """log_fields names the token's subject and nothing else of it."""
    decision = _policy(ISSUE_EXAMPLE).evaluate(
        _req(path="/items", **_user("inventory:read", secret_claim="s3cret"))
    )
    fields = decision.log_fields()
    assert fields["user"] == "alice"
    assert fields["decision"] == "allow"
    assert "s3cret" not in json.dumps(fields)


# --- callers -------------------------------------------------------------------------------


GLOB_POLICY = """
rules:
  - name: ns-orders
    callers: ["spiffe://example.org/ns/*/svc/orders"]
  - name: team
    callers: ["spiffe://example.org/team/**"]
  - name: prefixed
    callers: ["spiffe://example.org/svc/batch-*"]
"""


@pytest.mark.parametrize(
    ("caller", "rule"),
    [
        ("spiffe://example.org/ns/prod/svc/orders", "ns-orders"),
        ("spiffe://example.org/ns/dev/svc/orders", "ns-orders"),
        ("spiffe://example.org/ns/a/b/svc/orders", None),
        ("spiffe://example.org/ns/prod/svc/orders/v2", None),
        ("spiffe://example.org/ns/prod/svc/billing", None),
        ("spiffe://other.org/ns/prod/svc/orders", None),
        ("spiffe://example.org/team/a", "team"),
        ("spiffe://example.org/team/a/b/c", "team"),
        ("spiffe://example.org/team", None),
        ("spiffe://example.org/teams/a", None),
        ("spiffe://example.org/svc/batch-nightly", "prefixed"),
        ("spiffe://example.org/svc/batch-", "prefixed"),
        ("spiffe://example.org/svc/batch-x/y", None),
        (None, None),
    ],
)
def test_caller_globs(caller: str | None, rule: str | None) -> None:
    """Caller globs: '*' stays in one segment, '**' crosses them, the trust domain is literal."""
    decision = _policy(GLOB_POLICY).evaluate(_req(caller))
    assert decision.rule == rule
    assert decision.allowed is (rule is not None)


@pytest.mark.parametrize(
    "caller",
    [
        "spiffe://example.org/ns/prod/svc/orders",
        "spiffe://example.org/ns/a/b/svc/orders",
        "spiffe://example.org/team/a/b",
        "spiffe://example.org/svc/batch-1",
        "spiffe://example.org/x",
    ],
)
def test_caller_globs_agree_with_join_token_globs(caller: str) -> None:
    """A caller glob matches exactly what the CA's join-token glob (pki.glob_match) matches."""
    policy = _policy(GLOB_POLICY)
    for rule in policy.rules:
        expected = glob_match(caller, rule.callers[0], sep="/")
        assert rule.caller_matches(caller) is expected


def test_any_caller_and_anonymous_are_distinct(caplog: pytest.LogCaptureFixture) -> None:
    """'*' admits every verified caller but not a request without a certificate; only
    'anonymous' admits that, and saying so is logged as a warning."""
    any_policy = Policy.from_mapping({"rules": [{"name": "any", "callers": ["*"]}]})
    assert any_policy.evaluate(_req("spiffe://elsewhere.net/x")).allowed
    no_cert = any_policy.evaluate(_req(None))
    assert not no_cert.allowed
    assert "needs a client certificate" in no_cert.reason
    assert "anonymous caller (no certificate)" in no_cert.reason
    with caplog.at_level(logging.WARNING, logger="trustmesh.policy"):
        anon = Policy.from_mapping(
            {"rules": [{"name": "health", "callers": ["anonymous"], "paths": ["/healthz"]}]}
        )
    assert any("without a client certificate" in r.getMessage() for r in caplog.records)
    assert anon.evaluate(_req(None, path="/healthz")).allowed
    assert not anon.evaluate(_req(ORDERS, path="/healthz")).allowed
    assert not anon.evaluate(_req(None, path="/items")).allowed


# --- methods and paths ---------------------------------------------------------------------


def test_methods_are_case_insensitive_and_optional() -> None:
    """Methods match in any case, omitted means any, and HEAD is not implied by GET."""
    policy = _policy(
        """
rules:
  - {name: reads, callers: ["spiffe://example.org/svc/orders"], methods: [get], paths: ["/r"]}
  - {name: any, callers: ["spiffe://example.org/svc/orders"], paths: ["/w"]}
  - {name: star, callers: ["spiffe://example.org/svc/orders"], methods: ["*"], paths: ["/s"]}
"""
    )
    assert policy.evaluate(_req(method="GET", path="/r")).allowed
    assert policy.evaluate(_req(method="get", path="/r")).allowed
    assert not policy.evaluate(_req(method="HEAD", path="/r")).allowed
    assert not policy.evaluate(_req(method="POST", path="/r")).allowed
    for method in ("GET", "POST", "DELETE", "patch"):
        assert policy.evaluate(_req(method=method, path="/w")).rule == "any"
        assert policy.evaluate(_req(method=method, path="/s")).rule == "star"


PATH_POLICY = """
rules:
  - name: items
    callers: ["*"]
    paths: ["/items", "/items/*", "/files/*.json", "/docs/**", "/", "/a/*/c"]
"""


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/items", True),
        ("/items/", True),  # a trailing slash is ignored
        ("/items/42", True),
        ("/items/42/", True),
        ("/items/42/parts", False),  # '*' is exactly one segment
        ("/Items", False),  # case-sensitive
        ("/itemsx", False),
        ("/files/a.json", True),
        ("/files/.json", True),
        ("/files/a.json/x", False),
        ("/files/a.yaml", False),
        ("/docs", True),  # '**' is zero or more segments
        ("/docs/a", True),
        ("/docs/a/b/c", True),
        ("/docsx", False),
        ("/", True),
        ("/a/b/c", True),
        ("/a/b/b/c", False),
        ("/a/c", False),
        ("/other", False),
    ],
)
def test_path_patterns(path: str, allowed: bool) -> None:
    """'*' is one non-empty segment, '**' zero or more, '*' inside a segment stays in it."""
    assert _policy(PATH_POLICY).evaluate(_req(path=path)).allowed is allowed


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("/items", "/items"),
        ("/items/", "/items"),
        ("//items//1", "/items/1"),
        ("/items/./1", "/items/1"),
        ("/items/../admin", "/admin"),
        ("/items/%2e%2e/admin", "/admin"),
        ("/items/%2E%2E/admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/caf%C3%A9", "/café"),
        ("/a/b/../../c", "/c"),
        ("/a/..", "/"),
    ],
)
def test_normalize_path(raw: str, normal: str) -> None:
    """Escapes are decoded once, '.', '..' and empty segments resolved, a trailing '/' dropped."""
    assert normalize_path(raw) == normal


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("/items%2F..%2Fadmin", "encoded '/'"),
        ("/items%2f..%2fadmin", "encoded '/'"),
        ("/items/..%5Cadmin", "encoded '/'"),
        ("/items\\..\\admin", "control character or '\\\\'"),
        ("/items%00", "control character"),
        ("/items\n/x", "control character"),
        ("/items%", "not a valid percent-escape"),
        ("/items%zz", "not a valid percent-escape"),
        ("/%C0%AE%C0%AE/admin", "not UTF-8"),
        ("/..", "above the root"),
        ("/items/../../admin", "above the root"),
        ("items", "does not start with '/'"),
        ("", "does not start with '/'"),
        ("/" + "a" * 9000, "longer than"),
        # Tomcat/Jetty strip ';' parameters, then resolve the dot segment: /admin.
        ("/public/..;/admin", "';' parameters"),
        ("/public/..;jsessionid=1/admin", "';' parameters"),
        ("/public/%2e%2e;/admin", "';' parameters"),
        ("/public/..%3b/admin", "';' parameters"),
        ("/public/.;/admin", "';' parameters"),
    ],
)
def test_ambiguous_paths_are_refused(raw: str, why: str) -> None:
    """Paths that could be read two ways are refused, whatever the rules say."""
    with pytest.raises(PathRefused, match=why):
        normalize_path(raw)
    policy = Policy.from_mapping({"rules": [{"name": "all", "callers": ["*"]}]})
    decision = policy.evaluate(_req(path=raw))
    assert not decision.allowed
    assert decision.rule is None
    assert "the path is ambiguous" in decision.reason


@pytest.mark.parametrize(
    "attack",
    ["/items/../admin", "/items/%2e%2e/admin", "/items/./../admin", "/items/1/../../admin"],
)
def test_traversal_cannot_sneak_past_path_rules(attack: str) -> None:
    """A path that climbs out of an allowed prefix is judged where it lands."""
    policy = _policy(
        """
rules:
  - {name: items, callers: ["*"], paths: ["/items/**"]}
  - {name: admin-block, effect: deny, callers: ["*"], paths: ["/admin/**"]}
"""
    )
    decision = policy.evaluate(_req(path=attack))
    assert not decision.allowed
    assert decision.rule == "admin-block"
    assert "normalised to /admin" in decision.reason


def test_encoded_letters_cannot_dodge_a_deny_rule() -> None:
    """/%61dmin is /admin to the app, so it is /admin to the policy too."""
    policy = _policy(
        """
rules:
  - {name: all, callers: ["*"]}
  - {name: no-admin, effect: deny, callers: ["*"], paths: ["/admin"]}
"""
    )
    assert policy.evaluate(_req(path="/%61dmin")).rule == "no-admin"


def test_control_characters_in_a_path_cannot_forge_log_lines() -> None:
    """The reason quotes a path with control characters instead of printing them raw."""
    decision = _policy(ISSUE_EXAMPLE).evaluate(_req(path="/x\nFAKE allow line"))
    assert "\n" not in decision.reason


# --- the user token ------------------------------------------------------------------------


USER_POLICY = """
rules:
  - name: admins
    callers: ["spiffe://example.org/svc/orders"]
    paths: ["/admin/**"]
    user:
      scopes: [orders:admin, orders:read]
      roles: [admin, auditor]
      claims: {tenant: [acme, globex], mfa: true, level: 3}
  - name: optional-user
    callers: ["spiffe://example.org/svc/orders"]
    paths: ["/maybe"]
    user: {required: false, scopes: [maybe:read]}
  - name: any-user
    callers: ["spiffe://example.org/svc/orders"]
    paths: ["/me"]
    user: {required: true}
"""

GOOD_ADMIN: dict[str, Any] = {
    "claims": {"sub": "alice", "tenant": "acme", "mfa": True, "level": 3},
    "scopes": ("orders:admin", "orders:read", "extra"),
    "roles": ("admin", "auditor", "other"),
}


def _admin(**changes: Any) -> PolicyRequest:
    data = {**GOOD_ADMIN, **{k: v for k, v in changes.items() if k in ("scopes", "roles")}}
    claims = {**GOOD_ADMIN["claims"]}
    for name, value in changes.items():
        if name not in ("scopes", "roles"):
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
    return _req(path="/admin/x", claims=claims, scopes=data["scopes"], roles=data["roles"])


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({}, None),
        ({"tenant": "globex"}, None),
        ({"tenant": ["initech", "globex"]}, None),  # a list claim: one item is enough
        ({"scopes": ("orders:read",)}, "missing scope 'orders:admin'"),
        ({"scopes": ()}, "missing scope 'orders:admin', missing scope 'orders:read'"),
        ({"roles": ("admin",)}, "missing role 'auditor'"),
        ({"tenant": "initech"}, "claim 'tenant' not one of ['acme', 'globex']"),
        ({"tenant": None}, "claim 'tenant' missing"),
        ({"mfa": "true"}, "claim 'mfa' not one of [True]"),  # type-strict
        ({"mfa": 1}, "claim 'mfa' not one of [True]"),
        ({"level": True}, "claim 'level' not one of [3]"),
        ({"level": "3"}, "claim 'level' not one of [3]"),
        ({"tenant": {"name": "acme"}}, "claim 'tenant' not one of"),
    ],
)
def test_scopes_roles_and_claims(changes: dict[str, Any], problem: str | None) -> None:
    """All listed scopes and roles are needed; a claim must hold one accepted value."""
    decision = _policy(USER_POLICY).evaluate(_admin(**changes))
    if problem is None:
        assert decision.allowed
        assert decision.rule == "admins"
    else:
        assert not decision.allowed
        assert problem in decision.reason


def test_user_block_requires_a_token_unless_told_otherwise() -> None:
    """A user block needs a token; required: false matches without one but checks one given."""
    policy = _policy(USER_POLICY)
    assert "no user token" in policy.evaluate(_req(path="/admin/x")).reason
    assert not policy.evaluate(_req(path="/me")).allowed
    assert policy.evaluate(_req(path="/me", claims={"sub": "bob"})).rule == "any-user"
    assert policy.evaluate(_req(path="/maybe")).rule == "optional-user"
    with_scope = _req(path="/maybe", claims={"sub": "bob"}, scopes=("maybe:read",))
    assert policy.evaluate(with_scope).allowed
    without = policy.evaluate(_req(path="/maybe", claims={"sub": "bob"}))
    assert not without.allowed
    assert "missing scope 'maybe:read'" in without.reason


def test_request_from_raw_claims_reads_scope_and_roles() -> None:
    """from_token_claims splits 'scope', reads 'scp' and 'roles' the way tokens carry them."""
    request = PolicyRequest.from_token_claims(
        ORDERS, "GET", "/x", {"scope": "a b", "scp": ["c"], "roles": ["admin", 7]}
    )
    assert request.scopes == frozenset({"a", "b", "c"})
    assert request.roles == ("admin",)
    assert PolicyRequest.from_token_claims(ORDERS, "GET", "/x", {"roles": "r"}).roles == ("r",)
    bare = PolicyRequest.from_token_claims(ORDERS, "GET", "/x", None)
    assert bare.claims is None
    assert bare.scopes == frozenset()


# --- validation ----------------------------------------------------------------------------


def _rule(extra: str) -> str:
    return f'rules:\n  - name: r1\n    callers: ["{ORDERS}"]\n{extra}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"policy\.yaml: the policy: is empty; it needs 'rules:'"),
        ("- a\n- b\n", r"the policy: must be a mapping with 'mode' and 'rules', got a list"),
        ("mode: enforce\n", r"rules: must be a non-empty list of rules, got nothing"),
        ("rules: []\n", r"rules: must be a non-empty list of rules, got an empty list"),
        ("mode: block\n" + _rule(""), r"mode: must be 'enforce' or 'audit', got 'block'"),
        ("mode: off\n" + _rule(""), r"mode: must be 'enforce' or 'audit', got False"),
        ("version: 2\n" + _rule(""), r"top-level key 'version': is not known"),
        ("rules:\n  - just-a-string\n", r"rules\[0\]: must be a mapping, got a string"),
        ("rules:\n  - callers: ['*']\n", r"rules\[0\]: name: must be a non-empty one-line"),
        ("rules:\n  - {name: '', callers: ['*']}\n", r"rules\[0\]: name: must be a non-empty"),
        (
            "rules:\n  - {name: a, callers: ['*']}\n  - {name: a, callers: ['*']}\n",
            r"rules\[1\] \('a'\): name: the name is already used by rules\[0\]",
        ),
        ("rules:\n  - {name: r1}\n", r"rules\[0\] \('r1'\): callers: is required"),
        (
            "rules:\n  - {name: r1, callers: spiffe://example.org/a}\n",
            r"callers: must be a list; write \['spiffe://example.org/a'\]",
        ),
        ("rules:\n  - {name: r1, callers: []}\n", r"callers: must be a non-empty list"),
        ("rules:\n  - {name: r1, callers: [3]}\n", r"callers\[0\]: must be a non-empty string"),
        (
            "rules:\n  - {name: r1, callers: [orders]}\n",
            r"callers\[0\]: 'orders' must be a SPIFFE ID or glob",
        ),
        (
            "rules:\n  - {name: r1, callers: ['spiffe://*.example.org/a']}\n",
            r"callers\[0\]: .* wildcard in the trust domain",
        ),
        (
            "rules:\n  - {name: r1, callers: ['spiffe://example.org**']}\n",
            r"callers\[0\]: .* wildcard in the trust domain",
        ),
        (
            "rules:\n  - {name: r1, callers: ['spiffe://example.org/a**']}\n",
            r"callers\[0\]: .* '\*\*' must be a whole segment",
        ),
        (
            "rules:\n  - {name: r1, callers: ['spiffe://example.org/a//b']}\n",
            r"callers\[0\]: .*empty segment",
        ),
        (
            "rules:\n  - {name: r1, callers: ['spiffe://Example.org/a']}\n",
            r"callers\[0\]: .*lower case",
        ),
        (_rule("    methods: [GTE]\n"), r"rules\[0\] \('r1'\): methods\[0\]: unknown method 'GTE'"),
        (_rule("    methods: GET\n"), r"methods: must be a list; write \['GET'\]"),
        (_rule("    methods: []\n"), r"methods: must be a non-empty list of strings, got an empty"),
        (_rule("    paths: [items]\n"), r"paths\[0\]: 'items' must start with '/'"),
        (
            _rule("    paths: ['/items/']\n"),
            r"paths\[0\]: '/items/' must not end with '/'.*'/items'",
        ),
        (_rule("    paths: ['/a//b']\n"), r"paths\[0\]: '/a//b' has an empty segment"),
        (_rule("    paths: ['/a/../b']\n"), r"paths\[0\]: '/a/../b' has a '..' segment"),
        (_rule("    paths: ['/a/**b']\n"), r"'\*\*' must be a whole segment"),
        (_rule("    paths: ['/a%2Fb']\n"), r"paths\[0\]: '/a%2Fb' has '%'"),
        (_rule("    paths: ['/a b']\n"), r"paths\[0\]: '/a b' has the segment 'a b' with a space"),
        (_rule("    paths: ['/a?x=1']\n"), r"paths\[0\]: '/a\?x=1' has the segment .* '\?' or '#'"),
        (_rule("    effect: block\n"), r"effect: must be 'allow' or 'deny', got 'block'"),
        (_rule("    path: ['/x']\n"), r"rules\[0\] \('r1'\): path: unknown key; a rule has"),
        (_rule("    description: 3\n"), r"description: must be a string, got a number"),
        (_rule("    user: [a]\n"), r"user: must be a mapping such as \{scopes: \[orders:read\]\}"),
        (_rule("    user: {scope: [a]}\n"), r"user\.scope: unknown key; a user block has"),
        (_rule("    user: {required: 'yes'}\n"), r"user\.required: must be true or false"),
        (_rule("    user: {scopes: 'a b'}\n"), r"user\.scopes: must be a list"),
        (_rule("    user: {scopes: ['a b']}\n"), r"user\.scopes\[0\]: 'a b' contains a space"),
        (_rule("    user: {roles: [1]}\n"), r"user\.roles\[0\]: must be a non-empty string"),
        (_rule("    user: {claims: []}\n"), r"user\.claims: must be a non-empty mapping"),
        (_rule("    user: {claims: {tenant: []}}\n"), r"user\.claims\.tenant: must list at least"),
        (_rule("    user: {claims: {tenant: 1.5}}\n"), r"user\.claims\.tenant: .*got a number"),
        (_rule("    user: {claims: {tenant: null}}\n"), r"user\.claims\.tenant: .*got nothing"),
        ("rules: [\n", r"not valid YAML: line 2, column 1: .*Fix the syntax there"),
        (
            _rule("    paths: ['/a']\n    paths: ['/**']\n"),
            r"not valid YAML: line 5, column 5: duplicate key 'paths'",
        ),
    ],
)
def test_validation_errors(tmp_path: Path, text: str, message: str) -> None:
    """Every invalid policy is refused with one line naming the file, rule and field."""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyConfigError, match=message) as refused:
        Policy.load(path)
    assert "\n" not in refused.value.message
    assert refused.value.message.startswith(str(path))


def test_validation_error_details_name_rule_and_field(tmp_path: Path) -> None:
    """The error's details carry the file, the rule index and name, and the field."""
    path = tmp_path / "policy.yaml"
    path.write_text(_rule("    methods: [GET, FETCH]\n"))
    with pytest.raises(PolicyConfigError) as refused:
        Policy.load(path)
    assert refused.value.details == {
        "path": str(path),
        "rule": 0,
        "rule_name": "r1",
        "field": "methods[1]",
    }


def test_unreadable_oversized_and_binary_files_are_refused(tmp_path: Path) -> None:
    """A missing, oversized or non-UTF-8 file is refused with what to do."""
    with pytest.raises(PolicyConfigError, match=r"Cannot read policy file .*missing\.yaml"):
        Policy.load(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(PolicyConfigError, match="larger than 1048576 bytes"):
        Policy.load(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"rules: \xff\xfe\n")
    with pytest.raises(PolicyConfigError, match="not UTF-8 text"):
        Policy.load(binary)


def test_yaml_tags_cannot_build_python_objects(tmp_path: Path) -> None:
    """The loader is a safe one: a Python tag is a YAML error, not an object."""
    path = tmp_path / "policy.yaml"
    path.write_text("rules: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(PolicyConfigError, match="not valid YAML"):
        Policy.load(path)


# --- hot reload ----------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


ALLOW_ITEMS = 'rules:\n  - {name: items, callers: ["*"], paths: ["/items/**"]}\n'
ALLOW_ORDERS = 'rules:\n  - {name: orders, callers: ["*"], paths: ["/orders/**"]}\n'


def test_policy_file_reloads_keeps_old_on_broken_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A changed file is picked up; a broken one keeps the old policy and logs why; a fixed
    one is picked up again."""
    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW_ITEMS)
    policy = PolicyFile(path, check_interval=0)
    assert policy.generation == 1
    assert policy.last_error is None
    assert policy.evaluate(_req(path="/items/1")).allowed
    assert not policy.evaluate(_req(path="/orders/1")).allowed

    _write_atomic(path, ALLOW_ORDERS)
    assert policy.evaluate(_req(path="/orders/1")).rule == "orders"
    assert not policy.evaluate(_req(path="/items/1")).allowed
    assert policy.generation == 2

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="trustmesh.policy"):
        _write_atomic(path, ALLOW_ORDERS.replace('["*"]', '["nobody"]'))
        assert policy.evaluate(_req(path="/orders/1")).rule == "orders"  # old policy kept
        assert policy.evaluate(_req(path="/orders/2")).allowed
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors  # reported once per change, not on every check
    assert str(path) in errors[0]
    assert "keeping generation 2" in errors[0]
    assert "callers[0]: 'nobody' must be a SPIFFE ID" in errors[0]
    assert policy.last_error is not None
    assert "'nobody'" in policy.last_error.message
    assert policy.generation == 2

    _write_atomic(path, ALLOW_ITEMS)
    assert policy.evaluate(_req(path="/items/1")).rule == "items"
    assert policy.generation == 3
    assert policy.last_error is None


def test_policy_file_rewritten_in_place_and_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An in-place rewrite is noticed; a deleted file keeps the policy in force."""
    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW_ITEMS)
    policy = PolicyFile(path, check_interval=0)
    path.write_text(ALLOW_ORDERS + "# padding so the size changes\n")
    assert policy.evaluate(_req(path="/orders/1")).allowed
    path.unlink()
    with caplog.at_level(logging.ERROR, logger="trustmesh.policy"):
        assert policy.evaluate(_req(path="/orders/1")).allowed
    assert policy.last_error is not None
    assert "Cannot read policy file" in policy.last_error.message
    assert any("not reloaded" in r.getMessage() for r in caplog.records)


def test_policy_file_checks_at_most_once_per_interval(tmp_path: Path) -> None:
    """Within the check interval the file is not looked at; after it, the change is seen;
    reload() applies a change at once."""
    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW_ITEMS)
    policy = PolicyFile(path, check_interval=0.5)
    _write_atomic(path, ALLOW_ORDERS)
    assert policy.evaluate(_req(path="/items/1")).allowed  # not checked yet
    time.sleep(0.6)
    assert policy.evaluate(_req(path="/orders/1")).allowed
    assert policy.generation == 2
    _write_atomic(path, ALLOW_ITEMS)
    assert policy.reload() is True
    assert policy.evaluate(_req(path="/items/1")).allowed
    assert policy.generation == 3
    _write_atomic(path, "rules: [")
    assert policy.reload() is False
    assert policy.policy.rules[0].name == "items"


def test_policy_file_refuses_to_start_without_a_valid_policy(tmp_path: Path) -> None:
    """A service cannot start with a broken or missing policy file."""
    path = tmp_path / "policy.yaml"
    with pytest.raises(PolicyConfigError, match="Cannot read policy file"):
        PolicyFile(path)
    path.write_text("rules: []\n")
    with pytest.raises(PolicyConfigError, match="non-empty list"):
        PolicyFile(path)
    with pytest.raises(ValueError, match="check_interval"):
        PolicyFile(path, check_interval=-1)


def test_decision_is_immutable() -> None:
    """Decisions are frozen values."""
    decision = Decision(True, "enforce", "r", "because")
    with pytest.raises(AttributeError):
        decision.allowed = False  # type: ignore[misc]


# --- the CLI -------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", "policy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def example_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(ISSUE_EXAMPLE)
    return path


def test_cli_check_as_a_process(example_file: Path) -> None:
    """`python -m trustmesh policy check` prints the decision and exits 0, 1 or 2."""
    base = [str(example_file), "--caller", ORDERS, "--method", "GET"]
    allowed = _cli(
        "check", *base, "--path", "/items/1", "--claims-json", '{"scope": "inventory:read"}'
    )
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith("ALLOW: rule 'orders-reads-inventory'")

    denied = _cli("check", *base, "--path", "/items/1")
    assert denied.returncode == 1
    assert denied.stdout.startswith("DENY: no rule allows")
    assert "no user token" in denied.stdout

    as_json = _cli("check", *base, "--path", "/items/1?x=1", "--json",
                   "--claims-json", '{"sub": "al", "scope": "other"}')  # fmt: skip
    assert as_json.returncode == 1
    data = json.loads(as_json.stdout)
    assert data["decision"] == "deny"
    assert data["path"] == "/items/1"
    assert data["user"] == "al"
    assert "missing scope 'inventory:read'" in data["reason"]

    bad_policy = example_file.with_name("bad.yaml")
    bad_policy.write_text(ISSUE_EXAMPLE.replace("[GET]", "[GTE]"))
    broken = _cli("check", str(bad_policy), "--caller", ORDERS, "--path", "/items")
    assert broken.returncode == 2
    assert "rules[0] ('orders-reads-inventory'): methods[0]: unknown method 'GTE'" in broken.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--caller", "orders", "--path", "/x"], "--caller: Invalid SPIFFE ID 'orders'"),
        (["--caller", ORDERS, "--path", "/x", "--claims-json", "[1]"], "must be a JSON object"),
        (["--caller", ORDERS, "--path", "/x", "--claims-json", "{"], "is not valid JSON"),
        (["--caller", ORDERS, "--path", "/x", "--token", "abc"], "--token needs --issuer"),
        (
            ["--caller", ORDERS, "--path", "/x", "--token", "a", "--claims-json", "{}"],
            "not both",
        ),
        (["--caller", ORDERS, "--path", "/x", "--method", "G T"], "is not an HTTP method"),
        (["--caller", ORDERS], "Missing option '--path'"),
    ],
)
def test_cli_check_bad_input_exits_2(
    example_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Bad input is exit code 2 with a one-line message saying what was wrong."""
    assert main(["policy", "check", str(example_file), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_check_audit_mode_reports_would_deny(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In audit mode the check says 'would deny' and exits 1, so scripts see the enforce answer."""
    path = tmp_path / "audit.yaml"
    path.write_text(ISSUE_EXAMPLE.replace("mode: enforce", "mode: audit"))
    code = main(["policy", "check", str(path), "--caller", ORDERS, "--path", "/items"])
    out = capsys.readouterr()
    assert code == 1
    assert out.out.startswith("WOULD DENY (audit mode lets it through): no rule allows")
    assert "audit mode" in out.err


def test_cli_lint(example_file: Path, tmp_path: Path) -> None:
    """`policy lint` exits 0 with a summary for a valid file and 2 with the problem otherwise."""
    ok = _cli("lint", str(example_file))
    assert ok.returncode == 0
    assert "1 rules (0 deny), mode enforce" in ok.stdout
    data = json.loads(_cli("lint", str(example_file), "--json").stdout)
    assert data == {
        "valid": True,
        "policy": str(example_file),
        "mode": "enforce",
        "rules": ["orders-reads-inventory"],
        "warnings": [],
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: []\n")
    refused = _cli("lint", str(bad))
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: {bad}: rules: must be a non-empty list of rules, got an empty list (a policy "
        f"with no rules denies everything; add at least one rule)."
    )


@pytest.mark.slow
def test_cli_check_with_a_real_token(tmp_path: Path, example_file: Path) -> None:
    """A token from a real `idp serve` is verified and its scope decides the check."""
    home = tmp_path / "home"
    CertificateAuthority.init(home, trust_domain="example.org", passphrase=PASSPHRASE).close()
    with running_idp(home, tmp_path) as idp:
        reader = idp.add_client("reader", "--scope", "inventory:read", "--audience", "inventory")
        writer = idp.add_client("writer", "--scope", "inventory:write", "--audience", "inventory")
        tokens = {}
        with idp.http() as http:
            for name, creds in (("reader", reader), ("writer", writer)):
                r: httpx.Response = http.post(
                    idp.token_url,
                    auth=(creds["client_id"], creds["client_secret"]),
                    data={"grant_type": "client_credentials"},
                )
                assert r.status_code == 200, r.text
                tokens[name] = r.json()["access_token"]
        common = [
            "check", str(example_file), "--caller", ORDERS, "--path", "/items/9",
            "--issuer", idp.url, "--audience", "inventory", "--ca-bundle", str(idp.bundle),
        ]  # fmt: skip
        allowed = _cli(*common, "--token", tokens["reader"])
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        assert "ALLOW: rule 'orders-reads-inventory'" in allowed.stdout
        denied = subprocess.run(  # the token on stdin, as scripts should pass it
            [sys.executable, "-m", "trustmesh", "policy", *common, "--token", "-", "--json"],
            input=tokens["writer"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert denied.returncode == 1, denied.stderr
        decision = json.loads(denied.stdout)
        assert decision["decision"] == "deny"
        assert decision["user"] == writer["client_id"]
        assert "missing scope 'inventory:read'" in decision["reason"]
        wrong_audience = [a if a != "inventory" else "billing" for a in common]
        refused = _cli(*wrong_audience, "--token", tokens["reader"])
        assert refused.returncode == 2
        assert "--token refused (bad_audience)" in refused.stderr


def test_many_distinct_callers_stay_correct() -> None:
    """Decisions stay right past the per-policy caller memo's size (it is cleared, not wrong)."""
    policy = _policy(GLOB_POLICY)
    for i in range(5000):
        assert policy.evaluate(_req(f"spiffe://example.org/team/t{i}")).rule == "team"
        assert not policy.evaluate(_req(f"spiffe://example.org/x/t{i}")).allowed
    assert policy.evaluate(_req("spiffe://example.org/ns/p/svc/orders")).rule == "ns-orders"


def test_the_documented_policy_loads_and_decides_as_documented(tmp_path: Path) -> None:
    """docs/policy.md's example file loads and gives the reasons the page shows."""
    doc = (Path(__file__).parent.parent / "docs" / "policy.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    policy = _policy(example, tmp_path)
    assert [r.name for r in policy.rules] == [
        "orders-reads-inventory",
        "admins-manage-items",
        "health-checks",
        "nobody-reaches-internal",
    ]
    for path in ("/items/7", "/items/../internal/x", "/items%2F..%2Fadmin"):
        reason = policy.evaluate(_req(path=path)).reason
        assert reason in doc, reason
    admin = _req(
        "spiffe://example.org/ns/prod/svc/admin-console",
        "DELETE",
        "/items/7/photos",
        claims={"sub": "root", "tenant": "acme", "mfa": True},
        scopes=("inventory:write",),
        roles=("admin",),
    )
    assert policy.evaluate(admin).rule == "admins-manage-items"
    assert policy.evaluate(_req(None, path="/healthz")).rule == "health-checks"


def test_a_deny_rule_for_every_caller_also_covers_anonymous_requests() -> None:
    """A deny rule with callers ['*'] refuses requests without a certificate as well."""
    policy = _policy(
        """
rules:
  - {name: open, callers: [anonymous, "*"], paths: ["/**"]}
  - {name: no-internal, effect: deny, callers: ["*"], paths: ["/internal/**"]}
"""
    )
    assert policy.evaluate(_req(None, path="/public")).rule == "open"
    for caller in (None, ORDERS):
        decision = policy.evaluate(_req(caller, path="/internal/x"))
        assert not decision.allowed
        assert decision.rule == "no-internal"


def test_policy_file_reloads_safely_under_concurrent_requests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Threads deciding while the file is replaced 20 times see only whole policies."""
    import threading

    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW_ITEMS)
    policy = PolicyFile(path, check_interval=0)
    seen: set[str | None] = set()
    failures: list[BaseException] = []
    stop = threading.Event()

    def decide() -> None:
        try:
            while not stop.is_set():
                decision = policy.evaluate(_req(path="/items/1"))
                other = policy.evaluate(_req(path="/orders/1"))
                seen.add(decision.rule)
                seen.add(other.rule)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=decide) for _ in range(4)]
    with caplog.at_level(logging.ERROR, logger="trustmesh.policy"):
        for thread in threads:
            thread.start()
        for i in range(20):
            _write_atomic(path, ALLOW_ORDERS if i % 2 == 0 else ALLOW_ITEMS)
            time.sleep(0.02)
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures
    assert seen == {"items", "orders", None}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert policy.evaluate(_req(path="/items/1")).rule == "items"  # the last version written
    assert policy.generation > 2


# --- the decision cache (issue 18) ---------------------------------------------------------


def test_decision_cache_repeats_the_same_answer_deny_reasons_included() -> None:
    """A repeated token-less request gets the decision the rules give, from the cache: the
    same allow rule, and for a deny the same rule or default-deny explanation."""
    text = (
        "rules:\n"
        '  - {name: no-admin, effect: deny, callers: ["*"], paths: ["/admin/**"]}\n'
        f'  - {{name: reads, callers: ["{ORDERS}"], methods: [GET], paths: ["/items/*"]}}\n'
    )
    cached, fresh = _policy(text), _policy(text)
    cases = [
        _req(path="/items/1"),
        _req(path="/admin/x"),
        _req(method="DELETE", path="/items/1"),
        _req(BILLING, path="/items/1"),
        _req(None, path="/items/1"),
        _req(path="/items/%2F"),
    ]
    for request in cases:
        first = cached.evaluate(request)
        again = cached.evaluate(_req(request.caller, request.method, request.path))
        assert again is first  # from the cache
        assert again == fresh._evaluate(request)  # what the rules say
        assert again.reason == fresh._evaluate(request).reason
    assert [cached.evaluate(r).allowed for r in cases] == [True, False, False, False, False, False]
    assert cached.evaluate(_req(path="/admin/x")).rule == "no-admin"
    assert "closest 'reads' (rules[1]): method DELETE not in ['GET']" in (
        cached.evaluate(_req(method="DELETE", path="/items/1")).reason
    )
    assert "ambiguous" in cached.evaluate(_req(path="/items/%2F")).reason


def test_decision_cache_keeps_method_case_and_audit_mode_apart() -> None:
    """The raw method is part of the key (the answer names it as sent); audit mode caches the
    would-deny, still flagged."""
    policy = _policy(
        f'mode: audit\nrules:\n  - {{name: r, callers: ["{ORDERS}"], methods: [GET]}}\n'
    )
    assert policy.evaluate(_req(method="get")).rule == "r"
    denied = policy.evaluate(_req(method="POST"))
    assert denied.allowed
    assert denied.would_deny
    again = policy.evaluate(_req(method="POST"))
    assert again is denied


def test_requests_with_a_token_are_decided_every_time() -> None:
    """Claims, scopes and roles are not part of the key, so token requests bypass the cache."""
    policy = _policy(ISSUE_EXAMPLE)
    with_scope = _req(path="/items/1", **_user("inventory:read"))
    without = _req(path="/items/1", **_user())
    assert policy.evaluate(with_scope).allowed
    assert not policy.evaluate(without).allowed
    assert "missing scope 'inventory:read'" in policy.evaluate(without).reason
    assert policy.evaluate(with_scope).allowed
    assert not policy.evaluate(_req(path="/items/1")).allowed  # no token: 'no user token'
    assert "no user token" in policy.evaluate(_req(path="/items/1")).reason
    assert list(policy._decisions) == [(ORDERS, "GET", "/items/1")]


def test_decision_cache_is_bounded_and_skips_long_paths() -> None:
    """Callers choose the paths: the cache never holds more than its size, stays right when
    cleared, and does not keep very long paths."""
    from trustmesh.policy._policy import DECISION_CACHE_SIZE

    policy = _policy(ALLOW_ITEMS)
    for i in range(DECISION_CACHE_SIZE + 100):
        assert policy.evaluate(_req(path=f"/items/{i}")).allowed
        assert len(policy._decisions) <= DECISION_CACHE_SIZE
    long_path = "/items/" + "a" * 1000
    assert policy.evaluate(_req(path=long_path)).allowed
    assert (ORDERS, "GET", long_path) not in policy._decisions
    assert not policy.evaluate(_req(path="/orders/1")).allowed


def test_decision_cache_is_dropped_when_the_policy_file_reloads(tmp_path: Path) -> None:
    """Cached allows and denies of one generation never answer for the next: after a change
    (seen by the check or by reload()) the new rules decide, then are cached in turn."""
    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW_ITEMS)
    policy = PolicyFile(path, check_interval=3600)  # only reload() looks at the file
    for _ in range(3):
        assert policy.evaluate(_req(path="/items/1")).rule == "items"
        assert not policy.evaluate(_req(path="/orders/1")).allowed
    _write_atomic(path, ALLOW_ORDERS)
    assert policy.evaluate(_req(path="/items/1")).allowed  # not looked at yet: generation 1
    assert policy.reload() is True
    assert policy.generation == 2
    for _ in range(3):
        denied = policy.evaluate(_req(path="/items/1"))
        assert not denied.allowed
        assert "no rule allows" in denied.reason
        assert "'orders'" in denied.reason
        assert policy.evaluate(_req(path="/orders/1")).rule == "orders"
    # A broken version keeps generation 2 and its cached answers, which stay right.
    _write_atomic(path, "rules: [")
    assert policy.reload() is False
    assert not policy.evaluate(_req(path="/items/1")).allowed
    assert policy.evaluate(_req(path="/orders/1")).allowed
    # The periodic check drops it too.
    _write_atomic(path, ALLOW_ITEMS)
    policy.check_interval = 0
    policy._next_check = 0.0
    assert policy.evaluate(_req(path="/items/1")).rule == "items"
    assert policy.generation == 3
