"""The node agent: one node identity, one SVID per registration entry, kept current.

The node enrolls once with a join token and renews its own identity with
:class:`trustmesh.agent.Agent` (files in ``DATA/node``). With that identity it lists its
registration entries on the CA, obtains an X.509-SVID for each (a fresh key per SVID, kept
in memory only), renews each at 2/3 of its life (with jitter), re-issues at once an SVID
the revocation feed reports revoked, drops the SVIDs of deleted entries, and keeps the
trust bundle, the CRL and the JWT-SVID keys current. Every change goes into the
:class:`~._cache.IdentityCache` the socket services stream from. A trust bundle the CA
publishes on its feed (a rotation step) is written to ``DATA/node/bundle.pem`` and
pushed to the streams at once, not at the next poll; the CA itself is verified against
the bundle the CA last sent (after a root retire the CA's certificate chains only to the
new root, which the node's first ``--bundle`` does not hold).
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from trustmesh.agent import Agent, new_key_and_csr, next_renewal
from trustmesh.client import CAClient
from trustmesh.errors import APIError, ClientError, ConfigError, TrustmeshError, VerificationError
from trustmesh.pki import KeyType, SpiffeID, spiffe_id_of, verify_chain
from trustmesh.tls import BundleUpdate, RevocationSet
from trustmesh.tokens import jwt_svid_keys

from ._cache import SVID, IdentityCache, entry_selectors

__all__ = ["DEFAULT_REFRESH", "WorkloadAgent"]

log = logging.getLogger("trustmesh.workload")

#: Seconds between two looks at the CA's entries, bundle and CRL.
DEFAULT_REFRESH = 5.0
#: Seconds between two checks of held serials against the revocation set.
_REVOCATION_TICK = 0.1


def _roots_from_bundle(doc: dict[str, Any]) -> list[x509.Certificate]:
    roots = []
    for key in doc.get("keys", []):
        if isinstance(key, dict) and key.get("use") == "x509-svid":
            for der in key.get("x5c", [])[:1]:
                roots.append(x509.load_der_x509_certificate(base64.b64decode(der)))
    return roots


@dataclass
class WorkloadAgent:
    """Holds the SVIDs of one node's registration entries.

    Args:
        ca_url: The CA API.
        node_id: This node's SPIFFE ID (what its entries name).
        data_dir: Where the node identity lives (``DATA/node``: key.pem, chain.pem...).
        bundle: PEM trust anchors to verify the CA with (default: ``DATA/node/bundle.pem``).
        token, token_file: The join token for the node's first enrollment.
        key_type: Type of every new key.
        refresh: Seconds between looks at entries, bundle and CRL.

    .. versionadded:: 0.1
    """

    ca_url: str
    node_id: SpiffeID
    data_dir: Path
    bundle: Path | None = None
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    key_type: KeyType = KeyType.EC_P256
    refresh: float = DEFAULT_REFRESH
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.node_id, str):
            self.node_id = SpiffeID.parse(self.node_id)
        if self.refresh <= 0:
            raise ConfigError("--refresh must be positive, e.g. 5s.", field="refresh")
        self.node = Agent(
            self.ca_url,
            self.node_id,
            self.data_dir / "node",
            bundle=self.bundle,
            token=self.token,
            token_file=self.token_file,
            key_type=self.key_type,
            timeout=self.timeout,
        )
        self.cache = IdentityCache(self.node_id.trust_domain)
        self._svids: dict[str, SVID] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._jitter: dict[str, float] = {}
        self._jwts: dict[tuple[str, tuple[str, ...]], tuple[str, datetime]] = {}
        self._jwt_lock = threading.Lock()
        self._lock = threading.RLock()
        self._rng = secrets.SystemRandom()
        self.revocations: RevocationSet | None = None
        self.reissued = 0

    # -- the CA ---------------------------------------------------------------------

    def _client(self) -> CAClient:
        return CAClient(
            self.ca_url,
            bundle=self.node.ca_bundle(),
            cert_dir=self.node.out,
            timeout=self.timeout,
        )

    def _issue(
        self, client: CAClient, entry: dict[str, Any], roots: list[x509.Certificate]
    ) -> SVID:
        spiffe_id = SpiffeID.parse(entry["spiffe_id"])
        key, csr = new_key_and_csr(spiffe_id, self.key_type)
        result = client.entry_svid(entry["entry_id"], csr)
        try:
            chain = tuple(x509.load_pem_x509_certificates(result.chain.encode()))
        except ValueError:
            raise ClientError("The CA's SVID is not PEM; check the CA's version.") from None
        try:
            verify_chain(chain[0], list(chain[1:]), roots, usage="client")
            if spiffe_id_of(chain[0]) != spiffe_id:
                raise ClientError(f"The CA's SVID is not for {spiffe_id}.")
        except VerificationError as exc:
            raise ClientError(
                f"The CA's SVID for {spiffe_id} does not verify: {exc.message}"
            ) from None
        svid = SVID(
            entry_id=entry["entry_id"],
            spiffe_id=spiffe_id.uri,
            selectors=entry_selectors(entry.get("selectors", [])),
            chain=chain,
            key=key,
        )
        log.info(
            "obtained %s (entry %s): serial %s, valid until %s",
            svid.spiffe_id,
            svid.entry_id,
            svid.serial,
            f"{svid.not_after:%Y-%m-%dT%H:%M:%SZ}",
            extra={"event": "svid", "spiffe_id": svid.spiffe_id, "serial": svid.serial},
        )
        return svid

    def _due(self, svid: SVID, now: datetime) -> bool:
        jitter = self._jitter.setdefault(svid.serial, self._rng.random())
        return now >= next_renewal(svid.not_before, svid.not_after, now, jitter)

    def _revoked(self, svid: SVID) -> bool:
        # Only what the feed reported: a set that fails closed while out of contact would
        # otherwise make every SVID look revoked (the CA refuses revoked nodes anyway).
        revocations = self.revocations
        return (
            revocations is not None and revocations.healthy and revocations.is_revoked(svid.serial)
        )

    # -- one pass -------------------------------------------------------------------

    def sync(self, *, full: bool = True) -> None:
        """Bring the cache up to date: entries, SVIDs (new, due, revoked), bundle, CRL.

        With ``full=False`` only SVIDs that are revoked or due are replaced (no listing).

        Raises:
            TrustmeshError: The CA could not be reached or refused; what is held stays.
        """
        with self._lock, self._client() as client:
            now = datetime.now(UTC)
            bundle_doc = client.spiffe_bundle() if full else None
            roots = (
                _roots_from_bundle(bundle_doc) if bundle_doc else list(self.cache.snapshot().bundle)
            )
            if not roots:
                roots = self.node.roots()
            if full:
                listed = {e["entry_id"]: e for e in client.entries()}
                for gone in set(self._svids) - set(listed):
                    log.info("entry %s was deleted: dropping its SVID", gone)
                    self._svids.pop(gone)
                self._entries = listed
            failures: list[str] = []
            for entry_id, entry in self._entries.items():
                held = self._svids.get(entry_id)
                revoked = held is not None and self._revoked(held)
                changed = held is not None and (
                    held.spiffe_id != entry["spiffe_id"]
                    or [str(s) for s in held.selectors] != list(entry.get("selectors", []))
                )
                if held is not None and not revoked and not changed and not self._due(held, now):
                    continue
                if revoked and held is not None:
                    log.warning(
                        "SVID %s of %s was revoked: re-issuing", held.serial, held.spiffe_id
                    )
                    self._svids.pop(entry_id)  # never serve a revoked SVID, even if re-issue fails
                try:
                    self._svids[entry_id] = self._issue(client, entry, roots)
                    if revoked:
                        self.reissued += 1
                except TrustmeshError as exc:
                    failures.append(f"{entry['spiffe_id']}: {exc.message}")
                    if held is not None and (revoked or held.not_after <= now):
                        self._svids.pop(entry_id, None)
            crls = self._fetch_crls(client, roots) if full else None
            self.cache.update(
                svids=list(self._svids.values()),
                bundle=roots,
                crls=crls,
                jwt_keys=_jwt_keys(bundle_doc) if bundle_doc else None,
            )
            if failures:
                raise ClientError("Could not obtain some SVIDs: " + "; ".join(failures))

    def _fetch_crls(self, client: CAClient, roots: list[x509.Certificate]) -> tuple[bytes, ...]:
        """The chain CRLs (leaf CRL, root-signed CRL), each checked against its issuer.

        A CA whose root CRL cannot be served (root key offline and no valid ``root.crl``:
        503) still gets its leaf CRL through, with a warning; SDS then tells Envoy to
        check the leaf only.
        """
        try:
            ders = client.crl_chain()
        except APIError as exc:
            if exc.status != 503:
                raise
            log.warning("the CA serves no root CRL (%s); serving the leaf CRL only", exc.message)
            ders = [client.crl()]
        issuers = list(roots) + self._node_intermediates()
        for svid in self._svids.values():
            issuers.extend(svid.chain[1:])
        checked = []
        for der in ders:
            crl = x509.load_der_x509_crl(der)
            if not any(_signed_by(crl, issuer) for issuer in issuers):
                raise ClientError(
                    f"The CA's CRL issued by {crl.issuer.rfc4514_string()} is signed by none "
                    "of the trust bundle's roots or the chain's intermediates; keeping the "
                    "CRLs held. Check --bundle."
                )
            checked.append(der)
        return tuple(checked)

    def _node_intermediates(self) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates((self.node.out / "chain.pem").read_bytes())[1:]
        except (OSError, ValueError):
            return []

    def refresh_crls(self) -> None:
        """Fetch the chain CRLs now (the feed reported a revocation) and publish them.

        Raises:
            TrustmeshError: The CA could not be reached or its CRLs do not verify.
        """
        with self._lock, self._client() as client:
            roots = list(self.cache.snapshot().bundle) or self.node.roots()
            self.cache.update(crls=self._fetch_crls(client, roots))

    # -- JWT-SVIDs --------------------------------------------------------------------

    def jwt_svid(self, svid: SVID, audience: tuple[str, ...]) -> str:
        """Return a JWT-SVID for ``svid``'s entry and ``audience`` (cached for half its life)."""
        key = (svid.entry_id, tuple(sorted(audience)))
        now = datetime.now(UTC)
        with self._jwt_lock:
            cached = self._jwts.get(key)
            if cached is not None and cached[1] - now > timedelta(seconds=60):
                return cached[0]
        with self._client() as client:
            token, expires = client.entry_jwt_svid(svid.entry_id, list(key[1]))
        with self._jwt_lock:
            self._jwts = {k: v for k, v in self._jwts.items() if v[1] > now}
            self._jwts[key] = (token, expires)
        return token

    # -- the loop ---------------------------------------------------------------------

    def apply_bundle(self, update: BundleUpdate) -> None:
        """Take a trust bundle the CA published: write it to the node's bundle.pem (as
        ``trustmesh agent`` does) and push it to every Workload API and SDS stream.

        Raises:
            TrustmeshError: The bundle is empty or does not trust the node's own
                certificate; what is held stays (the feed delivers it again).

        .. versionadded:: 0.3
        """
        written = self.node.apply_bundle(update)
        self.cache.update(bundle=list(update.roots))
        log.info(
            "trust bundle %d applied: %d root(s)%s",
            update.sequence,
            len(update.roots),
            f"; wrote {', '.join(map(str, written))}" if written else "",
            extra={"event": "bundle_updated", "bundle_sequence": update.sequence},
        )

    def start_revocations(self) -> None:
        """Follow the CA's revocation feed (and its bundle events) with the node identity."""
        self.revocations = RevocationSet(
            self.ca_url,
            lambda: self._client().ssl_context(),
            grace=timedelta(seconds=60),
            issuers=self._node_intermediates,
            on_bundle=self.apply_bundle,
        )
        self.revocations.start()

    def run(self, stop: threading.Event, *, raise_first: bool = True) -> None:
        """Keep everything current until ``stop`` is set.

        With ``raise_first`` the first pass's errors raise; later ones are logged and
        retried while what is held keeps being served.
        """
        first = raise_first
        next_full = 0.0
        node_check = 0.0
        crl_cursor = 0  # the feed position the held CRLs reflect
        while not stop.is_set():
            mono = time.monotonic()
            try:
                if mono >= node_check:
                    outcome = self.node.ensure()
                    if outcome.action != "unchanged":
                        log.info("node identity: %s", outcome.describe())
                    node_check = mono + min(self.refresh, 60.0)
                revocations = self.revocations
                if revocations is not None and revocations.cursor != crl_cursor:
                    # Even if this fetch fails the next full sync fetches them again.
                    crl_cursor = revocations.cursor
                    self.refresh_crls()  # within the tick: SDS pushes the new CRL to Envoy
                pending = any(self._revoked(s) for s in self._svids.values())
                due = any(self._due(s, datetime.now(UTC)) for s in self._svids.values())
                if mono >= next_full or pending or due:
                    self.sync(full=mono >= next_full or pending)
                    if mono >= next_full:
                        next_full = mono + self.refresh
            except TrustmeshError as exc:
                if first:
                    raise
                log.warning("%s; keeping what is held and retrying", exc.message)
                next_full = mono + min(self.refresh, 5.0)
            first = False
            stop.wait(_REVOCATION_TICK)

    def close(self) -> None:
        """Stop following the feed and wake every stream."""
        if self.revocations is not None:
            self.revocations.stop()
        self.cache.close()


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    if crl.issuer != issuer.subject:
        return False
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _jwt_keys(bundle_doc: dict[str, Any]) -> dict[str, object]:
    return jwt_svid_keys(bundle_doc)
