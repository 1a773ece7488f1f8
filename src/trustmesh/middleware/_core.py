"""What the ASGI and WSGI middleware share: the caller from a leaf, the forwarded
identity of a trusted proxy, refusals, the policy request and the decision log.

Nothing here does I/O; :mod:`._asgi` and :mod:`._wsgi` feed it the peer
certificate and the headers of one request and turn a :class:`Refusal` into a
problem+json response.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import CollectorRegistry, Counter

from trustmesh.errors import ConfigError, SpiffeIDError, VerificationError
from trustmesh.headers import IDENTITY_HEADER_PREFIX, IDENTITY_HEADERS
from trustmesh.pki import SpiffeID, match_spiffe_pattern, verify_chain
from trustmesh.policy import PolicyRequest
from trustmesh.problems import PROBLEM_CONTENT_TYPE, problem_document
from trustmesh.tls import RevocationLike
from trustmesh.tokens import AccessTokenClaims, InvalidTokenError, TokenVerifierUnavailableError

__all__ = [
    "FORWARDED_CALLER_HEADER",
    "FORWARDED_CERT_CHAIN_HEADER",
    "FORWARDED_CERT_HEADER",
    "IDENTITY_HEADERS",
    "IDENTITY_HEADER_PREFIX",
    "Caller",
    "DecisionLike",
    "Gate",
    "PolicyLike",
    "Refusal",
    "RequestIdentity",
    "RevocationLike",
]

log = logging.getLogger("trustmesh.middleware")

#: A trusted proxy names the caller it authenticated here (a SPIFFE ID).
FORWARDED_CALLER_HEADER = "x-trustmesh-caller"
#: RFC 9440: the caller's leaf as ``:base64(DER):``, set by a trusted proxy.
FORWARDED_CERT_HEADER = "client-cert"
#: RFC 9440: the certificates after the leaf, ``:b64:, :b64:``.
FORWARDED_CERT_CHAIN_HEADER = "client-cert-chain"

_PEM_CACHE_SIZE = 1024


def normalize_header(name: str) -> str:
    """Lower case with ``-``: the spelling every variant of a header name maps to."""
    return name.lower().replace("_", "-")


def is_identity_header(name: str) -> bool:
    """Whether a header (any spelling) is one only a trusted proxy may set."""
    norm = normalize_header(name)
    return norm in IDENTITY_HEADERS or norm.startswith(IDENTITY_HEADER_PREFIX)


# -- what the app sees ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified workload that called: its SPIFFE ID and certificate.

    Attributes:
        spiffe_id: The caller's identity.
        serial: The certificate's serial number; None when a trusted proxy named
            the caller without forwarding its certificate.
        certificate: The caller's leaf (None in that same case).
        via: The trusted proxy that forwarded the call, when there was one.

    .. versionadded:: 0.1
    """

    spiffe_id: SpiffeID
    serial: int | None
    certificate: x509.Certificate | None
    via: SpiffeID | None = None

    @property
    def serial_hex(self) -> str | None:
        """The serial as lower-case hex (how the CA lists it), or None."""
        return None if self.serial is None else format(self.serial, "x")

    def __str__(self) -> str:
        return self.spiffe_id.uri


@dataclass(frozen=True, slots=True)
class RequestIdentity:
    """Who is calling, as the middleware established it for one request.

    Found at ``scope["trustmesh"]`` (ASGI) and ``environ["trustmesh"]`` (WSGI).

    Attributes:
        caller: The calling workload.
        user: The verified end-user (or machine) token, or None.
        decision: The policy decision (None when no policy is configured).

    .. versionadded:: 0.1
    """

    caller: Caller
    user: AccessTokenClaims | None
    decision: DecisionLike | None = None


# -- what the middleware is given -------------------------------------------------------


class DecisionLike(Protocol):
    """What a policy decision carries (``trustmesh.policy.Decision``)."""

    @property
    def allowed(self) -> bool: ...

    @property
    def mode(self) -> str: ...

    @property
    def rule(self) -> str | None: ...

    @property
    def reason(self) -> str: ...

    @property
    def would_deny(self) -> bool: ...


class PolicyLike(Protocol):
    """Anything that decides a ``trustmesh.policy.PolicyRequest`` (``Policy``, ``PolicyFile``)."""

    def evaluate(self, request: PolicyRequest, /) -> DecisionLike: ...


