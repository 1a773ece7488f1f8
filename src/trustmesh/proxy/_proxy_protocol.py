"""The PROXY protocol version 2 header the inbound TCP sidecar sends to the app.

Layout (https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt, section 2.2)::

    12 bytes  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
     1 byte   0x21       version 2, command PROXY
     1 byte   0x11|0x21  TCP over IPv4 | TCP over IPv6
     2 bytes  length     of everything below (big-endian)
    12|36     addresses  source address, destination address, source port, destination port
     ...      TLVs       type (1 byte), length (2 bytes, big-endian), value

TLVs sent: ``PP2_TYPE_UNIQUE_ID`` (0x05, the sidecar's connection id), ``PP2_TYPE_SSL``
(0x20: client flags, verify result 0, and the sub-TLVs ``PP2_SUBTYPE_SSL_VERSION`` 0x21,
``PP2_SUBTYPE_SSL_CN`` 0x22, ``PP2_SUBTYPE_SSL_CIPHER`` 0x23) and ``PP2_TYPE_SPIFFE_ID``
(0xE0, the first number of the custom range: the caller's SPIFFE ID as UTF-8).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_SSL",
    "PP2_SIGNATURE",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_SPIFFE_ID",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "TLSInfo",
    "proxy_v2_header",
]

PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_VERSION_PROXY = 0x21
_TCP4 = 0x11
_TCP6 = 0x21

PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
#: The first type of the custom range (PP2_TYPE_MIN_CUSTOM): the caller's SPIFFE ID.
PP2_TYPE_SPIFFE_ID = 0xE0

#: The client connected over TLS.
PP2_CLIENT_SSL = 0x01
#: The client presented a certificate on this connection.
PP2_CLIENT_CERT_CONN = 0x02

_MAX_UNIQUE_ID = 128


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What the sidecar learnt from the caller's handshake.

    Attributes:
        spiffe_id: The caller's SPIFFE ID (verified).
        version: The TLS version, e.g. ``TLSv1.3``.
        cipher: The negotiated cipher suite name.
        common_name: The leaf's subject CN, or None (trustmesh leaves carry none; the
            SPIFFE ID is sent in the CN sub-TLV then).
    """

    spiffe_id: str
    version: str
    cipher: str
    common_name: str | None = None


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"TLV 0x{kind:02x} value of {len(value)} bytes is too long")
    return struct.pack("!BH", kind, len(value)) + value


def _addresses(source: tuple[str, int], destination: tuple[str, int]) -> tuple[int, bytes]:
    src = ipaddress.ip_address(source[0].partition("%")[0])
    dst = ipaddress.ip_address(destination[0].partition("%")[0])
    # A dual-stack listener sees IPv4 callers as ::ffff:a.b.c.d: send plain IPv4 then.
    if isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped is not None:
        src = src.ipv4_mapped
    if isinstance(dst, ipaddress.IPv6Address) and dst.ipv4_mapped is not None:
        dst = dst.ipv4_mapped
    if src.version != dst.version:  # one of each: send both as IPv6
        src = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
        dst = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
    family = _TCP4 if src.version == 4 else _TCP6
    return family, src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])


def proxy_v2_header(
    source: tuple[str, int],
    destination: tuple[str, int],
    tls: TLSInfo,
    *,
    unique_id: str | None = None,
) -> bytes:
    """Build the PROXY v2 header for one accepted connection.

    Args:
        source: The caller's address and port, as the sidecar saw them.
        destination: The address and port the caller connected to (the sidecar's).
        tls: The caller's verified TLS identity.
        unique_id: A connection id (at most 128 bytes) sent as ``PP2_TYPE_UNIQUE_ID``.

    Returns:
        The header, to send before the first byte of the caller's data.

    Raises:
        ValueError: An address is not an IP address, or a value is too long.
    """
    family, addresses = _addresses(source, destination)
    ssl_value = struct.pack("!BI", PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, 0) + b"".join(
        (
            _tlv(PP2_SUBTYPE_SSL_VERSION, tls.version.encode()),
            _tlv(PP2_SUBTYPE_SSL_CN, (tls.common_name or tls.spiffe_id).encode()),
            _tlv(PP2_SUBTYPE_SSL_CIPHER, tls.cipher.encode()),
        )
    )
    tlvs = b""
    if unique_id is not None:
        raw = unique_id.encode()
        if len(raw) > _MAX_UNIQUE_ID:
            raise ValueError(f"unique_id is {len(raw)} bytes; at most {_MAX_UNIQUE_ID}")
        tlvs += _tlv(PP2_TYPE_UNIQUE_ID, raw)
    tlvs += _tlv(PP2_TYPE_SSL, ssl_value) + _tlv(PP2_TYPE_SPIFFE_ID, tls.spiffe_id.encode())
    body = addresses + tlvs
    return PP2_SIGNATURE + struct.pack("!BBH", _VERSION_PROXY, family, len(body)) + body
