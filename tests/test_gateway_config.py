"""Gateway configuration: what loads, every class of error with its line and key, and
`trustmesh gateway check` for people and scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trustmesh.cli import main
from trustmesh.errors import ConfigError
from trustmesh.gateway import load_config, parse_config

BASE = """\
listen: 127.0.0.1:8080
id: spiffe://example.org/gateway
ca: https://127.0.0.1:8443
issuers:
  - issuer: https://127.0.0.1:9443
    audience: api
routes:
  - path: /orders
    upstream: {urls: ["https://127.0.0.1:7001"], id: "spiffe://example.org/svc/orders"}
    auth: {scopes: ["orders:read"]}
    allow_ips: ["127.0.0.0/8"]
"""


def test_the_issue_example_loads_with_defaults() -> None:
    """The shape from the issue loads; every default is what docs/gateway.md says."""
    config = parse_config(BASE, source="gw.yaml")
    assert config.listen == "127.0.0.1:8080"
    assert config.id == "spiffe://example.org/gateway"
    assert config.check_revocation
    assert config.max_header_bytes == 16384
    assert config.max_body_bytes == 10 * 1024 * 1024
    assert config.access_log
    assert config.metrics_listen is None
    (issuer,) = config.issuers
    assert issuer.audiences == ("api",)
    assert issuer.strict_rfc9068
    (route,) = config.routes
    assert route.name == "orders"
    assert not route.public
    assert route.auth == {"scopes": ["orders:read"]}
    assert route.allow_ips == ("127.0.0.0/8",)
    upstream = route.upstream
    assert (upstream.timeout, upstream.connect_timeout, upstream.retries) == (10.0, 2.0, 1)
    assert (upstream.eject_after, upstream.eject_for) == (3, 10.0)


def test_every_key_loads(tmp_path: Path) -> None:
    """A file using every key loads, with relative file names taken from its directory."""
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "policy.yaml").write_text(
        "rules:\n  - name: r\n    callers: [anonymous]\n    paths: ['/**']\n"
    )
    text = """\
listen: 0.0.0.0:443
id: spiffe://example.org/gateway
ca: https://ca:8443
dns: [gateway.internal, Localhost]
ip: [127.0.0.1, "::1"]
cert_dir: ids
tls: {cert: cert.pem, key: key.pem}
redirect_http: 0.0.0.0:80
issuers:
  - issuer: https://idp.example.org
    audience: [api, web]
    discovery: https://idp.example.org/.well-known/openid-configuration
    algorithms: [ES256]
    introspection:
      url: https://idp.example.org/introspect
      client_id: gw
      client_secret_file: secret
    strict_rfc9068: false
  - issuer: https://other.example.org
    audience: api
    jwks_uri: https://other.example.org/jwks
