"""The ACME server (RFC 8555) on top of the CA: one Starlette app mounted at ``/acme``.

Each provisioner answers under ``/acme/NAME/``. Every POST is a flattened JWS whose
``url`` must be the request URL and whose ``nonce`` must be one this server handed
out and nobody used yet (stored, so it holds across requests and replicas). Orders
for names outside the provisioner's trustmesh profile are refused with
``rejectedIdentifier``; a CSR must name exactly the order's identifiers
(``badCSR``); certificates are signed by :meth:`CertificateAuthority.sign_request`,
recorded and audited in the transaction that marks the order valid, and revoked with
:meth:`CertificateAuthority.revoke` into the same feed, CRL and OCSP as all others.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from sqlalchemy import Connection, and_, delete, select, update
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.authority import CertificateAuthority, Issued
from trustmesh.errors import CSRError, NotFoundError, PolicyError, TrustmeshError
from trustmesh.pki import LeafRequest, load_csr, pem_certificates
from trustmesh.serving import BodyTimeout, BodyTooLarge, read_bounded_body
from trustmesh.store import (
    acme_accounts,
    acme_authorizations,
    acme_challenges,
    acme_eab_keys,
    acme_nonces,
    acme_orders,
)

from ._config import ACMEConfig, Provisioner, acme_spiffe_id
from ._eab import open_eab_key
from ._jws import (
    JWS,
    PublicKey,
    b64url,
    b64url_decode,
    check_mac,
    key_from_jwk,
    parse_jws,
    thumbprint,
    verify_eab,
)
from ._problems import ACMEProblem, problem_response
from ._validate import validate_dns01, validate_http01, validate_tls_alpn01

__all__ = ["ACMEServer", "cert_id"]

log = logging.getLogger("trustmesh.acme")

_MAX_BODY = 64 * 1024
#: Seconds a request body may take to arrive once the head is in (as ``/v1/*``): a client
#: that announces a body and never sends it must not hold a connection and a task open.
_BODY_TIMEOUT = 10.0
_MAX_IDENTIFIERS = 100
#: One label of a host name (RFC 1123 2.1, RFC 5280 4.2.1.6's preferred name syntax):
#: letters, digits and hyphens, 1 to 63 of them, no hyphen first or last.
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_JOSE = "application/jose+json"
_PEM_CHAIN = "application/pem-certificate-chain"
#: RFC 5280 reason codes an ACME client may give (RFC 8555 7.6), and their names.
_REASONS = {
    0: "unspecified",
    1: "keyCompromise",
    3: "affiliationChanged",
    4: "superseded",
    5: "cessationOfOperation",
    9: "privilegeWithdrawn",
}


def _now() -> int:
    return int(datetime.now(UTC).timestamp())


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_id() -> str:
    return secrets.token_urlsafe(16)


def cert_id(cert: x509.Certificate) -> str:
    """The RFC 9773 certificate identifier: base64url(AKI keyIdentifier).base64url(serial)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    serial = cert.serial_number
    # The DER INTEGER's content octets: a leading zero when the top bit is set.
    raw = serial.to_bytes(serial.bit_length() // 8 + 1, "big")
    return f"{b64url(aki.key_identifier or b'')}.{b64url(raw)}"


@dataclass
class _Context:
    """One verified request: its provisioner, JWS, base URL and account (kid requests)."""

    provisioner: Provisioner
    base: str
    jws: JWS
    account: dict[str, Any] | None
    key: PublicKey

    @property
    def account_id(self) -> str:
        if self.account is None:  # pragma: no cover - routes that need one ask for kid
            raise ACMEProblem("malformed", "This request must be signed with the account 'kid'.")
        return str(self.account["id"])


@dataclass
class _Reply:
    body: dict[str, Any] | bytes | None
    status: int = 200
    location: str | None = None
    links: tuple[str, ...] = ()
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class ACMEServer:
    """The ACME endpoints of every configured provisioner, as one ASGI app.

    Args:
        ca: The open CA (signing key unlocked).
        config: The provisioners.
        eab_key: The key EAB keys are sealed with (:func:`sealing_key`).
        on_revoked: Awaited after a revocation (the CA API wakes its feed).
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        config: ACMEConfig,
        *,
        eab_key: bytes,
        on_revoked: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.ca = ca
        self.config = config
        self._eab_key = eab_key
        self._on_revoked = on_revoked
        self._tasks: set[asyncio.Task[None]] = set()
        self._cleaner: asyncio.Task[None] | None = None
        self.app = Starlette(routes=self._routes())

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the periodic clean-up of expired nonces and pending orders."""
        self._cleaner = asyncio.create_task(self._clean_forever())

    async def stop(self) -> None:
        """Stop the clean-up and any validation still running."""
        for task in [self._cleaner, *self._tasks]:
            if task is not None:
                task.cancel()
        for task in [self._cleaner, *self._tasks]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _clean_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.cleanup_interval)
            try:
                counts = await run_in_threadpool(self.cleanup)
            except TrustmeshError as exc:
                log.warning("ACME clean-up failed: %s", exc.message)
                continue
            if any(counts.values()):
                log.info("ACME clean-up: %s", counts, extra={"event": "acme_cleanup", **counts})

    def cleanup(self, now: int | None = None) -> dict[str, int]:
        """Delete expired nonces, and expired orders that never became valid.

        Returns:
            How many nonces, orders, authorizations and challenges went.
        """
        at = now if now is not None else _now()
        with self.ca.store.transaction() as conn:
            nonces = conn.execute(delete(acme_nonces).where(acme_nonces.c.expires_at < at))
            stale = select(acme_orders.c.id).where(
                acme_orders.c.expires_at < at,
                acme_orders.c.status.in_(("pending", "ready", "invalid")),
            )
            order_ids = [row[0] for row in conn.execute(stale)]
            authz_ids = [
                row[0]
                for row in conn.execute(
                    select(acme_authorizations.c.id).where(
                        acme_authorizations.c.order_id.in_(order_ids)
                    )
                )
            ]
            challenges = conn.execute(
                delete(acme_challenges).where(acme_challenges.c.authz_id.in_(authz_ids))
            )
            conn.execute(delete(acme_authorizations).where(acme_authorizations.c.id.in_(authz_ids)))
            conn.execute(delete(acme_orders).where(acme_orders.c.id.in_(order_ids)))
        return {
            "nonces": nonces.rowcount,
            "orders": len(order_ids),
            "authorizations": len(authz_ids),
            "challenges": challenges.rowcount,
        }

    # -- nonces ---------------------------------------------------------------------

    def _new_nonce(self) -> str:
        nonce = secrets.token_urlsafe(16)
        expires = _now() + int(self.config.nonce_lifetime.total_seconds())
        with self.ca.store.transaction() as conn:
            conn.execute(acme_nonces.insert().values(nonce=nonce, expires_at=expires))
        return nonce

    def _use_nonce(self, nonce: object) -> None:
        if not isinstance(nonce, str) or not nonce or len(nonce) > 64:
            raise ACMEProblem("badNonce", "The JWS has no 'nonce': get one from newNonce.")
        with self.ca.store.transaction() as conn:
            used = conn.execute(
                delete(acme_nonces).where(
                    acme_nonces.c.nonce == nonce, acme_nonces.c.expires_at >= _now()
                )
            )
        if used.rowcount != 1:
            raise ACMEProblem(
                "badNonce",
                "The nonce is unknown, used already or expired: retry with the "
                "Replay-Nonce of this response.",
            )

    # -- plumbing -------------------------------------------------------------------

    def _provisioner(self, request: Request) -> Provisioner:
        name = request.path_params["provisioner"]
        if name not in self.config.provisioners:
            raise ACMEProblem(
                "malformed",
                f"No ACME provisioner {name!r} here; the CA serves "
                f"{sorted(self.config.provisioners)}.",
                status=404,
            )
        return self.config.provisioners[name]

    @staticmethod
    def _base(request: Request, provisioner: Provisioner) -> str:
        return f"{request.url.scheme}://{request.url.netloc}/acme/{provisioner.name}"

    async def _headers(self, base: str | None) -> dict[str, str]:
        headers = {
            "Cache-Control": "no-store",
            "Replay-Nonce": await run_in_threadpool(self._new_nonce),
        }
        if base is not None:
            headers["Link"] = f'<{base}/directory>;rel="index"'
        return headers

    async def _respond(
        self, request: Request, work: Callable[[Provisioner, str], Awaitable[_Reply]]
    ) -> Response:
        base: str | None = None
        try:
            provisioner = self._provisioner(request)
            base = self._base(request, provisioner)
            reply = await work(provisioner, base)
        except ACMEProblem as problem:
            log.info(
                "ACME %s %s refused: %s (%s)",
                request.method,
                request.url.path,
                problem.detail,
                problem.kind,
                extra={"event": "acme_deny", "reason": problem.kind, "route": request.url.path},
            )
            return problem_response(problem, await self._safe_headers(base))
        except TrustmeshError as exc:
            log.error("ACME %s %s failed: %s", request.method, request.url.path, exc.message)
            internal = ACMEProblem(
                "serverInternal", "The CA could not complete the request; retry later."
            )
            return problem_response(internal, await self._safe_headers(base))
        headers = await self._headers(base) | reply.headers
        if reply.location:
            headers["Location"] = reply.location
        if reply.links:
            headers["Link"] = ", ".join([headers["Link"], *reply.links])
        if isinstance(reply.body, bytes):
            return Response(
                reply.body, status_code=reply.status, media_type=reply.media_type, headers=headers
            )
        if reply.body is None:
            return Response(b"", status_code=reply.status, headers=headers)
        return JSONResponse(reply.body, status_code=reply.status, headers=headers)

    async def _safe_headers(self, base: str | None) -> dict[str, str]:
        try:
            return await self._headers(base)
        except TrustmeshError:
            return {"Cache-Control": "no-store"}

    async def _verified(
        self, request: Request, provisioner: Provisioner, base: str, *, jwk_allowed: bool = False
    ) -> _Context:
        """Read the body and check the JWS: content type, url, nonce, key and signature."""
        if request.headers.get("content-type", "").split(";")[0].strip() != _JOSE:
            raise ACMEProblem("malformed", f"Send the JWS with Content-Type {_JOSE}.", status=415)
        try:
            body = await read_bounded_body(request, limit=_MAX_BODY, timeout=_BODY_TIMEOUT)
        except BodyTooLarge:
            raise ACMEProblem(
                "malformed", f"Request bodies are limited to {_MAX_BODY} bytes.", status=413
            ) from None
        except BodyTimeout:
            raise ACMEProblem(
                "malformed",
                f"The request body did not arrive within {_BODY_TIMEOUT:g} s; send it at once.",
                status=408,
            ) from None
        jws = parse_jws(body)
        url = str(request.url)
        if jws.protected.get("url") != url:
            raise ACMEProblem(
                "unauthorized",
                f"The JWS 'url' header {jws.protected.get('url')!r} is not the request URL "
                f"{url}: sign the URL you POST to.",
            )
        await run_in_threadpool(self._use_nonce, jws.protected.get("nonce"))
        has_jwk, has_kid = "jwk" in jws.protected, "kid" in jws.protected
        if has_jwk == has_kid:
            raise ACMEProblem("malformed", "The JWS must carry exactly one of 'jwk' or 'kid'.")
        if has_jwk:
            if not jwk_allowed:
                raise ACMEProblem(
                    "malformed",
                    "Sign this request with your account URL as 'kid', not a 'jwk'.",
                )
            key = key_from_jwk(jws.protected["jwk"])
            jws.verify(key)
            return _Context(provisioner, base, jws, None, key)
        kid = jws.protected["kid"]
        prefix = f"{base}/account/"
        if not isinstance(kid, str) or not kid.startswith(prefix):
            raise ACMEProblem(
                "accountDoesNotExist",
                f"kid {kid!r} is not an account of this provisioner ({prefix}...).",
            )
        account = await run_in_threadpool(self._account, kid[len(prefix) :])
        if account is None or account["provisioner"] != provisioner.name:
            raise ACMEProblem("accountDoesNotExist", f"No account {kid}: register with newAccount.")
        if account["status"] != "valid":
            raise ACMEProblem(
                "unauthorized",
                f"Account {kid} is {account['status']}: register a new account.",
            )
        key = key_from_jwk(json.loads(account["jwk"]))
        jws.verify(key)
        return _Context(provisioner, base, jws, account, key)

    def _account(self, account_id: str) -> dict[str, Any] | None:
        with self.ca.store.reader() as conn:
            row = conn.execute(
                select(acme_accounts).where(acme_accounts.c.id == account_id)
            ).first()
        return None if row is None else dict(row._mapping)

    # -- routes ---------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        post = ["POST"]
        return [
            Route("/{provisioner}/directory", self.directory, methods=["GET"]),
            Route("/{provisioner}/new-nonce", self.new_nonce, methods=["GET", "HEAD"]),
            Route("/{provisioner}/new-account", self.new_account, methods=post),
            Route("/{provisioner}/account/{id}", self.account, methods=post),
            Route("/{provisioner}/account/{id}/orders", self.orders, methods=post),
            Route("/{provisioner}/new-order", self.new_order, methods=post),
            Route("/{provisioner}/order/{id}", self.order, methods=post),
            Route("/{provisioner}/order/{id}/finalize", self.finalize, methods=post),
            Route("/{provisioner}/authz/{id}", self.authz, methods=post),
            Route("/{provisioner}/chall/{id}", self.challenge, methods=post),
            Route("/{provisioner}/cert/{id}", self.certificate, methods=post),
            Route("/{provisioner}/revoke-cert", self.revoke_cert, methods=post),
            Route("/{provisioner}/key-change", self.key_change, methods=post),
            Route("/{provisioner}/renewal-info/{id:path}", self.renewal_info, methods=["GET"]),
        ]

    async def directory(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            profiles = {}
            for name in provisioner.profiles:
                profile = self.ca.config.profile(name)
                default = " (the default)" if name == provisioner.profile else ""
                profiles[name] = (
                    f"trustmesh profile {name}{default}: server certificates for "
                    f"DNS names {list(profile.dns)} and IPs {list(profile.ips)}."
                )
            return _Reply(
                {
                    "newNonce": f"{base}/new-nonce",
                    "newAccount": f"{base}/new-account",
                    "newOrder": f"{base}/new-order",
                    "revokeCert": f"{base}/revoke-cert",
                    "keyChange": f"{base}/key-change",
                    "renewalInfo": f"{base}/renewal-info",
                    "meta": {
                        "externalAccountRequired": provisioner.eab_required,
                        "profiles": profiles,
                    },
                }
            )

        return await self._respond(request, work)

    async def new_nonce(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            return _Reply(None, status=200 if request.method == "HEAD" else 204)

        return await self._respond(request, work)

    # -- accounts -------------------------------------------------------------------

    def _account_json(self, base: str, account: dict[str, Any]) -> dict[str, Any]:
        return {
            "status": account["status"],
            "contact": json.loads(account["contact"]),
            "orders": f"{base}/account/{account['id']}/orders",
        }

    @staticmethod
    def _contact(payload: dict[str, Any]) -> list[str]:
        contact = payload.get("contact", [])
        if not isinstance(contact, list) or not all(isinstance(c, str) for c in contact):
            raise ACMEProblem("invalidContact", "contact must be a list of mailto: URLs.")
        for value in contact:
            if not value.startswith("mailto:"):
                raise ACMEProblem("unsupportedContact", f"Contact {value!r} is not a mailto: URL.")
            if "," in value or "@" not in value:
                raise ACMEProblem(
                    "invalidContact", f"Contact {value!r} must be one mailto: address."
                )
        return contact

    async def new_account(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base, jwk_allowed=True)
            payload = ctx.jws.payload_json()
            return await run_in_threadpool(self._register, ctx, payload, str(request.url))

        return await self._respond(request, work)

    def _register(self, ctx: _Context, payload: dict[str, Any], url: str) -> _Reply:
        thumb = thumbprint(ctx.key)
        with self.ca.store.reader() as conn:
            row = conn.execute(
                select(acme_accounts).where(acme_accounts.c.thumbprint == thumb)
            ).first()
        if row is not None:
            existing = dict(row._mapping)
            if existing["provisioner"] != ctx.provisioner.name:
                raise ACMEProblem(
                    "unauthorized",
                    "This account key is registered with another provisioner: use a "
                    "new key for this one.",
                )
            location = f"{ctx.base}/account/{existing['id']}"
            return _Reply(self._account_json(ctx.base, existing), location=location)
        if payload.get("onlyReturnExisting") is True:
            raise ACMEProblem("accountDoesNotExist", "No account has this key: register first.")
        contact = self._contact(payload)
        binding = payload.get("externalAccountBinding")
        if binding is None and ctx.provisioner.eab_required:
            raise ACMEProblem(
                "externalAccountRequired",
                f"Provisioner {ctx.provisioner.name!r} requires external account binding: "
                f"ask the CA operator for a key ('trustmesh acme eab create "
                f"{ctx.provisioner.name}') and pass its kid and HMAC key to your client.",
            )
        account_id = _new_id()
        at = _now()
        eab_kid: str | None = None
        with self.ca.store.transaction() as conn:
            if binding is not None:
                eab_kid = self._bind_eab(conn, ctx, binding, url, account_id, at)
            account = {
                "id": account_id,
                "provisioner": ctx.provisioner.name,
                "thumbprint": thumb,
                "jwk": json.dumps(ctx.jws.protected["jwk"], sort_keys=True),
                "status": "valid",
                "contact": json.dumps(contact),
                "eab_kid": eab_kid,
                "created_at": at,
            }
            conn.execute(acme_accounts.insert().values(**account))
            self.ca.store.append_audit(
                conn,
                at=datetime.fromtimestamp(at, UTC),
                actor=f"acme:{ctx.provisioner.name}",
                action="acme_account",
                subject=account_id,
                details={
                    "provisioner": ctx.provisioner.name,
                    "thumbprint": thumb,
                    "eab_kid": eab_kid or "",
                },
            )
        log.info(
            "ACME account %s on %s",
            account_id,
            ctx.provisioner.name,
            extra={"event": "acme_account", "account": account_id, "eab_kid": eab_kid},
        )
        return _Reply(
            self._account_json(ctx.base, account),
            status=201,
            location=f"{ctx.base}/account/{account_id}",
        )

    def _bind_eab(
        self,
        conn: Connection,
        ctx: _Context,
        binding: object,
        url: str,
        account_id: str,
        at: int,
    ) -> str:
        kid, mac = verify_eab(binding, url=url, account_jwk=ctx.jws.protected["jwk"])
        row = conn.execute(select(acme_eab_keys).where(acme_eab_keys.c.kid == kid)).first()
        refused = ACMEProblem(
            "unauthorized",
            "The external account binding does not verify (unknown kid, another "
            "provisioner's key, a wrong HMAC key, or a key used already): ask for a new one.",
        )
        if row is None or row.provisioner != ctx.provisioner.name or row.account_id is not None:
            raise refused
        key = open_eab_key(self._eab_key, kid, row.key_sealed)
        if key is None or not check_mac(mac, key):
            raise refused
        bound = conn.execute(
            update(acme_eab_keys)
            .where(acme_eab_keys.c.kid == kid, acme_eab_keys.c.account_id.is_(None))
            .values(account_id=account_id, bound_at=at)
        )
        if bound.rowcount != 1:
            raise refused
        return kid

    async def account(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base)
            if request.path_params["id"] != ctx.account_id:
                raise ACMEProblem("unauthorized", "A request may only change its own account.")
            payload = ctx.jws.payload_json() if ctx.jws.payload else {}
            return await run_in_threadpool(self._update_account, ctx, payload)

        return await self._respond(request, work)

    def _update_account(self, ctx: _Context, payload: dict[str, Any]) -> _Reply:
        changes: dict[str, Any] = {}
        if "contact" in payload:
            changes["contact"] = json.dumps(self._contact(payload))
        status = payload.get("status")
        if status is not None:
            if status != "deactivated":
                raise ACMEProblem("malformed", "An account's status can only become deactivated.")
            changes["status"] = "deactivated"
        account = dict(ctx.account or {})
        if changes:
            with self.ca.store.transaction() as conn:
                conn.execute(
                    update(acme_accounts)
                    .where(acme_accounts.c.id == ctx.account_id)
                    .values(**changes)
                )
                if "status" in changes:
                    self.ca.store.append_audit(
                        conn,
                        at=datetime.now(UTC),
                        actor=f"acme:{ctx.provisioner.name}:{ctx.account_id}",
                        action="acme_account_deactivate",
                        subject=ctx.account_id,
                        details={"provisioner": ctx.provisioner.name},
                    )
            account.update(changes)
        return _Reply(
            self._account_json(ctx.base, account), location=f"{ctx.base}/account/{ctx.account_id}"
        )

    async def key_change(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base)
            outer_url = str(request.url)
            doc = ctx.jws.payload
            inner = parse_jws(doc)
            if "jwk" not in inner.protected or "kid" in inner.protected:
                raise ACMEProblem("malformed", "The inner keyChange JWS must carry the new 'jwk'.")
            if "nonce" in inner.protected:
                raise ACMEProblem("malformed", "The inner keyChange JWS must not carry a nonce.")
            if inner.protected.get("url") != outer_url:
                raise ACMEProblem(
                    "malformed", "The inner keyChange JWS 'url' must equal the outer one."
                )
            new_key = key_from_jwk(inner.protected["jwk"])
            inner.verify(new_key)
            payload = inner.payload_json()
            kid = f"{base}/account/{ctx.account_id}"
            if payload.get("account") != kid:
                raise ACMEProblem("malformed", f"keyChange 'account' must be {kid}.")
            try:
                old = key_from_jwk(payload.get("oldKey"))
            except ACMEProblem:
                raise ACMEProblem("malformed", "keyChange 'oldKey' is not a valid JWK.") from None
            if thumbprint(old) != thumbprint(ctx.key):
                raise ACMEProblem("malformed", "keyChange 'oldKey' is not the account's key.")
            return await run_in_threadpool(self._change_key, ctx, new_key, inner.protected["jwk"])

        return await self._respond(request, work)

    def _change_key(self, ctx: _Context, key: PublicKey, jwk: dict[str, Any]) -> _Reply:
        thumb = thumbprint(key)
        with self.ca.store.transaction() as conn:
            taken = conn.execute(
                select(acme_accounts.c.id).where(acme_accounts.c.thumbprint == thumb)
            ).first()
            if taken is not None:
                raise ACMEProblem(
                    "malformed",
                    "The new key belongs to an account already; pick a fresh key.",
                    status=409,
                )
            conn.execute(
                update(acme_accounts)
                .where(acme_accounts.c.id == ctx.account_id)
                .values(thumbprint=thumb, jwk=json.dumps(jwk, sort_keys=True))
            )
            self.ca.store.append_audit(
                conn,
                at=datetime.now(UTC),
                actor=f"acme:{ctx.provisioner.name}:{ctx.account_id}",
                action="acme_key_change",
                subject=ctx.account_id,
                details={"provisioner": ctx.provisioner.name, "thumbprint": thumb},
            )
        account = dict(ctx.account or {}) | {"jwk": json.dumps(jwk)}
        return _Reply(
            self._account_json(ctx.base, account), location=f"{ctx.base}/account/{ctx.account_id}"
        )

    # -- orders ---------------------------------------------------------------------

    def _identifiers(
        self, provisioner: Provisioner, profile_name: str, raw: object
    ) -> list[tuple[str, str]]:
        if not isinstance(raw, list) or not raw:
            raise ACMEProblem("malformed", "newOrder needs a non-empty 'identifiers' list.")
        if len(raw) > _MAX_IDENTIFIERS:
            raise ACMEProblem(
                "rejectedIdentifier", f"An order may name at most {_MAX_IDENTIFIERS} identifiers."
            )
        profile = self.ca.config.profile(profile_name)
        result: list[tuple[str, str]] = []
        subproblems: list[dict[str, Any]] = []
        for item in raw:
            if not isinstance(item, dict) or not isinstance(item.get("value"), str):
                raise ACMEProblem("malformed", "Each identifier needs a 'type' and a 'value'.")
            kind, value = item.get("type"), str(item["value"])
            try:
                if kind == "dns":
                    value = value.lower().rstrip(".")
                    self._check_dns_syntax(value)
                    if "*" in value:
                        self._check_wildcard(provisioner, value)
                    profile.check_dns(value)
                elif kind == "ip":
                    try:
                        address = ipaddress.ip_address(value)
                    except ValueError:
                        raise ACMEProblem("malformed", f"{value!r} is not an IP address.") from None
                    value = str(address)
                    profile.check_ip(address)
                else:
                    raise ACMEProblem(
                        "unsupportedIdentifier",
                        f"Identifier type {kind!r} is not supported: use 'dns' or 'ip'.",
                    )
            except PolicyError as exc:
                subproblems.append(
                    ACMEProblem("rejectedIdentifier", exc.message).document()
                    | {"identifier": {"type": kind, "value": value}}
                )
                continue
            except ACMEProblem as problem:
                subproblems.append(
                    problem.document() | {"identifier": {"type": kind, "value": value}}
                )
                continue
            if (str(kind), value) not in result:
                result.append((str(kind), value))
        if subproblems:
            first = subproblems[0]
            detail = (
                f"Refusing {len(subproblems)} identifier(s) under profile {profile_name!r}: "
                f"{first['detail']}"
            )
            raise ACMEProblem(first["type"].rsplit(":", 1)[-1], detail, subproblems=subproblems)
        return result

    @staticmethod
    def _check_dns_syntax(value: str) -> None:
        """A ``dns`` identifier must be a host name (RFC 8555 7.1.4; RFC 5280 4.2.1.6): what is
        not one is ``malformed`` (as pebble and Boulder answer), before any policy applies.

        ``*.`` as the whole leftmost label is the only ``*`` allowed (RFC 8555 7.1.3); an IP
        address belongs in an ``ip`` identifier (RFC 8738 3).
        """
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(value)
            raise ACMEProblem(
                "malformed", f"{value!r} is an IP address: send it as an 'ip' identifier."
            )
        labels = value.split(".")
        if labels[0] == "*":
            labels = labels[1:]
        if any("*" in label for label in labels) or not labels:
            raise ACMEProblem(
                "malformed",
                f"Wildcard {value!r} must be '*.' followed by a name without '*' "
                f"(e.g. '*.example.internal').",
            )
        if len(value) > 253 or not all(_LDH_LABEL.fullmatch(label) for label in labels):
            raise ACMEProblem(
                "malformed",
                f"{value!r} is not a host name: use letters, digits and hyphens in labels "
                f"of 1-63 characters (IDNs as xn-- A-labels).",
            )

    @staticmethod
    def _check_wildcard(provisioner: Provisioner, value: str) -> None:
        """RFC 8555 7.1.3: a wildcard (its shape checked by ``_check_dns_syntax``) is
        validated by dns-01 only.

        The profile's ``dns`` patterns then decide (``Profile.check_dns``): a literal
        ``*`` label matches only a pattern label that is itself all wildcard
        (``*.example.internal`` or ``**.internal``), so a wildcard is allowed only
        where every name it covers is.
        """
        if "dns-01" not in provisioner.challenges:
            raise ACMEProblem(
                "rejectedIdentifier",
                f"Wildcard {value!r} needs dns-01, which provisioner {provisioner.name!r} "
                f"does not offer (it needs dns_resolvers): order each name.",
            )

    async def new_order(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base)
            payload = ctx.jws.payload_json()
            return await run_in_threadpool(self._create_order, ctx, payload)

        return await self._respond(request, work)

    def _create_order(self, ctx: _Context, payload: dict[str, Any]) -> _Reply:
        provisioner = ctx.provisioner
        if "notBefore" in payload or "notAfter" in payload:
            raise ACMEProblem(
                "malformed",
                "notBefore/notAfter are not supported: the profile sets the lifetime; "
                "pick a profile instead.",
            )
        profile_name = payload.get("profile", provisioner.profile)
        if profile_name not in provisioner.profiles:
            raise ACMEProblem(
                "invalidProfile",
                f"Profile {profile_name!r} is not offered here; the directory lists "
                f"{list(provisioner.profiles)}.",
            )
        identifiers = self._identifiers(provisioner, str(profile_name), payload.get("identifiers"))
        replaces = payload.get("replaces")
        now = _now()
        expires = now + int(provisioner.order_lifetime.total_seconds())
        order_id = _new_id()
        with self.ca.store.transaction() as conn:
            if replaces is not None:
                self._check_replaces(conn, ctx, replaces)
            conn.execute(
                acme_orders.insert().values(
                    id=order_id,
                    account_id=ctx.account_id,
                    provisioner=provisioner.name,
                    status="pending",
                    identifiers=json.dumps([{"type": k, "value": v} for k, v in identifiers]),
                    profile=profile_name,
                    expires_at=expires,
                    replaces=replaces,
                    created_at=now,
                )
            )
            for kind, value in identifiers:
                authz_id = _new_id()
                conn.execute(
                    acme_authorizations.insert().values(
                        id=authz_id,
                        order_id=order_id,
                        account_id=ctx.account_id,
                        identifier_type=kind,
                        identifier_value=value,
                        status="pending",
                        expires_at=expires,
                    )
                )
                for challenge_type in provisioner.challenges:
                    # dns-01 cannot prove an IP address (RFC 8738 7); a wildcard only dns-01.
                    if (kind == "ip" and challenge_type == "dns-01") or (
                        value.startswith("*.") and challenge_type != "dns-01"
                    ):
                        continue
                    conn.execute(
                        acme_challenges.insert().values(
                            id=_new_id(),
                            authz_id=authz_id,
                            type=challenge_type,
                            token=secrets.token_urlsafe(32),
                            status="pending",
                        )
                    )
        order = self._load_order(order_id)
        return _Reply(
            self._order_json(ctx.base, order), status=201, location=f"{ctx.base}/order/{order_id}"
        )

    def _check_replaces(self, conn: Connection, ctx: _Context, replaces: object) -> None:
        """RFC 9773 5: ``replaces`` names a certificate of this account not replaced yet."""
        if not isinstance(replaces, str) or "." not in replaces:
            raise ACMEProblem(
                "malformed", "replaces must be a certificate identifier (AKI.serial)."
            )
        serial = self._serial_of_cert_id(replaces)
        owner = conn.execute(
            select(acme_orders.c.account_id).where(acme_orders.c.serial == serial)
        ).first()
        if owner is None or owner[0] != ctx.account_id:
            raise ACMEProblem("malformed", "replaces names no certificate this account was issued.")
        taken = conn.execute(
            select(acme_orders.c.id).where(
                acme_orders.c.replaces == replaces, acme_orders.c.status != "invalid"
            )
        ).first()
        if taken is not None:
            raise ACMEProblem("alreadyReplaced", "Another order replaces this certificate already.")

    def _serial_of_cert_id(self, value: str) -> str:
        aki_b64, _, serial_b64 = value.partition(".")
        aki = b64url_decode(aki_b64, "certID keyIdentifier")
        serial = int.from_bytes(b64url_decode(serial_b64, "certID serial"), "big")
        ski = self.ca.intermediate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
        if aki != ski or serial <= 0:
            raise ACMEProblem(
                "malformed",
                "The certificate identifier names no certificate of this CA.",
                status=404,
            )
        return format(serial, "x")

    def _load_order(self, order_id: str, conn: Connection | None = None) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            c = conn if conn is not None else stack.enter_context(self.ca.store.reader())
            row = c.execute(select(acme_orders).where(acme_orders.c.id == order_id)).first()
            if row is None:
                raise ACMEProblem("malformed", f"No order {order_id}.", status=404)
            order = dict(row._mapping)
            authzs = [
                dict(r._mapping)
                for r in c.execute(
                    select(acme_authorizations).where(acme_authorizations.c.order_id == order_id)
                )
            ]
        order["authzs"] = authzs
        order["status"] = self._order_status(order)
        return order

    @staticmethod
    def _authz_status(authz: dict[str, Any], now: int) -> str:
        if authz["status"] == "pending" and authz["expires_at"] < now:
            return "expired"
        return str(authz["status"])

    def _order_status(self, order: dict[str, Any]) -> str:
        status = str(order["status"])
        now = _now()
        if status not in ("pending", "ready"):
            return status
        if order["expires_at"] < now:
            return "invalid"
        states = {self._authz_status(a, now) for a in order["authzs"]}
        if states & {"invalid", "deactivated", "expired", "revoked"}:
            return "invalid"
        if states == {"valid"}:
            return "ready"
        return "pending"

    def _order_json(self, base: str, order: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "status": order["status"],
            "expires": _iso(order["expires_at"]),
            "identifiers": json.loads(order["identifiers"]),
            "authorizations": [f"{base}/authz/{a['id']}" for a in order["authzs"]],
            "finalize": f"{base}/order/{order['id']}/finalize",
            "profile": order["profile"],
        }
        if order.get("replaces"):
            doc["replaces"] = order["replaces"]
        if order["serial"] and order["status"] == "valid":
            doc["certificate"] = f"{base}/cert/{order['serial']}"
        if order["error"]:
            doc["error"] = json.loads(order["error"])
        return doc

    def _own_order(self, ctx: _Context, order_id: str) -> dict[str, Any]:
        order = self._load_order(order_id)
        if order["account_id"] != ctx.account_id:
            raise ACMEProblem("unauthorized", "This order belongs to another account.")
        return order

    async def order(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base)
            order = await run_in_threadpool(self._own_order, ctx, request.path_params["id"])
            return _Reply(self._order_json(base, order))

        return await self._respond(request, work)

    async def orders(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base)
            if request.path_params["id"] != ctx.account_id:
                raise ACMEProblem("unauthorized", "An account may list only its own orders.")

            def fetch() -> list[str]:
                with self.ca.store.reader() as conn:
                    rows = conn.execute(
                        select(acme_orders.c.id).where(
                            and_(
                                acme_orders.c.account_id == ctx.account_id,
                                acme_orders.c.status.in_(("pending", "ready", "processing")),
                                acme_orders.c.expires_at >= _now(),
                            )
                        )
                    )
                    return [f"{base}/order/{row[0]}" for row in rows]

            return _Reply({"orders": await run_in_threadpool(fetch)})

        return await self._respond(request, work)

    # -- authorizations and challenges ----------------------------------------------

    def _authz(self, ctx: _Context, authz_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with self.ca.store.reader() as conn:
            row = conn.execute(
                select(acme_authorizations).where(acme_authorizations.c.id == authz_id)
            ).first()
            if row is None:
                raise ACMEProblem("malformed", f"No authorization {authz_id}.", status=404)
            authz = dict(row._mapping)
            challenges = [
                dict(r._mapping)
                for r in conn.execute(
                    select(acme_challenges)
                    .where(acme_challenges.c.authz_id == authz_id)
                    .order_by(acme_challenges.c.type)
                )
            ]
        if authz["account_id"] != ctx.account_id:
            raise ACMEProblem("unauthorized", "This authorization belongs to another account.")
        authz["status"] = self._authz_status(authz, _now())
        return authz, challenges

    @staticmethod
    def _challenge_json(base: str, challenge: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": challenge["type"],
            "url": f"{base}/chall/{challenge['id']}",
            "status": challenge["status"],
            "token": challenge["token"],
        }
        if challenge["validated_at"]:
            doc["validated"] = _iso(challenge["validated_at"])
        if challenge["error"]:
            doc["error"] = json.loads(challenge["error"])
        return doc

    def _authz_json(
        self, base: str, authz: dict[str, Any], challenges: list[dict[str, Any]]
    ) -> dict[str, Any]:
        shown = challenges
        if authz["status"] == "valid":
            shown = [c for c in challenges if c["status"] == "valid"] or challenges
        value = authz["identifier_value"]
        doc: dict[str, Any] = {
            # RFC 8555 7.1.4: a wildcard's authorization names the base domain.
            "identifier": {"type": authz["identifier_type"], "value": value.removeprefix("*.")},
            "status": authz["status"],
            "expires": _iso(authz["expires_at"]),
            "challenges": [self._challenge_json(base, c) for c in shown],
        }
        if value.startswith("*."):
            doc["wildcard"] = True
        return doc

    async def authz(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base)
            authz_id = request.path_params["id"]
            payload = ctx.jws.payload_json() if ctx.jws.payload else {}

            def act() -> _Reply:
                authz, challenges = self._authz(ctx, authz_id)
                if payload:
                    if payload.get("status") != "deactivated":
                        raise ACMEProblem(
                            "malformed", "An authorization's status can only become deactivated."
                        )
                    if authz["status"] not in ("pending", "valid"):
                        raise ACMEProblem(
                            "malformed", f"The authorization is {authz['status']} already."
                        )
                    with self.ca.store.transaction() as conn:
                        conn.execute(
                            update(acme_authorizations)
                            .where(acme_authorizations.c.id == authz_id)
                            .values(status="deactivated")
                        )
                    authz["status"] = "deactivated"
                return _Reply(self._authz_json(base, authz, challenges))

            return await run_in_threadpool(act)

        return await self._respond(request, work)

    async def challenge(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base)
            challenge_id = request.path_params["id"]
            respond = bool(ctx.jws.payload)
            if respond:
                ctx.jws.payload_json()  # RFC 8555 7.5.1: an empty JSON object

            def act() -> tuple[dict[str, Any], dict[str, Any], bool]:
                with self.ca.store.reader() as conn:
                    row = conn.execute(
                        select(acme_challenges).where(acme_challenges.c.id == challenge_id)
                    ).first()
                if row is None:
                    raise ACMEProblem("malformed", f"No challenge {challenge_id}.", status=404)
                challenge = dict(row._mapping)
                authz, _ = self._authz(ctx, challenge["authz_id"])
                start = False
                if respond and challenge["status"] == "pending":
                    if authz["status"] != "pending":
                        raise ACMEProblem(
                            "malformed", f"The authorization is {authz['status']}: nothing to do."
                        )
                    with self.ca.store.transaction() as conn:
                        moved = conn.execute(
                            update(acme_challenges)
                            .where(
                                acme_challenges.c.id == challenge_id,
                                acme_challenges.c.status == "pending",
                            )
                            .values(status="processing")
                        )
                    if moved.rowcount == 1:
                        challenge["status"] = "processing"
                        start = True
                return challenge, authz, start

            challenge, authz, start = await run_in_threadpool(act)
            if start:
                task = asyncio.create_task(self._validate(ctx, challenge, authz))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return _Reply(
                self._challenge_json(base, challenge),
                links=(f'<{base}/authz/{authz["id"]}>;rel="up"',),
            )

        return await self._respond(request, work)

    async def _validate(
        self, ctx: _Context, challenge: dict[str, Any], authz: dict[str, Any]
    ) -> None:
        kind, value = authz["identifier_type"], authz["identifier_value"]
        key_authorization = f"{challenge['token']}.{thumbprint(ctx.key)}"
        error: ACMEProblem | None = None
        try:
            if challenge["type"] == "http-01":
                await validate_http01(
                    kind,
                    value,
                    challenge["token"],
                    key_authorization,
                    port=ctx.provisioner.http01_port,
                )
            elif challenge["type"] == "dns-01":
                await validate_dns01(
                    value, key_authorization, resolvers=ctx.provisioner.dns_resolvers
                )
            else:
                await validate_tls_alpn01(
                    kind, value, key_authorization, port=ctx.provisioner.tlsalpn01_port
                )
        except ACMEProblem as problem:
            error = problem
        except Exception as exc:  # a validator bug must not leave the challenge processing
            log.exception("ACME validation of %s crashed", value)
            error = ACMEProblem("serverInternal", f"Validation failed: {type(exc).__name__}.")

        def record() -> None:
            at = _now()
            with self.ca.store.transaction() as conn:
                conn.execute(
                    update(acme_challenges)
                    .where(acme_challenges.c.id == challenge["id"])
                    .values(
                        status="invalid" if error else "valid",
                        validated_at=None if error else at,
                        error=json.dumps(error.document()) if error else None,
                    )
                )
                conn.execute(
                    update(acme_authorizations)
                    .where(
                        acme_authorizations.c.id == authz["id"],
                        acme_authorizations.c.status == "pending",
                    )
                    .values(status="invalid" if error else "valid")
                )

        await run_in_threadpool(record)
        log.info(
            "ACME %s for %s: %s",
            challenge["type"],
            value,
            "valid" if error is None else f"invalid ({error.detail})",
            extra={
                "event": "acme_challenge",
                "type": challenge["type"],
                "identifier": value,
                "status": "invalid" if error else "valid",
            },
        )

    # -- finalize and certificates ---------------------------------------------------

    async def finalize(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base)
            payload = ctx.jws.payload_json()
            return await run_in_threadpool(self._finalize, ctx, request.path_params["id"], payload)

        return await self._respond(request, work)

    def _csr_request(self, ctx: _Context, order: dict[str, Any], raw: object) -> LeafRequest:
        der = b64url_decode(raw, "csr")
        try:
            csr = load_csr(der, source="The CSR")
        except CSRError as exc:
            raise ACMEProblem("badCSR", exc.message) from None
        try:
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = x509.SubjectAlternativeName([])
        except ValueError:
            raise ACMEProblem("badCSR", "The CSR's extensions cannot be parsed.") from None
        others = [n for n in sans if not isinstance(n, x509.DNSName | x509.IPAddress)]
        if others:
            raise ACMEProblem("badCSR", "The CSR may name only DNS names and IP addresses as SANs.")
        dns = [n.lower().rstrip(".") for n in sans.get_values_for_type(x509.DNSName)]
        ips = sans.get_values_for_type(x509.IPAddress)
        asked = {("dns", d) for d in dns} | {("ip", str(i)) for i in ips}
        for attr in csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
            cn = str(attr.value).lower().rstrip(".")
            if ("dns", cn) not in asked and ("ip", cn) not in asked:
                raise ACMEProblem("badCSR", f"The CSR's common name {cn!r} is not one of its SANs.")
        wanted = {(i["type"], i["value"]) for i in json.loads(order["identifiers"])}
        if asked != wanted:
            missing = sorted(v for _, v in wanted - asked)
            extra = sorted(v for _, v in asked - wanted)
            raise ACMEProblem(
                "badCSR",
                f"The CSR must name exactly the order's identifiers; missing {missing}, "
                f"extra {extra}. Create the CSR for {sorted(v for _, v in wanted)}.",
            )
        key = csr.public_key()
        if not isinstance(
            key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
        ):
            raise ACMEProblem("badCSR", "The CSR key must be RSA, EC or Ed25519.")
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_bytes(*spki) == ctx.key.public_bytes(*spki):
            raise ACMEProblem("badCSR", "The CSR must not use the account key: make a new key.")
        profile = self.ca.config.profile(order["profile"])
        try:
            profile.check_key(key)
        except PolicyError as exc:
            raise ACMEProblem("badCSR", exc.message) from None
        addresses = tuple(
            i for i in ips if isinstance(i, ipaddress.IPv4Address | ipaddress.IPv6Address)
        )
        return LeafRequest(
            public_key=key,
            spiffe_id=acme_spiffe_id(
                self.ca.config.trust_domain, ctx.provisioner.name, ctx.account_id
            ),
            dns=tuple(sorted(set(dns))),
            ips=tuple(dict.fromkeys(addresses)),
            eku=("server",),
        )

    def _finalize(self, ctx: _Context, order_id: str, payload: dict[str, Any]) -> _Reply:
        order = self._own_order(ctx, order_id)
        if order["status"] != "ready":
            raise ACMEProblem(
                "orderNotReady",
                f"The order is {order['status']}; finalize it once every authorization "
                f"is valid (status ready).",
            )
        leaf = self._csr_request(ctx, order, payload.get("csr"))
        with self.ca.store.transaction() as conn:
            moved = conn.execute(
                update(acme_orders)
                .where(acme_orders.c.id == order_id, acme_orders.c.status.in_(("pending", "ready")))
                .values(status="processing")
            )
        if moved.rowcount != 1:
            raise ACMEProblem("orderNotReady", "The order is being finalized already.")

        def mark_valid(conn: Connection, issued: Issued) -> None:
            conn.execute(
                update(acme_orders)
                .where(acme_orders.c.id == order_id)
                .values(status="valid", serial=issued.record.serial)
            )

        try:
            issued = self.ca.sign_request(
                leaf,
                action="acme",
                actor=f"acme:{ctx.provisioner.name}:{ctx.account_id}",
                profile=order["profile"],
                extra={
                    "acme_provisioner": ctx.provisioner.name,
                    "acme_account": ctx.account_id,
                    "acme_order": order_id,
                },
                within=mark_valid,
            )
        except (PolicyError, TrustmeshError) as exc:
            problem = ACMEProblem(
                "badCSR" if isinstance(exc, PolicyError) else "serverInternal",
                exc.message if isinstance(exc, PolicyError) else "The CA could not sign.",
            )
            with self.ca.store.transaction() as conn:
                conn.execute(
                    update(acme_orders)
                    .where(acme_orders.c.id == order_id)
                    .values(status="invalid", error=json.dumps(problem.document()))
                )
            raise problem from None
        log.info(
            "ACME issued serial %s for %s",
            issued.record.serial,
            list(issued.record.dns) + list(issued.record.ips),
            extra={
                "event": "acme_issue",
                "serial": issued.record.serial,
                "account": ctx.account_id,
                "provisioner": ctx.provisioner.name,
            },
        )
        order = self._load_order(order_id)
        return _Reply(self._order_json(ctx.base, order), location=f"{ctx.base}/order/{order_id}")

    async def certificate(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base)
            serial = request.path_params["id"]

            def fetch() -> bytes:
                with self.ca.store.reader() as conn:
                    owner = conn.execute(
                        select(acme_orders.c.account_id).where(acme_orders.c.serial == serial)
                    ).first()
                if owner is None or owner[0] != ctx.account_id:
                    raise ACMEProblem(
                        "unauthorized", "No certificate of this account has that URL.", status=404
                    )
                record = self.ca.store.get_certificate(serial)
                leaf = x509.load_pem_x509_certificate(record.pem.encode())
                return pem_certificates([leaf, self.ca.intermediate])

            return _Reply(await run_in_threadpool(fetch), media_type=_PEM_CHAIN)

        return await self._respond(request, work)

    # -- revocation -----------------------------------------------------------------

    async def revoke_cert(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            ctx = await self._verified(request, provisioner, base, jwk_allowed=True)
            payload = ctx.jws.payload_json()
            der = b64url_decode(payload.get("certificate"), "certificate")
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                raise ACMEProblem("malformed", "'certificate' is not a DER certificate.") from None
            reason = payload.get("reason", 0)
            if not isinstance(reason, int) or reason not in _REASONS:
                raise ACMEProblem(
                    "badRevocationReason",
                    f"Reason {reason!r} is not accepted: use one of {sorted(_REASONS)}.",
                )
            await run_in_threadpool(self._revoke, ctx, cert, _REASONS[reason])
            if self._on_revoked is not None:
                await self._on_revoked()
            return _Reply(None)

        return await self._respond(request, work)

    def _revoke(self, ctx: _Context, cert: x509.Certificate, reason: str) -> None:
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        serial = format(cert.serial_number, "x")
        unknown = ACMEProblem(
            "unauthorized",
            "This certificate was not issued by this ACME provisioner, or the request is "
            "signed by neither its account nor its key.",
        )
        if cert.issuer != self.ca.intermediate.subject:
            raise unknown
        try:
            record = self.ca.store.get_certificate(serial)
        except NotFoundError:
            raise unknown from None
        if record.pem.strip() != cert.public_bytes(serialization.Encoding.PEM).decode().strip():
            raise unknown
        prefix = f"spiffe://{self.ca.config.trust_domain}/acme/{ctx.provisioner.name}/"
        if not record.spiffe_id.startswith(prefix):
            raise unknown
        if ctx.account is not None:
            with self.ca.store.reader() as conn:
                owner = conn.execute(
                    select(acme_orders.c.account_id).where(acme_orders.c.serial == serial)
                ).first()
            if owner is None or owner[0] != ctx.account_id:
                raise unknown
            actor = f"acme:{ctx.provisioner.name}:{ctx.account_id}"
        else:
            if cert.public_key().public_bytes(*spki) != ctx.key.public_bytes(*spki):
                raise unknown
            actor = f"acme:{ctx.provisioner.name}:certificate-key"
        if record.revoked_at is not None:
            raise ACMEProblem("alreadyRevoked", f"Certificate {serial} is revoked already.")
        self.ca.revoke(serial, reason=reason, actor=actor)
        log.info(
            "ACME revoked serial %s (%s)",
            serial,
            reason,
            extra={"event": "revoke", "serial": serial, "reason": reason, "caller": actor},
        )

    # -- renewal information (RFC 9773) -----------------------------------------------

    async def renewal_info(self, request: Request) -> Response:
        async def work(provisioner: Provisioner, base: str) -> _Reply:
            serial = self._serial_of_cert_id(request.path_params["id"])
            try:
                record = await run_in_threadpool(self.ca.store.get_certificate, serial)
            except NotFoundError:
                raise ACMEProblem(
                    "malformed", "No certificate has that identifier.", status=404
                ) from None
            start_at, end_at = record.not_before, record.not_after
            life = end_at - start_at
            now = datetime.now(UTC).replace(microsecond=0)
            if record.revoked_at is not None:
                # A window in the past: renew at once (RFC 9773 4.2).
                window = (now - life / 100, now)
            else:
                window = (start_at + life * 2 / 3, start_at + life * 5 / 6)
            retry = int(max(60, min(6 * 3600, life.total_seconds() / 10)))
            return _Reply(
                {
                    "suggestedWindow": {
                        "start": window[0].strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "end": window[1].strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                },
                headers={"Retry-After": str(retry)},
            )

        return await self._respond(request, work)
