"""py-spiffe's sources and spiffe-tls against the node agent, in their own process
(py-spiffe and trustmesh.workload register the same proto messages, see docs/workload.md).

Usage (each prints one JSON object as its last line):

    python -m tests._spiffe_client sources SOCKET [--uid UID] [--renewal SECONDS]
    python -m tests._spiffe_client denied SOCKET [--uid UID]
    python -m tests._spiffe_client dial SOCKET HOST:PORT SERVER_ID [--uid UID]
    python -m tests._spiffe_client listen SOCKET HOST:PORT COUNT [--uid UID]

With --uid it drops to that uid (and gid) after importing everything and before
connecting: the kernel records the uid at connect(), which is what the agent attests.

The blocks between ``# doc: NAME`` and ``# end doc`` are shown whole in
docs/runtimes/py-spiffe.md (tests/test_workload_spiffe.py checks they match).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import grpc
from cryptography import x509
from OpenSSL import SSL

# doc: imports
from spiffe import JwtSource, JwtSvid, SpiffeId, WorkloadApiClient, X509Source
from spiffe.errors import PySpiffeError
from spiffetls import ListenOptions, ServerTlsMode, dial, listen
from spiffetls.errors import TLSConnectionError
from spiffetls.tlsconfig.authorize import authorize_any, authorize_id

# end doc

AUDIENCE = "spiffe://example.org/db"


def _spiffe_id(cert: x509.Certificate | None) -> str:
    if cert is None:
        raise RuntimeError("the peer sent no certificate")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def _code(exc: BaseException) -> str | None:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, grpc.RpcError):
        cause = cause.__cause__ or cause.__context__
    return cause.code().name if isinstance(cause, grpc.RpcError) else None


def sources(socket_path: str, renewal: float) -> dict[str, Any]:
    """X509Source and JwtSource: the SVID, bundles, JWT-SVID, and a pushed renewal."""
    out: dict[str, Any] = {}
    updated = threading.Event()

    def on_update() -> None:
        updated.set()

    # doc: x509-source
    with X509Source(socket_path=socket_path, timeout_in_seconds=10) as x509_source:
        # the current X509Svid (spiffe_id, leaf, cert_chain, private_key) and its bundle:
        svid = x509_source.get_x509_context().default_svid
        bundle = x509_source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        # called on each push (renewal, re-issue, new bundle); then get_x509_context()
        # returns the new SVID:
        x509_source.subscribe_for_updates(on_update)
        # end doc
        out["x509"] = {
            "spiffe_id": str(svid.spiffe_id),
            "serial": format(svid.leaf.serial_number, "x"),
            "chain": len(svid.cert_chain),
            "not_after": svid.leaf.not_valid_after_utc.isoformat(),
        }
        assert bundle is not None
        out["bundle"] = {
            "trust_domain": str(bundle.trust_domain),
            "roots": len(bundle.x509_authorities),
            "verifies_leaf": _signed_by_bundle(svid.cert_chain, bundle.x509_authorities),
        }
        with WorkloadApiClient(socket_path=socket_path) as client:
            out["all_ids"] = sorted(str(s.spiffe_id) for s in client.fetch_x509_svids())
        if renewal > 0:
            deadline = time.monotonic() + renewal
            renewed = svid
            while time.monotonic() < deadline:
                updated.wait(max(0.0, deadline - time.monotonic()))
                updated.clear()
                renewed = x509_source.get_x509_context().default_svid
                if renewed.leaf.serial_number != svid.leaf.serial_number:
                    break
            out["renewed"] = {
                "spiffe_id": str(renewed.spiffe_id),
                "serial": format(renewed.leaf.serial_number, "x"),
                "not_after": renewed.leaf.not_valid_after_utc.isoformat(),
            }

    # doc: jwt-source
    with JwtSource(socket_path=socket_path, timeout_in_seconds=10) as jwt_source:
        jwt = jwt_source.fetch_svid(audience={AUDIENCE})  # a JwtSvid: token, spiffe_id, audience
        # the receiving side validates it offline against the JWT bundle the source keeps:
        jwt_bundle = jwt_source.get_bundle_for_trust_domain(jwt.spiffe_id.trust_domain)
        if jwt_bundle is None:
            raise RuntimeError(f"no JWT bundle for {jwt.spiffe_id.trust_domain}")
        checked = JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {AUDIENCE})
        # end doc
        out["jwt"] = {"spiffe_id": str(jwt.spiffe_id), "aud": sorted(jwt.audience)}
        out["jwt_validated"] = str(checked.spiffe_id)
        out["jwt_bundles"] = sorted(str(b.trust_domain) for b in jwt_source.bundles)
        try:
            JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"spiffe://example.org/other"})
            out["jwt_wrong_audience"] = "accepted"
        except PySpiffeError as exc:
            out["jwt_wrong_audience"] = type(exc).__name__
    return out


def _signed_by_bundle(chain: list[x509.Certificate], roots: set[x509.Certificate]) -> bool:
    # The leaf's issuer (the intermediate) is signed by one of the bundle's roots.
    for root in roots:
        try:
            chain[1].verify_directly_issued_by(root)
            return True
        except (IndexError, ValueError, TypeError):
            continue
    return False


def denied(socket_path: str) -> dict[str, Any]:
    """What each py-spiffe entry point says to a caller with no entry."""
    out: dict[str, Any] = {}
    with WorkloadApiClient(socket_path=socket_path) as client:
        for name, call in (
            ("x509_svid", client.fetch_x509_svid),
            ("x509_bundles", client.fetch_x509_bundles),
            ("jwt_svid", lambda: client.fetch_jwt_svid(audience={AUDIENCE})),
        ):
            try:
                got = call()
                out[name] = {"accepted": str(got)}
            except PySpiffeError as exc:
                out[name] = {"code": _code(exc), "error": str(exc)}
    try:
        with X509Source(socket_path=socket_path, timeout_in_seconds=5) as source:
            out["x509_source"] = {"accepted": str(source.get_x509_context().default_svid.spiffe_id)}
    except PySpiffeError as exc:
        out["x509_source"] = {"code": _code(exc), "error": str(exc)}
    return out


def dial_service(socket_path: str, address: str, server_id: str) -> dict[str, Any]:
    """spiffe-tls dials a `trustmesh run` service over mTLS and sends one HTTP request."""
    out: dict[str, Any] = {}
    # doc: spiffe-tls-dial
    with X509Source(socket_path=socket_path, timeout_in_seconds=10) as x509_source:
        conn = dial(address, x509_source, authorize_fn=authorize_id(SpiffeId(server_id)))
        conn.sendall(b"GET /whoami HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
        response = _read_all(conn)  # the service's app sees our SPIFFE ID as `caller`
        conn.close()
        # end doc
        out["me"] = str(x509_source.get_x509_context().default_svid.spiffe_id)
        head, _, body = response.partition(b"\r\n\r\n")
        out["status"] = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        out["body"] = json.loads(body)
        try:
            other = SpiffeId("spiffe://example.org/svc/someone-else")
            dial(address, x509_source, authorize_fn=authorize_id(other)).close()
            out["wrong_server"] = "accepted"
        except TLSConnectionError as exc:
            out["wrong_server"] = str(exc)
    return out


def _dechunk(data: bytes) -> bytes:
    # HTTP/1.1 chunked body (RFC 9112 section 7.1): SIZE-HEX CRLF DATA CRLF ... 0 CRLF CRLF
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body
        body, data = body + data[:size], data[size + 2 :]


def _read_all(conn: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunk = conn.recv(65536)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def ready(x509_source: X509Source) -> None:
    me = x509_source.get_x509_context().default_svid.spiffe_id
    print(json.dumps({"listening": str(me)}), flush=True)


def listen_service(socket_path: str, address: str, count: int) -> dict[str, Any]:
    """A spiffe-tls mTLS server: answers ``count`` requests with the caller's SPIFFE ID."""
    served: list[str] = []
    # doc: spiffe-tls-listen
    with X509Source(socket_path=socket_path, timeout_in_seconds=10) as x509_source:
        options = ListenOptions(tls_mode=ServerTlsMode.MTLS, authorize_fn=authorize_any())
        listener = listen(address, x509_source, options)
        ready(x509_source)
        for _ in range(count):
            conn, _addr = listener.accept()
            try:
                conn.do_handshake()  # refuses a caller without a valid SVID of the bundle
            except SSL.Error:
                conn.close()
                continue
            caller = _spiffe_id(conn.get_peer_certificate(as_cryptography=True))
            # end doc
            conn.recv(65536)
            body = json.dumps({"caller": caller}).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            conn.shutdown()
            conn.close()
            served.append(caller)
        listener.close()
    return {"served": served}


def main(argv: list[str]) -> None:
    if "--uid" in argv:
        at = argv.index("--uid")
        uid = int(argv[at + 1])
        del argv[at : at + 2]
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    renewal = 0.0
    if "--renewal" in argv:
        at = argv.index("--renewal")
        renewal = float(argv[at + 1])
        del argv[at : at + 2]
    command, sock = argv[0], f"unix://{argv[1]}"
    out: dict[str, Any] = {"uid": os.getuid()}
    try:
        if command == "sources":
            out.update(sources(sock, renewal))
        elif command == "denied":
            out.update(denied(sock))
        elif command == "dial":
            out.update(dial_service(sock, argv[2], argv[3]))
        elif command == "listen":
            out.update(listen_service(sock, argv[2], int(argv[3])))
        else:
            raise SystemExit(f"unknown command {command!r}: sources, denied, dial or listen")
    except PySpiffeError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["code"] = _code(exc)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
