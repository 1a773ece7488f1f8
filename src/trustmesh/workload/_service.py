"""The SPIFFE Workload API service (``SpiffeWorkloadAPI``) over the identity cache.

Every call must carry the metadata ``workload.spiffe.io: true`` (InvalidArgument without
it, as SPIRE answers), which proves the call was made on purpose by a Workload API client
rather than forged by a browser or a confused deputy. The caller is attested only from the
kernel's view of its connection (:mod:`._peer`); a caller that matches no entry gets
PermissionDenied. Streams send the current state at once and again after every change of
what that caller is entitled to (renewal, re-issue after a revocation, entry changes, new
bundle or CRL).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf import struct_pb2

from trustmesh.errors import TrustmeshError
from trustmesh.tokens import InvalidTokenError, verify_jwt_svid

from ._cache import SVID, IdentityCache, Snapshot
from ._grpc import Attest, abort, attested, deny
from ._peer import PeerInfo
from ._proto import workload_pb2 as pb
from ._proto import workload_pb2_grpc as pb_grpc

__all__ = ["SECURITY_HEADER", "SERVICE_NAME", "JWTIssuer", "WorkloadAPIService"]

log = logging.getLogger("trustmesh.workload.api")

#: The metadata every Workload API call must carry (value ``true``).
SECURITY_HEADER = "workload.spiffe.io"
#: The gRPC service name (the proto has no package).
SERVICE_NAME = "SpiffeWorkloadAPI"
#: Streams re-check that their caller is still connected this often (seconds).
STREAM_POLL = 1.0


class JWTIssuer(Protocol):
    """Obtains a JWT-SVID for an SVID's identity and audiences (the agent asks the CA)."""

    def __call__(self, svid: SVID, audience: tuple[str, ...]) -> str: ...


