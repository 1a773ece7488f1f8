"""``trustmesh ca rotate intermediate|root prepare|activate|retire|status``."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.rotation import RotationStatus, StepResult

from ._common import (
    home_option,
    json_option,
    open_ca,
    passphrase_option,
    print_fields,
    print_json,
    print_table,
)

__all__ = ["rotate_command"]

_STEPS = ("prepare", "activate", "retire", "status")


def _print_status(status: RotationStatus) -> None:
    data = status.to_json()
    print_fields(
        f"trustmesh CA {status.role} rotation",
        [
            ("stage", status.stage),
            ("bundle sequence", status.version),
            ("min overlap", data["min_overlap"]),
            ("activate allowed from", data["activate_allowed_at"] or "-"),
            ("retire allowed from", data["retire_allowed_at"] or "-"),
            (
                "live certificates of the old issuer",
                "-" if status.old_live is None else status.old_live.count,
            ),
            ("status", status.message),
        ],
    )
    rows = []
    for issuer, live in status.issuers:
        rows.append(
            (
                issuer.generation,
                issuer.state,
                issuer.certificate.subject.rfc4514_string(),
                format(issuer.certificate.serial_number, "x")[:16],
                f"{issuer.certificate.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
                live.count,
            )
        )
    print_table(None, ["gen", "state", "subject", "serial", "not after", "live certificates"], rows)


def _describe(result: StepResult) -> str:
    names = ", ".join(i.name for i in result.issuers)
    verb = {"prepare": "prepared", "activate": "activated", "retire": "retired"}[result.step]
    line = f"{verb} {names}; bundle sequence {result.version}"
    if result.step == "prepare":
        line += (
            f"; published in the trust bundle, the old {result.role} keeps signing; "
            f"activate allowed from {result.audit_details['activate_from']}"
        )
    return line


@click.command("rotate")
@click.argument("role", type=click.Choice(["intermediate", "root"]))
@click.argument("step", type=click.Choice(_STEPS))
@click.option(
    "--pkcs11",
    default=None,
    metavar="URI",
    help="prepare: generate the new key(s) in this PKCS#11 token (default: 'pkcs11' "
    "of config.toml, where 'ca init --pkcs11' put the keys; else the database).",
)
@home_option
@passphrase_option
@json_option
def rotate_command(
    role: str,
    step: str,
    pkcs11: str | None,
    home: Path | None,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Rotate the intermediate or the root in stages, without downtime.

    prepare: create the next key and certificate (a new root is cross-certified
    with the old one both ways) and publish it in the trust bundle; the old one
    keeps signing. activate: the new one signs (allowed once the bundle has been
    published for rotation_min_overlap, config.toml). retire: drop the old one from
    the bundle, CRLs and OCSP (allowed once the last certificate it signed has
    expired). status: where the rotation stands. See docs/rotation.md.
    """
    if step == "status":
        with open_ca(home) as ca:
            status = ca.rotation_status(role)
            if as_json:
                print_json(status.to_json())
            else:
                _print_status(status)
        return
    with open_ca(home, passphrase_file, sign=True) as ca:
        result = ca.rotate(role, step, pkcs11=pkcs11)
        if as_json:
            print_json(
                {
                    "step": result.step,
                    "role": result.role,
                    "bundle_sequence": result.version,
                    "details": result.audit_details,
                }
            )
        else:
            click.echo(_describe(result))
