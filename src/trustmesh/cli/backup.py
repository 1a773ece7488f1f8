"""``trustmesh ca backup`` and ``trustmesh ca restore``: disaster recovery of the CA."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from trustmesh.backup import BackupSummary, create_backup, restore_backup, verify_backup

from ._common import (
    ca_passphrase,
    home_option,
    json_option,
    passphrase_option,
    print_fields,
    print_json,
    resolve_home,
)


def _progress(as_json: bool) -> Callable[[str], None]:
    """Progress lines for people on stderr; none with --json."""
    if as_json:
        return lambda _: None
    return lambda line: click.echo(line, err=True)


def _print(title: str, summary: BackupSummary) -> None:
    info = summary.to_json()
    db = info["database"]
    audit = info["audit"]
    rows: list[tuple[str, object]] = [
        ("archive", info["archive"]),
        ("SHA-256", info["sha256"]),
        ("size", f"{info['bytes']} bytes"),
        ("created", info["created_at"]),
        ("trust domain", info["trust_domain"]),
        ("files", ", ".join(info["files"])),
        (
            "database",
            f"{db['dialect']} at revision {db['revision']}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(db["tables"].items()) if v),
        ),
        (
            "audit chain",
            f"{audit['events']} event(s), "
            f"{'verified' if audit['ok'] else 'BROKEN'}, head {audit['backup_head']['head']}",
        ),
    ]
    if info["skipped"]:
        rows.append(("skipped (not regular files)", ", ".join(info["skipped"])))
    if info["home"]:
        rows += [("restored home", info["home"]), ("restored database", info["restored_database"])]
    print_fields(title, rows)


@click.group("backup", invoke_without_command=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Archive to write (mode 0600, written atomically). Required unless a subcommand is given.",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@home_option
@passphrase_option
@json_option
@click.pass_context
def backup_group(
    ctx: click.Context,
    out: Path | None,
    force: bool,
    home: Path | None,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Write an encrypted backup of the CA: database snapshot, keys, config, CRLs.

    Safe while 'ca serve' runs: SQLite is copied with its online backup API and
    PostgreSQL inside one read-only serializable transaction. The archive is
    encrypted (AES-256-GCM, scrypt) with the CA passphrase. 'ca backup verify
    FILE' checks an archive without restoring it.
    """
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise click.UsageError("Missing option '--out': name the archive to write.")
    passphrase = ca_passphrase(passphrase_file)
    summary = create_backup(
        resolve_home(home), out, passphrase, force=force, progress=_progress(as_json)
    )
    if as_json:
        print_json(summary.to_json())
    else:
        _print("trustmesh backup", summary)
    if not summary.audit_ok:
        click.echo(
            "warning: the audit chain in this backup does not verify; run 'trustmesh audit "
            "verify' to see where it breaks.",
            err=True,
        )


@backup_group.command("verify")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@passphrase_option
@json_option
def verify_command(archive: Path, passphrase_file: Path | None, as_json: bool) -> None:
    """Check ARCHIVE end to end (passphrase, every byte, manifest, audit chain)."""
    summary = verify_backup(archive, ca_passphrase(passphrase_file))
    _report_check(summary, as_json)


def _report_check(summary: BackupSummary, as_json: bool) -> None:
    if as_json:
        print_json({"ok": summary.audit_ok, **summary.to_json()})
    else:
        _print("trustmesh backup (verified)", summary)
    if not summary.audit_ok:
        raise click.ClickException(
            "The archive is intact but the audit chain it holds does not verify."
        )


@click.command("restore")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--database-url",
    default=None,
    help="Database to restore into (must be empty). Default: trustmesh.db in the new "
    "home for a SQLite backup; the archived config's URL for a PostgreSQL one.",
)
@click.option("--check", is_flag=True, help="Only verify the archive; write nothing.")
@home_option
@passphrase_option
@json_option
def restore_command(
    archive: Path,
    database_url: str | None,
    check: bool,
    home: Path | None,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Restore a CA from ARCHIVE into a new or empty home (never over an existing CA).

    The database may be SQLite or PostgreSQL whatever the backup came from. The
    restore is appended to the restored audit chain, which must verify.
    """
    passphrase = ca_passphrase(passphrase_file)
    if check:
        _report_check(verify_backup(archive, passphrase), as_json)
        return
    summary = restore_backup(
        archive,
        passphrase,
        resolve_home(home),
        database_url=database_url,
        progress=_progress(as_json),
    )
    if as_json:
        print_json(summary.to_json())
    else:
        _print("trustmesh restore", summary)
        click.echo(
            "Certificates issued after this backup are unknown to the restored CA: their "
            "renewals fail closed, so those services must enroll again (docs/operations.md).",
            err=True,
        )
    if not summary.audit_ok:
        raise click.ClickException("The restored audit chain does not verify.")
