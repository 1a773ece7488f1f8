"""The offline root: its key lives on another machine and signs only there.

Two halves, run on two machines (the runbook is docs/hsm.md):

- On the offline machine, a *root directory* (``root.pem``, ``root.key`` encrypted
  with the passphrase or a PKCS#11 URI in ``root.json``) made by
  :func:`create_offline_root`; it signs the online intermediate's CSR
  (:func:`sign_intermediate_request`) and the root CRL (:func:`sign_offline_root_crl`).
- On the online CA, :func:`create_intermediate_request` makes the intermediate key
  (a file or in a token) and its CSR and remembers them in ``intermediate-request.json``;
  :meth:`trustmesh.authority.CertificateAuthority.import_intermediate` then checks
  the signed intermediate against that request and the root, and creates the CA with
  no root key on disk.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from trustmesh.errors import ConfigError, PKIError
from trustmesh.files import atomic_write
from trustmesh.hsm import PKCS11URI, check_token, generate_pkcs11_key
from trustmesh.pki import (
    BACKDATE,
    KeyType,
    PrivateKey,
    PublicKey,
    RevokedEntry,
    SpiffeID,
    build_crl,
    create_intermediate,
    create_root,
    dump_private_key,
    generate_private_key,
    load_csr,
    load_pem_certificates,
    signature_hash_for,
)
from trustmesh.signers import FileSigner, Signer, open_signer

__all__ = [
    "REQUEST_NAME",
    "IntermediateRequest",
    "OfflineRoot",
    "check_imported_intermediate",
    "check_root_crl",
    "create_intermediate_request",
    "create_offline_root",
    "crl_distribution_urls",
    "sign_intermediate_request",
    "sign_offline_root_crl",
]

#: The pending intermediate request ``ca csr`` leaves in TRUSTMESH_HOME.
REQUEST_NAME = "intermediate-request.json"
_ROOT_META = "root.json"


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def trust_domain_of(cert: x509.Certificate) -> str:
    """The trust domain a trustmesh CA certificate names (its ``O=``)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if not attrs:
        raise ConfigError(
            f"{cert.subject.rfc4514_string()} names no trust domain (O=): it is not a "
            f"trustmesh CA certificate."
        )
    return str(attrs[0].value)


def crl_distribution_urls(cert: x509.Certificate) -> tuple[str, ...]:
    """The CRL distribution point URLs of ``cert`` (where its issuer's CRL is)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(
        str(n.value)
        for dp in ext
        for n in dp.full_name or ()
        if isinstance(n, x509.UniformResourceIdentifier)
    )


# -- online half ----------------------------------------------------------------------


@dataclass(frozen=True)
class IntermediateRequest:
    """What ``ca csr`` created: the intermediate key's reference and its CSR."""

    trust_domain: str
    key_type: KeyType
    key_ref: str
    csr: x509.CertificateSigningRequest
    pkcs11: str = ""

    def save(self, home: Path) -> None:
        data = {
            "trust_domain": self.trust_domain,
            "key_type": self.key_type.value,
            "key_ref": self.key_ref,
            "pkcs11": self.pkcs11,
            "csr": self.csr.public_bytes(serialization.Encoding.PEM).decode(),
        }
        atomic_write(home / REQUEST_NAME, json.dumps(data, indent=2).encode(), mode=0o600)

    @classmethod
    def load(cls, home: Path) -> IntermediateRequest:
        """Read the pending request in ``home``.

        Raises:
            ConfigError: There is none (``ca csr`` was not run there) or it is damaged.
        """
        path = home / REQUEST_NAME
        try:
            data = json.loads(path.read_text())
            return cls(
                trust_domain=str(data["trust_domain"]),
                key_type=KeyType.parse(str(data["key_type"])),
                key_ref=str(data["key_ref"]),
                csr=load_csr(str(data["csr"]).encode(), source=str(path)),
                pkcs11=str(data.get("pkcs11", "")),
            )
        except FileNotFoundError:
            raise ConfigError(
                f"No intermediate request in {home}: run 'trustmesh ca csr --trust-domain "
                f"DOMAIN --out intermediate.csr' there first (docs/hsm.md).",
                path=str(path),
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is damaged ({exc}): run 'trustmesh ca csr' again.") from None

    def done(self, home: Path) -> None:
        (home / REQUEST_NAME).unlink(missing_ok=True)

    def signer(self, home: Path, passphrase: bytes | None) -> Signer:
        return open_signer(
            self.key_ref, home=home, key_pem=None, passphrase=passphrase, what="the intermediate"
        )


def _csr_for(key: PrivateKey, trust_domain: str) -> x509.CertificateSigningRequest:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "trustmesh Intermediate CA"),
        ]
    )
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(SpiffeID.trust_domain_id(trust_domain).uri)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, signature_hash_for(key))
    )


