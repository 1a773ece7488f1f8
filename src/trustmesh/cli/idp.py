"""``trustmesh idp``: the embedded OAuth 2.0 / OpenID Connect identity server."""

from __future__ import annotations

import click

__all__ = ["idp_group"]


@click.group("idp")
def idp_group() -> None:
    """Run the identity server and manage its clients, users and signing keys."""
