"""Users, lockout, login form tokens, codes and refresh families on real SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

from trustmesh.errors import ConfigError, ConflictError, NotFoundError
from trustmesh.idp import LockoutPolicy, UserStore
from trustmesh.idp._login import FormSigner, error_page, login_page
from trustmesh.idp._user_tokens import (
    RefreshToken,
    claim_code,
    claim_refresh_token,
    find_refresh_token,
    new_secret,
    revoke_family,
    save_code,
    save_refresh_token,
    set_code_family,
)
from trustmesh.store import Store, open_store
from trustmesh.store._schema import idp_users

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
PASSWORD = "correct horse battery staple"
# Real argon2id, with small costs so the suite stays quick.
FAST = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = (
        request.getfixturevalue("pg_url")
        if request.param == "postgres"
        else f"sqlite:///{tmp_path / 'idp.db'}"
    )
    s = open_store(url)
    yield s
    s.close()


@pytest.fixture
def users(store: Store) -> UserStore:
    return UserStore(store, hasher=FAST)


def _actions(store: Store) -> list[str]:
    return [e.action for e in store.audit_events()]


def test_add_stores_an_argon2id_hash_never_the_password(users: UserStore, store: Store) -> None:
    """The password is stored only as an argon2id hash and the addition is audited."""
    user = users.add("Alice", PASSWORD, roles=["admin"], scopes=["orders:read"], actor="t", now=T0)
    assert user.username == "alice"
    assert user.roles == ("admin",)
    with store.engine.connect() as conn:
        stored = conn.execute(select(idp_users.c.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored
    events = store.audit_events()
    assert events[-1].action == "idp.user.add"
    assert PASSWORD not in str(events[-1].details)


def test_add_refuses_bad_input(users: UserStore) -> None:
    """Short passwords, bad names, roles and e-mail addresses are refused with a reason."""
    with pytest.raises(ConfigError, match="at least 8 characters"):
        users.add("bob", "short", actor="t")
    with pytest.raises(ConfigError, match="empty"):
        users.add("bob", "", actor="t")
    with pytest.raises(ConfigError, match="Username 'b ob' is not valid"):
        users.add("b ob", PASSWORD, actor="t")
    with pytest.raises(ConfigError, match="role 'a b' is not valid"):
        users.add("bob", PASSWORD, roles=["a b"], actor="t")
    with pytest.raises(ConfigError, match="E-mail address"):
        users.add("bob", PASSWORD, email="nope", actor="t")
    users.add("bob", PASSWORD, actor="t")
    with pytest.raises(ConflictError, match="already exists"):
        users.add("BOB", PASSWORD, actor="t")


def test_authenticate_success_and_wrong_password(users: UserStore, store: Store) -> None:
    """The right password signs in; a wrong one is refused as 'invalid' and audited."""
    users.add("alice", PASSWORD, actor="t")
    assert users.authenticate("ALICE", PASSWORD, ip="10.0.0.1", now=T0).ok
    bad = users.authenticate("alice", "wrong password", ip="10.0.0.1", now=T0)
    assert not bad.ok
    assert bad.reason == "invalid"
    unknown = users.authenticate("mallory", PASSWORD, ip="10.0.0.1", now=T0)
    assert unknown.reason == "invalid"  # unknown users look the same
    assert _actions(store)[-3:] == ["idp.login.success", "idp.login.failure", "idp.login.failure"]
    assert all(PASSWORD not in str(e.details) for e in store.audit_events())


def test_five_failures_lock_the_user_even_with_the_right_password(
    users: UserStore, store: Store
) -> None:
    """Five failures in the window lock the username for 15 minutes, from any address."""
    users.add("alice", PASSWORD, actor="t")
    for i in range(5):
        assert users.authenticate("alice", f"guess {i}xx", ip=f"10.0.0.{i}", now=T0).reason == (
            "invalid"
        )
    assert "idp.login.lockout" in _actions(store)
    locked = users.authenticate("alice", PASSWORD, ip="10.9.9.9", now=T0 + timedelta(minutes=1))
    assert locked.reason == "locked"
    assert 800 <= locked.retry_after <= 900
    assert users.locked_until("alice", now=T0) == T0 + timedelta(minutes=15)
    assert _actions(store)[-1] == "idp.login.locked"
    later = users.authenticate("alice", PASSWORD, ip="10.9.9.9", now=T0 + timedelta(minutes=16))
    assert later.ok


def test_failures_outside_the_window_do_not_add_up(users: UserStore) -> None:
    """Four failures, a pause longer than the window, four more: no lock."""
    users.add("alice", PASSWORD, actor="t")
    for i in range(4):
        users.authenticate("alice", "wrong-one", ip="10.0.0.1", now=T0 + timedelta(seconds=i))
    for i in range(4):
        users.authenticate(
            "alice", "wrong-two", ip="10.0.0.1", now=T0 + timedelta(minutes=20, seconds=i)
        )
    assert users.authenticate("alice", PASSWORD, ip="10.0.0.1", now=T0 + timedelta(minutes=21)).ok


def test_one_address_guessing_many_users_is_locked(store: Store) -> None:
    """The per-address limit stops password spraying across usernames."""
    users = UserStore(store, hasher=FAST, lockout=LockoutPolicy(ip_max_failures=3))
    users.add("alice", PASSWORD, actor="t")
    for name in ("u1", "u2", "u3"):
        users.authenticate(name, "spray-pass", ip="192.0.2.7", now=T0)
    assert users.authenticate("alice", PASSWORD, ip="192.0.2.7", now=T0).reason == "locked"
    assert users.authenticate("alice", PASSWORD, ip="192.0.2.8", now=T0).ok


def test_unlock_clears_a_lock(users: UserStore) -> None:
    """An operator can lift a lock; it is audited."""
    users.add("alice", PASSWORD, actor="t")
    for _ in range(5):
        users.authenticate("alice", "wrong-pass", ip="10.0.0.1", now=T0)
    assert users.locks(now=T0) == {"alice": T0 + timedelta(minutes=15)}
    assert users.unlock("alice", actor="t", now=T0)
    assert users.authenticate("alice", PASSWORD, ip="10.0.0.2", now=T0).ok


def test_disabled_user_is_refused_and_loses_refresh_tokens(users: UserStore, store: Store) -> None:
    """Disabling refuses sign-in with the right password and revokes refresh tokens."""
    user = users.add("alice", PASSWORD, actor="t")
    with store.transaction() as conn:
        save_refresh_token(
            conn, "rt-1", family_id="f1", client_id="c", user_id=user.user_id, scope="openid",
            auth_time=int(T0.timestamp()), now=T0,
        )  # fmt: skip
    users.disable("alice", actor="t", now=T0)
    assert users.authenticate("alice", PASSWORD, ip="10.0.0.1", now=T0).reason == "disabled"
    record = find_refresh_token(store, "rt-1")
    assert record is not None
    assert record.revoked_at is not None
    with pytest.raises(NotFoundError, match="No user named 'nobody'"):
        users.disable("nobody", actor="t")


def test_form_token_is_bound_to_cookie_params_and_time() -> None:
    """A form token only checks with its cookie, unchanged parameters and before expiry."""
    signer = FormSigner(b"k" * 32, lifetime=600)
    params = {"client_id": "c1", "redirect_uri": "https://app/cb", "state": "s"}
    token = signer.issue("cookie-a", params, now=1000)
    assert signer.check(token, "cookie-a", params, now=1100) is None
    assert signer.check(token, "cookie-b", params, now=1100) == "mismatch"
    assert signer.check(token, "cookie-a", {**params, "redirect_uri": "https://evil/cb"}) == (
        "mismatch"
    )
    assert signer.check(token, "cookie-a", params, now=1601) == "expired"
    assert signer.check("", "cookie-a", params) == "missing"
    assert FormSigner(b"x" * 32).check(token, "cookie-a", params, now=1100) == "mismatch"


def test_login_page_escapes_everything_and_forbids_framing() -> None:
    """Request values are HTML-escaped and the page sends its security headers."""
    response = login_page(
        action="/authorize",
        params={"state": '"><script>alert(1)</script>', "client_id": "c1"},
        form_token="t",
        client_name="<b>app</b>",
        error="bad <password>",
        cookie="ck",
    )
    body = bytes(response.body).decode()
    assert "<script>" not in body
    assert "&lt;b&gt;app&lt;/b&gt;" in body
    assert "&quot;&gt;&lt;script&gt;" in body
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    assert "__Host-trustmesh-login=ck" in response.headers["set-cookie"]
    assert "Secure" in response.headers["set-cookie"]
    page = error_page("Unknown <redirect>", "x & y", status=400)
    assert page.status_code == 400
    assert b"Unknown &lt;redirect&gt;" in bytes(page.body)


def test_code_is_single_use_and_bound_to_its_client(store: Store) -> None:
    """A code redeems once; again is 'replayed'; another client cannot spend it."""
    code = new_secret()
    with store.transaction() as conn:
        save_code(
            conn, code, client_id="c1", user_id="u1", redirect_uri="https://app/cb",
            scope="openid", nonce="n", code_challenge="x" * 43, code_challenge_method="S256",
            auth_time=T0, now=T0,
        )  # fmt: skip
    assert claim_code(store, "nope", client_id="c1", now=T0)[1] == "unknown"
    assert claim_code(store, code, client_id="c2", now=T0)[1] == "wrong_client"
    record, status = claim_code(store, code, client_id="c1", now=T0 + timedelta(seconds=5))
    assert status == "ok"
    assert record is not None
    assert record.nonce == "n"
    assert claim_code(store, code, client_id="c1", now=T0 + timedelta(seconds=6))[1] == "replayed"
    late = new_secret()
    with store.transaction() as conn:
        save_code(
            conn, late, client_id="c1", user_id="u1", redirect_uri="https://app/cb",
            scope="", nonce=None, code_challenge="x" * 43, code_challenge_method="S256",
            auth_time=T0, now=T0,
        )  # fmt: skip
    assert claim_code(store, late, client_id="c1", now=T0 + timedelta(seconds=61))[1] == "expired"


def test_refresh_rotation_and_family_revocation(store: Store) -> None:
    """A refresh token rotates once; a family can be revoked as a whole."""
    with store.transaction() as conn:
        for token in ("a", "b"):
            save_refresh_token(
                conn, token, family_id="fam", client_id="c1", user_id="u1", scope="openid",
                auth_time=int(T0.timestamp()), now=T0,
            )  # fmt: skip
        set_code_family(conn, "nohash", "fam")
    first = find_refresh_token(store, "a")
    assert isinstance(first, RefreshToken)
    assert not first.is_expired(T0 + timedelta(days=13))
    assert first.is_expired(T0 + timedelta(days=14))
    with store.transaction() as conn:
        assert claim_refresh_token(conn, first, now=T0)
        assert not claim_refresh_token(conn, first, now=T0)
        assert revoke_family(conn, "fam", now=T0) == 2
    second = find_refresh_token(store, "b")
    assert second is not None
    assert second.revoked_at is not None
