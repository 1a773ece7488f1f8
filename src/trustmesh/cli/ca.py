"""``trustmesh ca``: create and show the certificate authority."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.acme import ACMEConfig, load_acme_config
from trustmesh.authority import CertificateAuthority
from trustmesh.config import CONFIG_NAME, CAConfig
from trustmesh.errors import ConfigError
from trustmesh.files import atomic_write
from trustmesh.logs import announce, configure_logging
from trustmesh.offline import IntermediateRequest, create_intermediate_request
from trustmesh.pki import (
    KeyType,
    describe_key,
    fingerprint,
    load_pem_certificates,
    parse_backdate,
)
from trustmesh.store import normalize_url

from ._common import (
    F,
    ca_passphrase,
    home_option,
    json_option,
    open_ca,
    passphrase_option,
    print_fields,
    print_json,
    resolve_home,
)
from .backup import backup_group, restore_command
from .offline_root import root_group
from .rotate import rotate_command

KEY_TYPES = [k.value for k in KeyType]


@click.group("ca")
def ca_group() -> None:
    """Create and inspect the certificate authority."""


ca_group.add_command(backup_group)
ca_group.add_command(restore_command)
ca_group.add_command(rotate_command)
ca_group.add_command(root_group)


def _pkcs11_option(func: F) -> F:
    return click.option(
        "--pkcs11",
        "pkcs11",
        default=None,
        metavar="URI",
        help="Generate the CA keys in this PKCS#11 token (RFC 7512 URI, e.g. "
        "'pkcs11:token=trustmesh;object=ca?module-path=/usr/lib/softhsm/libsofthsm2.so"
        "&pin-source=file:/etc/trustmesh/pin'); they never leave it. The PIN comes from "
        "pin-source (file:PATH or env:NAME) or $TRUSTMESH_PKCS11_PIN, never the command "
        "line. See docs/hsm.md.",
    )(func)


@ca_group.command("init")
@click.option("--trust-domain", default=None, help="SPIFFE trust domain, e.g. example.org.")
@click.option(
    "--key-type",
    type=click.Choice(KEY_TYPES),
    default="ec-p256",
    show_default=True,
    help="Key type of the root and intermediate (and default for issued keys).",
)
@click.option("--db", "db_url", default=None, help="Database URL (default: SQLite in the home).")
@click.option(
    "--crl-url",
    "crl_urls",
    multiple=True,
    help="Public URL of the leaf CRL, written into every leaf as its CRL distribution point, "
    "e.g. http://ca.internal:8080/crl (served by 'ca serve --ocsp-listen'). Repeatable.",
)
@click.option(
    "--ocsp-url",
    "ocsp_urls",
    multiple=True,
    help="Public URL of the OCSP responder, written into every leaf (AIA), e.g. "
    "http://ca.internal:8080/ (served by 'ca serve --ocsp-listen'). Repeatable.",
)
@click.option(
    "--root-crl-url",
    "root_crl_urls",
    multiple=True,
    help="Public URL of the root-signed CRL, written into the intermediate (default: "
    "URL/root for each --crl-url ending in /crl). Repeatable.",
)
@click.option(
    "--backdate",
    default="1m",
    show_default=True,
    help="How far notBefore of every certificate lies before the CA's clock, for hosts "
    "whose clocks are a little behind: 0s to 10m (config.toml 'backdate').",
)
@_pkcs11_option
@click.option(
    "--import-intermediate",
    "import_intermediate",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Offline root: finish the CA with the intermediate certificate the offline root "
    "signed for the CSR of 'trustmesh ca csr' (no root key on this machine). Needs "
    "--root-cert.",
)
@click.option(
    "--root-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="With --import-intermediate: the offline root's root.pem.",
)
@click.option(
    "--root-crl",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="With --import-intermediate: the root CRL from 'trustmesh ca root sign-crl' "
    "(import a fresh one later with 'trustmesh ca root import-crl').",
)
@home_option
@passphrase_option
@json_option
def init_command(
    trust_domain: str | None,
    key_type: str,
    db_url: str | None,
    crl_urls: tuple[str, ...],
    ocsp_urls: tuple[str, ...],
    root_crl_urls: tuple[str, ...],
    backdate: str,
    pkcs11: str | None,
    import_intermediate: Path | None,
    root_cert: Path | None,
    root_crl: Path | None,
    home: Path | None,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Create a root (10 years) and an online intermediate CA (1 year).

    Keys are encrypted with the passphrase from --passphrase-file,
    TRUSTMESH_CA_PASSPHRASE or a prompt, and written with mode 0600; with --pkcs11
    they are generated in the token instead and no key file is written. With
    --import-intermediate (offline root, docs/hsm.md) no root key is made here.
    Refuses to overwrite an existing CA.
    """
    directory = resolve_home(home)
    back = parse_backdate(backdate, field="--backdate")
    if import_intermediate is not None:
        ca = _import(
            directory,
            import_intermediate,
            root_cert,
            root_crl,
            trust_domain,
            pkcs11,
            db_url,
            crl_urls,
            ocsp_urls,
            root_crl_urls,
            back,
            passphrase_file,
        )
    else:
        if root_cert is not None or root_crl is not None:
            raise click.UsageError("--root-cert and --root-crl go with --import-intermediate.")
        if not trust_domain:
            raise click.UsageError("Missing option '--trust-domain', e.g. example.org.")
        passphrase = None if pkcs11 else ca_passphrase(passphrase_file, confirm=True)
        ca = CertificateAuthority.init(
            directory,
            trust_domain=trust_domain,
            passphrase=passphrase,
            key_type=KeyType.parse(key_type),
            db_url=normalize_url(db_url) if db_url else None,
            crl_urls=crl_urls,
            ocsp_urls=ocsp_urls,
            root_crl_urls=root_crl_urls or None,
            backdate=back,
            pkcs11=pkcs11,
        )
    with ca:
        if as_json:
            print_json(_describe(ca))
        else:
            click.echo(f"Created CA for trust domain {ca.config.trust_domain} in {directory}")
            _show(ca)
            click.echo(revocation_hint(ca.config), err=True)


