"""Blocking work of the hot routes on worker threads, with the answers handed back to
the event loop in batches.

``loop.run_in_executor`` costs, per call, a ``concurrent.futures.Future`` (with its
``Condition``), the executor's queue and semaphore, the chaining of that future to an
asyncio one, and a ``call_soon_threadsafe`` (a byte written to the loop's self-pipe, a
wake-up of the loop) when it completes. Under load the renewals finish in groups (the
store commits them together, trustmesh.store.Store.record_issued), so here a finished
job is appended to its loop's list and only the first of a batch wakes the loop, which
then resolves every future in the list at once. bench/RESULTS.md (issue 18) has the
profile that led here.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Offload"]

_T = TypeVar("_T")
_Job = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class _Inbox:
    """The finished jobs of one event loop, not yet delivered to it."""

    __slots__ = ("items", "scheduled")

    def __init__(self) -> None:
        self.items: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self.scheduled = False


class Offload:
    """``await offload(fn)``: ``fn()`` on one of ``threads`` worker threads (started on
    first use, daemons), its result or exception in the awaiting task. Cancelling the
    awaiting task does not stop ``fn`` (as with ``run_in_executor``)."""

    def __init__(self, threads: int, name: str) -> None:
        self._size = threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}
        self._threads: list[threading.Thread] = []
        self._closed = False

    async def __call__(self, fn: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        if not self._threads:
            self._start()
        self._jobs.put((fn, future, loop))
        return await future

    def _start(self) -> None:
        with self._lock:
            if self._threads or self._closed:
                if self._closed:
                    raise RuntimeError("the CA API's worker threads were shut down")
                return
            for index in range(self._size):
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{index}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future, loop = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except StopIteration as exc:  # an asyncio future cannot carry this one
                error = RuntimeError(f"StopIteration raised by {fn!r}")
                error.__cause__ = exc
            except BaseException as exc:  # handed to the awaiting task
                error = exc
            del fn, job
            with self._lock:
                inbox = self._inboxes.get(loop)
                if inbox is None:
                    inbox = self._inboxes[loop] = _Inbox()
                inbox.items.append((future, result, error))
                if inbox.scheduled:
                    continue  # the loop is already asked to deliver this batch
                inbox.scheduled = True
            try:
                loop.call_soon_threadsafe(self._deliver, loop)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                with self._lock:
                    self._inboxes.pop(loop, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            inbox = self._inboxes.pop(loop, None)
        if inbox is None:
            return
        for future, result, error in inbox.items:
            if future.cancelled():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def shutdown(self) -> None:
        """Let the threads end once the queued jobs are done (does not wait)."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
