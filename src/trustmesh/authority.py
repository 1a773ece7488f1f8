"""The certificate authority: PKI + store + audit.

:class:`CertificateAuthority` owns the CA files in ``TRUSTMESH_HOME`` (root and
intermediate certificates, their encrypted keys, ``config.toml``) and the
database. Every operation that hands something out records it and appends an
audit event in the same transaction, and only then returns it.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509 import ocsp
from sqlalchemy import Connection

from trustmesh.audit import AuditEvent, AuditReport
from trustmesh.audit import verify_chain as verify_audit_chain
from trustmesh.config import CONFIG_NAME, CAConfig
from trustmesh.errors import (
    CertificateRevokedError,
    ConfigError,
    ConflictError,
    CSRError,
    NotFoundError,
    PKIError,
    PolicyError,
    ScopeError,
    TokenError,
)
from trustmesh.files import atomic_write, stage_file
from trustmesh.hsm import PKCS11URI, check_token, generate_pkcs11_key
from trustmesh.offline import (
    IntermediateRequest,
    check_imported_intermediate,
    check_root_crl,
    crl_distribution_urls,
)
from trustmesh.pki import (
    BACKDATE,
    KeyType,
    LeafRequest,
    OCSPStatus,
    PrivateKey,
    Profile,
    RevokedEntry,
    SANAllowance,
    SpiffeID,
    build_crl,
    build_ocsp_response,
    check_backdate,
    check_csr,
    create_intermediate,
    create_root,
    describe_key,
    dump_private_key,
    fingerprint,
    format_duration,
    generate_private_key,
    issue_leaf,
    key_type_of,
    load_private_key,
    match_spiffe_pattern,
    parse_reason,
    parse_selector,
    request_matches_issuer,
    verify_chain,
)
from trustmesh.rotation import (
    Issuer,
    IssuerSet,
    RotationStatus,
    StepResult,
    current_version,
    initial_issuers,
    load_issuer_set,
    rotation_status,
    store_initial_issuers,
)
from trustmesh.rotation import activate as _activate
from trustmesh.rotation import prepare as _prepare
from trustmesh.rotation import retire as _retire
from trustmesh.signers import OFFLINE_KEY_REF, Signer, open_signer
from trustmesh.store import (
    CertificateRecord,
    RegistrationEntry,
    RevocationEvent,
    Store,
    add_entry,
    add_join_token,
    consume_join_token,
    delete_entry,
    find_entries,
    get_entry,
    open_store,
)

__all__ = [
    "CA_FILES",
    "ROOT_CRL_NAME",
    "CertificateAuthority",
    "Issued",
    "IssuerExpiry",
    "default_actor",
    "default_home",
]

#: Files ``ca init`` creates in TRUSTMESH_HOME, and their modes.
CA_FILES = {
    "root.pem": 0o644,
    "root.key": 0o600,
    "intermediate.pem": 0o644,
    "intermediate.key": 0o600,
}
#: The root-signed CRL of the intermediates, kept in TRUSTMESH_HOME (DER).
ROOT_CRL_NAME = "root.crl"
_SERIAL_ATTEMPTS = 5
#: Join tokens look like ``tmj_...`` so secret scanners and people recognise them.
JOIN_TOKEN_PREFIX = "tmj_"  # noqa: S105 - a prefix, not a secret
DEFAULT_TOKEN_TTL = timedelta(minutes=15)
#: The JWT-SVID signing key (EC P-256, ES256), encrypted like the CA keys; made on first use.
JWT_KEY_FILE = "jwt-svid.key"
#: Lifetime of a JWT-SVID: short, as they are bearer tokens.
JWT_SVID_TTL = timedelta(minutes=5)
MAX_JWT_AUDIENCES = 10
MAX_TOKEN_TTL = timedelta(days=7)

log = logging.getLogger("trustmesh.authority")

#: How many callers' verified chains :meth:`CertificateAuthority.verify_caller` keeps.
CHAIN_CACHE_SIZE = 4096


@dataclass(frozen=True)
class _VerifiedChain:
    """A client certificate whose chain verified, and what that verification relied on."""

    spiffe_id: SpiffeID
    valid_from: datetime  # the latest notBefore along the chain
    valid_until: datetime  # the earliest notAfter along the chain
    issuers: IssuerSet  # the snapshot it was verified against (a rotation replaces it)


class _ChainCache:
    """Verified client chains by certificate (hashed and compared by DER), LRU-bounded.

    Only the signatures, EKU and SPIFFE ID checks are remembered; the time window is
    re-checked and the revocation status looked up on every use, and an entry counts
    only for the issuer snapshot it was verified against (a rotation misses).
    """

    def __init__(self, size: int = CHAIN_CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[x509.Certificate, _VerifiedChain] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, cert: x509.Certificate) -> _VerifiedChain | None:
        with self._lock:
            entry = self._entries.get(cert)
            if entry is not None:
                self._entries.move_to_end(cert)
            return entry

    def put(self, cert: x509.Certificate, entry: _VerifiedChain) -> None:
        with self._lock:
            self._entries[cert] = entry
            self._entries.move_to_end(cert)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def _root_crl_urls(crl_urls: Sequence[str]) -> tuple[str, ...]:
    """Where ``ca serve`` publishes the root CRL, next to each leaf CRL URL ending in /crl."""
    return tuple(f"{u}/root" for u in crl_urls if u.rstrip("/").endswith("/crl"))


def _same_key(a: object, b: object) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(
        getattr(a, "public_bytes")(der, spki) == getattr(b, "public_bytes")(der, spki)  # noqa: B009
    )


def _refuse_existing(home: Path, *, allow: Sequence[str] = ()) -> None:
    names = (CONFIG_NAME, *CA_FILES)
    existing = [n for n in names if n not in allow and (home / n).exists()]
    if existing:
        raise ConfigError(
            f"A CA already exists in {home} ({', '.join(existing)}); refusing to "
            f"overwrite it. Use another TRUSTMESH_HOME or remove the directory.",
            path=str(home),
        )


def default_home() -> Path:
    """Return ``$TRUSTMESH_HOME`` or ``~/.trustmesh``."""
    return Path(os.environ.get("TRUSTMESH_HOME") or Path.home() / ".trustmesh")


def default_actor() -> str:
    """Return ``cli:USER@HOST``: who acts, for audit events."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Issued:
    """A certificate the CA handed out.

    Attributes:
        certificate: The leaf.
        chain: Leaf followed by the intermediate.
        bundle: Trust anchors (the root).
        record: What the store recorded.
        key: The generated private key (``issue`` only; never stored).
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    bundle: tuple[x509.Certificate, ...]
    record: CertificateRecord
    key: PrivateKey | None = None


#: Warn when the intermediate has less than this much of its life left (or one third).
INTERMEDIATE_EXPIRY_WARNING = timedelta(days=30)
#: Warn when the root has less than this left.
ROOT_EXPIRY_WARNING = timedelta(days=365)


@dataclass(frozen=True)
class IssuerExpiry:
    """How long one of the CA's own certificates has left, and a warning when too little.

    Attributes:
        role: ``root`` or ``intermediate``.
        not_after: When it expires.
        seconds_left: Seconds until then (negative once expired).
        lifetime: Its whole validity in seconds.
        warning: One line for people and logs, or None while there is time.

    .. versionadded:: 0.1
    """

    role: str
    not_after: datetime
    seconds_left: float
    lifetime: float
    warning: str | None

    @classmethod
    def of(cls, role: str, cert: x509.Certificate, now: datetime) -> IssuerExpiry:
        """Return the expiry of ``cert`` in ``role`` at ``now``.

        The intermediate warns with less than a third of its life or 30 days left;
        the root with less than a year.
        """
        not_after = cert.not_valid_after_utc
        left = not_after - now
        lifetime = not_after - cert.not_valid_before_utc
        days = left.total_seconds() / 86400
        when = not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        warning = None
        if left.total_seconds() <= 0:
            warning = (
                f"The {role} CA certificate expired at {when}: nothing it signed verifies; "
                f"replace the CA (see docs/operations.md)."
            )
        elif role == "root" and left < ROOT_EXPIRY_WARNING:
            warning = (
                f"The root CA certificate expires in {days:.0f} days ({when}); plan the "
                f"root rotation now: every relying party must receive the new root first."
            )
        elif role != "root" and (left < INTERMEDIATE_EXPIRY_WARNING or left < lifetime / 3):
            warning = (
                f"The {role} CA certificate expires in {days:.1f} days ({when}, "
                f"{left / lifetime:.0%} of its life left); rotate it before then, or every "
                f"certificate it signs stops verifying."
            )
        return cls(role, not_after, left.total_seconds(), lifetime.total_seconds(), warning)


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).replace(microsecond=0)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign_root_crl(
    root: x509.Certificate,
    root_key: PrivateKey,
    at: datetime,
    lifetime: timedelta,
    entries: Sequence[RevokedEntry] = (),
) -> x509.CertificateRevocationList:
    # Lists revoked intermediates: the ones a rotation retired (reason superseded). The
    # CRL number is the signing time in seconds: it increases without a database
    # counter, so an offline root host can sign it too.
    return build_crl(
        root, root_key, list(entries), number=int(at.timestamp()), now=at, lifetime=lifetime
    )


def _crl_serials(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


def _resign_at(crl: x509.CertificateRevocationList) -> datetime:
    """Half-way between thisUpdate and nextUpdate: when a root CRL is signed again."""
    this = crl.last_update_utc
    return this + ((crl.next_update_utc or this) - this) / 2


def _serial_hex(serial: int) -> str:
    return format(serial, "x")


class CertificateAuthority:
    """A CA loaded from ``home``; see :meth:`init` and :meth:`open`.

    Args:
        home: The directory holding the CA files.
        config: Its configuration.
        store: The open store.
        passphrase: Unlocks the intermediate key; None for read-only use.
    """

    def __init__(
        self, home: Path, config: CAConfig, store: Store, passphrase: bytes | None
    ) -> None:
        self.home = home
        self.config = config
        self.store = store
        self._passphrase = passphrase
        self._signers: dict[str, Signer] = {}
        self._root_crls: dict[str, x509.CertificateRevocationList] = {}
        self._issuers: IssuerSet = load_issuer_set(home, store)
        self._jwt_key: ec.EllipticCurvePrivateKey | None = None
        self._jwt_lock = threading.Lock()
        self._chains = _ChainCache()

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        home: Path,
        *,
        trust_domain: str,
        passphrase: bytes | None,
        key_type: KeyType = KeyType.EC_P256,
        db_url: str | None = None,
        actor: str | None = None,
        now: datetime | None = None,
        crl_urls: Sequence[str] = (),
        ocsp_urls: Sequence[str] = (),
        root_crl_urls: Sequence[str] | None = None,
        backdate: timedelta = BACKDATE,
        pkcs11: str | None = None,
    ) -> CertificateAuthority:
        """Create a root and an intermediate CA in ``home``, and the root-signed CRL.

        Args:
            crl_urls: Public URLs of the leaf CRL, written into every leaf (CDP).
            ocsp_urls: Public URLs of the OCSP responder, written into every leaf (AIA).
            root_crl_urls: Public URLs of the root-signed CRL, written into the
                intermediate (CDP). None: ``URL/root`` for each ``crl_urls`` entry
                that ends in ``/crl`` (the layout of ``ca serve --ocsp-listen``).
            pkcs11: A PKCS#11 token URI (RFC 7512): both keys are generated in the
                token (non-extractable) and no key file is written; ``passphrase``
                may then be None.

        ``backdate`` (0 to 10 minutes) is written to ``config.toml`` and used for the CA
        certificates and every certificate issued later.

        Raises:
            ConfigError: A CA already exists there, the trust domain is invalid,
                the passphrase is empty, the token cannot be used (wrong PIN, no
                such token), or the database cannot be reached.

        .. versionchanged:: 0.3
           ``pkcs11``.
        """
        _refuse_existing(home)
        token = PKCS11URI.parse(pkcs11) if pkcs11 else None
        if not passphrase and token is None:
            raise ConfigError(
                "The CA passphrase is empty: set TRUSTMESH_CA_PASSPHRASE or pass "
                "--passphrase-file with a non-empty passphrase."
            )
        SpiffeID.trust_domain_id(trust_domain)  # validates
        check_backdate(backdate)
        roots_at = _root_crl_urls(crl_urls) if root_crl_urls is None else tuple(root_crl_urls)
        url = db_url or f"sqlite:///{home / 'trustmesh.db'}"
        config = CAConfig.new(
            trust_domain,
            url,
            key_type,
            crl_urls=tuple(crl_urls),
            ocsp_urls=tuple(ocsp_urls),
            root_crl_urls=roots_at,
            backdate=backdate,
            pkcs11=str(replace(token, object=token.object, id=None)) if token else "",
        )  # checks the URLs before anything is created
        if token is not None:
            check_token(token)  # a wrong PIN or token fails before anything is created
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = open_store(url)  # fail on a bad database before writing any file
        start = _now(now)
        files: dict[str, bytes] = {}
        refs: dict[str, str] = {}
        try:
            if token is None:
                root_key = generate_private_key(key_type)
                inter_key = generate_private_key(key_type)
            else:
                base = token.object or "trustmesh"
                stamp = f"{start:%Y%m%d%H%M%S}"
                root_signer = generate_pkcs11_key(token, key_type, f"{base}-root-1-{stamp}")
                inter_signer = generate_pkcs11_key(
                    token, key_type, f"{base}-intermediate-1-{stamp}"
                )
                root_key, inter_key = root_signer.private_key(), inter_signer.private_key()
                refs = {"root": root_signer.ref, "intermediate": inter_signer.ref}
        except BaseException:
            store.close()
            raise
        root = create_root(root_key, trust_domain, now=start, backdate=backdate)
        inter = create_intermediate(
            root,
            root_key,
            inter_key,
            trust_domain,
            now=start,
            crl_urls=config.root_crl_urls,
            backdate=backdate,
        )
        if token is None:
            assert passphrase  # noqa: S101 - checked above (mypy narrowing only)
            files["root.key"] = dump_private_key(root_key, passphrase)
            files["intermediate.key"] = dump_private_key(inter_key, passphrase)
        root_crl = _sign_root_crl(root, root_key, start, config.root_crl_lifetime)
        return cls._create(
            home,
            config,
            store,
            root=root,
            inter=inter,
            key_files=files,
            root_crl=root_crl,
            refs=refs,
            actor=actor,
            at=start,
            details={"key_type": key_type.value, **({"keys": "pkcs11"} if token else {})},
            passphrase=passphrase,
        )

    @classmethod
    def import_intermediate(
        cls,
        home: Path,
        *,
        intermediate: x509.Certificate,
        root: x509.Certificate,
        root_crl: x509.CertificateRevocationList | None = None,
        passphrase: bytes | None = None,
        db_url: str | None = None,
        actor: str | None = None,
        now: datetime | None = None,
        crl_urls: Sequence[str] = (),
        ocsp_urls: Sequence[str] = (),
        backdate: timedelta = BACKDATE,
    ) -> CertificateAuthority:
        """Finish an offline-root CA: the intermediate the offline root signed for the
        request :func:`trustmesh.offline.create_intermediate_request` left in ``home``.

        No root key is on this machine: the root's ``key_ref`` is ``offline``, and
        the root-signed CRL (``root_crl``, signed offline) is re-signed offline too.

        Raises:
            ConfigError: No pending request, the certificate is not for its key, not
                a CA certificate of the trust domain, or not signed by ``root``; a
                root CRL not signed by ``root``.

        .. versionadded:: 0.3
        """
        _refuse_existing(home, allow=("intermediate.key",))
        request = IntermediateRequest.load(home)
        at = _now(now)
        check_imported_intermediate(request, intermediate, root, now=at)
        if root_crl is not None:
            check_root_crl(root_crl, root, now=at)
        config = CAConfig.new(
            request.trust_domain,
            db_url or f"sqlite:///{home / 'trustmesh.db'}",
            request.key_type,
            crl_urls=tuple(crl_urls),
            ocsp_urls=tuple(ocsp_urls),
            root_crl_urls=crl_distribution_urls(intermediate),
            backdate=backdate,
            pkcs11=request.pkcs11,
        )
        # ca serve cannot prepare the next intermediate without the root key
        config = replace(config, rotation_auto=False)
        if request.key_ref.startswith("file:") and passphrase is not None:
            # fail now on a wrong passphrase rather than at the first issuance
            open_signer(
                request.key_ref, home=home, key_pem=None, passphrase=passphrase, what="x"
            ).private_key()
        store = open_store(config.db)
        ca = cls._create(
            home,
            config,
            store,
            root=root,
            inter=intermediate,
            key_files={},
            root_crl=root_crl,
            refs={"root": OFFLINE_KEY_REF, "intermediate": request.key_ref},
            actor=actor,
            at=at,
            details={"key_type": request.key_type.value, "root": "offline"},
            passphrase=passphrase,
        )
        request.done(home)
        return ca

    @classmethod
    def _create(
        cls,
        home: Path,
        config: CAConfig,
        store: Store,
        *,
        root: x509.Certificate,
        inter: x509.Certificate,
        key_files: dict[str, bytes],
        root_crl: x509.CertificateRevocationList | None,
        refs: dict[str, str],
        actor: str | None,
        at: datetime,
        details: dict[str, object],
        passphrase: bytes | None,
    ) -> CertificateAuthority:
        """Write the CA's files (temp + rename, after the audit commits)."""
        pem = serialization.Encoding.PEM
        contents = {
            "root.pem": root.public_bytes(pem),
            "intermediate.pem": inter.public_bytes(pem),
            **key_files,
        }
        staged: list[tuple[Path, Path]] = []
        try:
            for name, data in contents.items():
                staged.append((stage_file(home / name, data, mode=CA_FILES[name]), home / name))
            staged.append(
                (stage_file(home / CONFIG_NAME, config.dumps().encode()), home / CONFIG_NAME)
            )
            if root_crl is not None:
                staged.append(
                    (
                        stage_file(
                            home / ROOT_CRL_NAME, root_crl.public_bytes(serialization.Encoding.DER)
                        ),
                        home / ROOT_CRL_NAME,
                    )
                )
            with store.transaction() as conn:
                if refs:
                    store_initial_issuers(
                        conn,
                        initial_issuers(
                            root,
                            inter,
                            root_ref=refs.get("root", "file:root.key"),
                            inter_ref=refs.get("intermediate", "file:intermediate.key"),
                        ),
                    )
                store.append_audit(
                    conn,
                    at=at,
                    actor=actor or default_actor(),
                    action="init",
                    subject=SpiffeID.trust_domain_id(config.trust_domain).uri,
                    details={
                        **details,
                        "root_serial": _serial_hex(root.serial_number),
                        "intermediate_serial": _serial_hex(inter.serial_number),
                    },
                )
            for tmp, final in staged:
                os.replace(tmp, final)
        except BaseException:
            for tmp, _ in staged:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            store.close()
            raise
        return cls(home, config, store, passphrase)

    @classmethod
    def open(cls, home: Path, *, passphrase: bytes | None = None) -> CertificateAuthority:
        """Open the CA in ``home``; a passphrase is needed only to sign.

        Raises:
            ConfigError: No CA there, or its database cannot be reached.
        """
        config = CAConfig.load(home / CONFIG_NAME)
        store = open_store(config.db)
        return cls(home, config, store, passphrase)

    def unlock(self, passphrase: bytes | None) -> None:
        """Set the passphrase of the CA's encrypted keys (before the first signature).

        .. versionadded:: 0.3
        """
        self._passphrase = passphrase
        self._signers.clear()

    def close(self) -> None:
        """Release the database."""
        self.store.close()

    def __enter__(self) -> CertificateAuthority:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- issuers --------------------------------------------------------------------

    @property
    def issuers(self) -> IssuerSet:
        """The current snapshot of the CA's roots and intermediates (see :mod:`trustmesh.rotation`).

        .. versionadded:: 0.3
        """
        return self._issuers

    @property
    def root(self) -> x509.Certificate:
        """The active root (the one above the signing intermediate)."""
        return self._issuers.active("root").certificate

    @property
    def intermediate(self) -> x509.Certificate:
        """The intermediate that signs new certificates."""
        return self._issuers.active("intermediate").certificate

    @property
    def issuer_id(self) -> str:
        """SKI hex of the signing intermediate (the ``issuer`` of new records)."""
        return self._issuers.active("intermediate").ski

    @property
    def bundle_sequence(self) -> int:
        """Grows with every change of the issuers (the SPIFFE bundle sequence).

        .. versionadded:: 0.3
        """
        return self._issuers.version

    def refresh(self) -> bool:
        """Re-read the issuers when another process (the CLI, a replica) changed them.

        Returns:
            True when they changed.

        .. versionadded:: 0.3
        """
        if current_version(self.store) == self._issuers.version:
            return False
        fresh = load_issuer_set(self.home, self.store)
        changed = fresh.version != self._issuers.version
        self._issuers = fresh
        if changed:
            log.info(
                "CA issuers changed (bundle sequence %d): %s signs; bundle %s",
                fresh.version,
                fresh.active("intermediate").name,
                ", ".join(c.subject.rfc4514_string() for c in fresh.roots),
                extra={"event": "ca_issuers_changed", "bundle_sequence": fresh.version},
            )
        return changed

    def key_of(self, issuer: Issuer) -> PrivateKey:
        """The private key of an intermediate, unlocked on first use and kept.

        Raises:
            PKIError: No or a wrong passphrase.
            ConfigError: The key is missing.

        .. versionadded:: 0.3
        """
        signer = self._signers.get(issuer.ski)
        if signer is None:
            signer = self._signers[issuer.ski] = self._issuers.signer(
                issuer, self.home, self._passphrase
            )
        return signer.private_key()

    @property
    def signing_key(self) -> PrivateKey:
        """The signing intermediate's private key, decrypted on first use.

        Raises:
            PKIError: No or a wrong passphrase.
        """
        return self.key_of(self._issuers.active("intermediate"))

    def issuer_expiry(self, now: datetime | None = None) -> tuple[IssuerExpiry, ...]:
        """Return the expiry of the root and the intermediate (with warnings when near).

        .. versionadded:: 0.1
        """
        at = now or datetime.now(UTC)
        return (
            IssuerExpiry.of("root", self.root, at),
            IssuerExpiry.of("intermediate", self.intermediate, at),
        )

    @property
    def bundle(self) -> tuple[x509.Certificate, ...]:
        """The trust anchors relying parties should trust: every published root."""
        return self._issuers.roots

    @property
    def chain_certificates(self) -> tuple[x509.Certificate, ...]:
        """Every published intermediate and cross certificate (to verify chains).

        .. versionadded:: 0.3
        """
        return self._issuers.intermediates + self._issuers.crosses

    # -- rotation ---------------------------------------------------------------------

    def _rotation_audit(self, actor: str | None, at: datetime) -> Callable[..., None]:
        def audit(conn: Connection, subject: str, details: dict[str, object]) -> None:
            self.store.append_audit(
                conn,
                at=at,
                actor=actor or default_actor(),
                action="rotate",
                subject=subject,
                details=details,
            )
            # Every replica's feed hears of the bundle change at commit.
            sequence = details.get("bundle_sequence")
            if isinstance(sequence, int):
                self.store.notify_bundle(conn, sequence)

        return audit

    def rotate(
        self,
        role: str,
        step: str,
        *,
        actor: str | None = None,
        now: datetime | None = None,
        pkcs11: str | None = None,
    ) -> StepResult:
        """Run one rotation step (``prepare``, ``activate`` or ``retire``) for ``role``.

        ``pkcs11`` (``prepare`` only): a token URI where the new keys are generated
        (default: ``pkcs11`` of ``config.toml``).

        Raises:
            ConfigError: The step is not allowed now (the message says why and when).
            PKIError: The passphrase does not unlock a key the step needs.

        .. versionadded:: 0.3
        """
        at = _now(now)
        steps = {"prepare": _prepare, "activate": _activate, "retire": _retire}
        if step not in steps:
            raise ConfigError(f"Unknown rotation step {step!r}: use prepare, activate or retire.")
        if pkcs11 and step != "prepare":
            raise ConfigError("--pkcs11 goes with 'prepare' only (it says where new keys go).")
        extra: dict[str, str] = {"pkcs11": pkcs11} if pkcs11 else {}
        result = steps[step](
            role=role,
            home=self.home,
            config=self.config,
            store=self.store,
            passphrase=self._passphrase,
            audit=self._rotation_audit(actor, at),
            now=at,
            **extra,
        )
        self.refresh()
        if step == "retire":
            for root in self._issuers.live("root"):
                with contextlib.suppress(ConfigError):
                    self.root_crl(root=root.ski, actor=actor, now=at)  # lists the retired
        return result

    def rotation_status(self, role: str, *, now: datetime | None = None) -> RotationStatus:
        """Where the rotation of ``role`` stands.

        .. versionadded:: 0.3
        """
        return rotation_status(
            role=role, home=self.home, config=self.config, store=self.store, now=_now(now)
        )

    # -- issuance -------------------------------------------------------------------

    def issue(
        self,
        spiffe_id: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        ttl: timedelta | None = None,
        profile: str | None = None,
        key_type: KeyType | None = None,
        actor: str | None = None,
        now: datetime | None = None,
        deliver: Callable[[Issued], None] | None = None,
    ) -> Issued:
        """Generate a key and issue a certificate for it.

        Args:
            spiffe_id: The identity.
            dns: DNS SANs.
            ips: IP SANs.
            ttl: Lifetime (profile default when None).
            profile: Profile name (the default profile when None).
            key_type: Subject key type (the CA's key type when None).
            actor: Who asks, for the audit log.
            now: The current time (for tests).
            deliver: Called with the result inside the transaction; if it raises,
                nothing is recorded. Use it to stage output files.

        Raises:
            SpiffeIDError, PolicyError: The request is not allowed.
        """
        prof = self.config.profile(profile)
        sid = SpiffeID.parse(spiffe_id)
        addresses = tuple(self._parse_ip(ip) for ip in ips)
        ktype = key_type or self.config.key_type
        prof.check_spiffe_id(sid)
        for name in dns:
            prof.check_dns(name)
        for ip in addresses:
            prof.check_ip(ip)
        if ktype not in prof.key_types:
            prof.check_key(generate_private_key(ktype).public_key())
        lifetime = prof.resolve_ttl(ttl)
        key = generate_private_key(ktype)
        request = LeafRequest(key.public_key(), sid, tuple(dns), addresses, prof.eku)
        return self._sign(
            request,
            prof,
            lifetime,
            key=key,
            actor=actor,
            now=now,
            deliver=deliver,
            action="issue",
            allowance=self._exactly(request),
        )

    def sign(
        self,
        csr: bytes | x509.CertificateSigningRequest,
        *,
        ttl: timedelta | None = None,
        profile: str | None = None,
        actor: str | None = None,
        now: datetime | None = None,
        source: str = "CSR",
        deliver: Callable[[Issued], None] | None = None,
    ) -> Issued:
        """Check a CSR against a profile and sign it.

        Raises:
            CSRError: The CSR is malformed or badly signed.
            PolicyError: The profile forbids what it asks for.
        """
        prof = self.config.profile(profile)
        request = check_csr(csr, prof, source=source)
        lifetime = prof.resolve_ttl(ttl)
        return self._sign(
            request,
            prof,
            lifetime,
            actor=actor,
            now=now,
            deliver=deliver,
            action="sign",
            allowance=self._exactly(request),
        )

    def sign_request(
        self,
        request: LeafRequest,
        *,
        action: str,
        actor: str,
        profile: str | None = None,
        ttl: timedelta | None = None,
        extra: dict[str, str] | None = None,
        within: Callable[[Connection, Issued], None] | None = None,
        now: datetime | None = None,
    ) -> Issued:
        """Sign a request built by a front end with its own checks (the ACME server).

        The profile's rules apply again here (SPIFFE ID, DNS/IP SANs, key, lifetime),
        so no front end can issue beyond them. ``within`` runs inside the transaction
        that records and audits the certificate, after both: if it raises, nothing is
        recorded (the ACME server marks its order valid there).

        Args:
            request: What to certify.
            action: The audit action (``acme``).
            actor: Who asks, for the audit log.
            profile: Profile name (the default profile when None).
            ttl: Lifetime (the profile's default when None).
            extra: More audit details.
            within: Called with the transaction's connection and the result before commit.
            now: The current time (for tests).

        Raises:
            PolicyError, SpiffeIDError: The profile forbids the request.

        .. versionadded:: 0.2
        """
        prof = self.config.profile(profile)
        prof.check_spiffe_id(request.spiffe_id)
        for name in request.dns:
            prof.check_dns(name)
        for ip in request.ips:
            prof.check_ip(ip)
        prof.check_key(request.public_key)
        lifetime = prof.resolve_ttl(ttl)

        opened: list[Connection] = []

        def inside(conn: Connection) -> SANAllowance | None:
            opened.append(conn)  # the transaction ``deliver`` runs in, for ``within``
            return None

        def deliver(issued: Issued) -> None:
            if within is not None:
                within(opened[-1], issued)

        return self._sign(
            request,
            prof,
            lifetime,
            action=action,
            actor=actor,
            now=now,
            deliver=deliver,
            within=inside,
            extra=extra,
            allowance=self._exactly(request),
        )

    @staticmethod
    def _exactly(request: LeafRequest) -> SANAllowance:
        # The operator named these SANs by hand: renewals may keep (or drop) them.
        return SANAllowance.exactly(request.dns, [str(ip) for ip in request.ips])

    @staticmethod
    def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            raise ConfigError(
                f"{value!r} is not an IP address: pass --ip 10.0.0.7 or --ip ::1.",
                field="ip",
            ) from None

    def _sign(
        self,
        request: LeafRequest,
        profile: Profile,
        ttl: timedelta,
        *,
        action: str,
        key: PrivateKey | None = None,
        actor: str | None,
        now: datetime | None,
        deliver: Callable[[Issued], None] | None,
        within: Callable[[Connection], SANAllowance | None] | None = None,
        extra: dict[str, str] | None = None,
        allowance: SANAllowance | None = None,
    ) -> Issued:
        start = _now(now)
        issuers = self._issuers  # one snapshot for the whole issuance
        signer = issuers.active("intermediate")
        signing_key = self.key_of(signer)
        for attempt in range(_SERIAL_ATTEMPTS):
            cert = issue_leaf(
                request,
                signer.certificate,
                signing_key,
                ttl=ttl,
                now=start,
                crl_urls=self.config.crl_urls,
                ocsp_urls=self.config.ocsp_urls,
                backdate=self.config.backdate,
            )

            def details(record: CertificateRecord) -> dict[str, Any]:
                return {
                    "spiffe_id": record.spiffe_id,
                    "profile": profile.name,
                    "not_after": record.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "fingerprint": record.fingerprint,
                    "dns": list(record.dns),
                    "ips": list(record.ips),
                    **(extra or {}),
                }

            try:
                if within is None and deliver is None:
                    # Nothing else in the transaction (renewals): group-committed with
                    # the other threads' records; returns once its own is durable.
                    record = self._record_for(
                        cert, request, profile, allowance or SANAllowance(), signer.ski
                    )
                    chain = (cert, *issuers.chain_tail(signer))
                    issued = Issued(cert, chain, issuers.roots, record, key)
                    self.store.record_issued(
                        record,
                        at=start,
                        actor=actor or default_actor(),
                        action=action,
                        details=details(record),
                    )
                    return issued
                with self.store.transaction() as conn:
                    granted = within(conn) if within is not None else None
                    record = self._record_for(
                        cert, request, profile, granted or allowance or SANAllowance(), signer.ski
                    )
                    chain = (cert, *issuers.chain_tail(signer))
                    issued = Issued(cert, chain, issuers.roots, record, key)
                    self.store.add_certificate(conn, record)
                    self.store.append_audit(
                        conn,
                        at=start,
                        actor=actor or default_actor(),
                        action=action,
                        subject=record.serial,
                        details=details(record),
                    )
                    if deliver is not None:
                        deliver(issued)
            except ConflictError as exc:
                if exc.details.get("reason") != "duplicate_serial" or (
                    attempt == _SERIAL_ATTEMPTS - 1
                ):
                    raise
                continue
            return issued
        raise AssertionError("unreachable")  # pragma: no cover

    def _record_for(
        self,
        cert: x509.Certificate,
        request: LeafRequest,
        profile: Profile,
        allowance: SANAllowance,
        issuer: str,
    ) -> CertificateRecord:
        ktype = key_type_of(request.public_key)
        return CertificateRecord(
            issuer=issuer,
            serial=_serial_hex(cert.serial_number),
            spiffe_id=request.spiffe_id.uri,
            dns=request.dns,
            ips=tuple(str(ip) for ip in request.ips),
            profile=profile.name,
            key_type=ktype.value if ktype else describe_key(request.public_key),
            fingerprint=fingerprint(cert).replace(":", "").lower(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            issued_at=cert.not_valid_before_utc,
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            allowed_dns=allowance.dns,
            allowed_ips=allowance.ips,
        )

    # -- enrollment and renewal -----------------------------------------------------

    def create_join_token(
        self,
        spiffe_pattern: str,
        *,
        ttl: timedelta = DEFAULT_TOKEN_TTL,
        uses: int = 1,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        actor: str | None = None,
        now: datetime | None = None,
    ) -> str:
        """Create a join token for an ID (or glob of IDs) and return it.

        Only its SHA-256 is stored; the token is shown once.

        Args:
            spiffe_pattern: The ID, or a glob of IDs, the token enrolls.
            ttl: How long the token may be used.
            uses: How many enrollments it allows.
            dns: DNS names or patterns (``*`` within a label, ``**`` across
                labels) the enrollment may claim as SANs; none by default.
            ips: IP addresses or CIDR ranges it may claim; none by default.
            actor: Who asks, for the audit log.
            now: The current time (for tests).

        Raises:
            ConfigError: Bad pattern, lifetime, use count, DNS pattern or IP range.
            PolicyError: The default profile would never certify such an ID, name
                or address.

        .. versionchanged:: 0.2
           ``dns`` and ``ips``.
        """
        if "*" not in spiffe_pattern:
            self.config.profile(None).check_spiffe_id(SpiffeID.parse(spiffe_pattern))
        elif not spiffe_pattern.startswith(f"spiffe://{self.config.trust_domain}/"):
            raise ConfigError(
                f"Token pattern {spiffe_pattern!r} must start with "
                f"spiffe://{self.config.trust_domain}/.",
                field="spiffe_id",
            )
        if uses < 1:
            raise ConfigError("--uses must be at least 1.", field="uses")
        allowance = SANAllowance.parse(dns, ips)
        self._check_allowance(allowance)
        if ttl <= timedelta(0) or ttl > MAX_TOKEN_TTL:
            raise ConfigError(
                f"A join token lives between 1 s and {format_duration(MAX_TOKEN_TTL)}; "
                f"ask for a --ttl in that range.",
                field="ttl",
            )
        start = _now(now)
        token = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.store.transaction() as conn:
            stored = add_join_token(
                conn,
                token=token,
                spiffe_pattern=spiffe_pattern,
                uses=uses,
                expires_at=start + ttl,
                created_at=start,
                created_by=actor or default_actor(),
                dns_patterns=allowance.dns,
                ip_ranges=allowance.ips,
            )
            self.store.append_audit(
                conn,
                at=start,
                actor=actor or default_actor(),
                action="token",
                subject=spiffe_pattern,
                details={
                    "token_sha256": stored.token_hash[:16],
                    "uses": uses,
                    "dns": list(allowance.dns),
                    "ips": list(allowance.ips),
                    "expires_at": (start + ttl).strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
            )
        return token

    def _check_allowance(self, allowance: SANAllowance) -> None:
        """Refuse token SANs the default profile would never sign: literal names and
        addresses are checked as the CSR will be, ranges must lie inside its ranges."""
        profile = self.config.profile(None)
        for pattern in allowance.dns:
            if "*" not in pattern:
                profile.check_dns(pattern)
        for net in allowance.networks:
            if net.num_addresses == 1:
                profile.check_ip(net.network_address)
            elif not any(
                net.version == wide.version and net.subnet_of(wide)  # type: ignore[arg-type]
                for wide in (ipaddress.ip_network(r) for r in profile.ips)
            ):
                raise PolicyError(
                    f"Refusing --ip {net}: profile {profile.name!r} allows addresses in "
                    f"{list(profile.ips)} only. Give a range inside one of those or add it "
                    f"to the profile's ips list in config.toml.",
                    profile=profile.name,
                    field="ip",
                    reason="san_not_allowed",
                )

    def enroll(
        self,
        token: str,
        csr: bytes,
        *,
        ttl: timedelta | None = None,
        actor: str | None = None,
        now: datetime | None = None,
    ) -> Issued:
        """Sign a CSR for a service's first identity, spending one use of a token.

        The token is checked and spent in the same transaction that records the
        certificate: a refused CSR gives the use back, a used token never yields
        a certificate.

        Raises:
            TokenError: The token is unknown, used up or expired (reason in details).
            ScopeError: The CSR asks for an ID the token is not bound to, or for a
                DNS/IP SAN the token does not allow (``reason="san_not_allowed"``).
            CSRError, PolicyError: The CSR is not acceptable.

        .. versionchanged:: 0.2
           DNS and IP SANs must be allowed by the token (none are by default); the
           certificate record keeps the token's allowance for renewals.
        """
        start = _now(now)
        profile = self.config.profile(None)
        request = check_csr(csr, profile, source="the CSR")
        lifetime = profile.resolve_ttl(ttl)

        def spend(conn: Connection) -> SANAllowance:
            result = consume_join_token(conn, token, now=start)
            if isinstance(result, str):
                messages = {
                    "unknown": "The join token is not known to this CA: create one with "
                    "'trustmesh token create SPIFFE_ID'.",
                    "used": "The join token was already used: create a new one with "
                    "'trustmesh token create'.",
                    "expired": "The join token expired: create a new one with "
                    "'trustmesh token create'.",
                }
                raise TokenError(messages[result], reason=f"token_{result}")
            if not match_spiffe_pattern(request.spiffe_id, result.spiffe_pattern):
                raise ScopeError(
                    f"The join token is for {result.spiffe_pattern}, not "
                    f"{request.spiffe_id}: use a token created for this identity.",
                    reason="token_wrong_identity",
                )
            granted = SANAllowance(result.dns_patterns, result.ip_ranges)
            granted.check(
                request.dns,
                request.ips,
                spiffe_id=request.spiffe_id.uri,
                granted_by="the join token",
                fix="enroll with a token created with",
            )
            return granted

        return self._sign(
            request,
            profile,
            lifetime,
            action="enroll",
            actor=actor,
            now=start,
            deliver=None,
            within=spend,
        )

    def renew(
        self,
        current: x509.Certificate,
        csr: bytes,
        *,
        ttl: timedelta | None = None,
        actor: str | None = None,
        now: datetime | None = None,
        allow_same_key: bool = False,
    ) -> Issued:
        """Renew the identity ``current`` proves, for the CSR's (new) key.

        Raises:
            VerificationError: ``current`` is expired, revoked or not ours.
            PolicyError: The CSR asks for a different SPIFFE ID, or a SAN the profile
                does not allow.
            ScopeError: The CSR asks for a DNS/IP SAN beyond the allowance recorded
                with ``current`` (``reason="san_not_allowed"``): a renewal may drop
                SANs, never add new ones.
            CSRError: The CSR reuses the current key (unless allowed) or is bad.
        """
        start = _now(now)
        spiffe_id, old = self.verify_caller(current, now=start)
        profile = self.config.profile(old.profile if old.profile in self.config.profiles else None)
        request = check_csr(csr, profile, source="the renewal CSR")
        if request.spiffe_id != spiffe_id:
            raise PolicyError(
                f"A renewal keeps the identity: the CSR asks for {request.spiffe_id} but "
                f"the caller is {spiffe_id}. Enroll with a join token for a new identity.",
                reason="identity_change",
            )
        if not allow_same_key and _same_key(request.public_key, current.public_key()):
            raise CSRError(
                "The renewal CSR reuses the current key: generate a new key for each renewal.",
                reason="same_key",
            )
        # The token was spent at enrollment; its allowance lives on with the record.
        allowance = SANAllowance(old.allowed_dns, old.allowed_ips)
        allowance.check(
            request.dns,
            request.ips,
            spiffe_id=spiffe_id.uri,
            granted_by=f"certificate {old.serial}, which this renewal replaces,",
            fix="enroll again with a token created with",
        )
        return self._sign(
            request,
            profile,
            profile.resolve_ttl(ttl),
            action="renew",
            actor=actor or str(spiffe_id),
            now=start,
            deliver=None,
            extra={"renews": old.serial},
            allowance=allowance,
        )

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """Return True when ``cert`` is revoked, or is a leaf this CA never recorded.

        CA certificates (ours) are never in the table and count as not revoked.
        """
        if cert in self.chain_certificates or cert in self.bundle:
            return False
        record = self.store.lookup_certificate(_serial_hex(cert.serial_number))
        # Signed by our key but not recorded: fail closed.
        return record is None or record.revoked_at is not None

    def verify_caller(
        self, cert: x509.Certificate, *, now: datetime | None = None
    ) -> tuple[SpiffeID, CertificateRecord]:
        """Verify a client certificate of this CA and return its SPIFFE ID and record.

        What :func:`~trustmesh.pki.verify_chain` checks with :meth:`is_revoked`, for
        the price of one lookup once the chain is known: the chain verification
        (signatures, CA flags, EKU, SPIFFE ID) is remembered per certificate (by DER),
        for the issuer snapshot it was verified against; the validity period is
        checked on every call, and the revocation status is read from the store on
        every call (never cached).

        Raises:
            CertificateExpiredError: Outside its (or its chain's) validity period.
            CertificateRevokedError: Revoked, or never recorded by this CA.
            VerificationError: Any other chain failure.

        .. versionadded:: 0.3
        """
        when = _now(now)
        entry = self._chains.get(cert)
        issuers = self._issuers
        if (
            entry is None
            or entry.issuers is not issuers
            or not entry.valid_from <= when <= entry.valid_until
        ):
            # The leaf's revocation is looked up below; this CA's own certificates are
            # never revoked in its table (is_revoked says False for them).
            published = self.chain_certificates
            spiffe_id = verify_chain(
                cert, list(published), list(self.bundle), usage="client", now=when
            )
            # The window: the leaf and every published certificate that could have
            # carried it to an anchor (a cross certificate shares its intermediate's
            # subject), so an entry is never used past any of them.
            path = [cert, *(c for c in published if c.subject == cert.issuer)]
            path += [r for r in self.bundle if any(r.subject == c.issuer for c in path[1:])]
            entry = _VerifiedChain(
                spiffe_id,
                valid_from=max(c.not_valid_before_utc for c in path),
                valid_until=min(c.not_valid_after_utc for c in path),
                issuers=issuers,
            )
            self._chains.put(cert, entry)
        serial = _serial_hex(cert.serial_number)
        record = self.store.lookup_certificate(serial)
        if record is None or record.revoked_at is not None:
            raise CertificateRevokedError(
                f"Certificate {serial} ({entry.spiffe_id}) was revoked.", reason="revoked"
            )
        return entry.spiffe_id, record

    # -- registration entries -------------------------------------------------------

    def create_entry(
        self,
        spiffe_id: str,
        *,
        node_id: str,
        selectors: Sequence[str],
        dns: Sequence[str] = (),
        ttl: timedelta | None = None,
        actor: str | None = None,
        now: datetime | None = None,
    ) -> RegistrationEntry:
        """Record that node ``node_id`` may obtain ``spiffe_id`` for callers matching
        every one of ``selectors``.

        Raises:
            SpiffeIDError: ``spiffe_id`` or ``node_id`` is not a SPIFFE ID.
            ConfigError: An ID outside the trust domain, the node's own ID, no or a bad
                selector.
            PolicyError: The default profile would never certify the ID, a DNS name or
                the lifetime.
        """
        domain = self.config.trust_domain
        sid = SpiffeID.parse(spiffe_id)
        node = SpiffeID.parse(node_id)
        for what, value, example in (
            ("SPIFFE ID", sid, "svc/app"),
            ("node ID", node, "node/host1"),
        ):
            if not value.member_of(domain) or not value.path:
                raise ConfigError(
                    f"The {what} {value} is not a workload in trust domain {domain}: "
                    f"give an ID such as spiffe://{domain}/{example}.",
                    field="node" if what == "node ID" else "spiffe_id",
                )
        if sid == node:
            raise ConfigError(
                f"An entry hands {sid} to workloads of node {node}: the two must differ.",
                field="spiffe_id",
            )
        if not selectors:
            raise ConfigError(
                "An entry needs at least one --selector (e.g. --selector unix:uid:1001): "
                "without one it would match every local process.",
                field="selector",
            )
        parsed = sorted({parse_selector(s) for s in selectors})
        profile = self.config.profile(None)
        profile.check_spiffe_id(sid)
        names = tuple(dict.fromkeys(n.lower().rstrip(".") for n in dns))
        for name in names:
            profile.check_dns(name)
        if ttl is not None:
            profile.resolve_ttl(ttl)
        at = _now(now)
        entry = RegistrationEntry(
            entry_id=str(uuid.uuid4()),
            spiffe_id=sid.uri,
            node_id=node.uri,
            selectors=tuple(str(s) for s in parsed),
            dns=names,
            ttl=None if ttl is None else int(ttl.total_seconds()),
            created_at=at,
            created_by=actor or default_actor(),
        )
        with self.store.transaction() as conn:
            add_entry(conn, entry)
            self.store.append_audit(
                conn,
                at=at,
                actor=entry.created_by,
                action="entry-create",
                subject=entry.entry_id,
                details={
                    "spiffe_id": entry.spiffe_id,
                    "node_id": entry.node_id,
                    "selectors": list(entry.selectors),
                    "dns": list(entry.dns),
                    "ttl": entry.ttl,
                },
            )
        return entry

    def list_entries(
        self, *, node_id: str | None = None, spiffe_id: str | None = None
    ) -> list[RegistrationEntry]:
        """Return registration entries (of one node, or for one ID), oldest first."""
        with self.store.reader() as conn:
            return find_entries(conn, node_id=node_id, spiffe_id=spiffe_id)

    def get_entry(self, entry_id: str) -> RegistrationEntry:
        """Return one registration entry.

        Raises:
            NotFoundError: No entry has this id.
        """
        with self.store.reader() as conn:
            entry = get_entry(conn, entry_id.strip().lower())
        if entry is None:
            raise NotFoundError(
                f"No registration entry {entry_id!r}: see 'trustmesh entry list'.",
                entry_id=entry_id,
            )
        return entry

    def delete_entry(
        self, entry_id: str, *, actor: str | None = None, now: datetime | None = None
    ) -> RegistrationEntry:
        """Delete a registration entry (SVIDs already issued for it stay until they
        expire or are revoked; the node agent drops them at its next refresh).

        Raises:
            NotFoundError: No entry has this id.
        """
        entry = self.get_entry(entry_id)
        at = _now(now)
        with self.store.transaction() as conn:
            if not delete_entry(conn, entry.entry_id):
                raise NotFoundError(
                    f"No registration entry {entry_id!r}: see 'trustmesh entry list'.",
                    entry_id=entry_id,
                )
            self.store.append_audit(
                conn,
                at=at,
                actor=actor or default_actor(),
                action="entry-delete",
                subject=entry.entry_id,
                details={"spiffe_id": entry.spiffe_id, "node_id": entry.node_id},
            )
        return entry

    def node_identity(self, cert: x509.Certificate, *, now: datetime | None = None) -> SpiffeID:
        """Return the SPIFFE ID a node's client certificate proves (chain, expiry, revocation).

        Raises:
            VerificationError: The certificate is expired, revoked or not ours.
        """
        return verify_chain(
            cert,
            [self.intermediate],
            list(self.bundle),
            usage="client",
            now=_now(now),
            is_revoked=self.is_revoked,
        )

    def sign_entry(
        self,
        node_cert: x509.Certificate,
        entry_id: str,
        csr: bytes,
        *,
        now: datetime | None = None,
    ) -> Issued:
        """Sign an X.509-SVID for a registration entry, for the node the entry names.

        Raises:
            VerificationError: ``node_cert`` is expired, revoked or not ours.
            NotFoundError: No such entry.
            ScopeError: The entry belongs to another node.
            CSRError, PolicyError: The CSR is bad or asks for another ID.
        """
        start = _now(now)
        node = self.node_identity(node_cert, now=start)
        entry = self.get_entry(entry_id)
        if entry.node_id != node.uri:
            raise ScopeError(
                f"Entry {entry.entry_id} is for node {entry.node_id}, not {node}: a node "
                f"obtains only the identities of its own entries.",
                reason="wrong_node",
            )
        profile = self.config.profile(None)
        request = check_csr(csr, profile, source="the entry CSR")
        if request.spiffe_id.uri != entry.spiffe_id:
            raise PolicyError(
                f"Entry {entry.entry_id} is for {entry.spiffe_id}, but the CSR asks for "
                f"{request.spiffe_id}: put exactly the entry's ID in the CSR.",
                reason="identity_change",
            )
        for name in entry.dns:
            profile.check_dns(name)
        leaf = LeafRequest(request.public_key, request.spiffe_id, entry.dns, (), profile.eku)
        lifetime = profile.resolve_ttl(None if entry.ttl is None else timedelta(seconds=entry.ttl))
        return self._sign(
            leaf,
            profile,
            lifetime,
            action="entry-svid",
            actor=node.uri,
            now=start,
            deliver=None,
            extra={"entry_id": entry.entry_id},
        )

    # -- JWT-SVIDs -------------------------------------------------------------------

    def _jwt_signing_key(self) -> ec.EllipticCurvePrivateKey:
        """The ES256 key for JWT-SVIDs, created (encrypted, mode 0600) on first use."""
        with self._jwt_lock:
            if self._jwt_key is not None:
                return self._jwt_key
            path = self.home / JWT_KEY_FILE
            if path.exists():
                key = load_private_key(path.read_bytes(), self._passphrase, source=str(path))
            else:
                if not self._passphrase:
                    raise ConfigError(
                        "Signing JWT-SVIDs needs the CA passphrase: set "
                        "TRUSTMESH_CA_PASSPHRASE or pass --passphrase-file."
                    )
                key = generate_private_key(KeyType.EC_P256)
                tmp = stage_file(path, dump_private_key(key, self._passphrase), mode=0o600)
                try:
                    os.link(tmp, path)  # never replaces a key another process just made
                except FileExistsError:
                    key = load_private_key(path.read_bytes(), self._passphrase, source=str(path))
                finally:
                    tmp.unlink()
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
                raise ConfigError(f"{path} is not an EC P-256 key: remove it to make a new one.")
            self._jwt_key = key
            return key

    def jwt_keys(self) -> list[dict[str, str]]:
        """Return the JWT-SVID public keys as JWKs with ``use: jwt-svid`` (the SPIFFE bundle).

        Creates the key on first use when the passphrase is known; without it and
        without a key yet, the list is empty.
        """
        if not (self.home / JWT_KEY_FILE).exists() and not self._passphrase:
            return []
        numbers = self._jwt_signing_key().public_key().public_numbers()
        jwk = {
            "crv": "P-256",
            "kty": "EC",
            "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big")),
        }
        # RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order.
        thumb = hashlib.sha256(json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode())
        return [{**jwk, "kid": _b64url(thumb.digest()), "use": "jwt-svid", "alg": "ES256"}]

    def sign_jwt_svid(
        self,
        node_cert: x509.Certificate,
        entry_id: str,
        audience: Sequence[str],
        *,
        ttl: timedelta = JWT_SVID_TTL,
        now: datetime | None = None,
    ) -> tuple[str, datetime]:
        """Sign a JWT-SVID (ES256) for an entry's SPIFFE ID, for the node the entry names.

        Returns:
            The token and when it expires.

        Raises:
            VerificationError: ``node_cert`` is expired, revoked or not ours.
            NotFoundError: No such entry.
            ScopeError: The entry belongs to another node.
            ConfigError: No audience, too many, or an empty one.
        """
        start = _now(now)
        node = self.node_identity(node_cert, now=start)
        entry = self.get_entry(entry_id)
        if entry.node_id != node.uri:
            raise ScopeError(
                f"Entry {entry.entry_id} is for node {entry.node_id}, not {node}: a node "
                f"obtains only the identities of its own entries.",
                reason="wrong_node",
            )
        audiences = list(dict.fromkeys(audience))
        if not audiences or len(audiences) > MAX_JWT_AUDIENCES or not all(audiences):
            raise ConfigError(
                f"A JWT-SVID needs 1 to {MAX_JWT_AUDIENCES} non-empty audiences: name the "
                f"service(s) it will be presented to.",
                reason="bad_audience",
            )
        key = self._jwt_signing_key()
        kid = self.jwt_keys()[0]["kid"]
        expires = start + ttl
        header = {"alg": "ES256", "kid": kid, "typ": "JWT"}
        claims = {
            "sub": entry.spiffe_id,
            "aud": audiences,
            "iat": int(start.timestamp()),
            "exp": int(expires.timestamp()),
        }
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        r, s_value = decode_dss_signature(
            key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        signature = r.to_bytes(32, "big") + s_value.to_bytes(32, "big")
        with self.store.transaction() as conn:
            self.store.append_audit(
                conn,
                at=start,
                actor=node.uri,
                action="jwt-svid",
                subject=entry.spiffe_id,
                details={"entry_id": entry.entry_id, "aud": audiences, "exp": claims["exp"]},
            )
        return f"{signing_input}.{_b64url(signature)}", expires

    # -- revocation -----------------------------------------------------------------

    def revoke(
        self,
        serial: str | None = None,
        *,
        spiffe_id: str | None = None,
        reason: str = "unspecified",
        actor: str | None = None,
        now: datetime | None = None,
    ) -> list[CertificateRecord]:
        """Revoke one certificate by serial, or every unexpired one of an identity.

        Returns:
            The records that were revoked by this call (already revoked ones are
            returned unchanged and not audited again).

        Raises:
            NotFoundError: No such serial, or no unexpired certificate for the ID.
        """
        reason_name = parse_reason(reason)
        at = _now(now)
        who = actor or default_actor()
        if (serial is None) == (spiffe_id is None):
            raise ConfigError("Give either a serial or --id SPIFFE_ID to revoke, not both.")
        if serial is not None:
            serials = [self._normalize_serial(serial)]
        else:
            sid = SpiffeID.parse(spiffe_id or "")
            records = self.store.find_certificates(spiffe_id=sid.uri, valid_at=at)
            serials = [r.serial for r in records if r.revoked_at is None]
            if not serials:
                raise NotFoundError(
                    f"No unrevoked, unexpired certificate for {sid}; see 'trustmesh list "
                    f"--id {sid}'.",
                    spiffe_id=sid.uri,
                )
        revoked: list[CertificateRecord] = []
        with self.store.transaction() as conn:
            for value in serials:
                before = self.store.get_certificate(value, conn)
                after = self.store.mark_revoked(conn, value, at=at, reason=reason_name)
                if before.revoked_at is None:
                    event = self.store.append_audit(
                        conn,
                        at=at,
                        actor=who,
                        action="revoke",
                        subject=after.serial,
                        details={"spiffe_id": after.spiffe_id, "reason": reason_name},
                    )
                    # Feed subscribers on every replica hear of it at commit.
                    self.store.notify_revocation(conn, event.seq)
                revoked.append(after)
        return revoked

    def revocations_since(self, cursor: int, *, limit: int = 1000) -> list[RevocationEvent]:
        """Return revocation events after ``cursor`` (the audit sequence number), oldest first."""
        return self.store.revocation_events(since=cursor, limit=limit)

    @staticmethod
    def _normalize_serial(value: str) -> str:
        cleaned = value.strip().lower().replace(":", "")
        if cleaned.startswith("0x"):
            cleaned = cleaned[2:]
        try:
            return _serial_hex(int(cleaned, 16))
        except ValueError:
            raise ConfigError(
                f"{value!r} is not a certificate serial: give it in hex as 'trustmesh "
                f"list' prints it.",
                field="serial",
            ) from None

    def _live_issuer(self, role: str, ski: str | None) -> Issuer:
        issuers = self._issuers
        if ski is None:
            return issuers.active(role)
        found = issuers.by_ski(ski.lower())
        if found is None or found.role != role or found not in issuers.live(role):
            known = ", ".join(i.ski for i in issuers.live(role))
            raise NotFoundError(
                f"No published {role} has SKI {ski!r}: this CA publishes {known}.",
                reason="unknown_issuer",
            )
        return found

    def crl(
        self,
        *,
        issuer: str | None = None,
        actor: str | None = None,
        now: datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """Build an intermediate's CRL of its unexpired revoked certificates, with the
        next CRL number.

        Args:
            issuer: SKI hex of a published intermediate (default: the signing one).
                During a rotation each intermediate has its own CRL.

        Raises:
            NotFoundError: No published intermediate has that SKI.

        .. versionchanged:: 0.3
           ``issuer``.
        """
        at = _now(now)
        inter = self._live_issuer("intermediate", issuer)
        entries = [
            RevokedEntry(int(serial, 16), datetime.fromtimestamp(revoked_at, UTC), reason)
            for serial, revoked_at, reason in self.store.revoked_entries(now=at, issuer=inter.ski)
        ]
        key = self.key_of(inter)
        with self.store.transaction() as conn:
            number = self.store.next_counter(conn, "crl_number")
            crl = build_crl(
                inter.certificate,
                key,
                entries,
                number=number,
                now=at,
                lifetime=self.config.crl_lifetime,
            )
            self.store.append_audit(
                conn,
                at=at,
                actor=actor or default_actor(),
                action="crl",
                subject=str(number),
                details={"entries": len(entries), "issuer": inter.ski},
            )
        return crl

    def _root_crl_entries(self, root: Issuer) -> list[RevokedEntry]:
        """The intermediates of ``root`` that a rotation retired."""
        return [
            RevokedEntry(
                i.certificate.serial_number,
                i.retired_at or i.superseded_at or _now(None),
                "superseded",
            )
            for i in self._issuers.issuers
            if i.role == "intermediate" and i.parent == root.ski and i.state == "retired"
        ]

    def root_crl(
        self,
        *,
        root: str | None = None,
        actor: str | None = None,
        now: datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """Return a root-signed CRL of the intermediates (the active root's by default).

        Peers that check revocation for the whole chain (nginx ``ssl_crl``, HAProxy
        ``crl-file``, ``openssl verify -crl_check_all``) need a CRL for the
        intermediate too, and only the root can sign it. It lists the intermediates
        a rotation retired (reason superseded). The first root's is kept in
        ``root.crl`` (written by ``ca init``) and re-signed with the root key once
        half of its ``root_crl_lifetime`` has passed, when it does not list what it
        should, or when the file is missing or not the root's. The root key is
        decrypted only for that (with the CA passphrase) and not kept. When
        ``root.key`` is not here (kept offline), the stored CRL is served until its
        ``nextUpdate`` with a warning; re-sign it with ``trustmesh crl --root``
        where the root key is.

        Raises:
            ConfigError: No valid root CRL is stored and the root key cannot be
                unlocked.
            NotFoundError: ``root`` is not the SKI of a published root.

        .. versionchanged:: 0.3
           ``root``; retired intermediates are listed.
        """
        at = _now(now)
        issuer = self._live_issuer("root", root)
        entries = self._root_crl_entries(issuer)
        wanted = {e.serial for e in entries}
        in_file = issuer.generation == 1  # the root of 'ca init': its CRL is root.crl
        cached = self._root_crls.get(issuer.ski)
        if (cached is None or at >= _resign_at(cached)) and in_file:
            cached = self._stored_root_crl(issuer.certificate)
        if cached is not None and _crl_serials(cached) != wanted:
            cached = None
        if cached is not None and at < _resign_at(cached):
            self._root_crls[issuer.ski] = cached
            return cached
        try:
            root_key = self._issuers.signer(issuer, self.home, self._passphrase).private_key()
        except (ConfigError, PKIError) as exc:
            why = exc.message
            if cached is not None and cached.next_update_utc and at < cached.next_update_utc:
                log.warning(
                    "The root CRL in %s is due to be re-signed but the root key cannot be "
                    "used (%s); serving it until its nextUpdate %s. Sign a new one where "
                    "the root key is ('trustmesh ca root sign-crl' for an offline root, "
                    "'trustmesh crl --root' otherwise) and import it with 'trustmesh ca "
                    "root import-crl' (it becomes %s).",
                    self.home,
                    why,
                    f"{cached.next_update_utc:%Y-%m-%dT%H:%M:%SZ}",
                    ROOT_CRL_NAME,
                    extra={"event": "root_crl_due"},
                )
                return cached
            raise ConfigError(
                f"No valid root-signed CRL in {self.home / ROOT_CRL_NAME} and the root key "
                f"cannot be used to sign one ({why}): sign one where the root key is "
                f"('trustmesh crl --root' with this CA's home, or 'trustmesh ca root "
                f"sign-crl' for an offline root) and run 'trustmesh ca root import-crl FILE' "
                f"here.",
                path=str(self.home / ROOT_CRL_NAME),
            ) from None
        crl = _sign_root_crl(
            issuer.certificate, root_key, at, self.config.root_crl_lifetime, entries
        )
        del root_key
        if in_file:
            try:
                atomic_write(
                    self.home / ROOT_CRL_NAME, crl.public_bytes(serialization.Encoding.DER)
                )
            except ConfigError as exc:
                log.warning("could not keep the re-signed root CRL: %s", exc.message)
        with self.store.transaction() as conn:
            self.store.append_audit(
                conn,
                at=at,
                actor=actor or default_actor(),
                action="crl",
                subject="root",
                details={
                    "entries": len(entries),
                    "number": int(at.timestamp()),
                    "next_update": f"{crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}",
                    "issuer": issuer.ski,
                },
            )
        self._root_crls[issuer.ski] = crl
        return crl

    def import_root_crl(
        self,
        crl: x509.CertificateRevocationList,
        *,
        actor: str | None = None,
        now: datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """Install a root CRL signed elsewhere (the offline root) as ``root.crl``.

        ``ca serve`` picks it up when its cached one is due. A CRL that does not list
        the intermediates a rotation retired is refused.

        Raises:
            ConfigError: Not signed by the first root, expired, older than the one
                in place, or missing retired intermediates.

        .. versionadded:: 0.3
        """
        at = _now(now)
        root = next(i for i in self._issuers.issuers if i.role == "root" and i.generation == 1)
        check_root_crl(crl, root.certificate, now=at)
        missing = {e.serial for e in self._root_crl_entries(root)} - _crl_serials(crl)
        if missing:
            raise ConfigError(
                f"The root CRL does not list the retired intermediate(s) "
                f"{', '.join(format(m, 'x') for m in sorted(missing))}: sign it again with "
                f"'trustmesh ca root sign-crl --revoke CERT.pem' for each."
            )
        current = self._stored_root_crl(root.certificate)
        if current is not None and current.last_update_utc > crl.last_update_utc:
            raise ConfigError(
                f"The root CRL in place is newer ({current.last_update_utc:%Y-%m-%dT%H:%M:%SZ}) "
                f"than this one ({crl.last_update_utc:%Y-%m-%dT%H:%M:%SZ}): import a fresh one."
            )
        atomic_write(self.home / ROOT_CRL_NAME, crl.public_bytes(serialization.Encoding.DER))
        with self.store.transaction() as conn:
            self.store.append_audit(
                conn,
                at=at,
                actor=actor or default_actor(),
                action="crl",
                subject="root",
                details={
                    "imported": True,
                    "entries": len(list(crl)),
                    "next_update": f"{crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}",
                    "issuer": root.ski,
                },
            )
        self._root_crls[root.ski] = crl
        return crl

    def _stored_root_crl(self, root: x509.Certificate) -> x509.CertificateRevocationList | None:
        """The root CRL in the home, when it is readable and signed by ``root``."""
        path = self.home / ROOT_CRL_NAME
        try:
            crl = x509.load_der_x509_crl(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s)", path, exc)
            return None
        if crl.issuer != root.subject or not crl.is_signature_valid(
            root.public_key()  # type: ignore[arg-type]
        ):
            log.warning("ignoring %s: it is not signed by this CA's root", path)
            return None
        return crl

    def chain_crls(
        self, *, actor: str | None = None, now: datetime | None = None
    ) -> tuple[x509.CertificateRevocationList, ...]:
        """Return the CRLs for every chain: each published intermediate's (leaves),
        then each published root's (intermediates). Outside a rotation: two.

        Raises:
            ConfigError: See :meth:`root_crl`.

        .. versionchanged:: 0.3
           One CRL per published issuer.
        """
        issuers = self._issuers
        leaves = [
            self.crl(issuer=i.ski, actor=actor, now=now) for i in issuers.live("intermediate")
        ]
        roots = [self.root_crl(root=r.ski, actor=actor, now=now) for r in issuers.live("root")]
        return (*leaves, *roots)

    def ocsp_response(
        self, request: ocsp.OCSPRequest, *, now: datetime | None = None
    ) -> ocsp.OCSPResponse:
        """Answer an OCSP request for a certificate of a published intermediate, signed
        by that intermediate ("unknown", signed by the active one, for anything else)."""
        issuers = self._issuers
        responder = next(
            (
                i
                for i in issuers.live("intermediate")
                if request_matches_issuer(request, i.certificate)
            ),
            None,
        )
        if responder is None:
            status = OCSPStatus("unknown")
            responder = issuers.active("intermediate")
        else:
            try:
                record = self.store.get_certificate(_serial_hex(request.serial_number))
            except NotFoundError:
                status = OCSPStatus("unknown")
            else:
                if record.issuer != responder.ski:
                    status = OCSPStatus("unknown")
                elif record.revoked_at is not None:
                    status = OCSPStatus(
                        "revoked", record.revoked_at, record.revocation_reason or "unspecified"
                    )
                else:
                    status = OCSPStatus("good")
        return build_ocsp_response(
            request, status, responder.certificate, self.key_of(responder), now=now
        )

    # -- listing, export, audit -----------------------------------------------------

    def record_export(
        self, kind: str, path: str, *, subject: str, actor: str | None = None
    ) -> None:
        """Audit an export (``p12``, ``truststore``, ``bundle``)."""
        with self.store.transaction() as conn:
            self.store.append_audit(
                conn,
                at=_now(None),
                actor=actor or default_actor(),
                action="export",
                subject=subject,
                details={"kind": kind, "path": path},
            )

    def record_denial(self, route: str, reason: str, *, actor: str, subject: str) -> None:
        """Audit a refused request (enroll, renew, revoke) with its reason."""
        with self.store.transaction() as conn:
            self.store.append_audit(
                conn,
                at=_now(None),
                actor=actor,
                action="deny",
                subject=subject,
                details={"route": route, "reason": reason},
            )

    def verify_audit(self) -> AuditReport:
        """Check the audit chain end to end."""
        return verify_audit_chain(
            self.store.audit_events(), expected_count=self.store.counter("audit_seq")
        )

    def audit_tail(self, n: int) -> list[AuditEvent]:
        """Return the last ``n`` audit events."""
        return self.store.audit_events(last=n)
