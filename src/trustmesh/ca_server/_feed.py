"""The revocation feed: wake subscribers when any replica records a revocation.

The store is the source of truth (events are audit rows with a monotonically
increasing cursor). This hub only tells waiting subscribers *when* to look: a
PostgreSQL ``LISTEN`` on the channel every revocation ``NOTIFY``s at commit
(sub-second across replicas), plus a periodic poll of the newest cursor as the
safety net (and the only mechanism on SQLite). A subscriber that reconnects with
its last cursor misses nothing, whatever happened meanwhile.

The same poll (and ``NOTIFY`` payloads ``bundle:SEQUENCE``) notices when the CA's
issuers change (a rotation step by the CLI or another replica): the hub re-reads
them (:meth:`CertificateAuthority.refresh`), so this replica signs with the active
issuer and serves the new bundle, and wakes every stream to send a ``bundle`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from trustmesh.authority import CertificateAuthority
from trustmesh.store import REVOCATION_CHANNEL, RevocationEvent

__all__ = ["RevocationHub"]

log = logging.getLogger("trustmesh.ca_server.feed")


class RevocationHub:
    """Tracks the newest revocation cursor and wakes waiters when it grows.

    Args:
        ca: The open CA.
        poll_interval: Seconds between polls of the newest cursor.
    """

    def __init__(self, ca: CertificateAuthority, *, poll_interval: float | None = None) -> None:
        self.ca = ca
        postgres = ca.store.dialect == "postgresql"
        self.poll_interval = poll_interval or (1.0 if postgres else 0.25)
        self.latest = 0
        #: The CA's bundle sequence as last seen (streams send a bundle event when it grows).
        self.bundle_sequence = ca.bundle_sequence
        self._bundle_listeners: list[Callable[[int], None]] = []
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self._inflight: dict[int, asyncio.Future[list[RevocationEvent]]] = {}

    async def start(self) -> None:
        """Start polling (and listening, on PostgreSQL)."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        self.latest = await run_in_threadpool(self.ca.store.latest_revocation_cursor)
        self._tasks.append(asyncio.create_task(self._poll()))
        if self.ca.store.dialect == "postgresql":
            self._listener = threading.Thread(
                target=self._listen, name="revocation-listen", daemon=True
            )
            self._listener.start()

    async def stop(self) -> None:
        """Stop background work."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    @property
    def closing(self) -> bool:
        """True once :meth:`close_streams` or :meth:`stop` was called."""
        return self._stop.is_set()

    def close_streams(self) -> None:
        """End every feed stream: the server is stopping (safe in a signal handler).

        Streams return at their next wake-up, which this brings forward, so uvicorn's
        graceful shutdown does not wait for them until its timeout.
        """
        self._stop.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._wake()))

    async def _wake(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    def add_bundle_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(sequence)`` (in a worker thread) after the issuers changed."""
        self._bundle_listeners.append(callback)

    async def check_bundle(self) -> bool:
        """Re-read the CA's issuers if they changed; wake the streams when they did."""
        changed = await run_in_threadpool(self.ca.refresh)
        sequence = self.ca.bundle_sequence
        if not changed and sequence == self.bundle_sequence:
            return False
        self.bundle_sequence = sequence
        for callback in list(self._bundle_listeners):
            try:
                await run_in_threadpool(callback, sequence)
            except Exception:  # a listener must not stop the feed
                log.exception("bundle listener %r failed", callback)
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()
        return True

    async def bump(self, cursor: int) -> None:
        """Record that revocations up to ``cursor`` exist and wake waiters."""
        if cursor <= self.latest or self._changed is None:
            return
        self.latest = cursor
        async with self._changed:
            self._changed.notify_all()

    def bump_threadsafe(self, cursor: int) -> None:
        """:meth:`bump` from another thread."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.bump(cursor), self._loop)

    async def wait_beyond(self, cursor: int, timeout: float, bundle: int | None = None) -> bool:
        """Wait until a revocation newer than ``cursor`` is known, or (when ``bundle``
        is given) the bundle sequence differs from it; False on timeout."""

        def news() -> bool:
            return self.latest > cursor or (bundle is not None and self.bundle_sequence != bundle)

        if news():
            return True
        if self._changed is None:
            return False
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: news() or self._stop.is_set()), timeout
                )
            except TimeoutError:
                return False
        return news()

    async def events_since(self, cursor: int) -> list[RevocationEvent]:
        """Return the events after ``cursor``, sharing one query among concurrent callers.

        When a revocation wakes every subscriber, they all ask from the same cursor:
        one database query answers all of them instead of one query each.
        """
        pending = self._inflight.get(cursor)
        if pending is None:
            pending = asyncio.ensure_future(run_in_threadpool(self.ca.revocations_since, cursor))
            self._inflight[cursor] = pending
            pending.add_done_callback(lambda _done: self._inflight.pop(cursor, None))
        return list(await asyncio.shield(pending))

    async def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                await self.bump(await run_in_threadpool(self.ca.store.latest_revocation_cursor))
                await self.check_bundle()
            except Exception as exc:  # the database may be down: keep trying
                log.warning("revocation poll failed: %s", exc)
            await asyncio.sleep(self.poll_interval)

    def _listen(self) -> None:
        import psycopg

        url = self.ca.store.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        while not self._stop.is_set():
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {REVOCATION_CHANNEL}")
                    log.info("listening for revocations on %s", REVOCATION_CHANNEL)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._on_notify(note)
            except Exception as exc:  # reconnect; polling covers the gap
                log.warning("revocation listener lost PostgreSQL (%s); reconnecting", exc)
                self._stop.wait(1.0)

    def _on_notify(self, note: Any) -> None:
        if str(note.payload).startswith("bundle:"):
            if self._loop is not None:
                asyncio.run_coroutine_threadsafe(self.check_bundle(), self._loop)
            return
        try:
            self.bump_threadsafe(int(note.payload))
        except ValueError:
            log.warning("ignoring revocation notice with payload %r", note.payload)
