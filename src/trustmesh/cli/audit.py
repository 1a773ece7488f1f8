"""``trustmesh audit``: check and read the hash-chained audit log."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from trustmesh.errors import AuditError

from ._common import home_option, json_option, open_ca, print_json, print_table


@click.group("audit")
def audit_group() -> None:
    """Verify and read the audit log."""


@audit_group.command("verify")
@home_option
@json_option
def verify_command(home: Path | None, as_json: bool) -> None:
    """Check every link of the audit chain; exit 1 at the first broken one."""
    with open_ca(home) as ca:
        report = ca.verify_audit()
    if as_json:
        print_json(
            {
                "ok": report.ok,
                "checked": report.checked,
                "broken_at": report.broken_at,
                "problem": report.problem,
            }
        )
        if not report.ok:
            sys.exit(1)
        return
    if not report.ok:
        raise AuditError(
            f"Audit chain broken at event {report.broken_at}: {report.problem}; "
            f"{report.checked} event(s) before it verified.",
            broken_at=report.broken_at,
        )
    click.echo(f"audit chain intact: {report.checked} event(s) verified")


@audit_group.command("tail")
@click.option(
    "-n",
    "count",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="How many events.",
)
@home_option
@json_option
def tail_command(count: int, home: Path | None, as_json: bool) -> None:
    """Show the last N audit events (the table title says how many there are in all)."""
    with open_ca(home) as ca:
        events = ca.audit_tail(count)
        total = ca.store.counter("audit_seq")
    if as_json:
        print_json(
            [
                {
                    "seq": e.seq,
                    "at": datetime.fromtimestamp(e.at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "actor": e.actor,
                    "action": e.action,
                    "subject": e.subject,
                    "details": dict(e.details),
                    "hash": e.hash,
                }
                for e in events
            ]
        )
        return
    print_table(
        f"last {len(events)} of {total} audit event(s)"
        if total > len(events)
        else f"{total} audit event(s)",
        ["seq", "time (UTC)", "actor", "action", "subject", "details"],
        [
            [
                e.seq,
                datetime.fromtimestamp(e.at, UTC).strftime("%Y-%m-%d %H:%M:%S"),
                e.actor,
                e.action,
                e.subject,
                " ".join(f"{k}={v}" for k, v in sorted(e.details.items())),
            ]
            for e in events
        ],
    )
