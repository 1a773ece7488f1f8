"""End users of the identity server: accounts, argon2id passwords, sign-in with lockout.

Users live in ``idp_users`` (passwords as argon2id hashes, never in logs), failed
sign-ins in ``idp_login_failures`` (one counter per ``user:NAME`` and one per
``ip:ADDRESS``), and every account change and sign-in outcome in the audit chain.

Lockout (the defaults of :class:`LockoutPolicy`): 5 failed sign-ins for one username
within 15 minutes lock that username for 15 minutes, whatever address they come
from; 20 failures from one address within 15 minutes lock that address for 15
minutes, whatever usernames it tries. While locked, even the right password is
refused. Unknown usernames are counted and hashed like real ones, so neither the
answer nor its timing tells whether an account exists.
"""

from __future__ import annotations

import re
import secrets
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import Connection, delete, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from trustmesh.errors import ConfigError, ConflictError, NotFoundError
from trustmesh.store import Store, idp_login_failures, idp_refresh_tokens, idp_users

__all__ = [
    "DEFAULT_LOCKOUT",
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "LockoutPolicy",
    "LoginResult",
    "User",
    "UserStore",
    "check_password",
    "normalize_username",
]

#: Shortest password ``idp user add`` accepts (NIST SP 800-63B's minimum).
MIN_PASSWORD_LENGTH = 8
#: Longest password accepted (bounds the hashing work one request can cause).
MAX_PASSWORD_LENGTH = 1024

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@+-]{0,127}$")
# RFC 6749 section 3.3 scope-token characters; roles use the same set.
_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")


@dataclass(frozen=True)
class LockoutPolicy:
    """How many failed sign-ins lock a username or an address, and for how long.

    Args:
        user_max_failures: Failures per username within ``window`` that lock it.
        ip_max_failures: Failures per client address within ``window`` that lock it.
        window: The counting window, from the first failure.
        lock_for: How long a lock lasts.
    """

    user_max_failures: int = 5
    ip_max_failures: int = 20
    window: timedelta = timedelta(minutes=15)
    lock_for: timedelta = timedelta(minutes=15)


#: 5 failures per username / 20 per address within 15 minutes lock for 15 minutes.
DEFAULT_LOCKOUT = LockoutPolicy()


