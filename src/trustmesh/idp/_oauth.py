"""OAuth requests as Authlib sees them, with what TLS told us, and the shared errors.

:class:`IdpOAuth2Request` is built by the app from the already-read body (Authlib
is synchronous and runs in a worker thread); every module of the server builds its
``error_description`` with :func:`_safe`.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

from authlib.oauth2.rfc6749 import OAuth2Error, OAuth2Request, UnsupportedGrantTypeError
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload

__all__ = ["IdpOAuth2Request", "InvalidTargetError", "basic_credentials"]


def _safe(text: str, limit: int = 400) -> str:
    """Make text fit error_description (RFC 6749 §5.2: printable ASCII but ``"`` and ``\\``).

    Descriptions quote what the client sent; Authlib refuses (ValueError) anything else.
    """
    cleaned = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
    return cleaned[:limit]


class InvalidTargetError(OAuth2Error):
    """The requested ``resource``/``audience`` is not allowed (RFC 8707 §2)."""

    error = "invalid_target"


class _UnsupportedGrantTypeError(UnsupportedGrantTypeError):
    def __init__(self, grant_type: str | None, supported: list[str]) -> None:
        super().__init__(grant_type)
        self.supported = supported
        self.description = self.get_error_description()

    def get_error_description(self) -> str:
        given = (
            f"grant_type {self.grant_type!r} is not supported"
            if self.grant_type
            else ("grant_type is missing")
        )
        return _safe(f"{given}; use one of: {', '.join(self.supported)}.")


class _Payload(BasicOAuth2Payload):
    def __init__(self, values: Mapping[str, str], lists: Mapping[str, list[str]]) -> None:
        super().__init__(dict(values))
        self._lists: defaultdict[str, list[str]] = defaultdict(list, lists)

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._lists


class IdpOAuth2Request(OAuth2Request):
    """An OAuth request as Authlib sees it, plus what TLS told us.

    Args:
        method: HTTP method.
        uri: Full https URL.
        headers: Request headers (case-insensitive mapping).
        form: Parsed ``application/x-www-form-urlencoded`` body (single values).
        args: Query parameters.
        lists: Every value of every parameter (query and body).
        peer_der: The client's certificate (DER) if it sent one over TLS.
        client_host: The client's address.
    """

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Any,
        *,
        form: Mapping[str, str] | None = None,
        args: Mapping[str, str] | None = None,
        lists: Mapping[str, list[str]] | None = None,
        peer_der: bytes | None = None,
        client_host: str = "?",
    ) -> None:
        super().__init__(method, uri, headers=headers)
        self._form = dict(form or {})
        self._args = dict(args or {})
        self.payload = _Payload({**self._args, **self._form}, lists or {})
        self.peer_der = peer_der
        self.client_host = client_host
        #: ``x5t#S256`` of the certificate the client authenticated with (tls_client_auth).
        self.cnf_x5t: str | None = None
        #: Why authentication failed, for logs and metrics (never a secret).
        self.denial_reason: str | None = None
        #: Claims of the access token minted for this request (for the audit trail).
        self.minted_claims: dict[str, Any] | None = None

    @property
    def form(self) -> dict[str, str]:
        return self._form

    @property
    def args(self) -> dict[str, str]:
        return self._args

    def claimed_client_id(self) -> str | None:
        """The client_id the request names (not yet authenticated)."""
        basic_id, _ = basic_credentials(self.headers)
        return basic_id or self._form.get("client_id") or None


def basic_credentials(headers: Any) -> tuple[str | None, str | None]:
    """``(client_id, secret)`` from ``Authorization: Basic`` (RFC 6749 §2.3.1: each part
    form-urlencoded); ``(None, None)`` when absent or malformed (bad base64 or UTF-8)."""
    value = headers.get("Authorization") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None, None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None, None
    return unquote_plus(client_id) or None, unquote_plus(secret) or None
