"""How to trust one issuer: where its keys are, what to expect in its tokens."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from trustmesh.errors import ConfigError

from ._keys import ASYMMETRIC_ALGORITHMS

__all__ = [
    "DEFAULT_ALGORITHMS",
    "DEFAULT_LEEWAY",
    "DEFAULT_MAX_LIFETIME",
    "MAX_TOKEN_BYTES",
    "IntrospectionConfig",
    "IssuerConfig",
]

log = logging.getLogger("trustmesh.tokens")

#: Tokens longer than this are refused before any parsing.
MAX_TOKEN_BYTES = 8192
#: Clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
DEFAULT_LEEWAY = timedelta(seconds=60)
#: Longest ``exp - iat`` accepted (our identity server issues 10-minute tokens).
DEFAULT_MAX_LIFETIME = timedelta(hours=1)
#: Algorithms accepted unless an issuer narrows them.
DEFAULT_ALGORITHMS = ("ES256", "ES384", "RS256", "PS256", "EdDSA", "Ed25519")


def _check_url(url: str, what: str, *, allow_http: bool) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and allow_http:
        log.warning("tokens: %s %s is plain HTTP (allow_insecure_http=True)", what, url)
        return url
    raise ConfigError(
        f"{what} {url!r} is not an https:// URL. Use the provider's HTTPS address "
        f"(plain HTTP needs allow_insecure_http=True).",
        field=what,
    )


@dataclass(frozen=True, slots=True)
class IntrospectionConfig:
    """Credentials for an RFC 7662 introspection endpoint (for opaque tokens).

    Args:
        client_id: The resource server's client id at the provider.
        client_secret: Its secret (sent with HTTP Basic, ``client_secret_basic``).
        url: The endpoint; ``None`` takes ``introspection_endpoint`` from discovery.
        cache_ttl: How long an active answer is reused (never past the token's ``exp``).
        cache_size: At most this many answers are kept.
    """

    client_id: str
    client_secret: str = field(repr=False)
    url: str | None = None
    cache_ttl: timedelta = timedelta(seconds=60)
    cache_size: int = 10_000


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted token issuer.

    Give ``discovery_url`` (the default when neither is given:
    ``{issuer}/.well-known/openid-configuration``) or ``jwks_url``.

    Args:
        issuer: The exact ``iss`` value (no normalisation, RFC 8414 §3.3).
        audiences: Accepted ``aud`` values; at least one is required.
        discovery_url: OpenID discovery document (its ``issuer`` must equal ``issuer``).
        jwks_url: The JWKS, when there is no discovery document.
        algorithms: Accepted ``alg`` values, asymmetric only.
        leeway: Clock skew allowed on ``exp``/``nbf``/``iat``.
        max_lifetime: Longest ``exp - iat``.
        ca_bundle: PEM trust anchors for the provider's HTTPS (our CA bundle).
        ssl_context: Or a ready client context (wins over ``ca_bundle``).
        revocation_list_url: The trustmesh revocation list; ``None`` takes
            ``revocation_list_endpoint`` from discovery when advertised.
        revocation_poll_interval: How often the list is fetched.
        revocation_max_stale: Refuse tokens (``revocation_unavailable``) when the
            list could not be fetched for this long; ``None`` soft-fails (logged).
        require_bound_tokens: Refuse tokens without ``cnf`` (``unbound``).
        strict_rfc9068: Require ``typ`` ``at+jwt`` and the ``client_id``/``jti`` claims
            (RFC 9068). ``False`` (logged) accepts providers whose access tokens predate
            it (``typ`` ``JWT`` or none, ``azp`` for ``client_id``, no ``jti``); ID
            tokens are still refused by their claims (``nonce``, ``at_hash``).
        jwks_max_age: Refresh the JWKS this often even when every kid is known.
        jwks_min_refetch_interval: At most one JWKS fetch per this interval
            (unknown kids and failures cannot make us hammer the provider).
        introspection: Credentials for opaque tokens.
        allow_insecure_http: Permit ``http://`` URLs (tests, never production).
        http_timeout: Per-request timeout towards the provider.

    Raises:
        ConfigError: A setting is unusable; the message says which and how to fix it.

    .. versionadded:: 0.1
    """

    issuer: str
    audiences: Sequence[str]
    discovery_url: str | None = None
    jwks_url: str | None = None
    algorithms: Collection[str] = DEFAULT_ALGORITHMS
    leeway: timedelta = DEFAULT_LEEWAY
    max_lifetime: timedelta = DEFAULT_MAX_LIFETIME
    ca_bundle: Path | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    revocation_list_url: str | None = None
    revocation_poll_interval: timedelta = timedelta(seconds=30)
    revocation_max_stale: timedelta | None = timedelta(minutes=5)
    require_bound_tokens: bool = False
    strict_rfc9068: bool = True
    jwks_max_age: timedelta = timedelta(minutes=5)
    jwks_min_refetch_interval: timedelta = timedelta(seconds=10)
    introspection: IntrospectionConfig | None = None
    allow_insecure_http: bool = False
    http_timeout: timedelta = timedelta(seconds=5)

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ConfigError("issuer is empty. Give the provider's exact issuer URL.")
        if isinstance(self.audiences, str):
            object.__setattr__(self, "audiences", (self.audiences,))
        object.__setattr__(self, "audiences", tuple(self.audiences))
        if not self.audiences or not all(isinstance(a, str) and a for a in self.audiences):
            raise ConfigError(
                f"Issuer {self.issuer!r} has no expected audience. Set audiences to the "
                f"value(s) this service's tokens carry in aud; any-audience is not offered.",
                field="audiences",
            )
        algorithms = tuple(self.algorithms)
        bad = [a for a in algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if bad or not algorithms:
            raise ConfigError(
                f"Issuer {self.issuer!r}: algorithms {bad or '(none)'} are not allowed; use "
                f"asymmetric ones from {sorted(ASYMMETRIC_ALGORITHMS)} (never none or HS*).",
                field="algorithms",
            )
        object.__setattr__(self, "algorithms", frozenset(algorithms))
        for name in ("leeway", "max_lifetime", "jwks_max_age", "http_timeout"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value < timedelta(0):
                raise ConfigError(f"{name} must be a non-negative timedelta.", field=name)
        if self.leeway > timedelta(minutes=5):
            raise ConfigError(
                f"leeway {self.leeway} is over the 5 minute bound. Fix the clocks (NTP) "
                f"rather than widening it.",
                field="leeway",
            )
        if self.jwks_url is not None and self.discovery_url is not None:
            raise ConfigError("Give discovery_url or jwks_url, not both.", field="jwks_url")
        http = self.allow_insecure_http
        if http:
            log.warning("tokens: issuer %s allows plain HTTP (allow_insecure_http)", self.issuer)
        if self.jwks_url is not None:
            _check_url(self.jwks_url, "jwks_url", allow_http=http)
        else:
            url = (
                self.discovery_url or self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            )
            object.__setattr__(
                self, "discovery_url", _check_url(url, "discovery_url", allow_http=http)
            )
        if self.revocation_list_url is not None:
            _check_url(self.revocation_list_url, "revocation_list_url", allow_http=http)
        if not self.strict_rfc9068:
            log.warning(
                "tokens: issuer %s: access tokens need not be RFC 9068 (typ JWT accepted, "
                "client_id and jti optional)",
                self.issuer,
            )
        if self.revocation_max_stale is None:
            log.warning("tokens: issuer %s soft-fails a stale revocation list", self.issuer)
        if self.introspection is not None and self.introspection.url is not None:
            _check_url(self.introspection.url, "introspection url", allow_http=http)
        if self.ca_bundle is not None and not Path(self.ca_bundle).is_file():
            raise ConfigError(
                f"CA bundle {str(self.ca_bundle)!r} does not exist. Export it with "
                f"`trustmesh export bundle --out FILE`.",
                field="ca_bundle",
            )

    @property
    def allowed_algorithms(self) -> frozenset[str]:
        """The accepted algorithms as a set."""
        return frozenset(self.algorithms)

    def client_ssl_context(self) -> ssl.SSLContext:
        """The context used to verify the provider's HTTPS certificate."""
        if self.ssl_context is not None:
            return self.ssl_context
        return ssl.create_default_context(
            cafile=str(self.ca_bundle) if self.ca_bundle is not None else None
        )
