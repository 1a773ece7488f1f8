"""The revocation set client: the CA's revocation feed, kept in memory.

:class:`RevocationSet` bootstraps from ``GET /v1/revocations?since=0`` (paging),
then follows the server-sent-events stream ``GET /v1/revocations/stream?since=``
from its cursor. When the stream drops it reconnects with backoff from the same
cursor, so nothing revoked meanwhile is missed. While the feed is unreachable it
refreshes the set from the CA's CRL (verified against the trust anchors), and when
neither answered for longer than ``grace`` it fails closed: every serial counts as
revoked (unless ``fail_closed=False``, which is logged as failing open). The CRL may
be signed by any intermediate the CA publishes (during a rotation, the active one is
not the one in our own chain): the set learns them from the feed's ``bundle`` events
(or ``/v1/bundle?format=intermediates``) and accepts one only when it chains to a
trust anchor of ``ssl_context()``.

With ``on_bundle`` it also follows trust changes: the stream is opened with the
bundle sequence it holds, and every ``bundle`` event (a CA rotation step, or a newer
bundle than ours at connect) is handed to the callback; a callback that raises keeps
the sequence, so the next connection delivers the bundle again.

Lookups (:meth:`RevocationSet.is_revoked`) are a set membership test plus two
attribute reads: no lock, safe from any number of threads. One daemon thread does
all the network work, with a synchronous API so WSGI and ASGI servers can share it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from trustmesh.errors import ConfigError, TrustmeshError
from trustmesh.pki import verify_ca_certificate

__all__ = [
    "BundleUpdate",
    "RevocationLike",
    "RevocationSet",
    "canonical_serial",
    "issuer_withdrawn",
]

log = logging.getLogger("trustmesh.tls.revocation")

_PAGE = 1000
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 3.0


def canonical_serial(serial: int | str) -> str:
    """Return a serial as the CA's API writes it: lower-case hex, no leading zeros.

    Accepts an integer, or hex text in any case with an optional ``0x`` prefix
    and ``:`` separators (as ``openssl x509 -serial`` or browsers print it).

    Raises:
        ValueError: Not a serial number.

    .. versionadded:: 0.1
    """
    if isinstance(serial, int):
        if serial < 0:
            raise ValueError(f"serial {serial} is negative")
        return format(serial, "x")
    try:
        value = int(serial.strip().replace(":", ""), 16)
    except ValueError:
        raise ValueError(f"{serial!r} is not a certificate serial (hex)") from None
    if value < 0:
        raise ValueError(f"{serial!r} is negative")
    return format(value, "x")


class RevocationLike(Protocol):
    """Anything that knows revoked serials (:class:`RevocationSet`).

    The middleware, the mTLS client and the sidecar take one; a :class:`RevocationSet`
    also knows the intermediates the CA publishes (see :func:`issuer_withdrawn`).

    .. versionadded:: 0.1
    .. versionchanged:: 0.3
       Defined once here for the middleware and the client
       (``trustmesh.middleware.RevocationLike`` is this class).
    """

    def is_revoked(self, serial: int | str, /) -> bool: ...


def issuer_withdrawn(revocation: RevocationLike | None, cert: x509.Certificate) -> bool:
    """Return True when ``revocation`` knows the CA no longer publishes the issuer of
    ``cert``: a leaf of an intermediate retired by ``ca rotate intermediate retire``, or
    of any intermediate under a root retired by ``ca rotate root retire``.

    False when ``revocation`` is None or knows only serials (a :class:`RevocationLike`
    without :meth:`RevocationSet.issuer_withdrawn`), and while it has not heard which
    intermediates the CA publishes.

    .. versionadded:: 0.3
    """
    check = getattr(revocation, "issuer_withdrawn", None)
    return check is not None and bool(check(cert))


#: Leaves whose issuer check (:meth:`RevocationSet.issuer_withdrawn`) is remembered.
_WITHDRAWN_CACHE_SIZE = 4096


class BundleUpdate:
    """A trust bundle the CA published (a ``bundle`` event of the feed).

    Attributes:
        sequence: The CA's bundle sequence (grows with every rotation step).
        roots: The trust anchors (never empty).
        intermediates: The CA's published intermediates and cross certificates.

    .. versionadded:: 0.3
    """

    __slots__ = ("intermediates", "roots", "sequence")

    def __init__(
        self,
        sequence: int,
        roots: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate],
    ) -> None:
        self.sequence = sequence
        self.roots = tuple(roots)
        self.intermediates = tuple(intermediates)

    @classmethod
    def from_event(cls, data: dict[str, Any]) -> BundleUpdate:
        """Parse the JSON of a ``bundle`` event.

        Raises:
            ValueError: Malformed, or a bundle without certificates.
        """
        sequence, bundle = data.get("sequence"), data.get("bundle")
        if not isinstance(sequence, int) or not isinstance(bundle, str):
            raise ValueError(f"malformed bundle event {str(data)[:200]!r}")
        roots = x509.load_pem_x509_certificates(bundle.encode())  # raises on none
        extra = data.get("intermediates") or ""
        chain = x509.load_pem_x509_certificates(extra.encode()) if extra.strip() else []
        return cls(sequence, roots, chain)


class _FeedClosedError(Exception):
    """The CA ended the stream on purpose (our own certificate was revoked)."""


class RevocationSet:
    """The set of revoked certificate serials, kept current from the CA's feed.

    Args:
        ca_url: The CA's base URL, e.g. ``https://ca.internal:8443``.
        ssl_context: Returns the client context to call the CA with (the feed
            needs our mTLS identity); called again on every reconnect, so a
            rotating identity is picked up, e.g. ``credentials.client_context``.
        grace: How long the set may be out of contact (no feed, no CRL) before
            :meth:`is_revoked` fails closed.
        fail_closed: When True (default), after ``grace`` every serial counts as
            revoked. False keeps answering from the last known set (fail open),
            which is logged as a warning.
        crl_url: Where to fetch the CRL while the feed is unreachable (default:
            ``{ca_url}/v1/crl``); it may point at another replica or a mirror.
        issuers: Returns the CA certificates that may sign the CRL (the
            intermediates of our chain, e.g. ``credentials.intermediates``); each
            must chain to a trust anchor of ``ssl_context()``. A CRL signed
            directly by a trust anchor needs none. The intermediates the CA
            publishes (from the feed's ``bundle`` events, or fetched from
            ``/v1/bundle?format=intermediates`` when a CRL's signer is unknown) are
            accepted too when they chain to a trust anchor, so the CRL of the
            other intermediate verifies during a rotation.
        crl_max_age: A CRL whose ``thisUpdate`` is older than this still adds its
            serials, but does not count as contact for ``grace`` (a replayed or
            stale CRL must not keep a set that lost its feed from failing closed).
            The CA rebuilds its CRL at least every 5 minutes by default.
        crl_interval: Seconds between CRL fetches while the feed is down (default:
            a third of ``grace``, between 0.5 and 30).
        read_timeout: Seconds of silence after which an open stream is considered
            dead (the CA sends a keep-alive every 15 s by default).
        on_bundle: Called (in the worker thread) with each trust bundle the CA
            publishes that differs from ``bundle_sequence``; it should swap trust
            or raise to keep the current one (then it is delivered again on the
            next connection).
        bundle_sequence: The sequence of the bundle held now (0: unknown, so the
            current one is delivered at the first connection).

    .. versionadded:: 0.1
    .. versionchanged:: 0.3
       ``on_bundle`` and ``bundle_sequence``; CRLs of every published intermediate.
    """

    def __init__(
        self,
        ca_url: str,
        ssl_context: Callable[[], ssl.SSLContext],
        *,
        grace: timedelta = timedelta(seconds=30),
        fail_closed: bool = True,
        crl_url: str | None = None,
        issuers: Callable[[], Sequence[x509.Certificate]] | None = None,
        crl_max_age: timedelta = timedelta(minutes=10),
        crl_interval: float | None = None,
        read_timeout: float = 40.0,
        on_bundle: Callable[[BundleUpdate], None] | None = None,
        bundle_sequence: int = 0,
    ) -> None:
        if not ca_url.startswith("https://"):
            raise ConfigError(
                f"CA URL {ca_url!r} must use https: the revocation feed is only served "
                f"over mTLS. Give the CA's https URL, e.g. https://ca.internal:8443.",
                field="ca_url",
            )
        if grace <= timedelta(0):
            raise ValueError("grace must be positive")
        self.ca_url = ca_url.rstrip("/")
        self.crl_url = crl_url or f"{self.ca_url}/v1/crl"
        self.grace = grace
        self.fail_closed = fail_closed
        self.read_timeout = read_timeout
        self.crl_max_age = crl_max_age
        self.crl_interval = (
            crl_interval
            if crl_interval is not None
            else max(0.5, min(grace.total_seconds() / 3, 30.0))
        )
        self._ssl_context = ssl_context
        self._issuers = issuers
        self._on_bundle = on_bundle
        #: The bundle sequence last applied by ``on_bundle``.
        self.bundle_sequence = bundle_sequence
        self.bundle_updates = 0
        self.bundle_failures = 0
        #: The intermediates (and cross certificates) the CA last published; CRL
        #: signers are looked up among them once verified to a trust anchor.
        self.published_intermediates: tuple[x509.Certificate, ...] = ()
        # (the published set it is for, {id(cert): (cert, answer)}): keyed by identity, as
        # a connection's leaf is one object for all its requests (hashing a certificate
        # costs more than the lookup); the entry holds the cert, so its id is not reused.
        self._withdrawn_cache: tuple[
            tuple[x509.Certificate, ...], dict[int, tuple[x509.Certificate, bool]]
        ] = ((), {})
        self._grace_s = grace.total_seconds()
        # Only the worker thread adds to this set (set.add is atomic); a CRL
        # refresh replaces it by a superset in one assignment.
        self._revoked: set[str] = set()
        self.cursor = 0
        #: Monotonic time since when the set is out of contact; None while the
        #: stream is open.
        self._stale_since: float | None = time.monotonic()
        self._started = False
        self._closed_logged = False
        self._transition = threading.Lock()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._backoff = _BACKOFF_FIRST
        self._last_crl = 0.0
        self._unreachable_logged = False
        self._crl_failing: str | None = None
        self._crl_quiet = False
        self.last_error: str | None = None
        # Counters for metrics.
        self.events = 0
        self.connects = 0
        self.disconnects = 0
        self.crl_refreshes = 0
        self.crl_failures = 0
        self.fail_closed_lookups = 0
        self.crl_number: int | None = None
        if not fail_closed:
            log.warning(
                "revocation set for %s fails OPEN: if the feed and the CRL stay unreachable "
                "for more than %gs, revoked callers the set has not heard of are accepted",
                self.ca_url,
                self._grace_s,
                extra={"event": "revocation_fail_open_configured"},
            )

    # -- lookups ------------------------------------------------------------------

    def is_revoked(self, serial: int | str) -> bool:
        """Return True if ``serial`` is revoked, or if the set fails closed.

        Args:
            serial: The certificate's serial number (``cert.serial_number``) or
                its hex text.

        Raises:
            ValueError: ``serial`` is not a serial number.
        """
        key = format(serial, "x") if type(serial) is int else canonical_serial(serial)
        if key in self._revoked:
            return True
        stale = self._stale_since
        if stale is None or not self.fail_closed:
            return False
        if time.monotonic() - stale <= self._grace_s:
            return False
        self.fail_closed_lookups += 1
        if not self._closed_logged:
            self._log_fail_closed(stale)
        return True

    def issuer_withdrawn(self, cert: x509.Certificate) -> bool:
        """Return True when the CA publishes its intermediates and none of them signed
        ``cert``: a leaf of a retired intermediate (after ``ca rotate ... retire``), which
        still chains to the root the handshake trusts. False while no intermediates are
        known yet (before the first bundle event). The answer is cached per certificate
        until the published set changes.
        """
        published = self.published_intermediates
        if not published:
            return False
        cache = self._withdrawn_cache
        if cache[0] is not published:
            cache = (published, {})
            self._withdrawn_cache = cache
        known = cache[1].get(id(cert))
        if known is not None and known[0] is cert:
            return known[1]
        withdrawn = True
        for issuer in published:
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            withdrawn = False
            break
        if len(cache[1]) >= _WITHDRAWN_CACHE_SIZE:
            cache[1].clear()
        cache[1][id(cert)] = (cert, withdrawn)
        return withdrawn

    @property
    def healthy(self) -> bool:
        """True while the feed is connected, or the last contact is within grace."""
        stale = self._stale_since
        return self._started and (stale is None or time.monotonic() - stale <= self._grace_s)

    @property
    def connected(self) -> bool:
        """True while the event stream is open."""
        return self._stale_since is None

    def __len__(self) -> int:
        return len(self._revoked)

    def metrics(self) -> dict[str, float]:
        """Return the counters and gauges, for a metrics exporter."""
        return {
            "revoked": len(self._revoked),
            "cursor": self.cursor,
            "healthy": float(self.healthy),
            "connected": float(self.connected),
            "events_total": self.events,
            "connects_total": self.connects,
            "disconnects_total": self.disconnects,
            "crl_refreshes_total": self.crl_refreshes,
            "crl_failures_total": self.crl_failures,
            "fail_closed_lookups_total": self.fail_closed_lookups,
        }

    def wait_for(self, cursor: int, timeout: float) -> bool:
        """Wait until the set has seen the feed up to ``cursor``; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.cursor >= cursor, timeout)

    def wait_revoked(self, serial: int | str, timeout: float) -> bool:
        """Wait until ``serial`` is in the set (not counting fail-closed); False on timeout."""
        key = canonical_serial(serial)
        with self._changed:
            return self._changed.wait_for(lambda: key in self._revoked, timeout)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until the event stream is open; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._stale_since is None, timeout)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start following the feed in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._stale_since = time.monotonic()
        self._started = True
        self._thread = threading.Thread(
            target=self._run, name=f"trustmesh-revocations:{self.ca_url}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop following the feed and close the connection.

        The set keeps answering from what it knows; it is no longer connected, so
        with ``fail_closed`` it fails closed once ``grace`` has passed.
        """
        self._stop.set()
        sock = self._socket
        if sock is not None:
            # Shutting the stream's socket down unblocks the worker's read at once;
            # the worker then closes its client itself.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=10)
        self._started = False
        if self._stale_since is None:
            self._stale_since = time.monotonic()

    def __enter__(self) -> RevocationSet:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- the worker ---------------------------------------------------------------

    def _log_fail_closed(self, stale: float) -> None:
        with self._transition:
            if self._closed_logged:
                return
            self._closed_logged = True
        log.error(
            "REVOCATION SET FAILING CLOSED: no contact with the revocation feed at %s or "
            "the CRL at %s for %.1fs (grace %gs); every certificate is treated as revoked "
            "until the feed is back (last error: %s)",
            self.ca_url,
            self.crl_url,
            time.monotonic() - stale,
            self._grace_s,
            self.last_error,
            extra={"event": "revocation_fail_closed"},
        )

    def _mark_connected(self) -> None:
        was = self._stale_since
        with self._changed:
            self._stale_since = None
            self._changed.notify_all()
        self._backoff = _BACKOFF_FIRST
        self.connects += 1
        if was is not None and time.monotonic() - was > self._grace_s:
            if self._closed_logged or not self.fail_closed:
                log.warning(
                    "revocation feed at %s is back after %.1fs; the set is current again "
                    "(cursor %d)",
                    self.ca_url,
                    time.monotonic() - was,
                    self.cursor,
                    extra={"event": "revocation_feed_recovered"},
                )
        with self._transition:
            self._closed_logged = False
        self._unreachable_logged = False
        self._crl_failing = None
        self._crl_quiet = False

    def _mark_disconnected(self, error: str) -> None:
        self.last_error = error
        if self._stale_since is None:
            self._stale_since = time.monotonic()
            self.disconnects += 1
            self._unreachable_logged = True
            log.warning(
                "lost the revocation feed at %s (%s); reconnecting from cursor %d",
                self.ca_url,
                error,
                self.cursor,
                extra={"event": "revocation_feed_lost"},
            )
        elif not self._unreachable_logged:
            self._unreachable_logged = True
            log.warning(
                "cannot reach the revocation feed at %s (%s); retrying from cursor %d, with "
                "the CRL at %s meanwhile",
                self.ca_url,
                error,
                self.cursor,
                self.crl_url,
                extra={"event": "revocation_feed_unreachable"},
            )

    def _add(self, event: dict[str, Any]) -> None:
        cursor = event.get("cursor")
        serial = event.get("serial")
        if not isinstance(cursor, int) or not isinstance(serial, str):
            raise ValueError(f"malformed revocation event {str(event)[:200]!r}")
        self._revoked.add(canonical_serial(serial))
        self.events += 1
        with self._changed:
            self.cursor = max(self.cursor, cursor)
            self._changed.notify_all()

    def _new_client(self) -> httpx.Client:
        timeout = httpx.Timeout(10.0, read=self.read_timeout)
        client = httpx.Client(
            base_url=self.ca_url,
            verify=self._ssl_context(),
            timeout=timeout,
            trust_env=False,
            headers={"user-agent": "trustmesh-revocation-set", "accept": "application/json"},
        )
        return client

    def _run(self) -> None:
        bootstrapped = False
        while not self._stop.is_set():
            try:
                with self._new_client() as client:
                    if not bootstrapped:
                        self._bootstrap(client)
                        bootstrapped = True
                    self._follow(client)
            except _FeedClosedError as exc:
                self._mark_disconnected(str(exc))
            except (httpx.HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    break
                self._mark_disconnected(_describe(exc))
            except Exception as exc:  # never let the worker die
                log.exception("revocation set worker failed")
                self._mark_disconnected(_describe(exc))
            finally:
                self._socket = None
            if self._stop.is_set():
                break
            delay = self._backoff * random.uniform(0.8, 1.2)  # noqa: S311 - jitter
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
            self._pause(delay)

    def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds before reconnecting, fetching the CRL whenever it is due."""
        deadline = time.monotonic() + delay
        while not self._stop.is_set():
            self._maybe_crl()
            now = time.monotonic()
            if now >= deadline:
                return
            due = self._last_crl + self.crl_interval
            self._stop.wait(max(0.01, min(deadline, due) - now))

    def _bootstrap(self, client: httpx.Client) -> None:
        while not self._stop.is_set():
            response = client.get(
                "/v1/revocations",
                params={"since": self.cursor, "limit": _PAGE},
                headers={"cache-control": "no-cache"},
            )
            _raise_for(response)
            body = response.json()
            events = body.get("events") if isinstance(body, dict) else None
            if not isinstance(events, list):
                raise ValueError("the CA's /v1/revocations answer has no 'events' list")
            for event in events:
                self._add(event)
            # Contact made: the set is current up to here.
            if self._stale_since is not None:
                self._stale_since = time.monotonic()
            if len(events) < _PAGE:
                log.info(
                    "revocation set bootstrapped from %s: %d revoked, cursor %d",
                    self.ca_url,
                    len(self._revoked),
                    self.cursor,
                    extra={"event": "revocation_bootstrap"},
                )
                return

    def _follow(self, client: httpx.Client) -> None:
        # Always follow bundle events: their intermediates are the CRL signers the
        # fallback accepts (the callback, if any, swaps trust too).
        params: dict[str, int] = {"since": self.cursor, "bundle": self.bundle_sequence}
        with client.stream(
            "GET",
            "/v1/revocations/stream",
            params=params,
            headers={"accept": "text/event-stream", "cache-control": "no-cache"},
        ) as response:
            _raise_for(response)
            stream = response.extensions.get("network_stream")
            self._socket = stream.get_extra_info("socket") if stream is not None else None
            if self._stop.is_set():
                return
            self._mark_connected()
            for kind, data in _sse(response.iter_lines()):
                if self._stop.is_set():
                    return
                if kind == "revocation":
                    self._add(json.loads(data))
                elif kind == "bundle":
                    self._bundle(json.loads(data))
                elif kind == "closed":
                    log.error(
                        "the CA closed the revocation feed: %s (our own certificate was "
                        "revoked?); reconnecting with the current identity",
                        data,
                        extra={"event": "revocation_feed_closed"},
                    )
                    raise _FeedClosedError(f"the CA closed the stream: {data}")
        raise httpx.ReadError("the CA ended the stream")

    def _bundle(self, data: dict[str, Any]) -> None:
        try:
            update = BundleUpdate.from_event(data)
        except ValueError as exc:
            self.bundle_failures += 1
            log.error(
                "ignoring a bundle event from %s (%s); keeping the current trust bundle",
                self.ca_url,
                exc,
                extra={"event": "bundle_update_failed"},
            )
            return
        # Only candidates: each is verified to a trust anchor before it may sign a CRL.
        self.published_intermediates = update.intermediates
        if update.sequence == self.bundle_sequence:
            return
        if self._on_bundle is None:
            self.bundle_sequence = update.sequence
            with self._changed:
                self._changed.notify_all()
            return
        try:
            self._on_bundle(update)
        except Exception as exc:
            self.bundle_failures += 1
            log.error(
                "TRUST BUNDLE UPDATE FAILED: bundle %d from %s was not applied (%s); keeping "
                "the current trust bundle, retrying on the next connection",
                update.sequence,
                self.ca_url,
                _describe(exc),
                extra={"event": "bundle_update_failed", "bundle_sequence": update.sequence},
            )
            return
        self.bundle_sequence = update.sequence
        self.bundle_updates += 1
        with self._changed:
            self._changed.notify_all()

    def wait_bundle(self, sequence: int, timeout: float) -> bool:
        """Wait until bundle ``sequence`` (or a later one) was applied; False on timeout.

        .. versionadded:: 0.3
        """
        with self._changed:
            return self._changed.wait_for(lambda: self.bundle_sequence >= sequence, timeout)

    # -- CRL fallback ---------------------------------------------------------------

    def _maybe_crl(self) -> None:
        if self._stale_since is None or self._stop.is_set():
            return
        if time.monotonic() - self._last_crl < self.crl_interval:
            return
        self._last_crl = time.monotonic()
        try:
            serials, number, this_update = self._fetch_crl()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            self.crl_failures += 1
            # Logged once per run of failures; the counter keeps the rest.
            level = logging.DEBUG if self._crl_failing == "failed" else logging.WARNING
            self._crl_failing = "failed"
            log.log(
                level,
                "CRL fallback failed: %s (%s)",
                self.crl_url,
                _describe(exc),
                extra={"event": "revocation_crl_failed"},
            )
            return
        merged = self._revoked | serials
        added = len(merged) - len(self._revoked)
        with self._changed:
            self._revoked = merged
            self._changed.notify_all()
        self.crl_refreshes += 1
        self.crl_number = number
        age = datetime.now(UTC) - this_update
        if age > self.crl_max_age:
            # Its revocations count, but it is no proof that nothing was revoked since.
            self.crl_failures += 1
            level = logging.DEBUG if self._crl_failing == "stale" else logging.WARNING
            self._crl_failing = "stale"
            log.log(
                level,
                "CRL %d at %s is %ds old (crl_max_age %ds): %d new revocations added, but "
                "it does not count as contact with the CA",
                number,
                self.crl_url,
                age.total_seconds(),
                self.crl_max_age.total_seconds(),
                added,
                extra={"event": "revocation_crl_stale"},
            )
            return
        first = self._crl_failing is not None or not self._crl_quiet
        self._crl_failing = None
        self._crl_quiet = True
        self._stale_since = time.monotonic()
        with self._transition:
            recovered = self._closed_logged
            self._closed_logged = False
        if recovered:
            level = logging.WARNING
        elif added or first:
            level = logging.INFO
        else:  # the same CRL again, every crl_interval: not worth a line each time
            level = logging.DEBUG
        log.log(
            level,
            "revocation set refreshed from CRL %d at %s while the feed is down: %d entries, %d new",
            number,
            self.crl_url,
            len(serials),
            added,
            extra={"event": "revocation_crl_refresh"},
        )

    def _fetch_crl(self) -> tuple[set[str], int, datetime]:
        ctx = self._ssl_context()
        with httpx.Client(verify=ctx, timeout=10.0, trust_env=False) as client:
            response = client.get(self.crl_url, headers={"accept": "application/pkix-crl"})
        _raise_for(response)
        try:
            crl = x509.load_der_x509_crl(response.content)
        except ValueError:
            raise ValueError("the answer is not a DER CRL") from None
        roots = [x509.load_der_x509_certificate(der) for der in ctx.get_ca_certs(binary_form=True)]
        candidates = list(self._issuers() if self._issuers else ())
        now = datetime.now(UTC)
        published = list(self.published_intermediates)
        if not _known_signer(crl, [*roots, *candidates, *published]):
            # A rotation we have not heard of (or no bundle event yet): ask the CA.
            published = self._fetch_published(ctx) or published
        issuer = _crl_issuer(crl, roots, candidates, published, now)
        if crl.next_update_utc is not None and crl.next_update_utc < now:
            raise ValueError(
                f"the CRL's nextUpdate {crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ} has passed"
            )
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = 0
        log.debug("CRL %d verified against %s", number, issuer.subject.rfc4514_string())
        serials = {format(entry.serial_number, "x") for entry in crl}
        return serials, number, crl.last_update_utc

    def _fetch_published(self, ctx: ssl.SSLContext) -> list[x509.Certificate]:
        """The CA's published intermediates (``[]`` when it does not answer)."""
        try:
            with httpx.Client(
                base_url=self.ca_url, verify=ctx, timeout=5.0, trust_env=False
            ) as client:
                response = client.get("/v1/bundle", params={"format": "intermediates"})
            _raise_for(response)
            found = x509.load_pem_x509_certificates(response.content)
        except (httpx.HTTPError, OSError, ValueError) as exc:
            log.debug("could not fetch the CA's published intermediates: %s", _describe(exc))
            return []
        self.published_intermediates = tuple(found)
        return found


def _known_signer(crl: x509.CertificateRevocationList, certs: list[x509.Certificate]) -> bool:
    return any(cert.subject == crl.issuer for cert in certs)


def _crl_issuer(
    crl: x509.CertificateRevocationList,
    roots: list[x509.Certificate],
    candidates: list[x509.Certificate],
    published: list[x509.Certificate],
    now: datetime,
) -> x509.Certificate:
    """Return the trusted certificate that signed ``crl``, or raise ValueError.

    ``candidates`` (our chain's intermediates) must be issued by a root directly;
    ``published`` (the CA's published intermediates and cross certificates) must
    verify up to a root, possibly through one another.
    """
    for root in roots:
        if root.subject == crl.issuer and crl.is_signature_valid(root.public_key()):  # type: ignore[arg-type]
            return root
    for cert in candidates:
        if cert.subject != crl.issuer:
            continue
        if not crl.is_signature_valid(cert.public_key()):  # type: ignore[arg-type]
            continue
        for root in roots:
            if cert.issuer != root.subject:
                continue
            try:
                cert.verify_directly_issued_by(root)
            except (ValueError, TypeError, Exception):  # noqa: S112 - try the next root
                continue
            return cert
    for cert in published:
        if cert.subject != crl.issuer:
            continue
        try:
            if not crl.is_signature_valid(cert.public_key()):  # type: ignore[arg-type]
                continue
            verify_ca_certificate(cert, published, roots, now=now)
        except (TrustmeshError, ValueError, TypeError):
            continue
        return cert
    raise ValueError(
        f"the CRL issued by {crl.issuer.rfc4514_string()} is not signed by a trust anchor "
        f"or by an intermediate that chains to one (our chain's, or one the CA publishes); "
        f"pass issuers= (our chain's intermediates) so it can be verified"
    )


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """Yield (event type, data) from server-sent-events lines; keep-alives too."""
    kind, data = "message", list[str]()
    for line in lines:
        if line == "":
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
        elif line.startswith(":"):
            yield "comment", line[1:].strip()
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    if response.is_stream_consumed is False:
        response.read()
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            detail = str(body.get("detail") or "")
    except ValueError:
        pass
    raise httpx.HTTPStatusError(
        f"{response.request.method} {response.request.url.path} answered "
        f"{response.status_code}{': ' + detail if detail else ''}",
        request=response.request,
        response=response,
    )


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