# -- refusals ---------------------------------------------------------------------------


@dataclass(slots=True)
class Refusal(Exception):  # noqa: N818 - a response, not an error of ours
    """A request the middleware turns away: status, reason code, title and detail."""

    status: int
    reason: str
    title: str
    detail: str
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    #: The identity refused, when known (for the log line).
    subject: str | None = None

    def body(self) -> bytes:
        return problem_document(
            self.status, self.title, self.detail, reason=self.reason, **self.extra
        )

    def response_headers(self) -> list[tuple[str, str]]:
        body = self.body()
        headers = [
            ("content-type", PROBLEM_CONTENT_TYPE),
            ("content-length", str(len(body))),
            ("cache-control", "no-store"),
            *self.headers.items(),
        ]
        if self.close:
            headers.append(("connection", "close"))
        return headers


def _cert_refusal(
    reason: str, title: str, detail: str, *, close: bool = False, subject: object = None
) -> Refusal:
    return Refusal(
        403, reason, title, detail, close=close, subject=None if subject is None else str(subject)
    )


_SVID_TITLE = "Not a workload certificate: present an X.509-SVID with exactly one SPIFFE ID"


def _rfc6750_safe(text: str) -> str:
    # RFC 6750 section 3: error_description is %x20-21 / %x23-5B / %x5D-7E (no quote, no backslash).
    return "".join(c for c in text if 0x20 <= ord(c) <= 0x7E and c not in '"\\')


# -- the checks -------------------------------------------------------------------------


