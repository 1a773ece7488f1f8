"""The bounded caches' eviction rule, shared by the token and introspection caches."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["evict_oldest"]

_K = TypeVar("_K")
_V = TypeVar("_V")


def evict_oldest(cache: dict[_K, _V]) -> None:
    """Drop the oldest entry (dicts keep insertion order).

    Verifier threads may race here; losing the race only means another thread
    evicted first.
    """
    try:
        del cache[next(iter(cache))]
    except (KeyError, RuntimeError, StopIteration):
        pass