trusted_proxies: [10.0.0.0/8]
rate_limits: {per_ip: {rate: 50, burst: 100}, per_client: {rate: 20}}
limits: {max_header_bytes: 8192, max_body_bytes: 1048576}
redis: redis://127.0.0.1:6379/0
alerts: {threshold: 5, window: 30s, block_for: 5m, webhook: https://hooks.example.org/x}
access_log: false
metrics: {listen: 127.0.0.1:9100}
routes:
  - name: orders-v1
    host: api.example.org
    path: /orders
    methods: [get, POST]
    rewrite_prefix: /v1/orders
    upstream:
      urls: [https://10.0.0.1:7001, https://10.0.0.2:7001]
      id: spiffe://example.org/svc/orders
      timeout: 1.5s
      connect_timeout: 500ms
      retries: 2
      eject_after: 5
      eject_for: 1m
    auth: {scopes: [orders:read], roles: [clerk], claims: {tenant: acme}, issuers: [https://idp.example.org]}
    policy: policy.yaml
    allow_ips: [10.0.0.0/8]
    deny_ips: [10.6.6.6]
    rate_limits: {per_ip: {rate: 5, burst: 5}}
    max_body_bytes: 1024
  - path: /static
    host: "*.example.org"
    strip_prefix: true
    upstream: {urls: [https://10.0.0.3:7002], id: spiffe://example.org/svc/static}
    auth: {public: true}
"""
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    config = load_config(path)
    assert config.cert_dir == tmp_path / "ids"
    assert config.dns == ("gateway.internal", "localhost")
    assert config.ips == ("127.0.0.1", "::1")
    assert config.tls_cert == tmp_path / "cert.pem"
    assert config.rate_limits.per_client is not None
    assert config.rate_limits.per_client.burst == 20
    assert config.alerts is not None
    assert (config.alerts.window, config.alerts.block_for) == (30.0, 300.0)
    orders, static = config.routes
    assert orders.methods == frozenset({"GET", "POST"})
    assert orders.upstream.timeout == 1.5
    assert orders.upstream.connect_timeout == 0.5
    assert orders.upstream.eject_for == 60.0
    assert orders.issuers == ("https://idp.example.org",)
    assert orders.policy == tmp_path / "policy.yaml"
    assert config.issuers[0].introspection is not None
    assert static.name == "static"
    assert static.public
    assert static.host == "*.example.org"


def _edit(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


ERRORS = [
    # (text, line, key, message fragment)
    ("", 0, "(file)", "is empty"),
    ("listen: [127", 1, "(yaml)", "expected"),
    ("- a list\n", 1, "", "expected a mapping"),
    (_edit("listen: 127.0.0.1:8080", "listen: 8080"), 1, "listen", "not HOST:PORT"),
    (_edit("listen: 127.0.0.1:8080\n", ""), 1, "listen", "is required"),
    (BASE + "listne: x\n", 12, "listne", "did you mean 'listen'"),
    (BASE + "listen: 127.0.0.1:1\n", 12, "listen", "duplicate key (first at line 1)"),
    (_edit("id: spiffe://example.org/gateway", "id: gateway"), 2, "id", "not a SPIFFE ID"),
    (_edit("ca: https://127.0.0.1:8443\n", ""), 1, "ca", "check_revocation: false"),
    (_edit("ca: https://", "ca: http://"), 3, "ca", "expected an https:// URL"),
    (_edit("audience: api", "audiense: api"), 6, "issuers[0].audiense", "did you mean"),
    (_edit("    audience: api\n", ""), 5, "issuers[0].audience", "is required"),
    (
        _edit('auth: {scopes: ["orders:read"]}', "auth: {scopes: [orders:read], public: true}"),
        10,
        "routes[0].auth.scopes",
        "a public route takes no other auth keys",
    ),
    (
        _edit('auth: {scopes: ["orders:read"]}', "auth: {scopes: 5}"),
        10,
        "routes[0].auth.scopes",
        "must be a non-empty list of strings",
    ),
    (
        _edit('auth: {scopes: ["orders:read"]}', "auth: {issuers: [https://x.example]}"),
        10,
        "routes[0].auth.issuers[0]",
        "not one of the configured issuers",
    ),
    (_edit("    auth: {scopes", "    #auth: {scopes"), 8, "routes[0].auth", "is required"),
    (_edit("path: /orders", "path: orders"), 8, "routes[0].path", "must start with '/'"),
    (_edit("path: /orders", "path: /orders/"), 8, "routes[0].path", "must not end with '/'"),
    (_edit("path: /orders", "path: /a/../orders"), 8, "routes[0].path", "'..'"),
    (_edit("path: /orders", "path: /orders%2F"), 8, "routes[0].path", "'%'"),
    (
        _edit('urls: ["https://127.0.0.1:7001"]', 'urls: ["http://127.0.0.1:7001"]'),
        9,
        "routes[0].upstream.urls[0]",
        "upstreams are called over mTLS",
    ),
    (
        _edit('urls: ["https://127.0.0.1:7001"]', 'urls: ["https://127.0.0.1:7001/base"]'),
        9,
        "routes[0].upstream.urls[0]",
        "rewrite_prefix",
    ),
    (
        _edit('urls: ["https://127.0.0.1:7001"]', "urls: []"),
        9,
        "routes[0].upstream.urls",
        "at least one",
    ),
    (
        _edit(
            '"spiffe://example.org/svc/orders"}',
            '"spiffe://example.org/svc/orders", timeout: soon}',
        ),
        9,
        "routes[0].upstream.timeout",
        "expected a duration",
    ),
    (
        _edit(
            '"spiffe://example.org/svc/orders"}', '"spiffe://example.org/svc/orders", retries: -1}'
        ),
        9,
        "routes[0].upstream.retries",
        "at least 0",
    ),
    (
        _edit(
            '"spiffe://example.org/svc/orders"}',
            '"spiffe://example.org/svc/orders", eject_after: 0}',
        ),
        9,
        "routes[0].upstream.eject_after",
        "at least 1",
    ),
    (
        _edit('["127.0.0.0/8"]', '["127.0.0.0/33"]'),
        11,
        "routes[0].allow_ips[0]",
        "not an IP network",
    ),
    (
        BASE + "    methods: [FETCH]\n",
        12,
        "routes[0].methods[0]",
        "not an HTTP method",
    ),
    (
        BASE + "    strip_prefix: true\n    rewrite_prefix: /v1\n",
        13,
        "routes[0].rewrite_prefix",
        "not both",
    ),
    (BASE + "    policy: missing.yaml\n", 12, "routes[0].policy", "does not exist"),
    (BASE + "    max_body_bytes: lots\n", 12, "routes[0].max_body_bytes", "whole number"),
    (BASE + "    host: 'api.example.org:443'\n", 12, "routes[0].host", "without scheme or port"),
    (
        BASE
        + "  - path: /orders\n    upstream: {urls: [https://a:1], id: spiffe://example.org/a}\n"
        "    auth: {public: true}\n    name: other\n",
        12,
        "routes[1]",
        "same host, path and methods as route 'orders'",
    ),
    (
        BASE
        + "  - path: /x\n    name: orders\n    upstream: {urls: [https://a:1], id: spiffe://example.org/a}\n"
        "    auth: {public: true}\n",
        12,
        "routes[1]",
        "already used by routes[0]",
    ),
    (BASE + "rate_limits: {per_ip: {rate: 0}}\n", 12, "rate_limits.per_ip.rate", "greater than 0"),
    (BASE + "limits: {max_header_bytes: 10}\n", 12, "limits.max_header_bytes", "at least 1024"),
    (BASE + "redis: localhost:6379\n", 12, "redis", "redis://"),
    (BASE + "alerts: {threshold: 0}\n", 12, "alerts.threshold", "at least 1"),
    (BASE + "metrics: {port: 9100}\n", 12, "metrics.port", "unknown key"),
    (BASE + "access_log: yes please\n", 12, "access_log", "true or false"),
    (BASE + "tls: {cert: nope.pem, key: nope.key}\n", 12, "tls.cert", "does not exist"),
    (_edit("routes:\n", "routes: []\nx_routes:\n"), 8, "x_routes", "unknown key"),
    (
        BASE.replace("issuers:\n  - issuer: https://127.0.0.1:9443\n    audience: api\n", ""),
        7,
        "routes[0].auth",
        "no 'issuers' are configured",
    ),
    (BASE + "id: !!python/object:os.system x\n", 12, "id", "duplicate key"),
    (BASE + "trusted_proxies: 10.0.0.0/8\n", 12, "trusted_proxies", "expected a list"),
    (BASE + "ip: [127.0.0.1, 10.0.0.0/8]\n", 12, "ip[1]", "'10.0.0.0/8' is not an IP address"),
    (BASE + "dns: ['https://gw.internal']\n", 12, "dns[0]", "is not a host name"),
    (BASE + "dns: gw.internal\n", 12, "dns", "expected a list"),
    (
        _edit(
            "    audience: api\n",
            "    audience: api\n    jwks_uri: https://a/j\n    discovery: https://a/d\n",
        ),
        5,
        "issuers[0]",
        "not both",
    ),
]


@pytest.mark.parametrize(("text", "line", "key", "message"), ERRORS)
def test_errors_point_at_line_and_key(text: str, line: int, key: str, message: str) -> None:
    """Each problem is one ConfigError naming the file, line and key, with a fix."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="gw.yaml")
    error = info.value
    assert error.details["line"] == line, error.message
    assert error.details["field"] == key, error.message
    assert message in error.message
    prefix = f"gw.yaml:{line}: " if line else "gw.yaml: "
    assert error.message.startswith(prefix + key + ": " if key else prefix), error.message


def test_unreadable_and_oversized_files(tmp_path: Path) -> None:
    """A missing file and a huge one are one-line errors too."""
    with pytest.raises(ConfigError, match="Cannot read the gateway configuration"):
        load_config(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("#" * (1024 * 1024 + 10))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)


def test_check_prints_the_route_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway check FILE` exits 0 and shows routes in the order they are tried."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        BASE + "  - path: /\n    host: api.example.org\n    upstream: {urls: [https://a:1],"
        " id: spiffe://example.org/a}\n    auth: {public: true}\n"
    )
    assert main(["gateway", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out
    assert out.index("api.example.org") < out.index("/orders")
    assert "spiffe://example.org/svc/orders" in out
    assert "scopes=['orders:read']" in out


def test_check_json_for_scripts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the configuration as scripts read it; an error is JSON plus exit 2."""
    path = tmp_path / "gw.yaml"
    path.write_text(BASE)
    assert main(["gateway", "check", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    assert doc["listen"] == "127.0.0.1:8080"
    (route,) = doc["routes"]
    assert route["name"] == "orders"
    assert route["line"] == 8
    assert route["upstream"]["id"] == "spiffe://example.org/svc/orders"
    assert route["upstream"]["timeout"] == 10.0
    assert route["auth"] == {"scopes": ["orders:read"]}
    path.write_text(_edit("audience: api", "audiense: api"))
    assert main(["gateway", "check", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert error == {
        "ok": False,
        "file": str(path),
        "error": error["error"],
        "line": 6,
        "key": "issuers[0].audiense",
    }
    assert captured.err.strip() == f"error: {error['error']}"
    assert error["error"].startswith(f"{path}:6: issuers[0].audiense: unknown key")


def test_check_error_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --json the error is one line on stderr."""
    path = tmp_path / "gw.yaml"
    path.write_text(_edit("path: /orders", "path: orders"))
    assert main(["gateway", "check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {path}:8: routes[0].path: 'orders' must start with '/'")
