"""The gateway's YAML configuration: loaded, validated, and every error pointing at
its line and key.

The file is walked with the located walker of :mod:`trustmesh.yamlwalk`, so each
value keeps its position: an error reads ``gateway.yaml:12: routes[0].upstream.id:
'orders' is not a SPIFFE ID ...``. Unknown keys are errors (a typo must not silently
turn a check off), and so are duplicate keys. This module is the gateway's schema:
what each key means and which values are valid. Relative file names are taken from the
configuration file's directory. The result is plain frozen data; the app compiles it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from trustmesh.errors import ConfigError, SpiffeIDError
from trustmesh.pki import SpiffeID, parse_dns_name, parse_ip_address
from trustmesh.policy import HTTP_METHODS, Policy, PolicyConfigError
from trustmesh.serving import parse_listen
from trustmesh.yamlwalk import FailAt, YamlValue, compose

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "AlertsConfig",
    "GatewayConfig",
    "IntrospectionEntry",
    "IssuerEntry",
    "RateLimitsConfig",
    "RateSpec",
    "RouteConfig",
    "UpstreamConfig",
    "describe_config",
    "load_config",
    "parse_config",
    "upstream_path_of",
]

#: ``limits.max_header_bytes`` default: request line plus headers.
DEFAULT_MAX_HEADER_BYTES = 16384
#: ``limits.max_body_bytes`` default (10 MiB).
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
#: Refuse configuration files larger than this.
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class RateSpec:
    """A token bucket: ``rate`` requests per second, bursts up to ``burst``."""

    rate: float
    burst: int


@dataclass(frozen=True)
class RateLimitsConfig:
    """Rate limits per client IP and per token client (``client_id``/``azp``/``sub``)."""

    per_ip: RateSpec | None = None
    per_client: RateSpec | None = None


@dataclass(frozen=True)
class AlertsConfig:
    """N denies from one source within ``window`` seconds fire an alert."""

    threshold: int = 20
    window: float = 60.0
    block_for: float = 300.0
    webhook: str | None = None


@dataclass(frozen=True)
class IntrospectionEntry:
    """RFC 7662 introspection for an issuer's opaque tokens."""

    client_id: str
    client_secret_file: Path
    url: str | None = None


@dataclass(frozen=True)
class IssuerEntry:
    """One trusted token issuer (``issuers:`` entry)."""

    issuer: str
    audiences: tuple[str, ...]
    discovery: str | None = None
    jwks_uri: str | None = None
    ca_bundle: Path | None = None
    algorithms: tuple[str, ...] | None = None
    introspection: IntrospectionEntry | None = None
    strict_rfc9068: bool = True
    line: int = 0


@dataclass(frozen=True)
class UpstreamConfig:
    """A route's upstream pool: endpoints that must all present ``id``."""

    urls: tuple[str, ...]
    id: str
    timeout: float = 10.0
    connect_timeout: float = 2.0
    retries: int = 1
    eject_after: int = 3
    eject_for: float = 10.0


@dataclass(frozen=True)
class RouteConfig:
    """One route: which requests (host, path prefix, methods) go where, under which rules."""

    name: str
    path: str
    upstream: UpstreamConfig
    host: str | None = None
    methods: frozenset[str] | None = None
    strip_prefix: bool = False
    rewrite_prefix: str | None = None
    public: bool = False
    #: The ``auth`` block without ``public``/``issuers``: the policy ``user`` requirement.
    auth: Mapping[str, Any] = field(default_factory=dict)
    issuers: tuple[str, ...] | None = None
    policy: Path | None = None
    allow_ips: tuple[str, ...] = ()
    deny_ips: tuple[str, ...] = ()
    rate_limits: RateLimitsConfig | None = None
    max_body_bytes: int | None = None
    line: int = 0


