"""py-spiffe against the node agent, in its own process (py-spiffe and trustmesh.workload
register the same proto messages, so they do not share one process).

Usage: python -m tests._workload_client SOCKET [--uid UID]; prints one JSON object.
With --uid it drops to that uid (and gid) after importing everything and before
connecting: the kernel records the uid at connect(), which is what the agent attests.
"""

from __future__ import annotations

import json
import os
import sys

import grpc
from spiffe import WorkloadApiClient
from spiffe.errors import PySpiffeError


def main() -> None:
    sock = sys.argv[1]
    if "--uid" in sys.argv:
        uid = int(sys.argv[sys.argv.index("--uid") + 1])
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    out: dict[str, object] = {"uid": os.getuid()}
    try:
        with WorkloadApiClient(socket_path=f"unix://{sock}") as client:
            svid = client.fetch_x509_svid()
            out["x509"] = {
                "spiffe_id": str(svid.spiffe_id),
                "serial": format(svid.leaf.serial_number, "x"),
                "chain": len(svid.cert_chain),
            }
            bundles = client.fetch_x509_bundles()
            out["bundles"] = sorted(str(b.trust_domain) for b in bundles.bundles)
            jwt = client.fetch_jwt_svid(audience={"spiffe://example.org/db"})
            out["jwt"] = {"spiffe_id": str(jwt.spiffe_id), "aud": sorted(jwt.audience)}
            jwt_bundles = client.fetch_jwt_bundles()
            out["jwt_bundles"] = sorted(str(b.trust_domain) for b in jwt_bundles.bundles)
            valid = client.validate_jwt_svid(jwt.token, "spiffe://example.org/db")
            out["validated"] = str(valid.spiffe_id)
            try:
                client.validate_jwt_svid(jwt.token, "spiffe://example.org/other")
                out["wrong_audience"] = "accepted"
            except PySpiffeError as exc:
                out["wrong_audience"] = str(exc)
    except PySpiffeError as exc:
        out["error"] = str(exc)
        cause = exc.__cause__ or exc.__context__
        while cause is not None and not isinstance(cause, grpc.RpcError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, grpc.RpcError):
            out["code"] = cause.code().name
    print(json.dumps(out))


if __name__ == "__main__":
    main()