class WorkloadAPIService(pb_grpc.SpiffeWorkloadAPIServicer):
    """``SpiffeWorkloadAPI`` for the callers :class:`~._peer.CredentialForwarder` attests.

    Args:
        cache: What the agent holds.
        attest: Returns the credentials of a call's connection (None: unknown).
        jwt_issuer: Obtains JWT-SVIDs (None: FetchJWTSVID is Unavailable).

    .. versionadded:: 0.1
    """

    def __init__(
        self, cache: IdentityCache, attest: Attest, jwt_issuer: JWTIssuer | None = None
    ) -> None:
        self.cache = cache
        self._attest = attest
        self._jwt_issuer = jwt_issuer

    # -- checks shared by every method ------------------------------------------------

    def _caller(self, context: grpc.ServicerContext, method: str) -> PeerInfo:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(SECURITY_HEADER) != "true":
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "security header missing from request: send the metadata "
                f"'{SECURITY_HEADER}: true' (every SPIFFE Workload API client does)",
            )
        return attested(self._attest, context, method, log)

    def _entitled(self, snapshot: Snapshot, peer: PeerInfo) -> list[SVID]:
        return snapshot.svids_for(lambda with_hash: peer.selectors(with_hash=with_hash))

    def _deny(self, context: grpc.ServicerContext, peer: PeerInfo, method: str) -> NoReturn:
        deny(context, peer, method, log)

    def _stream(
        self,
        context: grpc.ServicerContext,
        render: Callable[[Snapshot], tuple[Any, Any] | None],
    ) -> Iterator[Any]:
        """Yield ``render(snapshot)``'s message at once and whenever its key changes.

        ``render`` returns ``(key, message)``, or None when the caller is no longer
        entitled (the stream then ends with PermissionDenied, raised by ``render``).
        """
        # Woken by a change, or by the end of the call: a cancelled stream must give its
        # worker back at once, not at the next poll (clients that reconnect quickly would
        # otherwise exhaust the workers and get RESOURCE_EXHAUSTED).
        wake = threading.Event()
        unsubscribe = self.cache.subscribe(lambda _snapshot: wake.set())
        context.add_callback(wake.set)
        seen_key: Any = object()
        try:
            while context.is_active() and not self.cache.closed:
                wake.clear()
                rendered = render(self.cache.snapshot())
                if rendered is not None:
                    key, message = rendered
                    if key != seen_key:
                        seen_key = key
                        yield message
                wake.wait(STREAM_POLL)
        finally:
            unsubscribe()

    # -- X.509 ------------------------------------------------------------------------

    def FetchX509SVID(  # noqa: N802 - the gRPC method name
        self, request: pb.X509SVIDRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.X509SVIDResponse]:
        """Stream the caller's X.509-SVIDs (with bundle and CRLs)."""
        peer = self._caller(context, "FetchX509SVID")

        def render(snapshot: Snapshot) -> tuple[Any, Any]:
            svids = self._entitled(snapshot, peer)
            if not svids:
                self._deny(context, peer, "FetchX509SVID")
            bundle = snapshot.bundle_der()
            key = (tuple(s.serial for s in svids), bundle, snapshot.crls)
            message = pb.X509SVIDResponse(
                svids=[
                    pb.X509SVID(
                        spiffe_id=s.spiffe_id,
                        x509_svid=s.chain_der(),
                        x509_svid_key=s.key_der(),
                        bundle=bundle,
                    )
                    for s in svids
                ],
                crl=list(snapshot.crls),
            )
            return key, message

        yield from self._stream(context, render)

    def FetchX509Bundles(  # noqa: N802
        self, request: pb.X509BundlesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.X509BundlesResponse]:
        """Stream the trust bundle and CRLs (to callers with at least one entry)."""
        peer = self._caller(context, "FetchX509Bundles")

        def render(snapshot: Snapshot) -> tuple[Any, Any]:
            if not self._entitled(snapshot, peer):
                self._deny(context, peer, "FetchX509Bundles")
            bundle = snapshot.bundle_der()
            message = pb.X509BundlesResponse(
                bundles={snapshot.trust_domain_id: bundle}, crl=list(snapshot.crls)
            )
            return (bundle, snapshot.crls), message

        yield from self._stream(context, render)

    # -- JWT --------------------------------------------------------------------------

    def FetchJWTSVID(  # noqa: N802
        self, request: pb.JWTSVIDRequest, context: grpc.ServicerContext
    ) -> pb.JWTSVIDResponse:
        """Return JWT-SVIDs for the requested audience (one ID, or all of the caller's)."""
        peer = self._caller(context, "FetchJWTSVID")
        audience = tuple(a for a in request.audience if a)
        if not audience:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "audience must be specified: ask for a JWT-SVID for the service you call",
            )
        svids = self._entitled(self.cache.snapshot(), peer)
        if request.spiffe_id:
            svids = [s for s in svids if s.spiffe_id == request.spiffe_id]
        if not svids:
            self._deny(context, peer, "FetchJWTSVID")
        if self._jwt_issuer is None:
            abort(context, grpc.StatusCode.UNAVAILABLE, "this agent does not issue JWT-SVIDs")
        tokens = []
        for svid in svids:
            try:
                tokens.append(
                    pb.JWTSVID(spiffe_id=svid.spiffe_id, svid=self._jwt_issuer(svid, audience))
                )
            except TrustmeshError as exc:
                log.warning("JWT-SVID for %s failed: %s", svid.spiffe_id, exc.message)
                abort(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    f"could not obtain a JWT-SVID for {svid.spiffe_id}: {exc.message}",
                )
        return pb.JWTSVIDResponse(svids=tokens)

    def FetchJWTBundles(  # noqa: N802
        self, request: pb.JWTBundlesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JWTBundlesResponse]:
        """Stream the trust domain's JWT-SVID keys (JWKS)."""
        peer = self._caller(context, "FetchJWTBundles")

        def render(snapshot: Snapshot) -> tuple[Any, Any]:
            if not self._entitled(snapshot, peer):
                self._deny(context, peer, "FetchJWTBundles")
            document = json.dumps(snapshot.jwt_keys, sort_keys=True).encode()
            return document, pb.JWTBundlesResponse(bundles={snapshot.trust_domain_id: document})

        yield from self._stream(context, render)

    def ValidateJWTSVID(  # noqa: N802
        self, request: pb.ValidateJWTSVIDRequest, context: grpc.ServicerContext
    ) -> pb.ValidateJWTSVIDResponse:
        """Verify a JWT-SVID for an audience against the trust domain's keys."""
        peer = self._caller(context, "ValidateJWTSVID")
        snapshot = self.cache.snapshot()
        if not self._entitled(snapshot, peer):
            self._deny(context, peer, "ValidateJWTSVID")
        if not request.audience:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        try:
            verified = verify_jwt_svid(
                request.svid,
                audience=request.audience,
                jwks=snapshot.jwt_keys,
                trust_domain=snapshot.trust_domain,
            )
        except InvalidTokenError as exc:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        claims = struct_pb2.Struct()
        claims.update(verified.claims)  # type: ignore[arg-type]  # JSON values
        return pb.ValidateJWTSVIDResponse(spiffe_id=verified.spiffe_id, claims=claims)