@dataclass(frozen=True)
class User:
    """One account as the store knows it (never the password or its hash).

    .. versionadded:: 0.1
    """

    user_id: str
    username: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    email: str | None
    disabled: bool
    created_at: datetime
    updated_at: datetime

    def get_user_id(self) -> str:
        """Return the id tokens carry as ``sub`` (Authlib's user protocol)."""
        return self.user_id

    def to_json(self, *, locked_until: datetime | None = None) -> dict[str, Any]:
        """Return a JSON-ready mapping (times as RFC 3339)."""
        return {
            "user_id": self.user_id,
            "username": self.username,
            "roles": list(self.roles),
            "scopes": list(self.scopes),
            "email": self.email,
            "disabled": self.disabled,
            "locked_until": _iso(locked_until),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


@dataclass(frozen=True)
class LoginResult:
    """The outcome of :meth:`UserStore.authenticate`.

    ``user`` is set only on success. Otherwise ``reason`` is ``invalid`` (unknown
    user or wrong password: the two are never told apart), ``disabled`` (right
    password, disabled account) or ``locked`` (``retry_after`` seconds to wait).
    """

    user: User | None
    reason: str | None = None
    retry_after: int = 0

    @property
    def ok(self) -> bool:
        """True when the user signed in."""
        return self.user is not None


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _ts(value: datetime) -> int:
    return int(value.timestamp())


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def _split(value: str | None) -> tuple[str, ...]:
    return tuple((value or "").split())


def normalize_username(name: str) -> str:
    """Return the canonical (lower-case, trimmed) form of a username."""
    return name.strip().lower()


def _check_tokens(values: Iterable[str], what: str) -> tuple[str, ...]:
    seen: list[str] = []
    for value in values:
        if not _TOKEN.match(value):
            raise ConfigError(
                f"{what} {value!r} is not valid: use 1-128 printable ASCII characters "
                f"without spaces, quotes or backslashes (e.g. 'admin', 'orders:read').",
                field=what,
            )
        if value not in seen:
            seen.append(value)
    return tuple(seen)


def check_password(password: str) -> None:
    """Refuse a password that is too short or too long.

    Raises:
        ConfigError: Shorter than :data:`MIN_PASSWORD_LENGTH` or longer than
            :data:`MAX_PASSWORD_LENGTH` characters.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(
            f"The password is {'empty' if not password else f'{len(password)} characters'}: "
            f"use at least {MIN_PASSWORD_LENGTH} characters (a passphrase of several words "
            f"is best).",
            field="password",
        )
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ConfigError(
            f"The password is {len(password)} characters long: use at most {MAX_PASSWORD_LENGTH}.",
            field="password",
        )


def _user(row: Any) -> User:
    return User(
        user_id=row.user_id,
        username=row.username,
        roles=_split(row.roles),
        scopes=_split(row.scopes),
        email=row.email,
        disabled=bool(row.disabled),
        created_at=datetime.fromtimestamp(row.created_at, UTC),
        updated_at=datetime.fromtimestamp(row.updated_at, UTC),
    )


class UserStore:
    """Accounts, password checks and sign-in lockout on top of a :class:`Store`.

    Args:
        store: The CA's store (the same database and audit chain).
        lockout: Failed sign-in limits.
        hasher: The argon2 hasher (argon2id, RFC 9106 low-memory profile by default).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        store: Store,
        *,
        lockout: LockoutPolicy = DEFAULT_LOCKOUT,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.store = store
        self.lockout = lockout
        self.hasher = hasher or PasswordHasher()
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()

    # -- accounts -------------------------------------------------------------------

    def add(
        self,
        username: str,
        password: str,
        *,
        roles: Iterable[str] = (),
        scopes: Iterable[str] = (),
        email: str | None = None,
        actor: str,
        now: datetime | None = None,
    ) -> User:
        """Create an account.

        Raises:
            ConfigError: A bad username, role, scope, e-mail address or password.
            ConflictError: The username is taken.
        """
        name = normalize_username(username)
        if not _USERNAME.match(name):
            raise ConfigError(
                f"Username {username!r} is not valid: use 1-128 characters from a-z, 0-9 "
                f"and . _ @ + - starting with a letter or digit (e.g. 'alice').",
                field="username",
            )
        role_list = _check_tokens(roles, "role")
        scope_list = _check_tokens(scopes, "scope")
        if email is not None and (not re.fullmatch(r"[^@\s]+@[^@\s]+", email) or len(email) > 254):
            raise ConfigError(
                f"E-mail address {email!r} is not valid: use NAME@DOMAIN.", field="email"
            )
        check_password(password)
        password_hash = self.hasher.hash(password)
        at = _now(now)
        user_id = str(uuid.uuid4())
        with self.store.transaction() as conn:
            taken = conn.execute(
                select(idp_users.c.user_id).where(idp_users.c.username == name)
            ).first()
            if taken is not None:
                raise ConflictError(
                    f"A user named {name!r} already exists; pick another name or see "
                    f"'trustmesh idp user list'.",
                    reason="duplicate_user",
                )
            conn.execute(
                insert(idp_users).values(
                    user_id=user_id,
                    username=name,
                    password_hash=password_hash,
                    roles=" ".join(role_list),
                    scopes=" ".join(scope_list),
                    email=email,
                    disabled=0,
                    created_at=_ts(at),
                    updated_at=_ts(at),
                )
            )
            self.store.append_audit(
                conn,
                at=at,
                actor=actor,
                action="idp.user.add",
                subject=name,
                details={"user_id": user_id, "roles": list(role_list), "scopes": list(scope_list)},
            )
        return User(user_id, name, role_list, scope_list, email, False, at, at)

    def get(self, username: str, conn: Connection | None = None) -> User | None:
        """Return the account with this username, or None."""
        return self._one(idp_users.c.username == normalize_username(username), conn)

    def get_by_id(self, user_id: str, conn: Connection | None = None) -> User | None:
        """Return the account with this user id (the tokens' ``sub``), or None."""
        return self._one(idp_users.c.user_id == user_id, conn)

    def _one(self, where: Any, conn: Connection | None) -> User | None:
        query = select(idp_users).where(where)
        if conn is not None:
            row = conn.execute(query).first()
        else:
            with self.store.transaction() as c:
                row = c.execute(query).first()
        return None if row is None else _user(row)

    def all(self) -> list[User]:
        """Return every account, by username."""
        with self.store.transaction() as conn:
            rows = conn.execute(select(idp_users).order_by(idp_users.c.username)).all()
        return [_user(row) for row in rows]

    def disable(self, username: str, *, actor: str, now: datetime | None = None) -> User:
        """Disable an account: it can no longer sign in, and its refresh tokens are revoked.

        Idempotent (a disabled account stays disabled and is not audited again).

        Raises:
            NotFoundError: No such user.
        """
        name = normalize_username(username)
        at = _now(now)
        with self.store.transaction() as conn:
            user = self.get(name, conn)
            if user is None:
                raise NotFoundError(
                    f"No user named {name!r}; see 'trustmesh idp user list'.", username=name
                )
            if user.disabled:
                return user
            conn.execute(
                update(idp_users)
                .where(idp_users.c.user_id == user.user_id)
                .values(disabled=1, updated_at=_ts(at))
            )
            revoked = conn.execute(
                update(idp_refresh_tokens)
                .where(idp_refresh_tokens.c.user_id == user.user_id)
                .where(idp_refresh_tokens.c.revoked_at.is_(None))
                .values(revoked_at=_ts(at))
            ).rowcount
            self.store.append_audit(
                conn,
                at=at,
                actor=actor,
                action="idp.user.disable",
                subject=name,
                details={"user_id": user.user_id, "refresh_tokens_revoked": int(revoked or 0)},
            )
            return self.get(name, conn) or user

    def unlock(self, username: str, *, actor: str, now: datetime | None = None) -> bool:
        """Clear a username's failed sign-in counter and lock. Returns True if one existed."""
        name = normalize_username(username)
        at = _now(now)
        with self.store.transaction() as conn:
            removed = conn.execute(
                delete(idp_login_failures).where(idp_login_failures.c.key == f"user:{name}")
            ).rowcount
            if removed:
                self.store.append_audit(
                    conn, at=at, actor=actor, action="idp.user.unlock", subject=name
                )
        return bool(removed)

    def locked_until(self, username: str, *, now: datetime | None = None) -> datetime | None:
        """Return when a username's sign-in lock ends, or None if it is not locked."""
        return self._locks([f"user:{normalize_username(username)}"], _now(now)).get(
            f"user:{normalize_username(username)}"
        )

    def locks(self, *, now: datetime | None = None) -> dict[str, datetime]:
        """Return ``{username: lock end}`` for every locked username."""
        at = _ts(_now(now))
        with self.store.transaction() as conn:
            rows = conn.execute(
                select(idp_login_failures.c.key, idp_login_failures.c.locked_until)
                .where(idp_login_failures.c.key.like("user:%"))
                .where(idp_login_failures.c.locked_until > at)
            ).all()
        return {key[5:]: datetime.fromtimestamp(until, UTC) for key, until in rows}

    def _locks(self, keys: list[str], now: datetime) -> dict[str, datetime]:
        with self.store.transaction() as conn:
            rows = conn.execute(
                select(idp_login_failures.c.key, idp_login_failures.c.locked_until)
                .where(idp_login_failures.c.key.in_(keys))
                .where(idp_login_failures.c.locked_until > _ts(now))
            ).all()
        return {key: datetime.fromtimestamp(until, UTC) for key, until in rows}

    # -- sign-in --------------------------------------------------------------------

    def _dummy(self) -> str:
        with self._dummy_lock:
            if self._dummy_hash is None:
                self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))
            return self._dummy_hash

    def _verify(self, password_hash: str | None, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash or self._dummy(), password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def authenticate(
        self,
        username: str,
        password: str,
        *,
        ip: str,
        client_id: str | None = None,
        now: datetime | None = None,
    ) -> LoginResult:
        """Check a sign-in, count failures, apply lockout, and audit the outcome.

        Args:
            username: What the person typed (normalized here).
            password: The password (never logged or stored).
            ip: The client address, for the per-address counter.
            client_id: The OAuth client the sign-in is for (audit only).
            now: The current time (tests).

        Returns:
            The user, or why not (see :class:`LoginResult`).
        """
        at = _now(now)
        name = normalize_username(username)[:128]
        user_key, ip_key = f"user:{name}", f"ip:{ip}"
        facts: dict[str, Any] = {"ip": ip, "client_id": client_id}
        locks = self._locks([user_key, ip_key], at)
        if locks:
            until = max(locks.values())
            retry = max(1, int((until - at).total_seconds()))
            with self.store.transaction() as conn:
                self.store.append_audit(
                    conn,
                    at=at,
                    actor=f"ip:{ip}",
                    action="idp.login.locked",
                    subject=name,
                    details={**facts, "locked": sorted(locks), "retry_after": retry},
                )
            return LoginResult(None, "locked", retry)

        with self.store.transaction() as conn:
            row = conn.execute(
                select(idp_users.c.password_hash).where(idp_users.c.username == name)
            ).first()
        too_long = len(password) > MAX_PASSWORD_LENGTH
        # Unknown users cost one hash too, so timing does not reveal who exists.
        valid = not too_long and bool(password) and self._verify(row[0] if row else None, password)
        if valid and row is not None:
            user = self.get(name)
            if user is not None and not user.disabled:
                with self.store.transaction() as conn:
                    conn.execute(
                        delete(idp_login_failures).where(idp_login_failures.c.key == user_key)
                    )
                    if self.hasher.check_needs_rehash(row[0]):
                        conn.execute(
                            update(idp_users)
                            .where(idp_users.c.user_id == user.user_id)
                            .values(password_hash=self.hasher.hash(password))
                        )
                    self.store.append_audit(
                        conn,
                        at=at,
                        actor=f"ip:{ip}",
                        action="idp.login.success",
                        subject=name,
                        details={**facts, "user_id": user.user_id},
                    )
                return LoginResult(user)
            if user is not None:
                with self.store.transaction() as conn:
                    self.store.append_audit(
                        conn,
                        at=at,
                        actor=f"ip:{ip}",
                        action="idp.login.failure",
                        subject=name,
                        details={**facts, "reason": "disabled"},
                    )
                return LoginResult(None, "disabled")
        return self._fail(name, user_key, ip_key, at, facts, known=row is not None)

    def _fail(
        self,
        name: str,
        user_key: str,
        ip_key: str,
        at: datetime,
        facts: dict[str, Any],
        *,
        known: bool,
    ) -> LoginResult:
        policy = self.lockout
        locked_now: list[str] = []
        with self.store.transaction() as conn:
            self._prune(conn, at)
            for key, limit in (
                (user_key, policy.user_max_failures),
                (ip_key, policy.ip_max_failures),
            ):
                if self._count_failure(conn, key, limit, at):
                    locked_now.append(key)
            self.store.append_audit(
                conn,
                at=at,
                actor=f"ip:{facts['ip']}",
                action="idp.login.failure",
                subject=name,
                details={**facts, "reason": "bad_credentials", "known_user": known},
            )
            if locked_now:
                self.store.append_audit(
                    conn,
                    at=at,
                    actor=f"ip:{facts['ip']}",
                    action="idp.login.lockout",
                    subject=name,
                    details={
                        **facts,
                        "locked": locked_now,
                        "lock_seconds": int(policy.lock_for.total_seconds()),
                    },
                )
        return LoginResult(None, "invalid")

    def _prune(self, conn: Connection, at: datetime) -> None:
        """Drop counters whose window and lock are both over (bounds the table)."""
        cutoff = _ts(at - self.lockout.window)
        conn.execute(
            delete(idp_login_failures)
            .where(idp_login_failures.c.window_start < cutoff)
            .where(
                or_(
                    idp_login_failures.c.locked_until.is_(None),
                    idp_login_failures.c.locked_until <= _ts(at),
                )
            )
        )

    def _count_failure(self, conn: Connection, key: str, limit: int, at: datetime) -> bool:
        """Count one failure for ``key``; return True if this one locked it."""
        now = _ts(at)
        values = {"key": key, "failures": 0, "window_start": now, "locked_until": None}
        dialect = self.store.dialect
        if dialect == "postgresql":
            conn.execute(
                postgresql.insert(idp_login_failures).values(values).on_conflict_do_nothing()
            )
        else:
            conn.execute(sqlite.insert(idp_login_failures).values(values).on_conflict_do_nothing())
        row = conn.execute(
            select(idp_login_failures).where(idp_login_failures.c.key == key).with_for_update()
        ).one()
        failures, start = int(row.failures), int(row.window_start)
        if start < now - int(self.lockout.window.total_seconds()):
            failures, start = 0, now
        failures += 1
        locks = failures >= limit
        conn.execute(
            update(idp_login_failures)
            .where(idp_login_failures.c.key == key)
            .values(
                failures=0 if locks else failures,
                window_start=now if locks else start,
                locked_until=now + int(self.lockout.lock_for.total_seconds())
                if locks
                else row.locked_until,
            )
        )
        return locks
