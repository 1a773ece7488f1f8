"""``trustmesh idp``: the embedded OAuth 2.0 / OpenID Connect identity server."""

from __future__ import annotations

import click

from .idp_users import user_group

__all__ = ["idp_group"]


@click.group("idp")
def idp_group() -> None:
    """Run the identity server and manage its clients, users and signing keys."""


idp_group.add_command(user_group)
