"""Request-scoped values shared by the inbound middleware and the outbound client.

The middleware (:mod:`trustmesh.middleware`) sets :data:`inbound_token` to the
end-user bearer token it verified for the request being handled; the mTLS client
(:func:`trustmesh.client.mtls_client`) reads it to forward the token upstream.
This module sits in the bottom layer so both can import it; it imports nothing
of ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["current_inbound_token", "inbound_token", "using_inbound_token"]

#: The verified bearer token of the inbound request being handled, or None.
inbound_token: ContextVar[str | None] = ContextVar("trustmesh_inbound_token", default=None)


def current_inbound_token() -> str | None:
    """Return the verified inbound user token of the current request, if any.

    .. versionadded:: 0.1
    """
    return inbound_token.get()


@contextmanager
def using_inbound_token(token: str | None) -> Iterator[None]:
    """Set the inbound user token for the duration of a ``with`` block.

    Args:
        token: The verified bearer token, or None for "no user".

    .. versionadded:: 0.1
    """
    reset = inbound_token.set(token)
    try:
        yield
    finally:
        inbound_token.reset(reset)
