"""``trustmesh proxy``: sidecar proxies (inbound, outbound)."""

from __future__ import annotations

import click

__all__ = ["proxy_group"]


@click.group("proxy")
def proxy_group() -> None:
    """Sidecar proxies for services that do not speak mTLS. See docs/sidecars.md."""
