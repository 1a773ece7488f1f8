"""``trustmesh inspect``: a readable summary of a certificate, chain, CSR, CRL or PKCS#12.

The parsing and summarising live in :mod:`trustmesh.pki` (``load_inspectable``,
``summarize_*``, ``check_chain``); this module reads the input, finds the trust
bundle and prints. Every value that comes from the input is printed as a Rich
``Text``, never as markup, so a subject such as ``O=[red]x`` or a fingerprint
containing ``:AB:`` prints as it is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import click
from cryptography import x509
from rich.table import Table
from rich.text import Text

from trustmesh.authority import CertificateAuthority
from trustmesh.errors import ConfigError, NotFoundError
from trustmesh.pki import (
    MAX_INSPECT_BYTES,
    BasicConstraintsSummary,
    CertificateSummary,
    ChainCheck,
    CRLSummary,
    CSRSummary,
    Inspectable,
    check_chain,
    crl_revocation_check,
    load_inspectable,
    relative_time,
    summarize_certificate,
    summarize_crl,
    summarize_csr,
)

from ._common import (
    get_console,
    home_option,
    json_option,
    print_json,
    read_secret,
    resolve_home,
)

_Fields = list[tuple[str, str]]


def _read_input(file: str) -> tuple[bytes, str]:
    if file == "-":
        return sys.stdin.buffer.read(MAX_INSPECT_BYTES + 1), "stdin"
    path = Path(file)
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise ConfigError(f"Cannot read {path}: {exc.strerror}.", path=str(path)) from None


def _password(path: Path | None, source: str) -> Callable[[], bytes]:
    def ask() -> bytes:
        try:
            return read_secret(
                path, "TRUSTMESH_P12_PASSWORD", what="store password", option="--password-file"
            )
        except ConfigError as exc:
            raise ConfigError(f"{source} is an encrypted PKCS#12 file. {exc.message}") from None

    return ask


class _Trust:
    """The trust bundle and revocation sources a chain is checked against."""

    def __init__(self) -> None:
        self.roots: tuple[x509.Certificate, ...] = ()
        self.ca_certs: list[x509.Certificate] = []  # may have signed a CRL
        self.intermediates: list[x509.Certificate] = []
        self.label: str | None = None
        self.missing = ""
        self.revocation: list[str] = []
        self.checks: list[Callable[[x509.Certificate], bool]] = []

    def is_revoked(self, cert: x509.Certificate) -> bool:
        return any(check(cert) for check in self.checks)


def _store_check(ca: CertificateAuthority) -> Callable[[x509.Certificate], bool]:
    def is_revoked(cert: x509.Certificate) -> bool:
        if not any(cert.issuer == c.subject for c in ca.issuers.intermediates):
            return False
        try:
            record = ca.store.get_certificate(format(cert.serial_number, "x"))
        except NotFoundError:
            return False
        return record.revoked_at is not None

    return is_revoked


def _bundle_certificates(path: Path, password: Callable[[], bytes]) -> list[x509.Certificate]:
    data, source = _read_input(str(path))
    certs = list(load_inspectable(data, source=source, password=password).certificates)
    if not certs:
        raise ConfigError(
            f"--bundle {path} holds no certificates: pass the CA's bundle.pem "
            f"(trustmesh export bundle).",
            path=str(path),
        )
    return certs


def _verdict(check: ChainCheck, trust: _Trust) -> dict[str, object]:
    return {**check, "bundle": trust.label, "revocation": trust.revocation}


def _unchecked(trust: _Trust) -> dict[str, object]:
    return {
        "checked": False,
        "trusted": None,
        "reason": "no_bundle",
        "message": trust.missing,
        "spiffe_id": None,
        "usage": None,
        "bundle": None,
        "revocation": [],
    }


# -- printing ------------------------------------------------------------------------


def _join(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "-"


def _constraints(bc: BasicConstraintsSummary | None) -> str:
    if bc is None:
        return "-"
    text = "CA:TRUE" if bc["ca"] else "CA:FALSE"
    if bc["path_length"] is not None:
        text += f", pathlen:{bc['path_length']}"
    return text + (" (critical)" if bc["critical"] else "")


def _validity(c: CertificateSummary) -> str:
    seconds = c["expires_in_seconds"]
    if c["status"] == "not_yet_valid":
        return "NOT YET VALID (check the clocks)"
    if c["status"] == "expired":
        return "EXPIRED, " + relative_time(seconds, past="expired", future="expires")
    return "valid, " + relative_time(seconds, past="expired", future="expires")


def _certificate_fields(c: CertificateSummary) -> _Fields:
    fields: _Fields = []
    if c["alias"] is not None:
        fields.append(("alias", c["alias"]))
    other_uris = [u for u in c["uris"] if u != c["spiffe_id"]]
    fields += [
        ("SPIFFE ID", c["spiffe_id"] or "-"),
        ("DNS", _join(c["dns"])),
        ("IP", _join(c["ips"])),
    ]
    if other_uris:
        fields.append(("URI", _join(other_uris)))
    if c["emails"]:
        fields.append(("email", _join(c["emails"])))
    fields += [
        ("subject", c["subject"] or "(empty)"),
        ("issuer", c["issuer"] + ("  (self-signed)" if c["self_signed"] else "")),
        ("serial (hex)", c["serial_hex"]),
        ("serial (openssl)", c["serial_hex_colons"]),
        ("serial (decimal)", c["serial_decimal"]),
        ("not before", c["not_before"]),
        ("not after", c["not_after"]),
        ("validity", _validity(c)),
        ("key", c["key"]),
        ("signature", c["signature_algorithm"]),
        ("basic constraints", _constraints(c["basic_constraints"])),
        ("key usage", _join(c["key_usage"])),
        ("extended key usage", _join(c["extended_key_usage"])),
        ("SHA-256 fingerprint", c["sha256_fingerprint"]),
        ("subject key id", c["subject_key_identifier"] or "-"),
        ("authority key id", c["authority_key_identifier"] or "-"),
        ("CRL distribution", _join(c["crl_distribution_points"])),
        ("OCSP", _join(c["ocsp_urls"])),
        ("CA issuers", _join(c["ca_issuers_urls"])),
    ]
    return fields


def _csr_fields(c: CSRSummary) -> _Fields:
    return [
        (
            "signature",
            f"{'valid' if c['signature_valid'] else 'INVALID'}, {c['signature_algorithm']}",
        ),
        ("SPIFFE ID", c["spiffe_id"] or "-"),
        ("URI", _join(c["uris"])),
        ("DNS", _join(c["dns"])),
        ("IP", _join(c["ips"])),
        ("subject", c["subject"] or "(empty)"),
        ("key", c["key"]),
        ("basic constraints", _constraints(c["basic_constraints"])),
        ("key usage", _join(c["key_usage"])),
        ("extended key usage", _join(c["extended_key_usage"])),
    ]


def _crl_fields(c: CRLSummary) -> _Fields:
    signature = {
        True: "verifies",
        False: "DOES NOT VERIFY",
        None: "not checked (its issuer is not in the bundle or the file)",
    }
    freshness = c["status"].upper() if c["status"] != "current" else c["status"]
    if c["next_update_in_seconds"] is not None:
        when = relative_time(
            c["next_update_in_seconds"], past="next update was due", future="next update"
        )
        freshness = f"{freshness}, {when}"
    fields: _Fields = [
        ("issuer", c["issuer"]),
        ("CRL number", "-" if c["crl_number"] is None else str(c["crl_number"])),
        ("this update", c["this_update"]),
        ("next update", c["next_update"] or "-"),
        ("freshness", freshness),
        ("signature", f"{signature[c['signature_valid']]}, {c['signature_algorithm']}"),
        ("authority key id", c["authority_key_identifier"] or "-"),
        ("SHA-256 fingerprint", c["sha256_fingerprint"]),
        ("revoked", str(c["revoked_count"])),
    ]
    for entry in c["revoked"]:
        fields.append(
            (
                "  serial",
                f"{entry['serial_hex']} ({entry['serial_decimal']}) at "
                f"{entry['revoked_at']}, {entry['reason'] or 'no reason'}",
            )
        )
    return fields


def _print_fields(title: str, fields: _Fields) -> None:
    # Text cells and title: the values come from the input and must not be markup.
    table = Table(title=Text(title, style="bold"), show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in fields:
        table.add_row(Text(key), Text(value))
    get_console().print(table)


def _print_verdict(verdict: dict[str, object]) -> None:
    line = Text("chain: ", style="bold")
    if verdict["trusted"] is True:
        line.append("TRUSTED", style="green bold")
    elif verdict["trusted"] is False:
        line.append(f"NOT TRUSTED ({verdict['reason']})", style="red bold")
    else:
        line.append("NOT CHECKED", style="yellow bold")
    line.append(f": {verdict['message']}")
    get_console().print(line, soft_wrap=True)
    if verdict["bundle"]:
        revocation = verdict["revocation"]
        checked = ", ".join(str(r) for r in revocation) if isinstance(revocation, list) else ""
        details = Text(f"  bundle: {verdict['bundle']}; revocation: {checked or 'not checked'}")
        get_console().print(details, soft_wrap=True)


def _print_human(
    result: dict[str, object],
    found: Inspectable,
    certs: list[CertificateSummary],
    csrs: list[CSRSummary],
    crls: list[CRLSummary],
    verdict: dict[str, object] | None,
) -> None:
    get_console().print(Text(f"{result['source']}: {found.kind} ({found.format})", style="bold"))
    if found.format == "pkcs12":
        key = "none"
        if found.has_private_key:
            matches = "matches" if found.key_matches_certificate else "DOES NOT MATCH"
            key = f"present, {matches} the first certificate"
        get_console().print(Text(f"private key: {key} (never printed)"))
    elif found.has_private_key:
        get_console().print(Text("a private key block was skipped (never printed)"))
    for i, cert in enumerate(certs, start=1):
        role = "CA" if cert["basic_constraints"] and cert["basic_constraints"]["ca"] else "leaf"
        _print_fields(f"certificate {i} of {len(certs)} ({role})", _certificate_fields(cert))
    for i, csr in enumerate(csrs, start=1):
        _print_fields(f"certificate request {i} of {len(csrs)}", _csr_fields(csr))
    for i, crl in enumerate(crls, start=1):
        _print_fields(f"revocation list {i} of {len(crls)}", _crl_fields(crl))
    if verdict is not None:
        _print_verdict(verdict)


# -- the command ---------------------------------------------------------------------


@click.command("inspect")
@click.argument("file", metavar="FILE|-")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the PKCS#12 password (default: $TRUSTMESH_P12_PASSWORD or a prompt).",
)
@click.option(
    "--bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Trust anchors to verify a chain against (default: the CA in --home, if any).",
)
@click.option(
    "--crl",
    "crl_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A CRL (PEM or DER) to check the chain's revocation against (repeatable).",
)
@home_option
@json_option
def inspect_command(
    file: str,
    password_file: Path | None,
    bundle: Path | None,
    crl_files: tuple[Path, ...],
    home: Path | None,
    as_json: bool,
) -> None:
    """Summarise FILE (or - for stdin): a certificate, chain, CSR, CRL or PKCS#12.

    The format (PEM, DER, PKCS#12 keystore or truststore) is detected from the
    content. A certificate or chain is verified against --bundle, or the trust
    bundle of the CA in --home, and revocation is checked against that CA's
    records and any --crl.
    """
    now = datetime.now(UTC)
    data, source = _read_input(file)
    found = load_inspectable(data, source=source, password=_password(password_file, source))

    trust = _Trust()
    ca: CertificateAuthority | None = None
    try:
        if bundle is not None:
            password = _password(password_file, str(bundle))
            trust.roots = tuple(_bundle_certificates(bundle, password))
            trust.ca_certs = list(trust.roots)
            trust.label = str(bundle)
        else:
            ca_home = resolve_home(home)
            if (ca_home / "config.toml").is_file():
                ca = CertificateAuthority.open(ca_home)
                trust.roots = ca.bundle
                # Every published intermediate (two while a rotation lasts), and the
                # cross certificates of a root rotation.
                trust.ca_certs = [*ca.chain_certificates, *ca.bundle]
                trust.intermediates = list(ca.chain_certificates)
                trust.label = f"the CA in {ca_home}"
                trust.revocation.append("the CA's records")
                trust.checks.append(_store_check(ca))
            else:
                trust.missing = (
                    f"no trust bundle: there is no CA in {ca_home}; pass --bundle FILE "
                    f"(or --home DIR) to verify the chain"
                )
        if crl_files:
            given: list[x509.CertificateRevocationList] = []
            for path in crl_files:
                crl_data, crl_source = _read_input(str(path))
                loaded = load_inspectable(crl_data, source=crl_source)
                if not loaded.crls:
                    raise ConfigError(f"--crl {path} holds no CRL.", path=str(path))
                given.extend(loaded.crls)
            issuers = [*found.certificates, *trust.ca_certs]
            trust.checks.append(crl_revocation_check(given, issuers))
            trust.revocation.extend(f"--crl {p}" for p in crl_files)

        verdict: dict[str, object] | None = None
        if found.certificates and found.kind != "truststore":
            if trust.roots:
                check = check_chain(
                    found.certificates,
                    trust.roots,
                    now=now,
                    intermediates=trust.intermediates,
                    is_revoked=trust.is_revoked,
                )
                verdict = _verdict(check, trust)
            else:
                verdict = _unchecked(trust)
    finally:
        if ca is not None:
            ca.close()

    certs = [
        summarize_certificate(c, now=now, alias=a)
        for c, a in zip(found.certificates, found.aliases, strict=True)
    ]
    csrs = [summarize_csr(c) for c in found.csrs]
    crl_issuers = [*found.certificates, *trust.ca_certs]
    crls = [summarize_crl(c, now=now, issuers=crl_issuers) for c in found.crls]
    result: dict[str, object] = {
        "source": source,
        "format": found.format,
        "type": found.kind,
        "certificates": certs,
        "csrs": csrs,
        "crls": crls,
        "private_key_present": found.has_private_key,
        "key_matches_certificate": found.key_matches_certificate,
        "ignored_blocks": list(found.ignored),
        "verification": verdict,
    }
    if as_json:
        print_json(result)
    else:
        _print_human(result, found, certs, csrs, crls, verdict)
