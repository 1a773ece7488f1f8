"""What the Workload API and the SDS service share: attesting a call and refusing it.

Both serve the same callers on one socket, so a caller that cannot be attested, or that
no registration entry matches, gets the same status and message from either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn

import grpc

from ._peer import PeerInfo

__all__ = ["Attest", "abort", "attested", "deny"]

Attest = Callable[[grpc.ServicerContext], PeerInfo | None]


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


def attested(
    attest: Attest, context: grpc.ServicerContext, method: str, log: logging.Logger
) -> PeerInfo:
    """The kernel credentials of the call's connection; PermissionDenied without them."""
    peer = attest(context)
    if peer is None:
        abort(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            "the caller could not be attested: connect through the agent's socket",
        )
    log.debug("%s from %s", method, peer.describe())
    return peer


def deny(
    context: grpc.ServicerContext, peer: PeerInfo, method: str, log: logging.Logger
) -> NoReturn:
    """Log and end the call: no registration entry of this node matches ``peer``."""
    log.info(
        "%s denied: no registration entry matches %s",
        method,
        peer.describe(),
        extra={"event": "deny", "uid": peer.uid, "gid": peer.gid, "pid": peer.pid},
    )
    abort(
        context,
        grpc.StatusCode.PERMISSION_DENIED,
        f"no identity issued: no registration entry of this node matches uid {peer.uid} "
        f"gid {peer.gid} ({peer.exe or 'unknown executable'}); ask for one with "
        f"'trustmesh entry create ... --selector unix:uid:{peer.uid}'",
    )