def _import(
    directory: Path,
    inter_path: Path,
    root_cert: Path | None,
    root_crl: Path | None,
    trust_domain: str | None,
    pkcs11: str | None,
    db_url: str | None,
    crl_urls: tuple[str, ...],
    ocsp_urls: tuple[str, ...],
    root_crl_urls: tuple[str, ...],
    backdate: timedelta,
    passphrase_file: Path | None,
) -> CertificateAuthority:
    if root_cert is None:
        raise click.UsageError(
            "--import-intermediate needs --root-cert (the offline root's root.pem)."
        )
    if pkcs11 or root_crl_urls:
        raise click.UsageError(
            "--pkcs11 and --root-crl-url go with 'trustmesh ca csr' and 'ca root "
            "sign-intermediate', not with --import-intermediate."
        )
    request = IntermediateRequest.load(directory)
    if trust_domain and trust_domain != request.trust_domain:
        raise ConfigError(
            f"--trust-domain {trust_domain!r} differs from the request's "
            f"{request.trust_domain!r} (made by 'ca csr'): drop --trust-domain."
        )
    passphrase = ca_passphrase(passphrase_file) if request.key_ref.startswith("file:") else None
    crl = None
    if root_crl is not None:
        data = root_crl.read_bytes()
        try:
            crl = (
                x509.load_pem_x509_crl(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_crl(data)
            )
        except ValueError:
            raise ConfigError(f"{root_crl} is not a CRL (DER or PEM).") from None
    return CertificateAuthority.import_intermediate(
        directory,
        intermediate=load_pem_certificates(inter_path.read_bytes(), source=str(inter_path))[0],
        root=load_pem_certificates(root_cert.read_bytes(), source=str(root_cert))[0],
        root_crl=crl,
        passphrase=passphrase,
        db_url=normalize_url(db_url) if db_url else None,
        crl_urls=crl_urls,
        ocsp_urls=ocsp_urls,
        backdate=backdate,
    )


@ca_group.command("csr")
@click.option("--trust-domain", required=True, help="SPIFFE trust domain, e.g. example.org.")
@click.option(
    "--key-type",
    type=click.Choice(KEY_TYPES),
    default="ec-p256",
    show_default=True,
    help="Key type of the intermediate.",
)
@_pkcs11_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the CSR (PEM) to carry to the offline root.",
)
@home_option
@passphrase_option
def csr_command(
    trust_domain: str,
    key_type: str,
    pkcs11: str | None,
    out: Path,
    home: Path | None,
    passphrase_file: Path | None,
) -> None:
    """Offline root, online half: make the intermediate key and its CSR.

    The key goes to intermediate.key (encrypted with the CA passphrase) or, with
    --pkcs11, into the token. Sign the CSR with 'trustmesh ca root sign-intermediate'
    on the offline machine, then run 'trustmesh ca init --import-intermediate'. See
    docs/hsm.md.
    """
    directory = resolve_home(home)
    if out.exists():
        raise ConfigError(f"Refusing to overwrite {out}: give another --out.", path=str(out))
    passphrase = None if pkcs11 else ca_passphrase(passphrase_file, confirm=True)
    request = create_intermediate_request(
        directory,
        trust_domain=trust_domain,
        key_type=KeyType.parse(key_type),
        passphrase=passphrase,
        pkcs11=pkcs11,
    )
    atomic_write(out, request.csr.public_bytes(serialization.Encoding.PEM))
    click.echo(
        f"Wrote the intermediate CSR to {out} (key: {_where(request.key_ref)}). On the "
        f"offline machine: trustmesh ca root sign-intermediate {out.name} --root DIR "
        f"--out intermediate.pem; then here: trustmesh ca init --import-intermediate "
        f"intermediate.pem --root-cert root.pem --root-crl root.crl"
    )


