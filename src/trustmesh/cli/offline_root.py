"""``trustmesh ca root``: the offline root (init, sign-intermediate, sign-crl) and
``import-crl`` on the online CA. The runbook is docs/hsm.md."""

from __future__ import annotations

from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.errors import ConfigError
from trustmesh.files import atomic_write
from trustmesh.offline import (
    OfflineRoot,
    create_offline_root,
    sign_intermediate_request,
    sign_offline_root_crl,
)
from trustmesh.pki import KeyType, fingerprint, load_pem_certificates, parse_duration

from ._common import ca_passphrase, home_option, open_ca, passphrase_option

__all__ = ["root_group"]

_root_dir = click.option(
    "--root",
    "root_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="The offline root directory ('trustmesh ca root init --out').",
)


def _out(path: Path) -> Path:
    if path.exists():
        raise ConfigError(f"Refusing to overwrite {path}: give another --out.", path=str(path))
    return path


def _passphrase(root: OfflineRoot, passphrase_file: Path | None) -> bytes | None:
    return ca_passphrase(passphrase_file) if root.key_ref.startswith("file:") else None


def _load_crl(path: Path) -> x509.CertificateRevocationList:
    data = path.read_bytes()
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise ConfigError(f"{path} is not a CRL (DER or PEM).", path=str(path)) from None


@click.group("root")
def root_group() -> None:
    """The offline root: its key signs only on another machine (docs/hsm.md)."""


@root_group.command("init")
@click.option("--trust-domain", required=True, help="SPIFFE trust domain, e.g. example.org.")
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    default="ec-p256",
    show_default=True,
)
@click.option("--lifetime", default="3650d", show_default=True, help="Root validity.")
@click.option(
    "--pkcs11",
    default=None,
    metavar="URI",
    help="Generate the root key in this PKCS#11 token (RFC 7512 URI) instead of root.key.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The root directory to create (keep it on the offline machine).",
)
@passphrase_option
def init_command(
    trust_domain: str,
    key_type: str,
    lifetime: str,
    pkcs11: str | None,
    out: Path,
    passphrase_file: Path | None,
) -> None:
    """On the offline machine: create the root key and root.pem in --out."""
    life = parse_duration(lifetime, field="--lifetime")
    passphrase = None if pkcs11 else ca_passphrase(passphrase_file, confirm=True)
    root = create_offline_root(
        out,
        trust_domain=trust_domain,
        key_type=KeyType.parse(key_type),
        passphrase=passphrase,
        pkcs11=pkcs11,
        lifetime=life,
    )
    click.echo(
        f"Created the offline root for {trust_domain} in {out} (SHA-256 "
        f"{fingerprint(root.certificate)}). Carry {out / 'root.pem'} to the online CA; "
        f"the key stays here."
    )


@root_group.command("sign-intermediate")
@click.argument("csr", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_root_dir
@click.option("--lifetime", default="365d", show_default=True, help="Intermediate validity.")
@click.option(
    "--root-crl-url",
    "root_crl_urls",
    multiple=True,
    help="Where the online CA publishes the root CRL (written into the intermediate), "
    "e.g. http://ca.internal:8080/crl/root. Repeatable.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PEM.")
@passphrase_option
def sign_intermediate_command(
    csr: Path,
    root_dir: Path,
    lifetime: str,
    root_crl_urls: tuple[str, ...],
    out: Path,
    passphrase_file: Path | None,
) -> None:
    """On the offline machine: sign the intermediate CSR of 'trustmesh ca csr'."""
    from trustmesh.config import check_urls

    urls = check_urls("root_crl_urls", list(root_crl_urls), source="--root-crl-url")
    life = parse_duration(lifetime, field="--lifetime")
    root = OfflineRoot.load(root_dir)
    cert = sign_intermediate_request(
        root,
        csr.read_bytes(),
        passphrase=_passphrase(root, passphrase_file),
        lifetime=life,
        root_crl_urls=urls,
        source=str(csr),
    )
    atomic_write(_out(out), cert.public_bytes(serialization.Encoding.PEM))
    click.echo(
        f"Signed {cert.subject.rfc4514_string()} until "
        f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} into {out}. Also sign a root CRL "
        f"('trustmesh ca root sign-crl') and carry {out.name}, root.pem and the CRL back."
    )


@root_group.command("sign-crl")
@_root_dir
@click.option(
    "--revoke",
    "revoked",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="An intermediate of this root to list (retired by a rotation). Repeatable.",
)
@click.option(
    "--lifetime",
    default="30d",
    show_default=True,
    help="nextUpdate - thisUpdate; the online CA warns as it nears and asks for a new one "
    "at half of it (root_crl_lifetime).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="DER.")
@passphrase_option
def sign_crl_command(
    root_dir: Path,
    revoked: tuple[Path, ...],
    lifetime: str,
    out: Path,
    passphrase_file: Path | None,
) -> None:
    """On the offline machine: sign the root CRL of the intermediates (DER)."""
    life = parse_duration(lifetime, field="--lifetime")
    root = OfflineRoot.load(root_dir)
    certs = [load_pem_certificates(p.read_bytes(), source=str(p))[0] for p in revoked]
    crl = sign_offline_root_crl(
        root, passphrase=_passphrase(root, passphrase_file), revoked=certs, lifetime=life
    )
    atomic_write(_out(out), crl.public_bytes(serialization.Encoding.DER))
    click.echo(
        f"Signed the root CRL ({len(certs)} entries) until "
        f"{crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ} into {out}; import it on the online CA "
        f"with 'trustmesh ca root import-crl {out.name}'."
    )


@root_group.command("import-crl")
@click.argument("crl", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@home_option
def import_crl_command(crl: Path, home: Path | None) -> None:
    """On the online CA: install a root CRL signed offline (becomes root.crl)."""
    with open_ca(home) as ca:
        installed = ca.import_root_crl(_load_crl(crl))
        click.echo(
            f"Installed the root CRL (next update "
            f"{installed.next_update_utc:%Y-%m-%dT%H:%M:%SZ}) in {ca.home / 'root.crl'}; "
            f"'ca serve' serves it once its cached CRL is due."
        )