def create_intermediate_request(
    home: Path,
    *,
    trust_domain: str,
    key_type: KeyType,
    passphrase: bytes | None,
    pkcs11: str | None = None,
    now: datetime | None = None,
) -> IntermediateRequest:
    """Make the online intermediate's key (a file or in a token) and its CSR.

    Raises:
        ConfigError: A CA or a request exists in ``home``, the trust domain is
            invalid, no passphrase (file key), or the token cannot be used.
    """
    from trustmesh.config import CONFIG_NAME

    SpiffeID.trust_domain_id(trust_domain)
    for name in (CONFIG_NAME, REQUEST_NAME, "intermediate.key", "root.key"):
        if (home / name).exists():
            raise ConfigError(
                f"{home / name} exists: a CA or an intermediate request is already in "
                f"{home}; refusing to overwrite it. Use another TRUSTMESH_HOME, or finish "
                f"with 'trustmesh ca init --import-intermediate'.",
                path=str(home / name),
            )
    token = PKCS11URI.parse(pkcs11) if pkcs11 else None
    if token is None and not passphrase:
        raise ConfigError(
            "The CA passphrase is empty: set TRUSTMESH_CA_PASSPHRASE or pass "
            "--passphrase-file to protect intermediate.key."
        )
    if token is not None:
        check_token(token)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if token is not None:
        stamp = f"{_now(now):%Y%m%d%H%M%S}"
        signer: Signer = generate_pkcs11_key(
            token, key_type, f"{token.object or 'trustmesh'}-intermediate-1-{stamp}"
        )
        key = signer.private_key()
        ref = signer.ref
        base = str(replace(token, id=None))
    else:
        assert passphrase  # noqa: S101 - checked above (mypy narrowing only)
        key = generate_private_key(key_type)
        atomic_write(home / "intermediate.key", dump_private_key(key, passphrase), mode=0o600)
        ref, base = "file:intermediate.key", ""
    request = IntermediateRequest(trust_domain, key_type, ref, _csr_for(key, trust_domain), base)
    request.save(home)
    return request


def check_imported_intermediate(
    request: IntermediateRequest,
    inter: x509.Certificate,
    root: x509.Certificate,
    *,
    now: datetime | None = None,
) -> None:
    """Check the intermediate the offline root signed before the CA uses it.

    Raises:
        ConfigError: Not for the request's key, not a CA of its trust domain, not
            signed by ``root``, ``root`` not self-signed, or either not valid now.
    """
    at = _now(now)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if inter.public_key().public_bytes(der, spki) != request.csr.public_key().public_bytes(
        der, spki
    ):
        raise ConfigError(
            "The intermediate certificate is not for the key of this CA's request: import "
            "the certificate signed for the CSR 'trustmesh ca csr' wrote here."
        )
    for cert, what in ((root, "root"), (inter, "intermediate")):
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise ConfigError(f"The {what} certificate is not a CA certificate.")
        if trust_domain_of(cert) != request.trust_domain:
            raise ConfigError(
                f"The {what} certificate is for trust domain {trust_domain_of(cert)!r}, the "
                f"request for {request.trust_domain!r}: sign with the root of that domain."
            )
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise ConfigError(
                f"The {what} certificate is not valid now ({cert.not_valid_before_utc:%Y-%m-%d} "
                f"to {cert.not_valid_after_utc:%Y-%m-%d}): check the clocks or sign again."
            )
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no message
        raise ConfigError(
            f"--root-cert is not a self-signed root ({type(exc).__name__}): give the root.pem "
            f"of the offline root directory."
        ) from None
    try:
        inter.verify_directly_issued_by(root)
    except (ValueError, TypeError, Exception) as exc:
        raise ConfigError(
            f"The intermediate is not signed by --root-cert ({type(exc).__name__}): give the "
            f"root that signed it."
        ) from None


def check_root_crl(
    crl: x509.CertificateRevocationList, root: x509.Certificate, *, now: datetime | None = None
) -> None:
    """Check a root CRL signed offline before it is served.

    Raises:
        ConfigError: Not signed by ``root`` or already past its nextUpdate.
    """
    if crl.issuer != root.subject or not crl.is_signature_valid(
        root.public_key()  # type: ignore[arg-type]
    ):
        raise ConfigError(
            "The root CRL is not signed by this CA's root: sign it with 'trustmesh ca root "
            "sign-crl' in the offline root directory of this CA."
        )
    nxt = crl.next_update_utc
    if nxt is not None and _now(now) >= nxt:
        raise ConfigError(
            f"The root CRL expired at {nxt:%Y-%m-%dT%H:%M:%SZ}: sign a fresh one with "
            f"'trustmesh ca root sign-crl'."
        )


# -- offline half ---------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineRoot:
    """A root directory on the offline machine."""

    directory: Path
    certificate: x509.Certificate
    key_ref: str

    @classmethod
    def load(cls, directory: Path) -> OfflineRoot:
        """Open a root directory made by ``trustmesh ca root init``.

        Raises:
            ConfigError: It is not one.
        """
        try:
            meta = json.loads((directory / _ROOT_META).read_text())
            cert = load_pem_certificates((directory / "root.pem").read_bytes())[0]
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{directory} is not an offline root directory ({Path(exc.filename).name} "
                f"is missing): give the --out of 'trustmesh ca root init'.",
                path=str(directory),
            ) from None
        except (ValueError, PKIError) as exc:
            raise ConfigError(f"{directory}: damaged root directory ({exc}).") from None
        return cls(directory, cert, str(meta["key_ref"]))

    def signer(self, passphrase: bytes | None) -> Signer:
        if self.key_ref.startswith("file:"):
            return FileSigner(self.directory / self.key_ref.removeprefix("file:"), passphrase)
        return open_signer(
            self.key_ref,
            home=self.directory,
            key_pem=None,
            passphrase=passphrase,
            what="the offline root",
        )


