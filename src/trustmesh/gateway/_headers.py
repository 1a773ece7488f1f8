"""Which request headers a client may not send upstream, and what the gateway adds.

A client can write any header. Those that name an identity (``X-User``, ``Client-Cert``,
``X-Trustmesh-*``), a forwarding hop (``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``) or
an override of the request line (``X-Original-URL``, ``X-HTTP-Method-Override``) would be
believed by an upstream that trusts the gateway (the list, :data:`SPOOFABLE_HEADERS` and
:data:`SPOOFABLE_PREFIXES`, is :mod:`trustmesh.headers`, shared with the sidecar and the
middleware), so :func:`strip_inbound` removes every spelling of them: any case, ``_`` for
``-``, surrounding blanks, any number of copies, empty values. Hop-by-hop headers (RFC 9110
§7.6.1) and those a ``Connection`` header names go too. The gateway then adds
:func:`vouched_headers`, its own view of the client.

Everything here runs on every request: names are classified once and remembered in a
bounded table, so a repeated name costs one dict lookup and no allocation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from trustmesh.headers import (
    SPOOFABLE_HEADERS,
    SPOOFABLE_PREFIXES,
    is_spoofable_normalized,
    normalize_header_name,
)
from trustmesh.relay import HOP_BY_HOP

from ._addresses import parse_ip

__all__ = [
    "ERROR_RESPONSE_HEADERS",
    "HOP_BY_HOP_HEADERS",
    "SECURITY_HEADERS",
    "SPOOFABLE_HEADERS",
    "SPOOFABLE_PREFIXES",
    "add_security_headers",
    "is_spoofable",
    "normalize_name",
    "strip_inbound",
    "strip_response",
    "vouched_headers",
]

Headers = list[tuple[bytes, bytes]]

#: Hop-by-hop headers: never forwarded (the relay's list, RFC 9110 section 7.6.1).
HOP_BY_HOP_HEADERS: frozenset[bytes] = HOP_BY_HOP

# A Connection header may not remove these: the request's framing, target and credentials.
_NOT_CONNECTION_OPTIONS = frozenset({b"host", b"content-length", b"authorization"})
_NO_OPTIONS: frozenset[bytes] = frozenset()

#: Added to every response the gateway sends, unless the upstream set the same header.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"strict-transport-security", b"max-age=63072000; includeSubDomains"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)

#: Added (with :data:`SECURITY_HEADERS`) to the gateway's own error answers only.
ERROR_RESPONSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)

_SECURITY_NAMES = frozenset(name for name, _ in SECURITY_HEADERS)

# Name classes, remembered per raw spelling (bounded: clients choose the names).
_KEEP, _SPOOFABLE, _HOP, _CONNECTION = 0, 1, 2, 3
_CACHE_LIMIT = 4096
_classes: dict[bytes, int] = {}

# What a Host value may contain to be repeated in X-Forwarded-Host / Forwarded.
_HOST_RE = re.compile(rb"[A-Za-z0-9.\-_~]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")
_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


#: The spelling every variant of a header name maps to: trimmed, lower case, ``-``.
normalize_name = normalize_header_name


def _classify(name: bytes) -> int:
    norm = normalize_name(name)
    if norm == b"connection":
        kind = _CONNECTION
    elif norm in HOP_BY_HOP_HEADERS:
        kind = _HOP
    elif is_spoofable_normalized(norm):
        kind = _SPOOFABLE
    else:
        kind = _KEEP
    if len(_classes) < _CACHE_LIMIT:
        _classes[name] = kind
    return kind


def is_spoofable(name: bytes) -> bool:
    """Whether a client may not send this header (any case, ``_`` for ``-``)."""
    kind = _classes.get(name)
    if kind is None:
        kind = _classify(name)
    return kind == _SPOOFABLE


_options: dict[bytes, frozenset[bytes]] = {}


def _connection_options(value: bytes) -> frozenset[bytes]:
    # The names a Connection header lists that would not go anyway ("keep-alive" and
    # "close" are the usual values: nothing left, so no second pass over the headers).
    found = _options.get(value)
    if found is None:
        found = frozenset(
            option
            for option in (normalize_name(item) for item in value.split(b","))
            if option
            and option not in _NOT_CONNECTION_OPTIONS
            and option not in HOP_BY_HOP_HEADERS
            and option != b"close"
        )
        if len(_options) < _CACHE_LIMIT:
            _options[value] = found
    return found


def _strip(
    headers: Iterable[tuple[bytes, bytes]], drop_spoofable: bool
) -> tuple[Headers, list[str]]:
    kept: Headers = []
    removed: list[bytes] = []
    options: frozenset[bytes] = _NO_OPTIONS
    classes = _classes
    for item in headers:
        name = item[0]
        kind = classes.get(name)
        if kind is None:
            kind = _classify(name)
        if kind == _KEEP or (kind == _SPOOFABLE and not drop_spoofable):
            kept.append(item)
            continue
        removed.append(name)
        if kind == _CONNECTION:
            listed = _connection_options(item[1])
            if listed:
                options = options | listed
    if options:
        still: Headers = []
        for item in kept:
            if normalize_name(item[0]) in options:
                removed.append(item[0])
            else:
                still.append(item)
        kept = still
    if not removed:
        return kept, []
    if len(removed) == 1:
        return kept, [removed[0].lower().decode("latin-1")]
    return kept, sorted({n.lower().decode("latin-1") for n in removed})


def strip_inbound(headers: Iterable[tuple[bytes, bytes]]) -> tuple[Headers, list[str]]:
    """Remove spoofable, hop-by-hop and ``Connection``-named headers from a request.

    Args:
        headers: The request headers as received (ASGI ``scope["headers"]``).

    Returns:
        The headers to forward (order kept) and the sorted, unique, lower-cased names
        that were removed (as spelled by the client, for the access log).
    """
    return _strip(headers, True)


def strip_response(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Remove hop-by-hop and ``Connection``-named headers from an upstream response."""
    return _strip(headers, False)[0]


