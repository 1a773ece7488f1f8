"""A workload's identity on disk: new keys and CSRs, checking and writing the files.

The directory holds ``key.pem`` (mode 0600), ``cert.pem`` (the leaf), ``chain.pem``
(leaf + intermediate) and ``bundle.pem`` (trust anchors). New files are all written to
temporary names first and renamed into place only when every one of them is complete,
so a reader never sees an empty or partial file.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from trustmesh.client import EnrollResult
from trustmesh.errors import (
    CertificateExpiredError,
    ClientError,
    ConfigError,
    PKIError,
    VerificationError,
)
from trustmesh.files import stage_file
from trustmesh.pki import (
    KeyType,
    PrivateKey,
    PublicKey,
    SpiffeID,
    dump_private_key,
    generate_private_key,
    load_private_key,
    signature_hash_for,
    spiffe_id_of,
    verify_chain,
)

from ._stores import PKCS12Stores

__all__ = [
    "IDENTITY_FILES",
    "LocalIdentity",
    "Unusable",
    "inspect_identity",
    "load_roots",
    "new_key_and_csr",
    "prepare_out",
    "replace_files",
    "write_identity",
]

#: The files the agent keeps in its output directory.
IDENTITY_FILES = ("key.pem", "cert.pem", "chain.pem", "bundle.pem")

_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


@dataclass(frozen=True, slots=True)
class LocalIdentity:
    """A valid identity found on disk.

    .. versionadded:: 0.1
    """

    spiffe_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    #: The certificate's DNS and IP SANs (IPs in canonical text form).
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unusable:
    """Why the files on disk are not a usable identity.

    Attributes:
        reason: One sentence naming what is missing or wrong.
        expired: The certificate is otherwise fine but expired (it cannot renew).
    """

    reason: str
    expired: bool = False


def new_key_and_csr(
    spiffe_id: SpiffeID,
    key_type: KeyType,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> tuple[PrivateKey, bytes]:
    """Generate a fresh key and a PEM CSR for the SPIFFE ID (the URI SAN, the identity),
    plus DNS and IP SANs for host-name checks.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``dns`` and ``ips``.
    """
    key = generate_private_key(key_type)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id.uri)]
    names += [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, spiffe_id.trust_domain)])
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, signature_hash_for(key))
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def load_roots(path: Path, *, what: str = "trust bundle") -> list[x509.Certificate]:
    """Read a PEM bundle of trust anchors.

    Raises:
        ConfigError: The file cannot be read or holds no PEM certificate.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"Cannot read the {what} {path}: {exc.strerror}. Pass the CA's root certificate "
            f"(from 'trustmesh export bundle') with --bundle.",
            path=str(path),
        ) from None
    try:
        roots = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"The {what} {path} holds no PEM certificate: pass the CA's root certificate "
            f"(from 'trustmesh export bundle') with --bundle.",
            path=str(path),
        ) from None
    return roots


def _public(key: PublicKey | CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(_DER, _SPKI)


def inspect_identity(
    out: Path,
    spiffe_id: SpiffeID,
    roots: Sequence[x509.Certificate],
    now: datetime,
) -> LocalIdentity | Unusable:
    """Return the identity in ``out`` when it is complete, consistent and valid at ``now``.

    Checks that key.pem, cert.pem and chain.pem exist and parse, that the chain starts
    with cert.pem, that the key belongs to it, that it carries ``spiffe_id`` and that
    it chains to ``roots`` and is within its validity period.

    .. versionadded:: 0.1
    """
    cert_path, chain_path, key_path = out / "cert.pem", out / "chain.pem", out / "key.pem"
    if not cert_path.exists():
        return Unusable(f"There is no certificate in {out}")
    try:
        leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
        chain = x509.load_pem_x509_certificates(chain_path.read_bytes())
        key = load_private_key(key_path.read_bytes(), source=str(key_path))
    except (OSError, ValueError, PKIError) as exc:
        why = exc.message if isinstance(exc, PKIError) else str(exc) or type(exc).__name__
        return Unusable(f"The identity files in {out} are incomplete or unreadable ({why})")
    serial = format(leaf.serial_number, "x")
    if not chain or chain[0] != leaf:
        return Unusable(f"{chain_path} does not start with {cert_path}")
    if _public(key.public_key()) != _public(leaf.public_key()):
        return Unusable(f"{key_path} is not the key of certificate {serial}")
    try:
        found = spiffe_id_of(leaf)
        if found != spiffe_id:
            return Unusable(f"The certificate in {out} is for {found}, not {spiffe_id}")
        verify_chain(leaf, chain[1:], roots, usage="client", now=now)
    except CertificateExpiredError as exc:
        return Unusable(
            f"The certificate {serial} in {out} is not valid now ({exc.message})",
            expired=exc.details.get("reason") == "expired",
        )
    except VerificationError as exc:
        return Unusable(f"The certificate {serial} in {out} does not verify ({exc.message})")
    dns, ips = _host_sans(leaf)
    return LocalIdentity(
        spiffe_id=found.uri,
        serial=serial,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        dns=dns,
        ips=ips,
    )


def _host_sans(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    dns = tuple(name.lower() for name in san.get_values_for_type(x509.DNSName))
    return dns, tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))


