"""The identity server: OAuth 2.0 / OpenID Connect provider (Authlib)."""

from ._users import (
    DEFAULT_LOCKOUT,
    LockoutPolicy,
    LoginResult,
    User,
    UserStore,
)

__all__ = [
    "DEFAULT_LOCKOUT",
    "LockoutPolicy",
    "LoginResult",
    "User",
    "UserStore",
]
