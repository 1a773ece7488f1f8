"""The extensions ``idp serve`` installs by default.

The user side (users, login page, authorization_code + PKCE, refresh tokens, ID tokens,
userinfo) adds its :class:`~trustmesh.idp.IdpExtension` to :func:`default_extensions`.
"""

from __future__ import annotations

from ._app import IdpExtension
from ._user_side import UserSideExtension

__all__ = ["default_extensions"]


def default_extensions() -> list[IdpExtension]:
    """Extensions mounted by ``trustmesh idp serve``: the user side."""
    return [UserSideExtension()]