def add_security_headers(headers: Headers, *, error: bool = False) -> Headers:
    """Append :data:`SECURITY_HEADERS` the response does not set itself (in place).

    Args:
        headers: Response headers (lower-case names, as from :func:`strip_response`).
        error: Also add :data:`ERROR_RESPONSE_HEADERS` (the gateway's own refusals).

    Returns:
        ``headers``.
    """
    present = {name.lower() for name, _ in headers if name.lower() in _SECURITY_NAMES}
    if present:
        headers.extend(item for item in SECURITY_HEADERS if item[0] not in present)
    else:
        headers.extend(SECURITY_HEADERS)
    if error:
        headers.extend(ERROR_RESPONSE_HEADERS)
    return headers


# Values repeat (the same clients and hosts): their encodings are remembered, bounded.
_ENCODED_LIMIT = 65536
_for_values: dict[str, bytes] = {}
_host_values: dict[str, tuple[bytes, bytes] | None] = {}


def _forwarded_for(client_ip: str) -> bytes:
    value = _for_values.get(client_ip)
    if value is None:
        # RFC 7239 §6: IPv6 addresses are bracketed and the value quoted.
        address = parse_ip(client_ip)
        if address is None:
            value = b"unknown"
        elif address.version == 6:
            value = b'"[' + address.compressed.encode("ascii") + b']"'
        else:
            value = address.compressed.encode("ascii")
        if len(_for_values) >= _ENCODED_LIMIT:
            _for_values.clear()
        _for_values[client_ip] = value
    return value


def _host(host: str) -> tuple[bytes, bytes] | None:
    # (X-Forwarded-Host value, ";host=..." for Forwarded), or None when not a plain host.
    try:
        return _host_values[host]
    except KeyError:
        pass
    raw = host.encode("latin-1", "replace")
    result: tuple[bytes, bytes] | None = None
    if raw and _HOST_RE.fullmatch(raw):
        quoted = raw if _TOKEN_RE.fullmatch(raw) else b'"' + raw + b'"'
        result = (raw, b";host=" + quoted)
    if len(_host_values) >= _ENCODED_LIMIT:
        _host_values.clear()
    _host_values[host] = result
    return result


def vouched_headers(*, client_ip: str, scheme: str, host: str) -> Headers:
    """The forwarding headers the gateway vouches for: one value each, its own view.

    Args:
        client_ip: The client address as the gateway decided it (see ``_addresses``).
        scheme: ``https`` (or ``http``) as the client connected.
        host: The ``Host`` the client asked for; left out when it is not a plain host
            (``name``, ``name:port``, ``[v6]:port``), so nothing odd is repeated upstream.

    Returns:
        ``X-Forwarded-For``, ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and ``Forwarded``.
    """
    proto = b"http" if scheme == "http" else b"https"
    out: Headers = [
        (b"x-forwarded-for", client_ip.encode("ascii", "replace")),
        (b"x-forwarded-proto", proto),
    ]
    forwarded = b"for=" + _forwarded_for(client_ip) + b";proto=" + proto
    host_values = _host(host)
    if host_values is not None:
        out.append((b"x-forwarded-host", host_values[0]))
        forwarded += host_values[1]
    out.append((b"forwarded", forwarded))
    return out
