"""The identity cache: what the node agent currently holds, and who wants to hear of changes.

The agent writes it (new SVIDs, bundle, CRL, entries); the socket services read it. Each
change produces a new immutable :class:`Snapshot` with a higher ``version``; readers either
take :meth:`IdentityCache.snapshot` or block in :meth:`IdentityCache.wait` until the
version moves past the one they have seen (what a gRPC stream does), or register a
callback with :meth:`IdentityCache.subscribe`. The Workload API and Envoy SDS read the same
cache, so both push on the same events: renewal, re-issue after a revocation, entry
changes, a new bundle or CRL.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.pki import PrivateKey, Selector, parse_selector, selectors_match

__all__ = ["SVID", "IdentityCache", "Snapshot"]

log = logging.getLogger("trustmesh.workload.cache")
_DER = serialization.Encoding.DER


@dataclass(frozen=True)
class SVID:
    """One X.509-SVID the agent holds for a registration entry.

    Attributes:
        entry_id: The entry it was issued for.
        spiffe_id: Its SPIFFE ID.
        selectors: The entry's selectors (a caller must match all).
        chain: Leaf first, then the intermediate.
        key: Its private key (never leaves the agent except to a matching caller).

    .. versionadded:: 0.1
    """

    entry_id: str
    spiffe_id: str
    selectors: tuple[Selector, ...]
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def leaf(self) -> x509.Certificate:
        """The SVID's certificate."""
        return self.chain[0]

    @property
    def serial(self) -> str:
        """The leaf's serial, lower-case hex as the CA writes it."""
        return format(self.leaf.serial_number, "x")

    @property
    def not_before(self) -> datetime:
        """Start of validity (UTC)."""
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        """End of validity (UTC)."""
        return self.leaf.not_valid_after_utc

    def chain_der(self) -> bytes:
        """The chain as concatenated DER certificates (the Workload API's ``x509_svid``)."""
        return b"".join(c.public_bytes(_DER) for c in self.chain)

    def key_der(self) -> bytes:
        """The key as unencrypted PKCS#8 DER (the Workload API's ``x509_svid_key``)."""
        return self.key.private_bytes(
            _DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def needs_hash(self) -> bool:
        """True when matching needs the caller's executable hash."""
        return any(s.key == "sha256" for s in self.selectors)


@dataclass(frozen=True)
class Snapshot:
    """Everything the agent holds at one version.

    Attributes:
        version: Increases with every change.
        trust_domain: The trust domain's name (``example.org``).
        svids: The current SVID of every entry of this node (entries without a usable
            SVID yet are absent).
        bundle: The trust anchors (root certificates).
        crls: The CA's current chain CRLs, DER: the leaf CRL, then the root-signed one
            (the leaf CRL alone when the CA serves no root CRL).
        jwt_keys: The trust domain's JWT-SVID signing keys, a JWKS document.

    .. versionadded:: 0.1
    """

    version: int = 0
    trust_domain: str = ""
    svids: tuple[SVID, ...] = ()
    bundle: tuple[x509.Certificate, ...] = ()
    crls: tuple[bytes, ...] = ()
    jwt_keys: dict[str, object] = field(default_factory=dict)

    @property
    def trust_domain_id(self) -> str:
        """``spiffe://TRUST_DOMAIN``: the key of bundle maps in the Workload API."""
        return f"spiffe://{self.trust_domain}"

    def bundle_der(self) -> bytes:
        """The trust anchors as concatenated DER certificates."""
        return b"".join(c.public_bytes(_DER) for c in self.bundle)

    def svids_for(self, have: Callable[[bool], Iterable[Selector]]) -> list[SVID]:
        """Return the SVIDs whose entries the caller matches.

        Args:
            have: Returns the caller's selectors; called with True when an entry needs
                the executable hash (so it is computed only then).
        """
        plain: list[Selector] | None = None
        hashed: list[Selector] | None = None
        found = []
        for svid in self.svids:
            if svid.needs_hash():
                hashed = hashed if hashed is not None else list(have(True))
                selectors = hashed
            else:
                plain = plain if plain is not None else list(have(False))
                selectors = plain
            if selectors_match(svid.selectors, selectors):
                found.append(svid)
        return found


class IdentityCache:
    """The node agent's current identities and trust, with change notification.

    .. versionadded:: 0.1
    """

    def __init__(self, trust_domain: str) -> None:
        self._snapshot = Snapshot(trust_domain=trust_domain)
        self._changed = threading.Condition()
        self._subscribers: list[Callable[[Snapshot], None]] = []
        self._closed = False

    def snapshot(self) -> Snapshot:
        """Return the current snapshot (immutable; safe to keep)."""
        return self._snapshot

    def wait(
        self, seen: int, timeout: float, *, cancelled: threading.Event | None = None
    ) -> Snapshot:
        """Block until the version is past ``seen`` (or ``timeout`` s, :meth:`close`, or
        ``cancelled`` set and :meth:`wake` called: a cancelled stream frees its thread)."""
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    self._closed
                    or self._snapshot.version > seen
                    or (cancelled is not None and cancelled.is_set())
                ),
                timeout=timeout,
            )
            return self._snapshot

    def wake(self) -> None:
        """Wake every :meth:`wait` to look at its ``cancelled`` event again."""
        with self._changed:
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`: streams should end."""
        return self._closed

    def subscribe(self, callback: Callable[[Snapshot], None]) -> Callable[[], None]:
        """Call ``callback(snapshot)`` after every change; returns the unsubscribe function."""
        with self._changed:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._changed:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def update(
        self,
        *,
        svids: Iterable[SVID] | None = None,
        bundle: Iterable[x509.Certificate] | None = None,
        crls: Iterable[bytes] | None = None,
        jwt_keys: dict[str, object] | None = None,
    ) -> Snapshot:
        """Replace the given parts; a new version only when something differs.

        An empty bundle never replaces a non-empty one (a holder of trust never swaps
        to nothing).
        """
        with self._changed:
            current = self._snapshot
            changes: dict[str, object] = {}
            if svids is not None:
                new = tuple(sorted(svids, key=lambda s: (s.spiffe_id, s.entry_id)))
                if [(s.entry_id, s.serial) for s in new] != [
                    (s.entry_id, s.serial) for s in current.svids
                ]:
                    changes["svids"] = new
            if bundle is not None:
                anchors = tuple(bundle)
                if anchors and anchors != current.bundle:
                    changes["bundle"] = anchors
            if crls is not None and tuple(crls) != current.crls:
                changes["crls"] = tuple(crls)
            if jwt_keys is not None and jwt_keys != current.jwt_keys:
                changes["jwt_keys"] = dict(jwt_keys)
            if not changes:
                return current
            self._snapshot = replace(current, version=current.version + 1, **changes)  # type: ignore[arg-type]
            subscribers = list(self._subscribers)
            self._changed.notify_all()
            snapshot = self._snapshot
        log.debug("identity cache version %d: %s changed", snapshot.version, ", ".join(changes))
        for callback in subscribers:
            try:
                callback(snapshot)
            except Exception:  # a subscriber's bug must not stop the others
                log.exception("identity cache subscriber failed")
        return snapshot

    def close(self) -> None:
        """Wake every waiter for good (the agent is stopping)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


def entry_selectors(values: Iterable[str]) -> tuple[Selector, ...]:
    """Parse an entry's stored selectors."""
    return tuple(parse_selector(v) for v in values)
