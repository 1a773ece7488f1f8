"""``trustmesh gateway``: the edge gateway (serve, check)."""

from __future__ import annotations

import click

__all__ = ["gateway_group"]


@click.group("gateway")
def gateway_group() -> None:
    """The edge gateway: user tokens in, mTLS out. See docs/gateway.md."""