def _where(ref: str) -> str:
    """Say where a key is, for people."""
    if ref.startswith("file:"):
        return f"file {ref.removeprefix('file:')} (encrypted)"
    if ref == "store":
        return "in the database (encrypted)"
    if ref == "offline":
        return "offline (not on this machine)"
    if ref.startswith("pkcs11:"):
        return f"PKCS#11 token ({ref})"
    return ref


def revocation_hint(config: CAConfig) -> str:
    """Say where new leaves point for revocation data, or how to make them point."""
    if config.crl_urls or config.ocsp_urls:
        return (
            f"New leaves carry CRL URL(s) {list(config.crl_urls)} and OCSP URL(s) "
            f"{list(config.ocsp_urls)}; serve them with 'trustmesh ca serve --ocsp-listen "
            f"HOST:PORT' (plain HTTP: /crl, /crl/root, /crl/chain and OCSP at /)."
        )
    return (
        "Leaves carry no CRL or OCSP URL, so Java and OpenSSL-based peers cannot check "
        'revocation by themselves: set crl_urls = ["http://HOST:8080/crl"] and '
        'ocsp_urls = ["http://HOST:8080/"] in config.toml (or \'ca init --crl-url '
        "--ocsp-url') and run 'trustmesh ca serve --ocsp-listen 0.0.0.0:8080'; see "
        "docs/revocation.md."
    )


def _describe(ca: CertificateAuthority) -> dict[str, object]:
    def cert(c: x509.Certificate) -> dict[str, object]:
        return {
            "subject": c.subject.rfc4514_string(),
            "serial": format(c.serial_number, "x"),
            "sha256": fingerprint(c),
            "not_before": c.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "not_after": c.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "key": describe_key(c.public_key()),
        }

    keys = {
        i.role: i.key_ref for i in (ca.issuers.active("root"), ca.issuers.active("intermediate"))
    }
    expiry = ca.issuer_expiry()
    return {
        "warnings": [e.warning for e in expiry if e.warning],
        "expires_in_seconds": {e.role: int(e.seconds_left) for e in expiry},
        "trust_domain": ca.config.trust_domain,
        "home": str(ca.home),
        "database": ca.store.url,
        "profiles": sorted(ca.config.profiles),
        "root": {**cert(ca.root), "key_ref": keys["root"]},
        "intermediate": {**cert(ca.intermediate), "key_ref": keys["intermediate"]},
        "crl_urls": list(ca.config.crl_urls),
        "ocsp_urls": list(ca.config.ocsp_urls),
        "root_crl_urls": list(ca.config.root_crl_urls),
    }


def _show(ca: CertificateAuthority) -> None:
    info = _describe(ca)
    rows: list[tuple[str, object]] = [
        ("trust domain", info["trust_domain"]),
        ("home", info["home"]),
        ("database", info["database"]),
        ("profiles", ", ".join(ca.config.profiles)),
        ("CRL URLs (leaves)", ", ".join(ca.config.crl_urls) or "none"),
        ("OCSP URLs (leaves)", ", ".join(ca.config.ocsp_urls) or "none"),
        ("root CRL URLs", ", ".join(ca.config.root_crl_urls) or "none"),
    ]
    for role in ("root", "intermediate"):
        cert = info[role]
        if not isinstance(cert, dict):  # pragma: no cover - shape fixed by _describe
            continue
        rows += [
            (f"{role} subject", cert["subject"]),
            (f"{role} key", cert["key"]),
            (f"{role} key is", _where(str(cert["key_ref"]))),
            (f"{role} SHA-256", cert["sha256"]),
            (f"{role} expires", cert["not_after"]),
        ]
    warnings = info["warnings"]
    if isinstance(warnings, list):
        rows += [("WARNING", w) for w in warnings]
    print_fields("trustmesh CA", rows)


