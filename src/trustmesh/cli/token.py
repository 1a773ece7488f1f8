"""``trustmesh token``: join tokens for first enrollment."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.pki import parse_duration

from ._common import home_option, json_option, open_ca, print_json


@click.group("token")
def token_group() -> None:
    """Create join tokens that let a service enroll once."""


@token_group.command("create")
@click.argument("spiffe_id")
@click.option("--ttl", default="15m", show_default=True, help="How long the token is valid.")
@click.option("--uses", default=1, show_default=True, help="How many enrollments it allows.")
@home_option
@json_option
def create_command(spiffe_id: str, ttl: str, uses: int, home: Path | None, as_json: bool) -> None:
    """Create a join token bound to SPIFFE_ID (or a glob such as spiffe://td/ns/*).

    Prints the token alone on stdout (it is shown once; only its hash is stored).
    """
    lifetime = parse_duration(ttl, field="--ttl")
    with open_ca(home) as ca:
        token = ca.create_join_token(spiffe_id, ttl=lifetime, uses=uses)
    if as_json:
        print_json({"token": token, "spiffe_id": spiffe_id, "uses": uses, "ttl": ttl})
    else:
        click.echo(token)
