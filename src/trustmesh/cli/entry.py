"""``trustmesh entry``: registration entries (which node hands which ID to which workloads)."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.pki import SELECTOR_KEYS, parse_duration
from trustmesh.store import RegistrationEntry

from ._common import home_option, json_option, open_ca, print_fields, print_json, print_table


@click.group("entry")
def entry_group() -> None:
    """Registration entries: the node agent that holds an ID, and the local callers that get it."""


def _fields(entry: RegistrationEntry) -> list[tuple[str, object]]:
    return [
        ("entry id", entry.entry_id),
        ("SPIFFE ID", entry.spiffe_id),
        ("node", entry.node_id),
        ("selectors", " ".join(entry.selectors)),
        ("dns", ", ".join(entry.dns)),
        ("ttl", "profile default" if entry.ttl is None else f"{entry.ttl}s"),
        ("created", f"{entry.created_at:%Y-%m-%d %H:%M:%S} UTC by {entry.created_by}"),
    ]


@entry_group.command("create")
@click.argument("spiffe_id")
@click.option("--node", "node_id", required=True, help="SPIFFE ID of the node agent.")
@click.option(
    "--selector",
    "selectors",
    multiple=True,
    help="TYPE:KEY:VALUE a caller must match (repeatable; all must match): "
    + ", ".join(SELECTOR_KEYS)
    + ".",
)
@click.option("--dns", multiple=True, help="DNS SAN to put in each SVID (repeatable).")
@click.option("--ttl", default=None, help="SVID lifetime, e.g. 1h (default: the profile's).")
@home_option
@json_option
def create_command(
    spiffe_id: str,
    node_id: str,
    selectors: tuple[str, ...],
    dns: tuple[str, ...],
    ttl: str | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Let node NODE hand SPIFFE_ID to local callers matching every --selector."""
    lifetime = None if ttl is None else parse_duration(ttl, field="--ttl")
    with open_ca(home) as ca:
        entry = ca.create_entry(
            spiffe_id, node_id=node_id, selectors=selectors, dns=dns, ttl=lifetime
        )
    if as_json:
        print_json(entry.to_json())
    else:
        click.echo(entry.entry_id)


@entry_group.command("list")
@click.option("--node", "node_id", default=None, help="Only the entries of this node.")
@click.option("--id", "spiffe_id", default=None, help="Only the entries for this SPIFFE ID.")
@home_option
@json_option
def list_command(
    node_id: str | None, spiffe_id: str | None, home: Path | None, as_json: bool
) -> None:
    """List registration entries, oldest first."""
    with open_ca(home) as ca:
        entries = ca.list_entries(node_id=node_id, spiffe_id=spiffe_id)
    if as_json:
        print_json([e.to_json() for e in entries])
        return
    print_table(
        None,
        ["entry id", "SPIFFE ID", "node", "selectors", "dns", "ttl"],
        [
            (
                e.entry_id,
                e.spiffe_id,
                e.node_id,
                " ".join(e.selectors),
                ",".join(e.dns),
                "" if e.ttl is None else f"{e.ttl}s",
            )
            for e in entries
        ],
    )


@entry_group.command("show")
@click.argument("entry_id")
@home_option
@json_option
def show_command(entry_id: str, home: Path | None, as_json: bool) -> None:
    """Show one registration entry."""
    with open_ca(home) as ca:
        entry = ca.get_entry(entry_id)
    if as_json:
        print_json(entry.to_json())
    else:
        print_fields(f"entry {entry.entry_id}", _fields(entry))


@entry_group.command("delete")
@click.argument("entry_id")
@home_option
@json_option
def delete_command(entry_id: str, home: Path | None, as_json: bool) -> None:
    """Delete a registration entry (its node agent drops the ID at its next refresh)."""
    with open_ca(home) as ca:
        entry = ca.delete_entry(entry_id)
    if as_json:
        print_json({"deleted": entry.to_json()})
    else:
        click.echo(f"deleted entry {entry.entry_id} ({entry.spiffe_id} on {entry.node_id})")