def create_offline_root(
    directory: Path,
    *,
    trust_domain: str,
    key_type: KeyType,
    passphrase: bytes | None,
    pkcs11: str | None = None,
    lifetime: timedelta = timedelta(days=3650),
    now: datetime | None = None,
) -> OfflineRoot:
    """Create the root key and certificate in ``directory`` (on the offline machine).

    Raises:
        ConfigError: The directory holds a root already, bad trust domain, no
            passphrase (file key), or the token cannot be used.
    """
    SpiffeID.trust_domain_id(trust_domain)
    for name in ("root.pem", "root.key", _ROOT_META):
        if (directory / name).exists():
            raise ConfigError(
                f"{directory / name} exists; refusing to overwrite an offline root. Use "
                f"another --out.",
                path=str(directory / name),
            )
    token = PKCS11URI.parse(pkcs11) if pkcs11 else None
    if token is None and not passphrase:
        raise ConfigError(
            "The root passphrase is empty: set TRUSTMESH_CA_PASSPHRASE or pass "
            "--passphrase-file to protect root.key."
        )
    if token is not None:
        check_token(token)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    at = _now(now)
    if token is not None:
        signer = generate_pkcs11_key(
            token, key_type, f"{token.object or 'trustmesh'}-root-1-{at:%Y%m%d%H%M%S}"
        )
        key, ref = signer.private_key(), signer.ref
    else:
        assert passphrase  # noqa: S101 - checked above (mypy narrowing only)
        key, ref = generate_private_key(key_type), "file:root.key"
    cert = create_root(key, trust_domain, lifetime=lifetime, now=at)
    if token is None:
        atomic_write(directory / "root.key", dump_private_key(key, passphrase), mode=0o600)
    atomic_write(directory / "root.pem", cert.public_bytes(serialization.Encoding.PEM))
    meta = {"trust_domain": trust_domain, "key_type": key_type.value, "key_ref": ref}
    atomic_write(directory / _ROOT_META, json.dumps(meta, indent=2).encode())
    return OfflineRoot(directory, cert, ref)


def sign_intermediate_request(
    root: OfflineRoot,
    csr_pem: bytes,
    *,
    passphrase: bytes | None,
    lifetime: timedelta = timedelta(days=365),
    root_crl_urls: Sequence[str] = (),
    generation: int = 1,
    now: datetime | None = None,
    source: str = "CSR",
) -> x509.Certificate:
    """Sign the online intermediate for the key of ``csr_pem`` (the subject is ours).

    Raises:
        ConfigError: The CSR is badly signed or for another trust domain; the key
            cannot be unlocked.
    """
    try:
        csr = load_csr(csr_pem, source=source)
    except PKIError as exc:
        raise ConfigError(exc.message) from None
    if not csr.is_signature_valid:
        raise ConfigError(f"{source}: the CSR's signature does not verify: make it again.")
    domain = trust_domain_of(root.certificate)
    asked = csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if asked and str(asked[0].value) != domain:
        raise ConfigError(
            f"{source} asks for trust domain {asked[0].value!r}, this root is for "
            f"{domain!r}: sign it with that domain's root."
        )
    try:
        key = root.signer(passphrase).private_key()
    except PKIError as exc:
        raise ConfigError(exc.message) from None
    public = csr.public_key()
    if not isinstance(public, PublicKey):
        raise ConfigError(f"{source}: the CSR's key type is not supported for a CA.")
    return create_intermediate(
        root.certificate,
        key,
        public,
        domain,
        lifetime=lifetime,
        now=now,
        crl_urls=root_crl_urls,
        backdate=BACKDATE,
        generation=generation,
    )


def sign_offline_root_crl(
    root: OfflineRoot,
    *,
    passphrase: bytes | None,
    revoked: Sequence[x509.Certificate] = (),
    lifetime: timedelta = timedelta(days=30),
    now: datetime | None = None,
) -> x509.CertificateRevocationList:
    """Sign the root CRL of the intermediates (``revoked``: retired ones, superseded).

    Raises:
        ConfigError: The key cannot be unlocked, or a certificate is not the root's.
    """
    at = _now(now)
    for cert in revoked:
        if cert.issuer != root.certificate.subject:
            raise ConfigError(
                f"{cert.subject.rfc4514_string()} is not issued by this root: list only its "
                f"intermediates."
            )
    try:
        key = root.signer(passphrase).private_key()
    except PKIError as exc:
        raise ConfigError(exc.message) from None
    entries = [RevokedEntry(c.serial_number, at, "superseded") for c in revoked]
    return build_crl(
        root.certificate, key, entries, number=int(at.timestamp()), now=at, lifetime=lifetime
    )
