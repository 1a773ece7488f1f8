"""Staged rotation of the CA's intermediate and root: prepare, activate, retire.

The CA's issuers form an :class:`IssuerSet`, read from the store's ``ca_issuers``
table (or, before the first rotation, from ``root.pem``/``intermediate.pem`` in
TRUSTMESH_HOME). Each issuer is in one state:

``prepared``
    Created and published in the trust bundle (and its CRL and OCSP answers work),
    but not signing yet: every holder of trust gets the new bundle first.
``active``
    Signs new certificates (one intermediate; its root).
``previous``
    Replaced, no longer signing; still in the bundle, the CRLs and OCSP until the
    last certificate it signed has expired.
``retired``
    Gone from the bundle, the CRLs and OCSP; a retired intermediate is listed on
    its root's CRL (reason superseded).

A new root is cross-certified both ways with the old one (:func:`cross_certify`):
leaves of the new chain carry the new root certified by the old one, so peers that
still trust only the old root accept them; leaves of the old chain carry the old
root certified by the new one, for peers that trust only the new root. That one
lives only as long as leaves of the old chain can (``max_ttl`` from prepare; activate
re-issues it until the last one expires) and retire waits until it has expired, so it
never chains a leaf made with a retired key to the new root.

Every step is one transaction: the rows, a compare-and-set on the ``ca_state``
counter (the bundle sequence that ``ca serve`` replicas poll) and the audit event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection

from trustmesh.config import CAConfig
from trustmesh.errors import ConfigError
from trustmesh.hsm import PKCS11URI, generate_pkcs11_key
from trustmesh.pki import (
    PrivateKey,
    Profile,
    create_intermediate,
    create_root,
    cross_certify,
    format_duration,
    load_pem_certificates,
)
from trustmesh.signers import STORE_KEY_REF, Signer, new_stored_key, open_signer
from trustmesh.store import (
    IssuerRow,
    LiveCertificates,
    Store,
    advance_state,
    insert_issuer,
    live_certificates,
    load_issuers,
    read_state,
    update_issuer,
)

__all__ = [
    "LIVE_STATES",
    "ROLES",
    "AuditHook",
    "Issuer",
    "IssuerSet",
    "RotationStatus",
    "StepResult",
    "activate",
    "current_version",
    "initial_issuers",
    "load_issuer_set",
    "prepare",
    "retire",
    "rotation_status",
    "ski_of",
    "store_initial_issuers",
]

ROLES = ("intermediate", "root")
#: States whose certificates are published (bundle, CRLs, OCSP).
LIVE_STATES = ("prepared", "active", "previous")
_TIME = "%Y-%m-%dT%H:%M:%SZ"
_PEM = serialization.Encoding.PEM
#: ``audit(conn, subject, details)``: appends a step's audit event in its transaction.
AuditHook = Callable[[Connection, str, dict[str, object]], None]


def ski_of(cert: x509.Certificate) -> str:
    """Return the SKI of a CA certificate as hex (the ``issuer`` of what it signs)."""
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(_PEM).decode()


@dataclass(frozen=True)
class Issuer:
    """One CA certificate of this CA and where it stands."""

    ski: str
    role: str
    generation: int
    state: str
    parent: str | None
    certificate: x509.Certificate
    key_ref: str
    prepared_at: datetime
    cross: x509.Certificate | None = None
    key_pem: str | None = field(default=None, repr=False)
    activated_at: datetime | None = None
    superseded_at: datetime | None = None
    retired_at: datetime | None = None

    @property
    def name(self) -> str:
        """E.g. ``intermediate 2 (CN=trustmesh Intermediate CA 2)``."""
        cn = self.certificate.subject.rfc4514_string()
        return f"{self.role} {self.generation} ({cn})"

    def to_row(self) -> IssuerRow:
        return IssuerRow(
            ski=self.ski,
            role=self.role,
            generation=self.generation,
            state=self.state,
            parent=self.parent,
            certificate_pem=_pem(self.certificate),
            key_ref=self.key_ref,
            prepared_at=self.prepared_at,
            not_after=self.certificate.not_valid_after_utc,
            cross_pem=_pem(self.cross) if self.cross is not None else None,
            key_pem=self.key_pem,
            activated_at=self.activated_at,
            superseded_at=self.superseded_at,
            retired_at=self.retired_at,
        )

    @classmethod
    def from_row(cls, row: IssuerRow) -> Issuer:
        return cls(
            ski=row.ski,
            role=row.role,
            generation=row.generation,
            state=row.state,
            parent=row.parent,
            certificate=x509.load_pem_x509_certificate(row.certificate_pem.encode()),
            key_ref=row.key_ref,
            prepared_at=row.prepared_at,
            cross=(
                x509.load_pem_x509_certificate(row.cross_pem.encode()) if row.cross_pem else None
            ),
            key_pem=row.key_pem,
            activated_at=row.activated_at,
            superseded_at=row.superseded_at,
            retired_at=row.retired_at,
        )


@dataclass(frozen=True)
class IssuerSet:
    """A consistent snapshot of the CA's issuers.

    Attributes:
        version: The ``ca_state`` counter it was read at (the bundle sequence).
        issuers: Every issuer, roots and intermediates, oldest first.
        stored: False while the issuers come from the files of ``ca init`` only.
    """

    version: int
    issuers: tuple[Issuer, ...]
    stored: bool = True

    def active(self, role: str) -> Issuer:
        """The signing intermediate, or the root above it."""
        return next(i for i in self.issuers if i.role == role and i.state == "active")

    def live(self, role: str) -> list[Issuer]:
        """Published issuers of ``role``: prepared, active and previous."""
        return [i for i in self.issuers if i.role == role and i.state in LIVE_STATES]

    def in_state(self, role: str, state: str) -> list[Issuer]:
        return [i for i in self.issuers if i.role == role and i.state == state]

    def by_ski(self, ski: str) -> Issuer | None:
        return next((i for i in self.issuers if i.ski == ski), None)

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """The trust bundle: every published root, the active one first."""
        live = sorted(self.live("root"), key=lambda i: (i.state != "active", i.generation))
        return tuple(i.certificate for i in live)

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """Every published intermediate, the active one first."""
        live = sorted(self.live("intermediate"), key=lambda i: (i.state != "active", i.generation))
        return tuple(i.certificate for i in live)

    @property
    def crosses(self) -> tuple[x509.Certificate, ...]:
        """Cross certificates between published roots."""
        return tuple(c for r in self.live("root") if (c := self._live_cross(r)) is not None)

    def _live_cross(self, root: Issuer) -> x509.Certificate | None:
        if root.cross is None:
            return None
        issuers = [r for r in self.live("root") if r.ski != root.ski]
        if any(root.cross.issuer == r.certificate.subject for r in issuers):
            return root.cross
        return None

    def chain_tail(self, intermediate: Issuer) -> tuple[x509.Certificate, ...]:
        """What follows a leaf of ``intermediate`` in its chain: the intermediate, and
        its root certified by the other published root while a root rotation lasts."""
        parent = self.by_ski(intermediate.parent) if intermediate.parent else None
        cross = self._live_cross(parent) if parent is not None else None
        return (intermediate.certificate,) if cross is None else (intermediate.certificate, cross)

    def signer(self, issuer: Issuer, home: Path, passphrase: bytes | None) -> Signer:
        """The key of ``issuer``."""
        return open_signer(
            issuer.key_ref,
            home=home,
            key_pem=issuer.key_pem,
            passphrase=passphrase,
            what=issuer.name,
        )


def initial_issuers(
    root: x509.Certificate,
    inter: x509.Certificate,
    *,
    root_ref: str = "file:root.key",
    inter_ref: str = "file:intermediate.key",
) -> tuple[Issuer, Issuer]:
    """The root and intermediate ``ca init`` creates (generation 1, active).

    .. versionadded:: 0.3
    """
    root_ski = ski_of(root)
    return (
        Issuer(
            ski=root_ski,
            role="root",
            generation=1,
            state="active",
            parent=None,
            certificate=root,
            key_ref=root_ref,
            prepared_at=root.not_valid_before_utc,
            activated_at=root.not_valid_before_utc,
        ),
        Issuer(
            ski=ski_of(inter),
            role="intermediate",
            generation=1,
            state="active",
            parent=root_ski,
            certificate=inter,
            key_ref=inter_ref,
            prepared_at=inter.not_valid_before_utc,
            activated_at=inter.not_valid_before_utc,
        ),
    )


def store_initial_issuers(conn: Connection, issuers: Sequence[Issuer]) -> None:
    """Record the issuers of ``ca init`` when their keys are not the default files.

    .. versionadded:: 0.3
    """
    for issuer in issuers:
        insert_issuer(conn, issuer.to_row())


def _files_issuers(home: Path) -> tuple[Issuer, Issuer]:
    def load(name: str) -> x509.Certificate:
        path = home / name
        try:
            return load_pem_certificates(path.read_bytes(), source=str(path))[0]
        except FileNotFoundError:
            raise ConfigError(
                f"The CA in {home} is incomplete: {name} is missing.", path=str(path)
            ) from None

    return initial_issuers(load("root.pem"), load("intermediate.pem"))


def _read_set(conn: Connection, home: Path) -> IssuerSet:
    version = read_state(conn)
    rows = load_issuers(conn)
    if not rows:
        return IssuerSet(version, _files_issuers(home), stored=False)
    return IssuerSet(version, tuple(Issuer.from_row(r) for r in rows))


def load_issuer_set(home: Path, store: Store) -> IssuerSet:
    """Read the CA's issuers.

    Raises:
        ConfigError: No rotation yet and ``root.pem``/``intermediate.pem`` are missing.
        StoreError: The database failed.
    """
    with store.reader() as conn:
        return _read_set(conn, home)


def current_version(store: Store) -> int:
    """The ``ca_state`` counter: cheap to poll."""
    with store.reader() as conn:
        return read_state(conn)


# -- the steps ---------------------------------------------------------------------


def _role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"Unknown CA role {role!r}: rotate 'intermediate' or 'root'.")
    return role


def _when(at: datetime, now: datetime) -> str:
    left = at - now
    return f"{at:{_TIME}} (in {format_duration(max(left, timedelta(seconds=1)))})"


def _begin(conn: Connection, home: Path) -> IssuerSet:
    """Read the set inside the step's transaction; store the files' issuers on first use."""
    current = _read_set(conn, home)
    if not current.stored:
        for issuer in current.issuers:
            insert_issuer(conn, issuer.to_row())
    return current


def _in_progress(current: IssuerSet) -> str | None:
    # The root first: a root rotation also prepares (and later replaces) an
    # intermediate, and its steps are the root's, not the intermediate's.
    for role in reversed(ROLES):
        prepared = current.in_state(role, "prepared")
        if prepared:
            return (
                f"{prepared[-1].name} is prepared and not active yet: run 'trustmesh ca "
                f"rotate {role} activate' (or see 'trustmesh ca rotate {role} status')"
            )
        previous = current.in_state(role, "previous")
        if previous:
            return (
                f"{previous[0].name} was replaced and is not retired yet: run 'trustmesh ca "
                f"rotate {role} retire' once its certificates have expired (see 'trustmesh ca "
                f"rotate {role} status')"
            )
    return None


@dataclass(frozen=True)
class StepResult:
    """What a step did: the issuers it touched and the new bundle sequence."""

    step: str
    role: str
    version: int
    issuers: tuple[Issuer, ...]
    audit_details: dict[str, object]


#: The timestamp a step sets with each state it moves issuers to.
_STAMPS = {"active": "activated_at", "previous": "superseded_at", "retired": "retired_at"}


def _move(
    conn: Connection, issuers: Sequence[Issuer], state: str, now: datetime
) -> tuple[Issuer, ...]:
    """Put ``issuers`` in ``state`` and stamp when (``activated_at`` for ``active``...);
    return them as they are now."""
    changes: dict[str, Any] = {"state": state, _STAMPS[state]: now}
    for issuer in issuers:
        update_issuer(conn, issuer.ski, **changes)
    return tuple(replace(i, **changes) for i in issuers)


def _max_leaf_ttl(config: CAConfig) -> timedelta:
    """The longest lifetime a leaf of this CA may get (the largest profile ``max_ttl``)."""
    default = Profile(name="default", spiffe_ids=()).max_ttl
    return max((p.max_ttl for p in config.profiles.values()), default=default)


def _old_by_new(old_root: Issuer, new_root: Issuer) -> x509.Certificate | None:
    """The old root certified by the new one, if that is what ``old_root`` carries."""
    cross = old_root.cross
    if cross is None or cross.issuer != new_root.certificate.subject:
        return None
    return cross


def _bounded(cross: x509.Certificate, old_root: Issuer, new_root: Issuer) -> bool:
    """False for a cross certificate made before it was bounded to the old chain's
    leaves (it expires with the roots): ``retire`` does not wait for that one."""
    ends = min(old_root.certificate.not_valid_after_utc, new_root.certificate.not_valid_after_utc)
    return cross.not_valid_after_utc < ends


def _cross_wait(
    current: IssuerSet, going: Sequence[Issuer], now: datetime
) -> x509.Certificate | None:
    """The bounded old-by-new cross certificate of a retiring root still valid at ``now``."""
    new_root = current.active("root")
    for old in going:
        if old.role != "root":
            continue
        cross = _old_by_new(old, new_root)
        if cross is not None and _bounded(cross, old, new_root):
            if cross.not_valid_after_utc >= now:
                return cross
    return None


def _names(issuers: Iterable[Issuer]) -> list[str]:
    """How the audit details name issuers: ``intermediate 2 SKI``."""
    return [f"{i.role} {i.generation} {i.ski}" for i in issuers]


def _finish(
    conn: Connection,
    current: IssuerSet,
    audit: AuditHook,
    step: str,
    role: str,
    touched: Sequence[Issuer],
    details: Mapping[str, object],
) -> StepResult:
    """Close a step inside its transaction: move the bundle sequence on (compare-and-set
    against ``current``) and append the audit event ``ROLE:STEP``."""
    version = advance_state(conn, current.version)
    full: dict[str, object] = {"step": step, "role": role, "bundle_sequence": version, **details}
    audit(conn, f"{role}:{step}", full)
    return StepResult(step, role, version, tuple(touched), full)


def prepare(
    *,
    role: str,
    home: Path,
    config: CAConfig,
    store: Store,
    passphrase: bytes | None,
    audit: AuditHook,
    now: datetime,
    pkcs11: str | None = None,
) -> StepResult:
    """Create the next ``role`` (key + certificate) and publish it, not signing yet.

    ``pkcs11`` (a token URI; default ``config.pkcs11``) puts the new keys in that
    PKCS#11 token instead of the store.

    Raises:
        ConfigError: A rotation is already under way (prepared, or not retired),
            the passphrase is missing, or the token cannot be used.
        PKIError: The passphrase does not unlock the root key.

    .. versionchanged:: 0.3
       ``pkcs11``.
    """
    _role(role)
    token = pkcs11 or config.pkcs11 or None
    token_uri = PKCS11URI.parse(token) if token else None
    if not passphrase and token_uri is None:
        raise ConfigError(
            "No CA passphrase: set TRUSTMESH_CA_PASSPHRASE or pass --passphrase-file."
        )

    def new_key(kind: str, generation: int) -> tuple[PrivateKey, str, str | None]:
        if token_uri is None:
            key, pem = new_stored_key(config.key_type, passphrase or b"")
            return key, STORE_KEY_REF, pem
        label = f"{token_uri.object or 'trustmesh'}-{kind}-{generation}-{now:%Y%m%d%H%M%S}"
        signer = generate_pkcs11_key(token_uri, config.key_type, label)
        return signer.private_key(), signer.ref, None

    with store.transaction() as conn:
        current = _begin(conn, home)
        busy = _in_progress(current)
        if busy is not None:
            raise ConfigError(f"Refusing to prepare a new {role}: {busy}.", reason="in_progress")
        old_root = current.active("root")
        root_key = current.signer(old_root, home, passphrase).private_key()
        next_gen = {r: 1 + max(i.generation for i in current.issuers if i.role == r) for r in ROLES}
        touched: list[Issuer] = []
        if role == "root":
            new_root_key, new_root_ref, new_root_pem = new_key("root", next_gen["root"])
            new_root_cert = create_root(
                new_root_key,
                config.trust_domain,
                lifetime=config.root_lifetime,
                now=now,
                backdate=config.backdate,
                generation=next_gen["root"],
            )
            new_root = Issuer(
                ski=ski_of(new_root_cert),
                role="root",
                generation=next_gen["root"],
                state="prepared",
                parent=None,
                certificate=new_root_cert,
                key_ref=new_root_ref,
                key_pem=new_root_pem,
                prepared_at=now,
                cross=cross_certify(
                    new_root_cert,
                    old_root.certificate,
                    root_key,
                    now=now,
                    backdate=config.backdate,
                ),
            )
            # The old root certified by the new one chains leaves of the old root to
            # the new root alone; after retire it must not (a peer off the revocation
            # feed would still accept a leaf made with a retired key). It covers the
            # leaves the old chain may issue from now on; activate re-issues it for the
            # leaves issued until then, and retire waits until it has expired.
            old_cross = cross_certify(
                old_root.certificate,
                new_root_cert,
                new_root_key,
                now=now,
                backdate=config.backdate,
                not_after=now + _max_leaf_ttl(config),
            )
            update_issuer(conn, old_root.ski, cross_pem=_pem(old_cross))
            insert_issuer(conn, new_root.to_row())
            touched.append(new_root)
            parent, parent_key = new_root, new_root_key
        else:
            parent, parent_key = old_root, root_key
        inter_key, inter_ref, inter_pem = new_key("intermediate", next_gen["intermediate"])
        inter_cert = create_intermediate(
            parent.certificate,
            parent_key,
            inter_key,
            config.trust_domain,
            lifetime=config.intermediate_lifetime,
            now=now,
            crl_urls=config.root_crl_urls,
            backdate=config.backdate,
            generation=next_gen["intermediate"],
        )
        inter = Issuer(
            ski=ski_of(inter_cert),
            role="intermediate",
            generation=next_gen["intermediate"],
            state="prepared",
            parent=parent.ski,
            certificate=inter_cert,
            key_ref=inter_ref,
            key_pem=inter_pem,
            prepared_at=now,
        )
        insert_issuer(conn, inter.to_row())
        touched.append(inter)
        details: dict[str, object] = {
            "activate_from": f"{now + config.rotation_min_overlap:{_TIME}}",
            **{
                f"new_{i.role}": {
                    "generation": i.generation,
                    "serial": format(i.certificate.serial_number, "x"),
                    "ski": i.ski,
                    "not_after": f"{i.certificate.not_valid_after_utc:{_TIME}}",
                }
                for i in touched
            },
        }
        return _finish(conn, current, audit, "prepare", role, touched, details)


def activate(
    *,
    role: str,
    home: Path,
    config: CAConfig,
    store: Store,
    passphrase: bytes | None,
    audit: AuditHook,
    now: datetime,
) -> StepResult:
    """Let the prepared ``role`` sign; the one it replaces becomes ``previous``.

    Raises:
        ConfigError: Nothing prepared, or the bundle has not been published for
            ``rotation_min_overlap`` yet (the message says when it will be allowed).
        PKIError: The passphrase does not unlock the new key.
    """
    _role(role)
    with store.transaction() as conn:
        current = _begin(conn, home)
        pending = current.in_state(role, "prepared")
        if role == "intermediate":
            root = current.active("root")
            staged = [i for i in pending if i.parent != root.ski]
            if staged:
                raise ConfigError(
                    f"Refusing to activate {staged[-1].name} alone: it belongs to the "
                    f"prepared root rotation and signs under a root that is not active "
                    f"yet: run 'trustmesh ca rotate root activate' instead.",
                    reason="root_rotation",
                )
        if not pending:
            other = next((r for r in ROLES if r != role and current.in_state(r, "prepared")), None)
            hint = (
                f" ({other} rotation is prepared: 'trustmesh ca rotate {other} activate')"
                if other
                else f": run 'trustmesh ca rotate {role} prepare' first"
            )
            raise ConfigError(f"No {role} rotation is prepared{hint}.", reason="not_prepared")
        target = pending[-1]
        allowed = target.prepared_at + config.rotation_min_overlap
        if now < allowed:
            raise ConfigError(
                f"Refusing to activate {target.name} yet: its bundle was published at "
                f"{target.prepared_at:{_TIME}} and rotation_min_overlap is "
                f"{format_duration(config.rotation_min_overlap)}, so activation is allowed "
                f"from {_when(allowed, now)}.",
                reason="too_early",
                allowed_at=f"{allowed:{_TIME}}",
            )
        if role == "root":
            new_inter = next(
                i for i in current.in_state("intermediate", "prepared") if i.parent == target.ski
            )
            switching = [target, new_inter]
        else:
            new_inter = target
            switching = [target]
        current.signer(new_inter, home, passphrase).private_key()  # the passphrase works
        replaced = [current.active(r.role) for r in switching]
        crossed: dict[str, object] = {}
        if role == "root":
            cross = _reissue_old_cross(
                conn, current, replaced[0], target, home, passphrase, config, now
            )
            crossed["old_root_cross"] = {
                "serial": format(cross.serial_number, "x"),
                "not_after": f"{cross.not_valid_after_utc:{_TIME}}",
            }
        _move(conn, replaced, "previous", now)
        touched = _move(conn, switching, "active", now)
        details = {"active": _names(switching), "previous": _names(replaced), **crossed}
        return _finish(conn, current, audit, "activate", role, touched, details)


def _reissue_old_cross(
    conn: Connection,
    current: IssuerSet,
    old_root: Issuer,
    new_root: Issuer,
    home: Path,
    passphrase: bytes | None,
    config: CAConfig,
    now: datetime,
) -> x509.Certificate:
    """At root activate: certify the old root by the new one again, until the last
    leaf the old root's intermediates signed expires (they sign nothing from now on),
    and never earlier than the certificate of ``prepare`` (so the stored one is always
    the last to expire of those the CA published, which is what ``retire`` waits for)."""
    old_skis = [i.ski for i in current.issuers if i.parent == old_root.ski]
    live = live_certificates(conn, old_skis, now=now)
    end = live.last_not_after or now
    previous = _old_by_new(old_root, new_root)
    if previous is not None:
        # A cross certificate of an older prepare (expiring with the roots) counts
        # only as far as a bounded one would have reached.
        bounded = _bounded(previous, old_root, new_root)
        reach = previous.not_valid_after_utc
        end = max(end, reach if bounded else new_root.prepared_at + _max_leaf_ttl(config))
    key = current.signer(new_root, home, passphrase).private_key()
    cross = cross_certify(
        old_root.certificate,
        new_root.certificate,
        key,
        now=now,
        backdate=config.backdate,
        not_after=end,
    )
    update_issuer(conn, old_root.ski, cross_pem=_pem(cross))
    return cross


def _retiring(current: IssuerSet, role: str) -> list[Issuer]:
    previous = current.in_state(role, "previous")
    if role == "intermediate":
        return previous
    skis = {r.ski for r in previous}
    below = [
        i
        for i in current.issuers
        if i.role == "intermediate" and i.parent in skis and i.state in LIVE_STATES
    ]
    return previous + below


def retire(
    *,
    role: str,
    home: Path,
    config: CAConfig,
    store: Store,
    passphrase: bytes | None,
    audit: AuditHook,
    now: datetime,
) -> StepResult:
    """Drop the replaced ``role`` from the bundle, CRLs and OCSP.

    Raises:
        ConfigError: Nothing to retire, or a certificate it signed is still valid
            (the message says how many and when the last expires).
    """
    _role(role)
    with store.transaction() as conn:
        current = _begin(conn, home)
        going = _retiring(current, role)
        if not [i for i in going if i.role == role]:
            raise ConfigError(
                f"No replaced {role} to retire: retire follows 'trustmesh ca rotate {role} "
                f"activate' (see 'trustmesh ca rotate {role} status').",
                reason="nothing_to_retire",
            )
        signers = [i for i in going if i.role == "intermediate"]
        live = live_certificates(conn, [i.ski for i in signers], now=now)
        if live.count:
            assert live.last_not_after is not None  # noqa: S101 - count > 0
            names = ", ".join(i.name for i in signers)
            shown = ", ".join(live.serials) + (", ..." if live.count > len(live.serials) else "")
            raise ConfigError(
                f"Refusing to retire {names}: {live.count} certificate"
                f"{'s' if live.count != 1 else ''} it signed "
                f"{'are' if live.count != 1 else 'is'} still valid (serials {shown}), the last "
                f"until {live.last_not_after:{_TIME}}; retire is allowed from "
                f"{_when(live.last_not_after + timedelta(seconds=1), now)}.",
                reason="still_valid",
                count=live.count,
                allowed_at=f"{live.last_not_after:{_TIME}}",
            )
        cross = _cross_wait(current, going, now) if role == "root" else None
        if cross is not None:
            ends = cross.not_valid_after_utc
            raise ConfigError(
                f"Refusing to retire {', '.join(i.name for i in going if i.role == role)}: "
                f"the cross certificate that chains it to the new root (serial "
                f"{cross.serial_number:x}) is valid until {ends:{_TIME}}; retire is allowed "
                f"from {_when(ends + timedelta(seconds=1), now)}.",
                reason="still_valid",
                count=0,
                allowed_at=f"{ends + timedelta(seconds=1):{_TIME}}",
            )
        touched = _move(conn, going, "retired", now)
        return _finish(conn, current, audit, "retire", role, touched, {"retired": _names(going)})


# -- status ------------------------------------------------------------------------


@dataclass(frozen=True)
class RotationStatus:
    """Where the rotation of one role stands (``ca rotate ROLE status``)."""

    role: str
    stage: str  # idle | prepared | overlap
    version: int
    issuers: tuple[tuple[Issuer, LiveCertificates], ...]
    min_overlap: timedelta
    activate_allowed_at: datetime | None
    retire_allowed_at: datetime | None
    old_live: LiveCertificates | None
    message: str

    def to_json(self) -> dict[str, object]:
        def iso(value: datetime | None) -> str | None:
            return None if value is None else f"{value:{_TIME}}"

        return {
            "role": self.role,
            "stage": self.stage,
            "bundle_sequence": self.version,
            "min_overlap": format_duration(self.min_overlap),
            "activate_allowed_at": iso(self.activate_allowed_at),
            "retire_allowed_at": iso(self.retire_allowed_at),
            "old_issuer_live_certificates": None if self.old_live is None else self.old_live.count,
            "message": self.message,
            "issuers": [
                {
                    "role": i.role,
                    "generation": i.generation,
                    "state": i.state,
                    "subject": i.certificate.subject.rfc4514_string(),
                    "serial": format(i.certificate.serial_number, "x"),
                    "ski": i.ski,
                    "not_after": iso(i.certificate.not_valid_after_utc),
                    "prepared_at": iso(i.prepared_at),
                    "activated_at": iso(i.activated_at),
                    "superseded_at": iso(i.superseded_at),
                    "retired_at": iso(i.retired_at),
                    "live_certificates": live.count,
                    "key": i.key_ref,
                }
                for i, live in self.issuers
            ],
        }


def rotation_status(
    *, role: str, home: Path, config: CAConfig, store: Store, now: datetime
) -> RotationStatus:
    """Report the stage of ``role``'s rotation, its issuers and what the old one still signs."""
    _role(role)
    with store.reader() as conn:
        current = _read_set(conn, home)
        rows: list[tuple[Issuer, LiveCertificates]] = []
        shown: Iterable[Issuer] = (i for i in current.issuers if i.role == role)
        for issuer in shown:
            skis = (
                [issuer.ski]
                if role == "intermediate"
                else [i.ski for i in current.issuers if i.parent == issuer.ski]
            )
            rows.append((issuer, live_certificates(conn, skis, now=now)))
        going = [i for i in _retiring(current, role) if i.role == "intermediate"]
        old_live = live_certificates(conn, [i.ski for i in going], now=now) if going else None
    prepared = current.in_state(role, "prepared")
    activate_at = retire_at = None
    if prepared:
        stage = "prepared"
        activate_at = prepared[-1].prepared_at + config.rotation_min_overlap
        message = (
            f"{prepared[-1].name} is published in the bundle and not signing; activate "
            f"allowed from {activate_at:{_TIME}}" + (" (now)" if now >= activate_at else "")
        )
    elif current.in_state(role, "previous"):
        stage = "overlap"
        assert old_live is not None  # noqa: S101 - previous issuers exist
        retire_at = old_live.last_not_after or now
        waiting = _cross_wait(current, current.in_state(role, "previous"), now)
        if waiting is not None:
            retire_at = max(retire_at, waiting.not_valid_after_utc + timedelta(seconds=1))
        message = (
            f"{current.active(role).name} signs; {old_live.count} live certificate"
            f"{'s' if old_live.count != 1 else ''} still signed by the old one; retire "
            f"allowed from {retire_at:{_TIME}}"
            + (" (now)" if not old_live.count and waiting is None else "")
        )
    else:
        stage = "idle"
        message = f"{current.active(role).name} signs; no rotation under way"
    return RotationStatus(
        role=role,
        stage=stage,
        version=current.version,
        issuers=tuple(rows),
        min_overlap=config.rotation_min_overlap,
        activate_allowed_at=activate_at,
        retire_allowed_at=retire_at,
        old_live=old_live,
        message=message,
    )


def now_utc() -> datetime:
    """The current time, whole seconds."""
    return datetime.now(UTC).replace(microsecond=0)
