"""``trustmesh issue|sign|revoke|list|crl``: certificates of workloads."""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.authority import Issued
from trustmesh.errors import ConfigError
from trustmesh.files import atomic_write, stage_file
from trustmesh.pki import (
    REASONS,
    KeyType,
    dump_private_key,
    glob_match,
    parse_duration,
    parse_reason,
    pem_certificates,
    pem_crls,
)
from trustmesh.store import CertificateRecord

from ._common import (
    force_option,
    home_option,
    json_option,
    open_ca,
    passphrase_option,
    print_fields,
    print_json,
    print_table,
    refuse_overwrite,
)

PEM = serialization.Encoding.PEM
#: What ``trustmesh issue`` writes into --out.
ISSUED_FILES = ("key.pem", "cert.pem", "chain.pem", "bundle.pem")


def _ttl(value: str | None) -> timedelta | None:
    return None if value is None else parse_duration(value, field="--ttl")


def _summary(issued: Issued, written: list[Path]) -> dict[str, object]:
    data = issued.record.to_json()
    data["files"] = [str(p) for p in written]
    return data


def _print_issued(issued: Issued, written: list[Path], as_json: bool) -> None:
    if as_json:
        print_json(_summary(issued, written))
        return
    record = issued.record
    print_fields(
        "issued",
        [
            ("SPIFFE ID", record.spiffe_id),
            ("serial", record.serial),
            ("profile", record.profile),
            ("key", record.key_type),
            ("DNS", ", ".join(record.dns) or "-"),
            ("IP", ", ".join(record.ips) or "-"),
            ("not after", record.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")),
            ("files", "\n".join(str(p) for p in written)),
        ],
    )


class _Staged:
    """Files prepared inside the issuing transaction, renamed after it commits."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []

    def add(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        self.pending.append((stage_file(path, data, mode=mode), path))

    def commit(self) -> list[Path]:
        for tmp, final in self.pending:
            os.replace(tmp, final)
        return [final for _, final in self.pending]

    def discard(self) -> None:
        for tmp, _ in self.pending:
            with contextlib.suppress(OSError):
                tmp.unlink()


@click.command("issue")
@click.argument("spiffe_id")
@click.option("--dns", multiple=True, help="DNS SAN (repeatable).")
@click.option("--ip", multiple=True, help="IP SAN (repeatable).")
@click.option("--ttl", default=None, help="Lifetime, e.g. 24h (default: the profile's).")
@click.option("--profile", default=None, help="Certificate profile from config.toml.")
@click.option("--key-type", type=click.Choice([k.value for k in KeyType]), default=None)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for key.pem, cert.pem, chain.pem and bundle.pem.",
)
@force_option
@home_option
@passphrase_option
@json_option
def issue_command(
    spiffe_id: str,
    dns: tuple[str, ...],
    ip: tuple[str, ...],
    ttl: str | None,
    profile: str | None,
    key_type: str | None,
    out: Path,
    force: bool,
    home: Path | None,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Generate a key here and issue a certificate for SPIFFE_ID.

    The key never leaves this machine and is not stored by the CA. Writes
    key.pem (0600), cert.pem, chain.pem (leaf + intermediate) and bundle.pem
    (trust anchors) into --out, each atomically. Refuses to replace any of them
    that already exists unless --force.
    """
    lifetime = _ttl(ttl)
    refuse_overwrite([out / name for name in ISSUED_FILES], force=force)
    with open_ca(home, passphrase_file, sign=True) as ca:
        staged = _Staged()

        def deliver(issued: Issued) -> None:
            out.mkdir(parents=True, exist_ok=True)
            if issued.key is not None:
                staged.add(out / "key.pem", dump_private_key(issued.key), mode=0o600)
            staged.add(out / "cert.pem", issued.certificate.public_bytes(PEM))
            staged.add(out / "chain.pem", pem_certificates(issued.chain))
            staged.add(out / "bundle.pem", pem_certificates(issued.bundle))

        try:
            issued = ca.issue(
                spiffe_id,
                dns=dns,
                ips=ip,
                ttl=lifetime,
                profile=profile,
                key_type=KeyType.parse(key_type) if key_type else None,
                deliver=deliver,
            )
        except BaseException:
            staged.discard()
            raise
        _print_issued(issued, staged.commit(), as_json)


@click.command("sign")
@click.argument("csr_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ttl", default=None, help="Lifetime, e.g. 24h (default: the profile's).")
@click.option("--profile", default=None, help="Certificate profile from config.toml.")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the certificate chain (leaf + intermediate, PEM).",
)
@force_option
@home_option
@passphrase_option
@json_option
def sign_command(
    csr_file: Path,
    ttl: str | None,
    profile: str | None,
    out: Path,
    force: bool,
    home: Path | None,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Check CSR_FILE against a profile and sign it.

    The CSR must carry exactly one SPIFFE ID as a URI SAN. Writes the leaf
    followed by the intermediate to --out (atomically; an existing file only
    with --force).
    """
    refuse_overwrite([out], force=force)
    try:
        data = csr_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read {csr_file}: {exc.strerror}.", path=str(csr_file)) from None
    lifetime = _ttl(ttl)
    with open_ca(home, passphrase_file, sign=True) as ca:
        staged = _Staged()
        try:
            issued = ca.sign(
                data,
                ttl=lifetime,
                profile=profile,
                source=str(csr_file),
                deliver=lambda i: staged.add(out, pem_certificates(i.chain)),
            )
        except BaseException:
            staged.discard()
            raise
        _print_issued(issued, staged.commit(), as_json)


@click.command("revoke")
@click.argument("serial", required=False)
@click.option("--id", "spiffe_id", default=None, help="Revoke every valid certificate of this ID.")
@click.option(
    "--reason",
    default="unspecified",
    show_default=True,
    help=f"RFC 5280 reason: {', '.join(REASONS)}.",
)
@click.option("--ca", "ca_url", default=None, help="Revoke through this CA API instead of --home.")
@click.option(
    "--cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --ca: the identity to call with, leaf + intermediate (e.g. chain.pem).",
)
@click.option(
    "--key", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Its key."
)
@click.option(
    "--bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --ca: the CA's root certificate(s), PEM (e.g. bundle.pem).",
)
@home_option
@json_option
def revoke_command(
    serial: str | None,
    spiffe_id: str | None,
    reason: str,
    ca_url: str | None,
    cert: Path | None,
    key: Path | None,
    bundle: Path | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Revoke a certificate by SERIAL, or all of an identity's with --id.

    With --ca, revoke through a running CA server, authenticated by --cert/--key:
    an admin identity may revoke any certificate, others only their own.
    """
    if (serial is None) == (spiffe_id is None):
        raise click.UsageError("Give a SERIAL or --id SPIFFE_ID (exactly one).")
    if ca_url is None:
        if cert or key or bundle:
            raise click.UsageError("--cert, --key and --bundle go with --ca URL.")
        with open_ca(home) as ca:
            records = [r.to_json() for r in ca.revoke(serial, spiffe_id=spiffe_id, reason=reason)]
    else:
        if cert is None or key is None or bundle is None:
            raise click.UsageError("--ca needs --cert, --key and --bundle.")
        from trustmesh.authority import CertificateAuthority
        from trustmesh.client import CAClient

        # bad input is exit 2 here too, before the call (the CA would answer 400: exit 1)
        reason = parse_reason(reason)
        if serial is not None:
            serial = CertificateAuthority._normalize_serial(serial)

        with CAClient(ca_url, bundle=bundle, cert=cert, key=key) as client:
            records = client.revoke(serial, spiffe_id, reason=reason)
    if as_json:
        print_json(records)
        return
    for r in records:
        click.echo(f"revoked {r['serial']} ({r['spiffe_id']}), reason {r['revocation_reason']}")


def _rows(records: list[CertificateRecord], now: datetime) -> list[list[object]]:
    return [
        [
            r.serial,
            r.spiffe_id,
            r.status(now),
            r.not_after.strftime("%Y-%m-%d %H:%M"),
            r.profile,
            r.revocation_reason or "",
        ]
        for r in records
    ]


@click.command("list")
@click.option(
    "--id", "id_glob", default=None, help="SPIFFE ID or glob (* in a segment, ** across)."
)
@click.option("--revoked", is_flag=True, help="Only revoked certificates.")
@click.option("--expiring", default=None, help="Only valid ones expiring within this, e.g. 7d.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="At most this many rows; the output says 'showing N of M' when more match.",
)
@click.option(
    "--envelope",
    is_flag=True,
    help="With --json: print an object with the certificates, the total that matched "
    "and whether --limit cut the list, instead of a bare list.",
)
@home_option
@json_option
def list_command(
    id_glob: str | None,
    revoked: bool,
    expiring: str | None,
    limit: int,
    envelope: bool,
    home: Path | None,
    as_json: bool,
) -> None:
    """List issued certificates, newest first.

    At most --limit of them: when more match, the table title says "showing N of M",
    and --json prints the bare list with that line on stderr (or, with --envelope,
    {"certificates": [...], "shown": N, "total": M, "truncated": true, "limit": L}).
    """
    if envelope and not as_json:
        raise click.UsageError("--envelope goes with --json.")
    now = datetime.now(UTC)
    window = parse_duration(expiring, field="--expiring") if expiring else None
    exact = id_glob if id_glob and "*" not in id_glob else None
    pattern = id_glob if id_glob and not exact else None
    status = True if revoked else (False if window else None)
    before = now + window if window else None
    valid = now if window else None
    with open_ca(home) as ca:
        records = ca.store.find_certificates(
            spiffe_id=exact,
            revoked=status,
            expiring_before=before,
            valid_at=valid,
            limit=None if pattern else limit,
        )
        if pattern is not None:
            records = [r for r in records if glob_match(r.spiffe_id, pattern, sep="/")]
            total = len(records)
            records = records[:limit]
        elif len(records) < limit:
            total = len(records)
        else:
            total = ca.store.count_certificates(
                spiffe_id=exact, revoked=status, expiring_before=before, valid_at=valid
            )
    truncated = total > len(records)
    cut = f"showing {len(records)} of {total} certificate(s) (--limit {limit})"
    if as_json:
        rows = [r.to_json(now) for r in records]
        if envelope:
            print_json(
                {
                    "certificates": rows,
                    "shown": len(rows),
                    "total": total,
                    "truncated": truncated,
                    "limit": limit,
                }
            )
            return
        print_json(rows)
        if truncated:
            click.echo(f"trustmesh list: {cut}; raise --limit to see them all.", err=True)
        return
    print_table(
        f"{cut}; raise --limit to see them all" if truncated else f"{len(records)} certificate(s)",
        ["serial", "SPIFFE ID", "status", "not after (UTC)", "profile", "reason"],
        _rows(records, now),
    )


@click.command("crl")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file (DER unless --pem); default: PEM to stdout.",
)
@click.option("--pem", is_flag=True, help="Write PEM instead of DER.")
@click.option(
    "--chain",
    is_flag=True,
    help="CRLs for the whole chain: the intermediate's and the root-signed one, in one PEM "
    "file (with --pem) as nginx ssl_crl and HAProxy crl-file need.",
)
@click.option(
    "--root",
    "root_only",
    is_flag=True,
    help="Only the root-signed CRL of the intermediates (re-signed when half its life passed).",
)
@home_option
@passphrase_option
def crl_command(
    out: Path | None,
    pem: bool,
    chain: bool,
    root_only: bool,
    home: Path | None,
    passphrase_file: Path | None,
) -> None:
    """Build a CRL of the unexpired revoked certificates, signed by the intermediate.

    With --chain, also the root-signed CRL of the intermediates: peers that check the
    whole chain (nginx ssl_crl, HAProxy crl-file, openssl -crl_check_all) refuse every
    client without it.
    """
    if chain and root_only:
        raise click.UsageError("Give --chain or --root, not both.")
    if chain and out is not None and not pem:
        raise click.UsageError(
            "--chain writes two CRLs, which only PEM can hold in one file: add --pem."
        )
    with open_ca(home, passphrase_file, sign=True) as ca:
        if chain:
            crls = list(ca.chain_crls())
        elif root_only:
            crls = [ca.root_crl()]
        else:
            crls = [ca.crl()]
    if out is None:
        click.echo(pem_crls(crls).decode(), nl=False)
        return
    data = pem_crls(crls) if pem else crls[0].public_bytes(serialization.Encoding.DER)
    atomic_write(out, data)
    roots = {r.subject for r in ca.bundle}  # every published root, old and new
    described = ", ".join(
        f"{'root' if c.issuer in roots else 'intermediate'} CRL number "
        f"{c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number} "
        f"({len(c)} entries)"
        for c in crls
    )
    click.echo(f"wrote {described} to {out}", err=True)
