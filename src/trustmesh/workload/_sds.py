"""Envoy SDS v3 (``envoy.service.secret.v3.SecretDiscoveryService``) over the identity cache.

Envoy asks for secrets by name on a state-of-the-world xDS stream (``StreamSecrets``) or
once (``FetchSecrets``); the names follow SPIRE's SDS:

- a SPIFFE ID the caller is entitled to, or ``default`` (the caller's first SVID): a
  ``tls_certificate`` (chain leaf first, PEM; the key, PKCS#8 PEM);
- the trust domain's ID (``spiffe://example.org``), ``ROOTCA`` or ``ALL``: a
  ``validation_context`` with the trust bundle (``trusted_ca``) and the CA's current chain
  CRLs (``crl``: the leaf CRL and the root-signed one; when the CA serves no root CRL, the
  leaf CRL with ``only_verify_leaf_cert_crl``).

No names (a wildcard request) means all of them. The caller is attested from its kernel
credentials like every Workload API caller (Envoy runs as some uid; the registration
entries decide what it gets; one matching none gets PERMISSION_DENIED). A stream answers at
once and again whenever what it asked for changes (renewal, re-issue after a revocation,
bundle or CRL change), with a new ``version_info`` (a digest of the content) and ``nonce``.
Per the xDS protocol, a request carrying a stale nonce is ignored, an ACK (the last nonce,
no ``error_detail``) is recorded, and a NACK (``error_detail``) is logged with Envoy's
reason and not answered with the same content again. ``DeltaSecrets`` is UNIMPLEMENTED
(Envoy uses it only when configured with ``api_type: DELTA_GRPC``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from ._cache import SVID, IdentityCache, Snapshot
from ._grpc import Attest, abort, attested, deny
from ._peer import PeerInfo

__all__ = [
    "SDS_SERVICE_NAME",
    "SECRET_TYPE_URL",
    "SecretDiscoveryService",
    "add_secret_discovery_service",
]

log = logging.getLogger("trustmesh.workload.sds")

#: The gRPC service Envoy calls.
SDS_SERVICE_NAME = "envoy.service.secret.v3.SecretDiscoveryService"
#: The type of every resource (exact: Envoy refuses any other).
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
#: The name that stands for the caller's first SVID.
DEFAULT_NAME = "default"
#: Names of the validation context besides the trust domain's ID (as SPIRE names them).
BUNDLE_ALIASES = ("ROOTCA", "ALL")
#: Streams re-check that their caller is still connected this often (seconds).
STREAM_POLL = 1.0

_PEM = serialization.Encoding.PEM
_CHANGED = object()
_END = object()


def _tls_certificate(name: str, svid: SVID) -> Any:
    chain = b"".join(c.public_bytes(_PEM) for c in svid.chain)
    key = svid.key.private_bytes(
        _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=chain),
            private_key=base_pb2.DataSource(inline_bytes=key),
        ),
    )


def _validation_context(name: str, snapshot: Snapshot) -> Any:
    bundle = b"".join(c.public_bytes(_PEM) for c in snapshot.bundle)
    context = common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=bundle)
    )
    if snapshot.crls:
        pem = b"".join(x509.load_der_x509_crl(d).public_bytes(_PEM) for d in snapshot.crls)
        context.crl.inline_bytes = pem
        # Envoy checks every certificate of the chain against a CRL unless told otherwise;
        # without the root-signed CRL (root key offline) it would refuse every peer.
        context.only_verify_leaf_cert_crl = len(snapshot.crls) < 2
    return secret_pb2.Secret(name=name, validation_context=context)


@dataclass(frozen=True)
class _Rendered:
    """The secrets answering one set of names, and their digest (the ``version_info``)."""

    secrets: tuple[Any, ...]
    version: str
    missing: tuple[str, ...]


class SecretDiscoveryService(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """Envoy SDS v3 for the callers :class:`~._peer.CredentialForwarder` attests.

    Args:
        cache: What the agent holds.
        attest: Returns the credentials of a call's connection (None: unknown).

    .. versionadded:: 0.1
    """

    def __init__(self, cache: IdentityCache, attest: Attest) -> None:
        self.cache = cache
        self._attest = attest
        self._nonces = itertools.count(1)
        self.nacks = 0

    # -- who asks, and what they get ------------------------------------------------

    def _caller(self, context: grpc.ServicerContext, method: str) -> PeerInfo:
        return attested(self._attest, context, method, log)

    def _deny(self, context: grpc.ServicerContext, peer: PeerInfo, method: str) -> NoReturn:
        deny(context, peer, method, log)

    def render(
        self,
        snapshot: Snapshot,
        peer: PeerInfo,
        names: Iterable[str],
        context: grpc.ServicerContext,
        method: str,
    ) -> _Rendered:
        """The secrets named ``names`` (all of the caller's for none) for ``peer``."""
        svids = snapshot.svids_for(lambda with_hash: peer.selectors(with_hash=with_hash))
        if not svids:
            self._deny(context, peer, method)
        by_id = {s.spiffe_id: s for s in reversed(svids)}  # the first SVID of an ID wins
        bundle_names = (snapshot.trust_domain_id, *BUNDLE_ALIASES)
        wanted = list(names) or [*by_id, snapshot.trust_domain_id]
        secrets: list[Any] = []
        missing: list[str] = []
        for name in dict.fromkeys(wanted):
            if name == DEFAULT_NAME:
                secrets.append(_tls_certificate(name, svids[0]))
            elif name in by_id:
                secrets.append(_tls_certificate(name, by_id[name]))
            elif name in bundle_names:
                if snapshot.bundle:
                    secrets.append(_validation_context(name, snapshot))
                else:
                    missing.append(name)
            else:
                missing.append(name)
        digest = hashlib.sha256()
        for secret in secrets:
            digest.update(secret.SerializeToString(deterministic=True))
        return _Rendered(tuple(secrets), digest.hexdigest()[:16], tuple(missing))

    def _response(self, rendered: _Rendered) -> Any:
        resources = []
        for secret in rendered.secrets:
            packed = any_pb2.Any()
            packed.Pack(secret)
            resources.append(packed)
        return discovery_pb2.DiscoveryResponse(
            version_info=rendered.version,
            resources=resources,
            type_url=SECRET_TYPE_URL,
            nonce=str(next(self._nonces)),
        )

    def _check_type(self, request: Any, context: grpc.ServicerContext) -> None:
        if request.type_url and request.type_url != SECRET_TYPE_URL:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this SDS serves {SECRET_TYPE_URL} only, not {request.type_url!r}",
            )

    def _warn_missing(self, peer: PeerInfo, rendered: _Rendered, snapshot: Snapshot) -> None:
        if rendered.missing:
            log.warning(
                "SDS: %s asked for %s, which it is not entitled to or which does not exist; "
                "it may ask for its SPIFFE IDs, %r, or the bundle as %r, %s",
                peer.describe(),
                ", ".join(repr(n) for n in rendered.missing),
                DEFAULT_NAME,
                snapshot.trust_domain_id,
                " or ".join(repr(n) for n in BUNDLE_ALIASES),
                extra={"event": "sds_unknown_secret", "names": list(rendered.missing)},
            )

    # -- the gRPC methods -------------------------------------------------------------

    def FetchSecrets(  # noqa: N802 - the gRPC method name
        self, request: Any, context: grpc.ServicerContext
    ) -> Any:
        """Answer once with the current secrets the request names."""
        peer = self._caller(context, "FetchSecrets")
        self._check_type(request, context)
        snapshot = self.cache.snapshot()
        rendered = self.render(snapshot, peer, request.resource_names, context, "FetchSecrets")
        self._warn_missing(peer, rendered, snapshot)
        return self._response(rendered)

    def StreamSecrets(  # noqa: N802
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """State-of-the-world xDS: answer each new subscription and every change."""
        peer = self._caller(context, "StreamSecrets")
        events: queue.Queue[object] = queue.Queue()
        unsubscribe = self.cache.subscribe(lambda _snapshot: events.put(_CHANGED))

        def read() -> None:
            try:
                for request in request_iterator:
                    events.put(request)
            except grpc.RpcError:
                pass  # the stream ended under us (cancelled, closed)
            except Exception:  # a reader must never die silently and leave the stream open
                log.exception("SDS: reading requests failed")
            finally:
                events.put(_END)

        threading.Thread(target=read, name="sds-requests", daemon=True).start()
        names: tuple[str, ...] | None = None  # None: nothing asked for yet
        sent_nonce = ""
        sent_version = ""
        acked = ""
        try:
            while context.is_active() and not self.cache.closed:
                try:
                    event = events.get(timeout=STREAM_POLL)
                except queue.Empty:
                    continue
                if event is _END:
                    return
                force = False
                if event is not _CHANGED:
                    request: Any = event
                    self._check_type(request, context)
                    if request.response_nonce and request.response_nonce != sent_nonce:
                        continue  # stale: answers an earlier response (xDS protocol)
                    if request.HasField("error_detail"):
                        self.nacks += 1
                        log.warning(
                            "SDS: Envoy (%s) rejected version %s of %s: %s",
                            peer.describe(),
                            sent_version,
                            ", ".join(names or ()) or "all secrets",
                            request.error_detail.message,
                            extra={"event": "sds_nack", "version": sent_version},
                        )
                    elif request.response_nonce:
                        acked = request.version_info
                        log.debug("SDS: %s acknowledged version %s", peer.describe(), acked)
                    asked = tuple(request.resource_names)
                    if asked != names:
                        names, force = asked, True
                if names is None:
                    continue
                snapshot = self.cache.snapshot()
                rendered = self.render(snapshot, peer, names, context, "StreamSecrets")
                if not force and rendered.version == sent_version:
                    continue  # nothing new for this stream (a NACKed version is not resent)
                if force:
                    self._warn_missing(peer, rendered, snapshot)
                response = self._response(rendered)
                sent_nonce, sent_version = response.nonce, rendered.version
                log.debug(
                    "SDS: %s version %s (nonce %s, acked %s) to %s",
                    ", ".join(s.name for s in rendered.secrets) or "nothing",
                    sent_version,
                    sent_nonce,
                    acked or "-",
                    peer.describe(),
                )
                yield response
        finally:
            unsubscribe()

    def DeltaSecrets(  # noqa: N802
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """Not served: use ``api_type: GRPC`` (state of the world) in Envoy's sds_config."""
        abort(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            "DeltaSecrets is not served: set api_type: GRPC (not DELTA_GRPC) in sds_config",
        )


def add_secret_discovery_service(server: Any) -> None:
    """Add SDS to a :class:`~._server.WorkloadServer` (on the same socket and cache).

    Args:
        server: The workload server, before ``start()``.

    .. versionadded:: 0.1
    """
    service = SecretDiscoveryService(server.cache, server.attest)
    server.add_service(
        SDS_SERVICE_NAME,
        lambda grpc_server: sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(
            service, grpc_server
        ),
    )
