"""Challenge validation: http-01 (RFC 8555 8.3), tls-alpn-01 (RFC 8737) and dns-01
(RFC 8555 8.4, asking only the provisioner's configured resolvers).

The CA connects to the name being validated. Names under ``localhost`` resolve to
the loopback address without asking DNS (RFC 6761 6.3); others through the host's
resolver. Every failure is an ACME problem (``connection``, ``incorrectResponse``,
``tls``, ``dns``) that becomes the challenge's ``error``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import httpx
from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from ._problems import ACMEProblem

__all__ = [
    "ACME_IDENTIFIER_OID",
    "dns01_value",
    "resolve",
    "validate_dns01",
    "validate_http01",
    "validate_tls_alpn01",
]

#: id-pe-acmeIdentifier (RFC 8737 6.1).
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
_TIMEOUT = 10.0
_MAX_BODY = 4096
#: dns-01: seconds per query to one resolver, and for the whole lookup.
_DNS_TIMEOUT = 2.0
_DNS_LIFETIME = 5.0


async def resolve(kind: str, value: str) -> str:
    """The address to connect to for an identifier.

    Raises:
        ACMEProblem: ``dns`` when the name does not resolve.
    """
    if kind == "ip":
        return value
    lowered = value.lower().rstrip(".")
    if lowered == "localhost" or lowered.endswith(".localhost"):
        return "127.0.0.1"  # RFC 6761 6.3: localhost names are loopback
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(lowered, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ACMEProblem(
            "dns", f"Cannot resolve {value}: {exc.strerror or exc}. Publish an address for it."
        ) from None
    return str(infos[0][4][0])


def _authority(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@functools.cache
def _http_tls_context() -> ssl.SSLContext:
    """The one (default, verifying) TLS context for http-01 fetches. The URL is plain HTTP
    and redirects are not followed, so it is never used; but httpx builds one per client
    otherwise, loading the CA bundle each time: about 60 ms of CPU per validation on a busy
    2-core machine, most of a validation's time (bench/acme.py)."""
    return ssl.create_default_context()


async def validate_http01(
    kind: str, value: str, token: str, key_authorization: str, *, port: int
) -> None:
    """Fetch ``http://NAME:PORT/.well-known/acme-challenge/TOKEN`` and compare.

    Redirects are not followed (a redirect answers as a wrong response).

    Raises:
        ACMEProblem: ``connection`` or ``incorrectResponse``.
    """
    address = await resolve(kind, value)
    host = f"[{value}]" if kind == "ip" and ":" in value else value
    url = f"http://{_authority(address, port)}/.well-known/acme-challenge/{token}"
    shown = f"http://{host}:{port}/.well-known/acme-challenge/{token}"
    try:
        async with httpx.AsyncClient(
            timeout=_TIMEOUT, follow_redirects=False, verify=_http_tls_context()
        ) as client:
            async with client.stream("GET", url, headers={"Host": f"{host}:{port}"}) as response:
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_BODY:
                        break
    except httpx.HTTPError as exc:
        raise ACMEProblem(
            "connection",
            f"Cannot fetch {shown}: {type(exc).__name__} {exc}. Serve the challenge "
            f"there (port {port}).",
        ) from None
    if response.status_code != 200:
        raise ACMEProblem(
            "incorrectResponse",
            f"{shown} answered HTTP {response.status_code}; it must answer 200 with the "
            f"key authorization.",
        )
    if body.strip().decode(errors="replace") != key_authorization:
        raise ACMEProblem(
            "incorrectResponse",
            f"{shown} answered something other than the key authorization of this challenge.",
        )


def _reverse_name(value: str) -> str:
    # RFC 8738 6: tls-alpn-01 for an IP identifier sends the reverse-mapping name as SNI.
    return ipaddress.ip_address(value).reverse_pointer