@dataclass(frozen=True)
class GatewayConfig:
    """The whole gateway configuration (see docs/gateway.md for every key)."""

    source: Path
    listen: str
    routes: tuple[RouteConfig, ...]
    id: str | None = None
    ca: str | None = None
    #: DNS and IP SANs the in-process agent asks for (``dns:``/``ip:``; validated).
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    check_revocation: bool = True
    cert_dir: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    redirect_http: str | None = None
    issuers: tuple[IssuerEntry, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    redis: str | None = None
    alerts: AlertsConfig | None = None
    access_log: bool = True
    metrics_listen: str | None = None

    def route(self, name: str) -> RouteConfig:
        """The route named ``name``.

        Raises:
            KeyError: No such route.
        """
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)


_HOST = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_PATH_SEGMENT_BAD = re.compile(r"[\s%?#\\]")


def _spiffe_id(value: YamlValue) -> str:
    text = value.string()
    try:
        return SpiffeID.parse(text).uri
    except SpiffeIDError as exc:
        value.error(f"{text!r} is not a SPIFFE ID ({exc.message})")


def _https_url(value: YamlValue, *, what: str = "an https:// URL", path_ok: bool = True) -> str:
    text = value.string()
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        value.error(f"expected {what}, got {text!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        value.error(f"{text!r} has an invalid port")
    if parts.query or parts.fragment or parts.username or parts.password:
        value.error(f"{text!r} must not carry a query, fragment or user info")
    if not path_ok and parts.path not in ("", "/"):
        value.error(
            f"{text!r} has a path; give scheme, host and port only (use the route's "
            f"rewrite_prefix to change the path)"
        )
    return text.rstrip("/") if not path_ok else text


def _listen(value: YamlValue) -> str:
    raw = value.scalar()
    text = str(raw).strip() if raw is not None else ""
    try:
        parse_listen(text)
    except ConfigError:
        value.error(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:8443")
    return text


def _file(value: YamlValue, base: Path, *, must_exist: bool = True) -> Path:
    path = Path(os.path.expanduser(value.string()))
    if not path.is_absolute():
        path = base / path
    if must_exist and not path.is_file():
        value.error(
            f"file {str(path)!r} does not exist (relative names are taken from the "
            f"configuration file's directory)"
        )
    return path


def _directory(value: YamlValue, base: Path) -> Path:
    path = Path(os.path.expanduser(value.string()))
    return path if path.is_absolute() else base / path


def _cidrs(value: YamlValue) -> tuple[str, ...]:
    entries: list[str] = []
    for item in value.items():
        text = item.string()
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            item.error(
                f"{text!r} is not an IP network; write an address (203.0.113.9) or a CIDR "
                f"block (203.0.113.0/24, 2001:db8::/32)"
            )
        entries.append(text)
    return tuple(entries)


def _rate(value: YamlValue) -> RateSpec:
    block = value.mapping(("rate", "burst"), required=("rate",))
    rate_value = block.get("rate")
    assert rate_value is not None  # noqa: S101 - required above
    rate = rate_value.number()
    burst_value = block.get("burst")
    burst = burst_value.integer(minimum=1) if burst_value is not None else max(1, math.ceil(rate))
    return RateSpec(rate, burst)


def _rate_limits(value: YamlValue) -> RateLimitsConfig:
    block = value.mapping(("per_ip", "per_client"))
    per_ip, per_client = block.get("per_ip"), block.get("per_client")
    return RateLimitsConfig(
        per_ip=_rate(per_ip) if per_ip is not None else None,
        per_client=_rate(per_client) if per_client is not None else None,
    )


def _route_path(value: YamlValue) -> str:
    path = value.string()
    if not path.startswith("/"):
        value.error(f"{path!r} must start with '/'")
    if path != "/" and path.endswith("/"):
        value.error(
            f"{path!r} must not end with '/': prefixes match whole segments, so "
            f"{path.rstrip('/')!r} already matches {path!r} and everything below it"
        )
    for segment in path[1:].split("/") if path != "/" else ():
        if segment in ("", ".", ".."):
            value.error(f"{path!r} has an empty, '.' or '..' segment; write the normalised path")
        if _PATH_SEGMENT_BAD.search(segment) or not segment.isprintable():
            value.error(
                f"{path!r} has a space, '%', '?', '#', '\\' or control character; write the "
                f"decoded path (requests are matched after decoding)"
            )
    return path


def _host(value: YamlValue) -> str:
    host = value.string().lower().rstrip(".")
    if not _HOST.fullmatch(host):
        value.error(
            f"{host!r} is not a host name; give an exact name (api.example.org) or a "
            f"wildcard (*.example.org), without scheme or port"
        )
    return host


def _upstream(value: YamlValue) -> UpstreamConfig:
    block = value.mapping(
        ("urls", "id", "timeout", "connect_timeout", "retries", "eject_after", "eject_for"),
        required=("urls", "id"),
    )
    urls_value = block.get("urls")
    if urls_value is None:
        block.value.error("urls is required")
    urls = tuple(
        _https_url(item, what="an https:// URL (upstreams are called over mTLS)", path_ok=False)
        for item in urls_value.items()
    )
    if not urls:
        urls_value.error("needs at least one URL")
    if len(set(urls)) != len(urls):
        urls_value.error("lists the same URL twice")
    id_value = block.get("id")
    if id_value is None:
        block.value.error("id is required")
    defaults = UpstreamConfig(urls=(), id="")
    get = block.get
    timeout, connect = get("timeout"), get("connect_timeout")
    retries, after, eject = get("retries"), get("eject_after"), get("eject_for")
    return UpstreamConfig(
        urls=urls,
        id=_spiffe_id(id_value),
        timeout=timeout.duration() if timeout else defaults.timeout,
        connect_timeout=connect.duration() if connect else defaults.connect_timeout,
        retries=retries.integer() if retries else defaults.retries,
        eject_after=after.integer(minimum=1) if after else defaults.eject_after,
        eject_for=eject.duration() if eject else defaults.eject_for,
    )


_AUTH_USER_KEYS = ("required", "scopes", "roles", "claims")


def _auth(
    value: YamlValue, issuers: Mapping[str, IssuerEntry]
) -> tuple[bool, dict[str, Any], tuple[str, ...] | None]:
    block = value.mapping(("public", *_AUTH_USER_KEYS, "issuers"))
    public_value = block.get("public")
    public = public_value.boolean() if public_value is not None else False
    if public:
        others = [key for key in block if key != "public"]
        if others:
            block.children[others[0]].error(
                "a public route takes no other auth keys (it checks no token); remove "
                "'public: true' to require a token"
            )
        return True, {}, None
    if public_value is not None:
        public_value.error("write 'public: true' for a public route, or leave 'public' out")
    user: dict[str, Any] = {}
    for key in _AUTH_USER_KEYS:
        child = block.get(key)
        if child is not None:
            user[key] = yaml.constructor.SafeConstructor().construct_document(child.node)
    allowed: tuple[str, ...] | None = None
    issuers_value = block.get("issuers")
    if issuers_value is not None:
        allowed = issuers_value.strings()
        for item, name in zip(issuers_value.items(), allowed, strict=True):
            if name not in issuers:
                item.error(
                    f"{name!r} is not one of the configured issuers "
                    f"({', '.join(sorted(issuers)) or 'none configured'})"
                )
    if not issuers:
        value.error(
            "the route requires a token but no 'issuers' are configured; add an issuer or "
            "make the route 'public: true'"
        )
    return False, user, allowed


def _check_user_block(value: YamlValue, name: str, user: Mapping[str, Any]) -> None:
    """Compile the requirement with the gateway's own builder (the policy library's parser),
    so a bad block is refused here, at load, pointing at its key."""
    from ._auth import route_policy

    try:
        route_policy(user, name=name)
    except PolicyConfigError as exc:
        field = str(exc.details.get("field") or "")
        key = field.removeprefix("user.").split(".")[0].split("[")[0]
        block = value.mapping(("public", *_AUTH_USER_KEYS, "issuers"))
        target = block.children.get(key, value)
        problem = exc.message
        for marker in ("): ", " auth: "):
            if marker in problem:
                problem = problem.split(marker, 1)[1]
                break
        target.error(problem.rstrip("."))


def _route(
    value: YamlValue,
    index: int,
    base: Path,
    issuers: Mapping[str, IssuerEntry],
) -> RouteConfig:
    block = value.mapping(
        (
            "name",
            "host",
            "path",
            "methods",
            "strip_prefix",
            "rewrite_prefix",
            "upstream",
            "auth",
            "policy",
            "allow_ips",
            "deny_ips",
            "rate_limits",
            "max_body_bytes",
        ),
        required=("path", "upstream", "auth"),
    )
    get = block.get
    path_value, upstream_value, auth_value = get("path"), get("upstream"), get("auth")
    if path_value is None or upstream_value is None or auth_value is None:
        block.value.error("path, upstream and auth are required")
    path = _route_path(path_value)
    name_value = get("name")
    if name_value is not None:
        name = name_value.string()
        if not _NAME.fullmatch(name):
            name_value.error(
                f"{name!r} must be 1-63 letters, digits, '.', '_' or '-' (it labels metrics)"
            )
    else:
        name = path.strip("/").replace("/", "-") or "root"
    methods: frozenset[str] | None = None
    methods_value = get("methods")
    if methods_value is not None:
        listed = [m.upper() for m in methods_value.strings()]
        for item, method in zip(methods_value.items(), listed, strict=True):
            if method not in HTTP_METHODS:
                item.error(f"{method!r} is not an HTTP method ({', '.join(sorted(HTTP_METHODS))})")
        if not listed:
            methods_value.error("needs at least one method (leave 'methods' out for all)")
        methods = frozenset(listed)
    strip_value, rewrite_value = get("strip_prefix"), get("rewrite_prefix")
    strip = strip_value.boolean() if strip_value is not None else False
    rewrite: str | None = None
    if rewrite_value is not None:
        rewrite = _route_path(rewrite_value)
        if strip:
            rewrite_value.error(
                "give strip_prefix or rewrite_prefix, not both (rewrite_prefix replaces "
                "the matched prefix; strip_prefix removes it)"
            )
    public, user, allowed = _auth(auth_value, issuers)
    if not public:
        _check_user_block(auth_value, name, user)
    policy: Path | None = None
    policy_value = get("policy")
    if policy_value is not None:
        policy = _file(policy_value, base)
        try:
            Policy.load(policy)
        except PolicyConfigError as exc:
            policy_value.error(f"the policy file does not load: {exc.message}")
    allow_value, deny_value = get("allow_ips"), get("deny_ips")
    limits_value, body_value = get("rate_limits"), get("max_body_bytes")
    return RouteConfig(
        name=name,
        path=path,
        upstream=_upstream(upstream_value),
        host=_host(host_value) if (host_value := get("host")) is not None else None,
        methods=methods,
        strip_prefix=strip,
        rewrite_prefix=rewrite,
        public=public,
        auth=user,
        issuers=allowed,
        policy=policy,
        allow_ips=_cidrs(allow_value) if allow_value is not None else (),
        deny_ips=_cidrs(deny_value) if deny_value is not None else (),
        rate_limits=_rate_limits(limits_value) if limits_value is not None else None,
        max_body_bytes=body_value.integer() if body_value is not None else None,
        line=value.line,
    )


def _issuer(value: YamlValue, base: Path) -> IssuerEntry:
    block = value.mapping(
        (
            "issuer",
            "audience",
            "discovery",
            "jwks_uri",
            "ca_bundle",
            "algorithms",
            "introspection",
            "strict_rfc9068",
        ),
        required=("issuer", "audience"),
    )
    get = block.get
    issuer_value, audience_value = get("issuer"), get("audience")
    if issuer_value is None or audience_value is None:
        block.value.error("issuer and audience are required")
    issuer = _https_url(issuer_value)
    if isinstance(audience_value.node, yaml.SequenceNode):
        audiences = audience_value.strings()
        if not audiences:
            audience_value.error("needs at least one audience")
    else:
        audiences = (audience_value.string(),)
    introspection: IntrospectionEntry | None = None
    if (intro_value := get("introspection")) is not None:
        intro = intro_value.mapping(
            ("url", "client_id", "client_secret_file"),
            required=("client_id", "client_secret_file"),
        )
        client_id, secret = intro.get("client_id"), intro.get("client_secret_file")
        if client_id is None or secret is None:
            intro.value.error("client_id and client_secret_file are required")
        url_value = intro.get("url")
        introspection = IntrospectionEntry(
            client_id=client_id.string(),
            client_secret_file=_file(secret, base),
            url=_https_url(url_value) if url_value is not None else None,
        )
    algorithms: tuple[str, ...] | None = None
    if (alg_value := get("algorithms")) is not None:
        from trustmesh.tokens import DEFAULT_ALGORITHMS

        algorithms = alg_value.strings()
        for item, alg in zip(alg_value.items(), algorithms, strict=True):
            if alg not in DEFAULT_ALGORITHMS:
                item.error(
                    f"{alg!r} is not accepted; use asymmetric algorithms from "
                    f"{', '.join(DEFAULT_ALGORITHMS)}"
                )
    strict_value = get("strict_rfc9068")
    discovery = _https_url(d) if (d := get("discovery")) is not None else None
    jwks_uri = _https_url(j) if (j := get("jwks_uri")) is not None else None
    if discovery is not None and jwks_uri is not None:
        block.value.error("give discovery or jwks_uri, not both")
    return IssuerEntry(
        issuer=issuer,
        audiences=audiences,
        discovery=discovery,
        jwks_uri=jwks_uri,
        ca_bundle=_file(c, base) if (c := get("ca_bundle")) is not None else None,
        algorithms=algorithms,
        introspection=introspection,
        strict_rfc9068=strict_value.boolean() if strict_value is not None else True,
        line=value.line,
    )


_TOP_KEYS = (
    "listen",
    "id",
    "ca",
    "dns",
    "ip",
    "check_revocation",
    "cert_dir",
    "tls",
    "redirect_http",
    "issuers",
    "trusted_proxies",
    "rate_limits",
    "limits",
    "redis",
    "alerts",
    "access_log",
    "metrics",
    "routes",
)


def parse_config(text: str, *, source: str = "<config>", base: Path | None = None) -> GatewayConfig:
    """Validate a configuration given as YAML text.

    Args:
        text: The YAML document.
        source: The file name shown in errors.
        base: The directory relative file names are taken from (default: the
            current directory).

    Raises:
        ConfigError: ``SOURCE:LINE: KEY: problem`` for the first problem found; its
            ``details`` carry ``line``, ``field`` (the key path) and ``path``.

    .. versionadded:: 0.1
    """
    base = base or Path.cwd()
    fail = FailAt(source)
    root = YamlValue(
        compose(text, source, empty="it needs at least 'listen' and 'routes'"), "", fail
    )
    top = root.mapping(_TOP_KEYS, required=("listen", "routes"))
    get = top.get
    listen_value = get("listen")
    if listen_value is None:
        root.error("listen is required")
    listen = _listen(listen_value)
    gateway_id = _spiffe_id(v) if (v := get("id")) is not None else None
    ca = _https_url(v, path_ok=False) if (v := get("ca")) is not None else None
    sans_dns = _sans(v, parse_dns_name) if (v := get("dns")) is not None else ()
    sans_ips = (
        _sans(v, lambda t, option: str(parse_ip_address(t, option=option)))
        if (v := get("ip")) is not None
        else ()
    )
    check_value = get("check_revocation")
    check_revocation = check_value.boolean() if check_value is not None else True
    if check_revocation and ca is None and get("routes") is not None:
        fail(
            check_value.node if check_value is not None else root.node,
            "ca",
            "is required to check upstream certificates for revocation; give the CA URL, "
            "or set 'check_revocation: false' to skip the check (logged)",
        )
    tls_cert = tls_key = None
    if (tls_value := get("tls")) is not None:
        tls = tls_value.mapping(("cert", "key"), required=("cert", "key"))
        cert_value, key_value = tls.get("cert"), tls.get("key")
        if cert_value is None or key_value is None:
            tls_value.error("cert and key are required")
        tls_cert, tls_key = _file(cert_value, base), _file(key_value, base)
    issuers: dict[str, IssuerEntry] = {}
    if (issuers_value := get("issuers")) is not None:
        for item in issuers_value.items():
            entry = _issuer(item, base)
            if entry.issuer in issuers:
                item.error(f"the issuer {entry.issuer!r} is listed twice")
            issuers[entry.issuer] = entry
    routes_value = get("routes")
    if routes_value is None:
        root.error("routes is required")
    routes: list[RouteConfig] = []
    names: dict[str, int] = {}
    for index, item in enumerate(routes_value.items()):
        route = _route(item, index, base, issuers)
        if route.name in names:
            item.error(
                f"the route name {route.name!r} is already used by routes[{names[route.name]}]; "
                f"give each route a unique 'name'"
            )
        for other in routes:
            if (other.host, other.path, other.methods) == (route.host, route.path, route.methods):
                item.error(
                    f"matches the same host, path and methods as route {other.name!r} "
                    f"(line {other.line}), which would always win; remove one"
                )
        names[route.name] = index
        routes.append(route)
    if not routes:
        routes_value.error("needs at least one route")
    max_header, max_body = DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_BODY_BYTES
    if (limits_value := get("limits")) is not None:
        limits = limits_value.mapping(("max_header_bytes", "max_body_bytes"))
        if (h := limits.get("max_header_bytes")) is not None:
            max_header = h.integer(minimum=1024)
        if (b := limits.get("max_body_bytes")) is not None:
            max_body = b.integer()
    alerts: AlertsConfig | None = None
    if (alerts_value := get("alerts")) is not None:
        block = alerts_value.mapping(("threshold", "window", "block_for", "webhook"))
        defaults = AlertsConfig()
        alerts = AlertsConfig(
            threshold=t.integer(minimum=1)
            if (t := block.get("threshold")) is not None
            else defaults.threshold,
            window=w.duration() if (w := block.get("window")) is not None else defaults.window,
            block_for=f.duration(allow_zero=True)
            if (f := block.get("block_for")) is not None
            else defaults.block_for,
            webhook=_webhook(h) if (h := block.get("webhook")) is not None else None,
        )
    metrics_listen: str | None = None
    if (metrics_value := get("metrics")) is not None:
        block = metrics_value.mapping(("listen",), required=("listen",))
        if (m := block.get("listen")) is None:
            metrics_value.error("listen is required")
        metrics_listen = _listen(m)
    redis: str | None = None
    if (redis_value := get("redis")) is not None:
        redis = redis_value.string()
        if urlsplit(redis).scheme not in ("redis", "rediss", "unix"):
            redis_value.error(f"expected a redis:// or rediss:// URL, got {redis!r}")
    access_value = get("access_log")
    return GatewayConfig(
        source=Path(source),
        listen=listen,
        routes=tuple(routes),
        id=gateway_id,
        ca=ca,
        dns=sans_dns,
        ips=sans_ips,
        check_revocation=check_revocation,
        cert_dir=_directory(v, base) if (v := get("cert_dir")) is not None else None,
        tls_cert=tls_cert,
        tls_key=tls_key,
        redirect_http=_listen(v) if (v := get("redirect_http")) is not None else None,
        issuers=tuple(issuers.values()),
        trusted_proxies=_cidrs(v) if (v := get("trusted_proxies")) is not None else (),
        rate_limits=_rate_limits(v)
        if (v := get("rate_limits")) is not None
        else RateLimitsConfig(),
        max_header_bytes=max_header,
        max_body_bytes=max_body,
        redis=redis,
        alerts=alerts,
        access_log=access_value.boolean() if access_value is not None else True,
        metrics_listen=metrics_listen,
    )


def _sans(value: YamlValue, parse: Callable[..., str]) -> tuple[str, ...]:
    """A list of DNS names or IP addresses for the agent's CSR, each checked."""
    out: list[str] = []
    for item in value.items():
        text = item.string()
        try:
            out.append(parse(text, option=item.key))
        except ConfigError as exc:
            item.error(exc.message.removeprefix(f"{item.key} "))
    return tuple(dict.fromkeys(out))


def _webhook(value: YamlValue) -> str:
    text = value.string()
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        value.error(f"expected an http(s):// URL, got {text!r}")
    return text


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate the gateway configuration file.

    Raises:
        ConfigError: The file cannot be read, or ``FILE:LINE: KEY: problem``.

    .. versionadded:: 0.1
    """
    file = Path(path)
    try:
        with file.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"Cannot read the gateway configuration {str(file)!r}: {exc.strerror}.",
            path=str(file),
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{file}: larger than {MAX_CONFIG_BYTES} bytes.", path=str(file))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text.", path=str(file)) from None
    return parse_config(text, source=str(file), base=file.resolve().parent)


def _rates(limits: RateLimitsConfig | None) -> dict[str, Any] | None:
    if limits is None:
        return None
    out: dict[str, Any] = {}
    for kind in ("per_ip", "per_client"):
        spec = getattr(limits, kind)
        if spec is not None:
            out[kind] = {"rate": spec.rate, "burst": spec.burst}
    return out


def upstream_path_of(route: RouteConfig) -> str:
    """What the route's prefix becomes upstream, e.g. ``/v1/...`` (for the route table)."""
    if route.rewrite_prefix is not None:
        return route.rewrite_prefix.rstrip("/") + "/..."
    if route.strip_prefix:
        return "/..."
    return route.path.rstrip("/") + "/..."


def describe_config(config: GatewayConfig) -> dict[str, Any]:
    """A JSON-able summary of a configuration (``trustmesh gateway check --json``).

    Routes are listed in the order they are tried: exact hosts, then wildcard hosts,
    then any host; longer path prefixes first.

    .. versionadded:: 0.1
    """

    def order(route: RouteConfig) -> tuple[int, int]:
        kind = 2 if route.host is None else (1 if route.host.startswith("*.") else 0)
        return (kind, -len(route.path))

    return {
        "file": str(config.source),
        "listen": config.listen,
        "id": config.id,
        "ca": config.ca,
        "dns": list(config.dns),
        "ip": list(config.ips),
        "check_revocation": config.check_revocation,
        "public_certificate": str(config.tls_cert) if config.tls_cert else "gateway identity",
        "redirect_http": config.redirect_http,
        "metrics": config.metrics_listen,
        "issuers": [
            {
                "issuer": i.issuer,
                "audiences": list(i.audiences),
                "opaque": i.introspection is not None,
            }
            for i in config.issuers
        ],
        "trusted_proxies": list(config.trusted_proxies),
        "rate_limits": _rates(config.rate_limits),
        "limits": {
            "max_header_bytes": config.max_header_bytes,
            "max_body_bytes": config.max_body_bytes,
        },
        "redis": config.redis,
        "alerts": dataclasses.asdict(config.alerts) if config.alerts else None,
        "access_log": config.access_log,
        "routes": [
            {
                "name": r.name,
                "line": r.line,
                "host": r.host,
                "path": r.path,
                "methods": sorted(r.methods) if r.methods else None,
                "strip_prefix": r.strip_prefix,
                "rewrite_prefix": r.rewrite_prefix,
                "upstream_path": upstream_path_of(r),
                "public": r.public,
                "auth": dict(r.auth),
                "issuers": list(r.issuers) if r.issuers is not None else None,
                "policy": str(r.policy) if r.policy else None,
                "allow_ips": list(r.allow_ips),
                "deny_ips": list(r.deny_ips),
                "rate_limits": _rates(r.rate_limits),
                "max_body_bytes": r.max_body_bytes or config.max_body_bytes,
                "upstream": dataclasses.asdict(r.upstream),
            }
            for r in sorted(config.routes, key=order)
        ],
    }