@ca_group.command("show")
@home_option
@json_option
def show_command(home: Path | None, as_json: bool) -> None:
    """Show the trust domain, CA subjects, fingerprints and expiry."""
    with open_ca(home) as ca:
        if as_json:
            print_json(_describe(ca))
        else:
            _show(ca)


def _acme_settings(ca: CertificateAuthority) -> ACMEConfig:
    """Read [acme] from config.toml and say what ACME serves (and every default turned off)."""
    acme = load_acme_config(ca.home / CONFIG_NAME, ca.config)
    for name, provisioner in acme.provisioners.items():
        announce(
            f"ACME provisioner {name!r}: /acme/{name}/directory (profiles "
            f"{list(provisioner.profiles)}, challenges {list(provisioner.challenges)})",
            event="acme_provisioner",
            provisioner=name,
        )
        if not provisioner.eab_required:
            announce(
                f"warning: ACME provisioner {name!r} has eab_required = false: anyone who "
                f"reaches the CA and controls a name its profile allows gets a certificate.",
                event="acme_eab_off",
                level=logging.WARNING,
                provisioner=name,
            )
    return acme


@ca_group.command("serve")
@click.option(
    "--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT to listen on."
)
@click.option(
    "--ocsp-listen",
    default=None,
    help="Also serve OCSP (RFC 6960: POST /, GET /BASE64) and the CRLs (/crl, /crl/root "
    "DER; /crl/chain PEM) over plain HTTP on HOST:PORT, read-only, nothing else. nginx "
    "ssl_ocsp_responder and the URLs in leaves need it; the answers are signed.",
)
@click.option(
    "--admin",
    "admins",
    multiple=True,
    help="SPIFFE ID (or glob) that may revoke any certificate (repeatable; adds to "
    "'admins' in config.toml).",
)
@click.option(
    "--enroll-rate",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Enrollments per second allowed from one client address (token bucket refill).",
)
@click.option(
    "--enroll-burst",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Enrollments one client address may make at once before --enroll-rate applies. "
    "Raise both when many agents enroll through one NAT or load balancer.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=64),
    default=1,
    show_default=True,
    help="Worker processes serving the API (one per core the server has to itself; see "
    "docs/operations.md). "
    "They share the port, the store and the audit chain; the enrollment limits are "
    "split between them.",
)
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    default="json",
    show_default=True,
    help="JSON lines for log shippers, or text for people.",
)
@home_option
@passphrase_option
def serve_command(
    listen: str,
    ocsp_listen: str | None,
    admins: tuple[str, ...],
    enroll_rate: float,
    enroll_burst: int,
    workers: int,
    log_level: str,
    log_format: str,
    home: Path | None,
    passphrase_file: Path | None,
) -> None:
    """Run the CA's HTTPS API: bundle, enroll, renew, revoke, CRL and OCSP.

    The server presents a certificate the CA issues to itself (naming localhost
    and the listen address), so `curl --cacert bundle.pem` works.
    """
    from trustmesh.ca_server import parse_listen, serve

    parse_listen(listen)  # bad input fails before the passphrase is needed
    if ocsp_listen is not None:
        parse_listen(ocsp_listen)
        if ocsp_listen == listen:
            raise click.UsageError("--ocsp-listen must differ from --listen: give another port.")
    configure_logging(log_level, log_format)
    with open_ca(home, passphrase_file, sign=True) as ca:
        try:
            ca.root_crl(actor="ca-server")  # re-signed now when due, not on a request
        except ConfigError as exc:
            announce(
                f"warning: {exc.message} Until then /v1/crl/chain answers 503.",
                event="root_crl_unavailable",
                level=logging.WARNING,
            )
        announce(revocation_hint(ca.config), event="revocation_urls")
        acme = _acme_settings(ca)
        serve(
            ca,
            listen=listen,
            ocsp_listen=ocsp_listen,
            ocsp_ready=lambda url: announce(
                f"trustmesh OCSP and CRL (plain HTTP) listening on {url}",
                event="ready",
                url=url,
            ),
            admins=tuple(ca.config.admins) + admins,
            enroll_rate=enroll_rate,
            enroll_burst=enroll_burst,
            workers=workers,
            log_level=log_level,
            acme=acme,
            ready=lambda url: announce(
                f"trustmesh CA API listening on {url}", event="ready", url=url
            ),
        )