class Gate:
    """The per-request checks, configured once and shared by every request.

    Args:
        trust_domain: Callers must belong to it.
        policy: Decides who may call what; None allows every verified caller of
            the trust domain (logged at startup).
        revocation: Knows revoked serials, asked on every request; None skips the
            check (logged at startup).
        require_token: Refuse requests without a bearer token (401).
        required_scopes: Scopes every token must carry (403 otherwise).
        trusted_proxies: SPIFFE IDs or globs of gateways/sidecars whose identity
            headers are believed.
        trust_bundle: Trust anchors (and intermediates) to verify a certificate a
            trusted proxy forwards in ``Client-Cert``.
        has_verifier: Whether a token verifier is configured.
        log_allowed: Log allowed requests too (one DEBUG line each); denials are always
            logged (WARNING).
        metrics_registry: Where to count decisions (``trustmesh_service_requests_total``
            by ``outcome`` and ``reason``); None counts nothing.
    """

    def __init__(
        self,
        *,
        trust_domain: str,
        policy: PolicyLike | None,
        revocation: RevocationLike | None,
        require_token: bool,
        required_scopes: Collection[str],
        trusted_proxies: Iterable[str],
        trust_bundle: Sequence[x509.Certificate],
        has_verifier: bool,
        log_allowed: bool,
        kind: str,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        try:
            self.trust_domain = SpiffeID.trust_domain_id(trust_domain).trust_domain
        except SpiffeIDError as exc:
            raise ConfigError(
                f"trust_domain {trust_domain!r} is not a SPIFFE trust domain: {exc.message}",
                field="trust_domain",
            ) from None
        if require_token and not has_verifier:
            raise ConfigError(
                "require_token=True needs a token verifier: pass verifier=AsyncVerifier(...) "
                "(ASGI) or verifier=Verifier(...) (WSGI).",
                field="require_token",
            )
        if required_scopes and not has_verifier:
            raise ConfigError(
                "required_scopes needs a token verifier: pass verifier=...", field="required_scopes"
            )
        self.policy = policy
        self.revocation = revocation
        self.require_token = require_token
        self.required_scopes = frozenset(required_scopes)
        self.trusted_proxies = tuple(trusted_proxies)
        for pattern in self.trusted_proxies:
            if not pattern.startswith("spiffe://"):
                raise ConfigError(
                    f"trusted proxy {pattern!r} is not a SPIFFE ID or glob; give e.g. "
                    f"spiffe://{self.trust_domain}/gateway.",
                    field="trusted_proxies",
                )
        self.trust_bundle = tuple(trust_bundle)
        self.has_verifier = has_verifier
        self.log_allowed = log_allowed
        self._counter = (
            Counter(
                "trustmesh_service_requests",
                "Requests decided by the identity middleware, by outcome and reason code",
                ["outcome", "reason"],
                registry=metrics_registry,
            )
            if metrics_registry is not None
            else None
        )
        # leaf -> (caller, not before, not after as POSIX seconds) or the refusal.
        self._leaves: dict[str | bytes, tuple[Caller, float, float] | Refusal] = {}
        if policy is None:
            log.warning(
                "%s middleware: no policy configured; every verified caller of %s is allowed",
                kind,
                self.trust_domain,
            )
        if revocation is None:
            log.warning(
                "%s middleware: no revocation set configured; revoked callers are accepted "
                "until their certificates expire",
                kind,
            )
        if not has_verifier:
            log.warning(
                "%s middleware: no token verifier configured; bearer tokens are ignored", kind
            )
        if self.trusted_proxies:
            log.info(
                "%s middleware: identity headers believed from %s",
                kind,
                ", ".join(self.trusted_proxies),
            )

    # -- the caller -------------------------------------------------------------

    def caller_from_peer(self, leaf: str | bytes | None, now: datetime | None = None) -> Caller:
        """Return the caller for the connection's leaf (PEM text or DER bytes).

        Raises:
            Refusal: No certificate, or one that is not a workload identity of
                the trust domain, or expired, or revoked.
        """
        if not leaf:
            raise _cert_refusal(
                "no_client_certificate",
                "Client certificate required: call this service over mTLS with your identity",
                "The connection presented no client certificate. Present the workload's "
                "certificate (trustmesh agent output) when connecting.",
            )
        cached = self._leaves.get(leaf)
        if cached is None:
            parsed = self._parse_leaf(leaf)
            if isinstance(parsed, Refusal):
                cached = parsed
            else:
                cert = parsed.certificate
                # A leaf from the connection always has its certificate.
                window = (
                    (cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())
                    if cert is not None
                    else (float("-inf"), float("inf"))
                )
                cached = (parsed, *window)
            # Plain dict operations only: WSGI servers call this from many threads.
            if len(self._leaves) >= _PEM_CACHE_SIZE:
                self._leaves.clear()
            self._leaves[leaf] = cached
        if isinstance(cached, Refusal):
            raise dataclasses.replace(cached)
        caller, not_before, not_after = cached
        # Inside the validity window by the clock: no datetimes to build. At or past an
        # edge (or with an explicit ``now``) the exact check decides and words the refusal.
        if now is not None or not not_before < time.time() < not_after:
            self._check_time(caller, now)
        self.check_revoked(caller)
        return caller

    def _parse_leaf(self, leaf: str | bytes) -> Caller | Refusal:
        try:
            if isinstance(leaf, str):
                cert = x509.load_pem_x509_certificate(leaf.encode())
            else:
                cert = x509.load_der_x509_certificate(leaf)
        except ValueError:
            return _cert_refusal(
                "bad_client_certificate",
                "Client certificate unreadable: present a certificate issued by the trust "
                "domain's CA",
                "The client certificate could not be parsed.",
            )
        try:
            return self._workload(cert, via=None)
        except Refusal as refusal:
            return refusal

    def _workload(self, cert: x509.Certificate, *, via: SpiffeID | None) -> Caller:
        serial = format(cert.serial_number, "x")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = bc.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if is_ca:
            raise _cert_refusal(
                "ca_as_client",
                "A CA certificate cannot call a service: present a workload certificate",
                f"Certificate {serial} is a CA certificate; workloads present the leaf "
                f"the CA issued to them.",
            )
        try:
            usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            usages = set()
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise _cert_refusal(
                "wrong_eku",
                "Certificate not allowed for client authentication: issue one with clientAuth",
                f"Certificate {serial} lacks the clientAuth extended key usage; issue it "
                f"with a profile whose eku includes 'client'.",
            )
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            raise _cert_refusal(
                "uri_san_count",
                _SVID_TITLE,
                f"Certificate {serial} has {len(uris)} URI SANs; an X.509-SVID has exactly one.",
            )
        try:
            spiffe_id = SpiffeID.parse(uris[0])
        except SpiffeIDError as exc:
            raise _cert_refusal("no_spiffe_id", _SVID_TITLE, exc.message) from None
        if not spiffe_id.member_of(self.trust_domain):
            raise _cert_refusal(
                "foreign_trust_domain",
                f"Caller outside the trust domain: only spiffe://{self.trust_domain}/... "
                f"identities may call",
                f"Caller {spiffe_id} is in trust domain {spiffe_id.trust_domain!r}, not "
                f"{self.trust_domain!r}.",
            )
        return Caller(spiffe_id, cert.serial_number, cert, via)

    @staticmethod
    def _check_time(caller: Caller, now: datetime | None) -> None:
        # The handshake checked validity; a keep-alive connection can outlive the leaf.
        cert = caller.certificate
        if cert is None:  # a caller a proxy named; the proxy checked its certificate
            return
        when = now or datetime.now(UTC)
        if when > cert.not_valid_after_utc:
            raise _cert_refusal(
                "expired",
                "Client certificate expired: renew it (the trustmesh agent does) and reconnect",
                f"Certificate {caller.serial_hex} of {caller.spiffe_id} expired at "
                f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}.",
                close=True,
                subject=caller.spiffe_id,
            )
        if when < cert.not_valid_before_utc:
            raise _cert_refusal(
                "not_yet_valid",
                "Client certificate not yet valid: check the clocks",
                f"Certificate {caller.serial_hex} of {caller.spiffe_id} is valid from "
                f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}.",
                close=True,
                subject=caller.spiffe_id,
            )

    def check_revoked(self, caller: Caller) -> None:
        """Refuse (and close the connection) when the caller's serial is revoked, or its
        certificate comes from an intermediate the CA no longer publishes."""
        if self.revocation is None or caller.serial is None:
            return
        if self.revocation.is_revoked(caller.serial):
            raise _cert_refusal(
                "revoked",
                "Client certificate revoked: this identity may no longer call; enroll again",
                f"Certificate {caller.serial_hex} of {caller.spiffe_id} is revoked (or the "
                f"revocation feed is lost and this service fails closed).",
                close=True,
                subject=caller.spiffe_id,
            )
        # A RevocationSet also knows the intermediates the CA publishes; other
        # RevocationLike objects may know only serials.
        withdrawn = getattr(self.revocation, "issuer_withdrawn", None)
        if (
            caller.certificate is not None
            and withdrawn is not None
            and withdrawn(caller.certificate)
        ):
            raise _cert_refusal(
                "issuer_retired",
                "Client certificate from a retired intermediate: renew it (the trustmesh "
                "agent does) and reconnect",
                f"Certificate {caller.serial_hex} of {caller.spiffe_id} was signed by an "
                f"intermediate the CA no longer publishes (retired by a rotation).",
                close=True,
                subject=caller.spiffe_id,
            )

    def is_trusted_proxy(self, caller: Caller) -> bool:
        """Whether the connection's own peer is a configured gateway or sidecar."""
        if not self.trusted_proxies:
            return False
        return caller.via is None and any(
            match_spiffe_pattern(caller.spiffe_id, p) for p in self.trusted_proxies
        )

    def forwarded_caller(self, proxy: Caller, headers: Mapping[str, list[str]]) -> Caller:
        """The caller a trusted proxy forwarded, or the proxy itself when it named none.

        Args:
            proxy: The connection's peer (a trusted proxy).
            headers: Identity header values by normalized name (every variant collected).

        Raises:
            Refusal: 400 for unreadable or ambiguous headers; 403 for a forwarded
                certificate or ID that is not acceptable.
        """
        for name, values in headers.items():
            if len(values) > 1:
                raise _bad_forwarded(
                    f"{name} was sent {len(values)} times (or in several spellings)"
                )
        names = headers.get(FORWARDED_CALLER_HEADER, [])
        certs = headers.get(FORWARDED_CERT_HEADER, [])
        chain_values = headers.get(FORWARDED_CERT_CHAIN_HEADER, [])
        if not names and not certs:
            return proxy
        caller: Caller | None = None
        if certs:
            leaf = _sf_certificates(certs[0], FORWARDED_CERT_HEADER)
            if len(leaf) != 1:
                raise _bad_forwarded("Client-Cert must hold exactly one certificate")
            chain = (
                _sf_certificates(chain_values[0], FORWARDED_CERT_CHAIN_HEADER)
                if chain_values
                else []
            )
            caller = self._verify_forwarded(leaf[0], chain, proxy.spiffe_id)
        if names:
            try:
                named = SpiffeID.parse(names[0].strip())
            except SpiffeIDError as exc:
                raise _bad_forwarded(f"X-Trustmesh-Caller: {exc.message}") from None
            if caller is not None and caller.spiffe_id != named:
                raise _bad_forwarded(
                    f"X-Trustmesh-Caller {named} does not match Client-Cert's {caller.spiffe_id}"
                )
            if caller is None:
                if not named.member_of(self.trust_domain):
                    raise _cert_refusal(
                        "foreign_trust_domain",
                        f"Caller outside the trust domain: only spiffe://{self.trust_domain}/"
                        f"... identities may call",
                        f"Forwarded caller {named} is not in trust domain {self.trust_domain!r}.",
                    )
                caller = Caller(named, None, None, proxy.spiffe_id)
        return caller if caller is not None else proxy

    def _verify_forwarded(
        self, leaf: x509.Certificate, chain: list[x509.Certificate], via: SpiffeID
    ) -> Caller:
        caller = self._workload(leaf, via=via)
        if not self.trust_bundle:
            raise _cert_refusal(
                "forwarded_cert_unverifiable",
                "Forwarded certificate cannot be verified: configure trust_bundle",
                "A trusted proxy forwarded Client-Cert, but this service has no trust "
                "bundle to verify it against.",
            )
        try:
            verify_chain(leaf, chain, self.trust_bundle, usage="client")
        except VerificationError as exc:
            reason = str(exc.details.get("reason") or "unverified")
            raise _cert_refusal(
                reason,
                "Forwarded client certificate not accepted: it must chain to this trust "
                "domain's CA and be valid now",
                exc.message,
            ) from None
        self.check_revoked(caller)
        return caller

    # -- tokens -----------------------------------------------------------------

    def bearer_token(self, authorization: list[str]) -> str | None:
        """The bearer token of the Authorization header values, or None.

        Raises:
            Refusal: 401 when a token is required and there is none; 400 for
                several Authorization headers.
        """
        if len(authorization) > 1:
            raise Refusal(
                400,
                "several_authorization_headers",
                "Send one Authorization header",
                "The request carries several Authorization headers.",
                headers={"www-authenticate": 'Bearer realm="trustmesh", error="invalid_request"'},
            )
        token = None
        if authorization:
            scheme, _, value = authorization[0].strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        if token is None and self.require_token:
            raise Refusal(
                401,
                "token_missing",
                "Bearer token required: send Authorization: Bearer <access token>",
                "This service needs an access token from the identity server with each request.",
                headers={"www-authenticate": 'Bearer realm="trustmesh"'},
            )
        if not self.has_verifier:
            return None
        return token

    def token_refusal(self, exc: InvalidTokenError) -> Refusal:
        """Map a verification failure to 401 invalid_token (503 when the issuer is unreachable)."""
        if isinstance(exc, TokenVerifierUnavailableError):
            return Refusal(
                503,
                exc.reason,
                "Token issuer unreachable: retry shortly",
                "The access token could not be checked because its issuer could not be reached.",
                headers={"retry-after": "5"},
            )
        description = _rfc6750_safe(exc.reason)
        return Refusal(
            401,
            "invalid_token",
            "Access token not accepted: get a new one from the identity server",
            exc.message,
            headers={
                "www-authenticate": (
                    f'Bearer realm="trustmesh", error="invalid_token", '
                    f'error_description="{description}"'
                )
            },
            extra={"token_reason": exc.reason},
        )

    def check_scopes(self, user: AccessTokenClaims) -> None:
        """Refuse 403 insufficient_scope when the token lacks a required scope."""
        missing = sorted(self.required_scopes - user.scopes)
        if missing:
            scope = " ".join(sorted(self.required_scopes))
            raise Refusal(
                403,
                "insufficient_scope",
                f"Token lacks scope: ask for {' '.join(missing)} when requesting the token",
                f"The access token lacks the scope(s) {missing} this service requires.",
                headers={
                    "www-authenticate": (
                        f'Bearer realm="trustmesh", error="insufficient_scope", '
                        f'scope="{_rfc6750_safe(scope)}"'
                    )
                },
            )

    # -- the policy -------------------------------------------------------------

    def decide(
        self, caller: Caller, user: AccessTokenClaims | None, method: str, path: str
    ) -> DecisionLike | None:
        """Evaluate the policy; refuse 403 on deny (audit mode lets it through).

        ``path`` is the raw request path (percent-escapes kept, no query): the
        policy normalises it and refuses ambiguous ones such as ``%2F``.

        Raises:
            Refusal: The policy denied the request.
        """
        if self.policy is None:
            return None
        request = PolicyRequest(
            caller=caller.spiffe_id.uri,
            method=method,
            path=path,
            claims=user.claims if user is not None else None,
            scopes=user.scopes if user is not None else frozenset(),
            roles=user.roles if user is not None else (),
        )
        decision = self.policy.evaluate(request)
        if not decision.allowed:
            raise Refusal(
                403,
                "policy_denied",
                "Not allowed by this service's policy: ask its owners for a rule that "
                "allows this caller",
                f"{caller.spiffe_id} may not {method} {path}: {decision.reason}",
                extra={"rule": decision.rule} if decision.rule else {},
            )
        return decision

    # -- the log ----------------------------------------------------------------

    def log_decision(
        self,
        *,
        method: str,
        path: str,
        caller: Caller | None,
        peer: Caller | None,
        user: AccessTokenClaims | None,
        decision: DecisionLike | None,
        refusal: Refusal | None,
    ) -> None:
        """Write one structured line: allow, deny or audit-deny, with the reason.

        Denials and audit-mode would-denies are WARNING, always; allowed requests
        are DEBUG (``log_allowed=False`` drops them), and cost nothing more than
        the metric when the logger is not enabled for DEBUG.
        """
        if refusal is None and (decision is None or not decision.would_deny):
            self._count("allow", "allowed")
            if not self.log_allowed or not log.isEnabledFor(logging.DEBUG):
                return
        fields: dict[str, object] = {
            "event": "trustmesh.request",
            "method": method,
            "path": path,
            "caller": str(caller) if caller else (str(peer) if peer else None),
            "serial": caller.serial_hex if caller else None,
            "via": str(caller.via) if caller and caller.via else None,
            "user": user.subject if user else None,
            "rule": decision.rule if decision else None,
        }
        if refusal is not None:
            fields.update(
                outcome="deny", status=refusal.status, reason=refusal.reason, detail=refusal.detail
            )
            if refusal.subject is not None:
                fields["caller"] = refusal.subject
            if refusal.extra.get("rule"):
                fields["rule"] = refusal.extra["rule"]
            self._count("deny", refusal.reason)
            log.warning(
                "deny %s %s from %s: %s (%s)",
                method,
                path,
                fields["caller"] or "unknown caller",
                refusal.reason,
                refusal.detail,
                extra=_clean(fields),
            )
            return
        if decision is not None and decision.would_deny:
            fields.update(outcome="audit_deny", reason=decision.reason)
            self._count("audit_deny", "policy_would_deny")
            log.warning(
                "audit: would deny %s %s from %s: %s",
                method,
                path,
                caller,
                decision.reason,
                extra=_clean(fields),
            )
            return
        reason = decision.reason if decision is not None else "no policy configured"
        fields.update(outcome="allow", reason=reason)
        log.debug("allow %s %s from %s: %s", method, path, caller, reason, extra=_clean(fields))

    def _count(self, outcome: str, reason: str) -> None:
        if self._counter is not None:
            self._counter.labels(outcome, reason).inc()


def _clean(fields: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in fields.items() if v is not None}


def _bad_forwarded(problem: str) -> Refusal:
    return Refusal(
        400,
        "bad_forwarded_identity",
        "Forwarded identity unreadable: fix the gateway or sidecar that sets it",
        f"The trusted proxy's identity headers are not usable: {problem}.",
    )


def _sf_certificates(value: str, name: str) -> list[x509.Certificate]:
    # RFC 9440 section 2: each certificate is an RFC 8941 Byte Sequence, ":base64(DER):".
    certs = []
    for item in value.split(","):
        item = item.strip()
        if len(item) < 2 or not (item.startswith(":") and item.endswith(":")):
            raise _bad_forwarded(f"{name} is not a list of :base64(DER): byte sequences")
        try:
            certs.append(
                x509.load_der_x509_certificate(base64.b64decode(item[1:-1], validate=True))
            )
        except (ValueError, binascii.Error):
            raise _bad_forwarded(f"{name} does not hold a DER certificate") from None
    return certs


def forwarded_certificate_header(cert: x509.Certificate) -> str:
    """Encode a certificate as a ``Client-Cert`` value (RFC 9440), for proxies and tests."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return ":" + base64.b64encode(cert.public_bytes(Encoding.DER)).decode() + ":"
