"""The certificate authority: PKI + store + audit.

:class:`CertificateAuthority` owns the CA files in ``TRUSTMESH_HOME`` (root and
intermediate certificates, their encrypted keys, ``config.toml``) and the
database. Every operation that hands something out records it and appends an
audit event in the same transaction, and only then returns it.
"""

from __future__ import annotations

import contextlib
import getpass
import ipaddress
import logging
import os
import secrets
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
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
    load_pem_certificates,
    load_private_key,
    match_spiffe_pattern,
    parse_reason,
    request_matches_issuer,
    verify_chain,
)
from trustmesh.store import (
    CertificateRecord,
    RevocationEvent,
    Store,
    add_join_token,
    consume_join_token,
    open_store,
)

__all__ = [
    "CA_FILES",
    "ROOT_CRL_NAME",
    "CertificateAuthority",
    "Issued",
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
    intermediate: x509.Certificate
    roots: tuple[x509.Certificate, ...]


class _ChainCache:
    """Verified client chains by certificate (hashed and compared by DER), LRU-bounded.

    Only the signatures, EKU and SPIFFE ID checks are remembered; the time window is
    re-checked and the revocation status looked up on every use, and an entry counts
    only for the CA certificates it was verified against (a rotation misses).
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


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).replace(microsecond=0)


def _sign_root_crl(
    root: x509.Certificate, root_key: PrivateKey, at: datetime, lifetime: timedelta
) -> x509.CertificateRevocationList:
    # Lists revoked intermediates: none can be revoked yet (there is one, and rotating it
    # is not built), so the list is empty. The CRL number is the signing time in seconds:
    # it increases without a database counter, so an offline root host can sign it too.
    return build_crl(root, root_key, [], number=int(at.timestamp()), now=at, lifetime=lifetime)


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
        self._key: PrivateKey | None = None
        self._root_crl: x509.CertificateRevocationList | None = None
        self._chains = _ChainCache()
        self.root = self._load_cert("root.pem")
        self.intermediate = self._load_cert("intermediate.pem")
        ski = self.intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        self.issuer_id = ski.value.digest.hex()

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        home: Path,
        *,
        trust_domain: str,
        passphrase: bytes,
        key_type: KeyType = KeyType.EC_P256,
        db_url: str | None = None,
        actor: str | None = None,
        now: datetime | None = None,
        crl_urls: Sequence[str] = (),
        ocsp_urls: Sequence[str] = (),
        root_crl_urls: Sequence[str] | None = None,
        backdate: timedelta = BACKDATE,
    ) -> CertificateAuthority:
        """Create a root and an intermediate CA in ``home``, and the root-signed CRL.

        Args:
            crl_urls: Public URLs of the leaf CRL, written into every leaf (CDP).
            ocsp_urls: Public URLs of the OCSP responder, written into every leaf (AIA).
            root_crl_urls: Public URLs of the root-signed CRL, written into the
                intermediate (CDP). None: ``URL/root`` for each ``crl_urls`` entry
                that ends in ``/crl`` (the layout of ``ca serve --ocsp-listen``).

        ``backdate`` (0 to 10 minutes) is written to ``config.toml`` and used for the CA
        certificates and every certificate issued later.

        Raises:
            ConfigError: A CA already exists there, the trust domain is invalid,
                the passphrase is empty, or the database cannot be reached.
        """
        existing = [n for n in (CONFIG_NAME, *CA_FILES) if (home / n).exists()]
        if existing:
            raise ConfigError(
                f"A CA already exists in {home} ({', '.join(existing)}); refusing to "
                f"overwrite it. Use another TRUSTMESH_HOME or remove the directory.",
                path=str(home),
            )
        if not passphrase:
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
        )  # checks the URLs before anything is created
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = open_store(url)  # fail on a bad database before writing any file
        start = _now(now)
        root_key = generate_private_key(key_type)
        root = create_root(root_key, trust_domain, now=start, backdate=backdate)
        inter_key = generate_private_key(key_type)
        inter = create_intermediate(
            root,
            root_key,
            inter_key,
            trust_domain,
            now=start,
            crl_urls=config.root_crl_urls,
            backdate=backdate,
        )
        pem = serialization.Encoding.PEM
        contents = {
            "root.pem": root.public_bytes(pem),
            "root.key": dump_private_key(root_key, passphrase),
            "intermediate.pem": inter.public_bytes(pem),
            "intermediate.key": dump_private_key(inter_key, passphrase),
        }
        root_crl = _sign_root_crl(root, root_key, start, config.root_crl_lifetime)
        staged: list[tuple[Path, Path]] = []
        try:
            for name, data in contents.items():
                staged.append((stage_file(home / name, data, mode=CA_FILES[name]), home / name))
            staged.append(
                (stage_file(home / CONFIG_NAME, config.dumps().encode()), home / CONFIG_NAME)
            )
            staged.append(
                (
                    stage_file(
                        home / ROOT_CRL_NAME, root_crl.public_bytes(serialization.Encoding.DER)
                    ),
                    home / ROOT_CRL_NAME,
                )
            )
            with store.transaction() as conn:
                store.append_audit(
                    conn,
                    at=start,
                    actor=actor or default_actor(),
                    action="init",
                    subject=SpiffeID.trust_domain_id(trust_domain).uri,
                    details={
                        "key_type": key_type.value,
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

    def close(self) -> None:
        """Release the database."""
        self.store.close()

    def __enter__(self) -> CertificateAuthority:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_cert(self, name: str) -> x509.Certificate:
        path = self.home / name
        try:
            return load_pem_certificates(path.read_bytes(), source=str(path))[0]
        except FileNotFoundError:
            raise ConfigError(
                f"The CA in {self.home} is incomplete: {name} is missing.", path=str(path)
            ) from None

    @property
    def signing_key(self) -> PrivateKey:
        """The intermediate's private key, decrypted on first use.

        Raises:
            PKIError: No or a wrong passphrase.
        """
        if self._key is None:
            path = self.home / "intermediate.key"
            self._key = load_private_key(path.read_bytes(), self._passphrase, source=str(path))
        return self._key

    @property
    def bundle(self) -> tuple[x509.Certificate, ...]:
        """The trust anchors relying parties should trust."""
        return (self.root,)

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
        signing_key = self.signing_key
        for attempt in range(_SERIAL_ATTEMPTS):
            cert = issue_leaf(
                request,
                self.intermediate,
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
                    record = self._record_for(cert, request, profile, allowance or SANAllowance())
                    issued = Issued(cert, (cert, self.intermediate), self.bundle, record, key)
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
                        cert, request, profile, granted or allowance or SANAllowance()
                    )
                    issued = Issued(cert, (cert, self.intermediate), self.bundle, record, key)
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
    ) -> CertificateRecord:
        ktype = key_type_of(request.public_key)
        return CertificateRecord(
            issuer=self.issuer_id,
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
        if cert == self.intermediate or cert in self.bundle:
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
        for the CA certificates it was verified against; the validity period is
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
        roots = self.bundle
        if (
            entry is None
            or entry.intermediate is not self.intermediate
            or entry.roots != roots
            or not entry.valid_from <= when <= entry.valid_until
        ):
            # The leaf's revocation is looked up below; this CA's own certificates are
            # never revoked in its table (is_revoked says False for them).
            spiffe_id = verify_chain(
                cert, [self.intermediate], list(roots), usage="client", now=when
            )
            chain = (cert, self.intermediate, *roots)
            entry = _VerifiedChain(
                spiffe_id,
                valid_from=max(c.not_valid_before_utc for c in chain),
                valid_until=min(c.not_valid_after_utc for c in chain),
                intermediate=self.intermediate,
                roots=roots,
            )
            self._chains.put(cert, entry)
        serial = _serial_hex(cert.serial_number)
        record = self.store.lookup_certificate(serial)
        if record is None or record.revoked_at is not None:
            raise CertificateRevokedError(
                f"Certificate {serial} ({entry.spiffe_id}) was revoked.", reason="revoked"
            )
        return entry.spiffe_id, record

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

    def crl(
        self, *, actor: str | None = None, now: datetime | None = None
    ) -> x509.CertificateRevocationList:
        """Build a CRL of unexpired revoked certificates with the next CRL number."""
        at = _now(now)
        entries = [
            RevokedEntry(int(serial, 16), datetime.fromtimestamp(revoked_at, UTC), reason)
            for serial, revoked_at, reason in self.store.revoked_entries(now=at)
        ]
        key = self.signing_key
        with self.store.transaction() as conn:
            number = self.store.next_counter(conn, "crl_number")
            crl = build_crl(
                self.intermediate,
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
                details={"entries": len(entries)},
            )
        return crl

    def root_crl(
        self, *, actor: str | None = None, now: datetime | None = None
    ) -> x509.CertificateRevocationList:
        """Return the root-signed CRL of the intermediates.

        Peers that check revocation for the whole chain (nginx ``ssl_crl``, HAProxy
        ``crl-file``, ``openssl verify -crl_check_all``) need a CRL for the
        intermediate too, and only the root can sign it. It is kept in
        ``root.crl`` (written by ``ca init``) and re-signed with the root key once
        half of its ``root_crl_lifetime`` has passed, or when the file is missing
        or not the root's. The root key is decrypted only for that (with the CA
        passphrase) and not kept. When ``root.key`` is not here (kept offline),
        the stored CRL is served until its ``nextUpdate`` with a warning; re-sign
        it with ``trustmesh crl --root`` where the root key is.

        Raises:
            ConfigError: No valid root CRL is stored and the root key cannot be
                unlocked.
        """
        at = _now(now)
        cached = self._root_crl
        if cached is None or at >= _resign_at(cached):
            cached = self._root_crl = self._stored_root_crl()
        if cached is not None and at < _resign_at(cached):
            return cached
        path = self.home / "root.key"
        try:
            root_key = load_private_key(path.read_bytes(), self._passphrase, source=str(path))
        except (OSError, PKIError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else exc.message
            if cached is not None and cached.next_update_utc and at < cached.next_update_utc:
                log.warning(
                    "The root CRL in %s is due to be re-signed but the root key cannot be "
                    "used (%s); serving it until its nextUpdate %s. Run 'trustmesh crl "
                    "--root' where root.key is and copy %s here.",
                    self.home,
                    why,
                    f"{cached.next_update_utc:%Y-%m-%dT%H:%M:%SZ}",
                    ROOT_CRL_NAME,
                    extra={"event": "root_crl_due"},
                )
                return cached
            raise ConfigError(
                f"No valid root-signed CRL in {self.home / ROOT_CRL_NAME} and the root key "
                f"cannot be used to sign one ({why}): run 'trustmesh crl --root' with the "
                f"CA passphrase where root.key is, and copy {ROOT_CRL_NAME} into {self.home}.",
                path=str(self.home / ROOT_CRL_NAME),
            ) from None
        crl = _sign_root_crl(self.root, root_key, at, self.config.root_crl_lifetime)
        del root_key
        try:
            atomic_write(self.home / ROOT_CRL_NAME, crl.public_bytes(serialization.Encoding.DER))
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
                    "entries": 0,
                    "number": int(at.timestamp()),
                    "next_update": f"{crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}",
                },
            )
        self._root_crl = crl
        return crl

    def _stored_root_crl(self) -> x509.CertificateRevocationList | None:
        """The root CRL in the home, when it is readable and signed by our root."""
        path = self.home / ROOT_CRL_NAME
        try:
            crl = x509.load_der_x509_crl(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s)", path, exc)
            return None
        if crl.issuer != self.root.subject or not crl.is_signature_valid(
            self.root.public_key()  # type: ignore[arg-type]
        ):
            log.warning("ignoring %s: it is not signed by this CA's root", path)
            return None
        return crl

    def chain_crls(
        self, *, actor: str | None = None, now: datetime | None = None
    ) -> tuple[x509.CertificateRevocationList, x509.CertificateRevocationList]:
        """Return the CRLs for the whole chain: the intermediate's (leaves), the root's.

        Raises:
            ConfigError: See :meth:`root_crl`.
        """
        return self.crl(actor=actor, now=now), self.root_crl(actor=actor, now=now)

    def ocsp_response(
        self, request: ocsp.OCSPRequest, *, now: datetime | None = None
    ) -> ocsp.OCSPResponse:
        """Answer an OCSP request for a certificate of this CA."""
        if not request_matches_issuer(request, self.intermediate):
            status = OCSPStatus("unknown")
        else:
            try:
                record = self.store.get_certificate(_serial_hex(request.serial_number))
            except NotFoundError:
                status = OCSPStatus("unknown")
            else:
                if record.revoked_at is not None:
                    status = OCSPStatus(
                        "revoked", record.revoked_at, record.revocation_reason or "unspecified"
                    )
                else:
                    status = OCSPStatus("good")
        return build_ocsp_response(request, status, self.intermediate, self.signing_key, now=now)

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