def _check_result(
    result: EnrollResult, key: PrivateKey, spiffe_id: SpiffeID, now: datetime
) -> None:
    try:
        leaf = x509.load_pem_x509_certificate(result.certificate.encode())
        chain = x509.load_pem_x509_certificates(result.chain.encode())
        roots = x509.load_pem_x509_certificates(result.bundle.encode())
    except ValueError:
        raise ClientError(
            "The CA's answer holds a certificate, chain or bundle that is not PEM; nothing "
            "was written. Check the CA's version and log."
        ) from None
    problem = None
    if not chain or chain[0] != leaf:
        problem = "the chain does not start with the certificate"
    elif _public(leaf.public_key()) != _public(key.public_key()):
        problem = "the certificate is not for the key we generated"
    else:
        try:
            found = spiffe_id_of(leaf)
            verify_chain(leaf, chain[1:], roots, usage="client", now=now)
            if found != spiffe_id:
                problem = f"the certificate is for {found}, not {spiffe_id}"
        except VerificationError as exc:
            problem = exc.message
    if problem is not None:
        raise ClientError(
            f"The CA's answer is not a usable identity ({problem}); nothing was written. "
            f"Check the CA's version and log."
        )


def prepare_out(out: Path) -> None:
    """Create ``out`` if needed and check that the agent may write there.

    Raises:
        ConfigError: It cannot be created or written.

    .. versionadded:: 0.1
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"Cannot create {out}: {exc.strerror}. Pass an --out directory the agent may write.",
            path=str(out),
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(
            f"Cannot write to {out}: permission denied. Pass an --out directory the agent "
            f"may write.",
            path=str(out),
        )


def replace_files(files: Sequence[tuple[Path, bytes, int]], *, what: str) -> list[Path]:
    """Write ``(path, data, mode)`` entries so that no reader sees a partial file.

    Every file is first written in full to a temporary name beside it (with its mode
    from the start), then all are renamed into place in the given order. A failure
    before the first rename leaves every previous file in place; temporary files are
    always removed.

    Returns:
        The files written.

    Raises:
        ConfigError: A file cannot be written (naming it and what is in place).

    .. versionadded:: 0.1
    """
    staged: list[tuple[Path, Path]] = []
    renamed = 0
    try:
        for final, data, mode in files:
            staged.append((stage_file(final, data, mode=mode), final))
        for tmp, final in staged:
            os.replace(tmp, final)
            renamed += 1
    except (OSError, ConfigError) as exc:  # disk full, read-only file system...
        # the file being staged, or else the one being renamed
        where = files[len(staged)][0] if len(staged) < len(files) else staged[renamed][1]
        state = (
            "the previous files are still in place"
            if not renamed
            else "some files were replaced: run the agent again"
        )
        if isinstance(exc, ConfigError):  # stage_file's own message names the fix
            message = f"{exc.message.rstrip('.')}; {state}."
        else:
            message = (
                f"Cannot write the {what} ({where}): {exc.strerror or exc}. Free space or fix "
                f"the permissions; {state}."
            )
        raise ConfigError(message, path=str(where)) from None
    finally:
        for tmp, _ in staged[renamed:]:  # left over only when a write or rename failed
            with contextlib.suppress(OSError):
                tmp.unlink()
    return [final for _, final in staged]


def write_identity(
    out: Path,
    key: PrivateKey,
    result: EnrollResult,
    spiffe_id: SpiffeID,
    now: datetime,
    *,
    stores: PKCS12Stores | None = None,
) -> list[Path]:
    """Check what the CA returned, then write the four files (and ``stores``) atomically.

    Every file is first written in full to a temporary name (the key with mode 0600
    from the start), then all are renamed into place: the PEM files first, then the
    PKCS#12 keystore and truststore when ``stores`` is given.

    Returns:
        The files written.

    Raises:
        ClientError: The answer is not a certificate for this key and identity that
            chains to its bundle; nothing is written.
        ConfigError: ``out`` cannot be created or written.

    .. versionadded:: 0.1
    """
    _check_result(result, key, spiffe_id, now)
    prepare_out(out)
    extra = []
    if stores is not None:
        chain = x509.load_pem_x509_certificates(result.chain.encode())
        extra = stores.render(key, chain, x509.load_pem_x509_certificates(result.bundle.encode()))
    files = [
        (out / "bundle.pem", result.bundle.encode(), 0o644),
        (out / "key.pem", dump_private_key(key), 0o600),
        (out / "cert.pem", result.certificate.encode(), 0o644),
        (out / "chain.pem", result.chain.encode(), 0o644),
        *extra,
    ]
    return replace_files(files, what="identity files")
