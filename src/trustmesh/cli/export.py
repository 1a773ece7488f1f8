"""``trustmesh export``: credentials for Java, .NET, Node.js and curl."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.errors import ConfigError
from trustmesh.files import atomic_write
from trustmesh.pki import (
    load_pem_certificates,
    load_private_key,
    pem_certificates,
    pkcs12_keystore,
    pkcs12_truststore,
)

from ._common import force_option, home_option, open_ca, read_secret, refuse_overwrite


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"Cannot read the {what} {path}: {exc.strerror}.", path=str(path)
        ) from None


def _password(path: Path | None) -> bytes:
    return read_secret(
        path,
        "TRUSTMESH_P12_PASSWORD",
        what="store password",
        option="--password-file",
        confirm=True,
    )


password_option = click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the store password (default: $TRUSTMESH_P12_PASSWORD or a prompt).",
)


@click.group("export")
def export_group() -> None:
    """Write keystores, truststores and bundles for other runtimes."""


@export_group.command("p12")
@click.option(
    "--cert",
    "cert_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="cert.pem or chain.pem from 'trustmesh issue'.",
)
@click.option(
    "--key",
    "key_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The matching key.pem.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--alias", default="trustmesh", show_default=True, help="Entry alias (friendly name)."
)
@click.option(
    "--legacy",
    is_flag=True,
    help="3DES/SHA-1 encryption for Java < 8u301, .NET Framework and old Windows.",
)
@password_option
@force_option
@home_option
def p12_command(
    cert_file: Path,
    key_file: Path,
    out: Path,
    alias: str,
    legacy: bool,
    password_file: Path | None,
    force: bool,
    home: Path | None,
) -> None:
    """Write a PKCS#12 keystore: the key, its certificate and the CA chain.

    Encrypted with AES-256-CBC and PBKDF2-HMAC-SHA256 unless --legacy. Written
    atomically with mode 0600; an existing --out is replaced only with --force.
    """
    refuse_overwrite([out], force=force)
    certs = load_pem_certificates(_read(cert_file, "certificate"), source=str(cert_file))
    key = load_private_key(_read(key_file, "key"), source=str(key_file))
    password = _password(password_file)
    with open_ca(home) as ca:
        chain = list(certs[1:]) or [ca.intermediate]
        data = pkcs12_keystore(key, certs[0], chain, password=password, alias=alias, legacy=legacy)
        atomic_write(out, data, mode=0o600)
        ca.record_export("p12", str(out), subject=format(certs[0].serial_number, "x"))
    click.echo(f"wrote PKCS#12 keystore {out} ({'legacy 3DES' if legacy else 'AES-256'})")


@export_group.command("truststore")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--legacy", is_flag=True, help="3DES/SHA-1 MAC for old Java and .NET.")
@password_option
@force_option
@home_option
def truststore_command(
    out: Path, legacy: bool, password_file: Path | None, force: bool, home: Path | None
) -> None:
    """Write a Java truststore (PKCS#12) with the CA's trust anchors.

    Written atomically; an existing --out is replaced only with --force.
    """
    refuse_overwrite([out], force=force)
    password = _password(password_file)
    with open_ca(home) as ca:
        atomic_write(out, pkcs12_truststore(ca.bundle, password=password, legacy=legacy))
        ca.record_export("truststore", str(out), subject=ca.config.trust_domain)
    click.echo(f"wrote Java truststore {out} with {len(ca.bundle)} trusted certificate(s)")


@export_group.command("bundle")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@force_option
@home_option
def bundle_command(out: Path, force: bool, home: Path | None) -> None:
    """Write the trust bundle (PEM) for curl, Node.js, nginx and friends.

    Written atomically; an existing --out is replaced only with --force.
    """
    refuse_overwrite([out], force=force)
    with open_ca(home) as ca:
        atomic_write(out, pem_certificates(ca.bundle))
        ca.record_export("bundle", str(out), subject=ca.config.trust_domain)
    click.echo(f"wrote trust bundle {out}")