async def validate_tls_alpn01(kind: str, value: str, key_authorization: str, *, port: int) -> None:
    """Connect with ALPN ``acme-tls/1`` and SNI, and check the acmeIdentifier (RFC 8737 3).

    Raises:
        ACMEProblem: ``connection``, ``tls`` or ``incorrectResponse``.
    """
    address = await resolve(kind, value)
    sni = _reverse_name(value) if kind == "ip" else value
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The certificate is self-signed by design (RFC 8737 3): its content is checked below.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["acme-tls/1"])
    where = f"{value} port {port}"
    try:
        async with asyncio.timeout(_TIMEOUT):
            _, writer = await asyncio.open_connection(
                address, port, ssl=context, server_hostname=sni
            )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise ACMEProblem(
            "connection" if not isinstance(exc, ssl.SSLError) else "tls",
            f"Cannot complete a TLS handshake with ALPN acme-tls/1 at {where}: {exc}.",
        ) from None
    try:
        tls = writer.get_extra_info("ssl_object")
        protocol = tls.selected_alpn_protocol() if tls is not None else None
        der = tls.getpeercert(binary_form=True) if tls is not None else None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
    if protocol != "acme-tls/1":
        raise ACMEProblem("tls", f"{where} did not negotiate ALPN acme-tls/1 (got {protocol!r}).")
    if not der:
        raise ACMEProblem("tls", f"{where} presented no certificate.")
    check_alpn_certificate(x509.load_der_x509_certificate(der), kind, value, key_authorization)


def check_alpn_certificate(
    cert: x509.Certificate, kind: str, value: str, key_authorization: str
) -> None:
    """Check a tls-alpn-01 certificate: one SAN, the identifier, and a critical
    acmeIdentifier holding SHA-256 of the key authorization (RFC 8737 3).

    Raises:
        ACMEProblem: ``incorrectResponse``.
    """
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ACMEProblem(
            "incorrectResponse", "The tls-alpn-01 certificate has no subjectAltName."
        ) from None
    names = list(sans)
    expected: x509.GeneralName = (
        x509.IPAddress(ipaddress.ip_address(value)) if kind == "ip" else x509.DNSName(value)
    )
    if len(names) != 1 or names[0] != expected:
        raise ACMEProblem(
            "incorrectResponse",
            f"The tls-alpn-01 certificate must name exactly {value}; it names "
            f"{[getattr(n, 'value', n) for n in names]}.",
        )
    try:
        ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except x509.ExtensionNotFound:
        raise ACMEProblem(
            "incorrectResponse", "The tls-alpn-01 certificate has no acmeIdentifier extension."
        ) from None
    digest = hashlib.sha256(key_authorization.encode()).digest()
    raw = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
    if not ext.critical or raw != b"\x04\x20" + digest:
        raise ACMEProblem(
            "incorrectResponse",
            "The acmeIdentifier extension must be critical and hold SHA-256 of this "
            "challenge's key authorization.",
        )


def dns01_value(key_authorization: str) -> str:
    """The TXT value of a dns-01 challenge: base64url(SHA-256(keyAuthorization)) (RFC 8555 8.4)."""
    digest = hashlib.sha256(key_authorization.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def validate_dns01(
    value: str, key_authorization: str, *, resolvers: Sequence[tuple[str, int]]
) -> None:
    """Ask the configured resolvers for TXT ``_acme-challenge.NAME`` and compare.

    ``NAME`` is the identifier without a leading ``*.`` (RFC 8555 8.4). Only the
    given resolvers are asked (UDP, TCP when the answer is truncated); the host's
    resolver configuration is not read.

    Raises:
        ACMEProblem: ``dns`` when the lookup fails, ``incorrectResponse`` when no
            TXT record holds the expected value.
    """
    base = value[2:] if value.startswith("*.") else value
    name = f"_acme-challenge.{base}."
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(a, port) for a, port in resolvers]
    resolver.timeout = _DNS_TIMEOUT
    resolver.lifetime = _DNS_LIFETIME
    resolver.cache = None
    asked = ", ".join(f"{a}:{p}" for a, p in resolvers)
    try:
        answer = await resolver.resolve(
            dns.name.from_text(name), dns.rdatatype.TXT, search=False, tcp=False
        )
    except dns.resolver.NXDOMAIN:
        raise ACMEProblem(
            "dns", f"{name} does not exist at {asked} (NXDOMAIN): publish the TXT record there."
        ) from None
    except dns.resolver.NoAnswer:
        raise ACMEProblem(
            "dns", f"{name} has no TXT record at {asked}: publish the TXT record there."
        ) from None
    except dns.exception.Timeout:
        raise ACMEProblem(
            "dns", f"No answer for TXT {name} from {asked} within {_DNS_LIFETIME:g} s."
        ) from None
    except dns.exception.DNSException as exc:
        raise ACMEProblem("dns", f"Cannot look up TXT {name} at {asked}: {exc}") from None
    expected = dns01_value(key_authorization)
    found = [b"".join(r.strings).decode(errors="replace") for r in answer]
    if expected not in found:
        raise ACMEProblem(
            "incorrectResponse",
            f"TXT {name} at {asked} holds {len(found)} value(s), none of them "
            f"base64url(SHA-256(key authorization)) of this challenge.",
        )
