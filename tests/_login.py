"""Scripted browser sign-in for identity-server tests: PKCE values and the login form."""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from trustmesh.demo import LoginForm, pkce_pair

__all__ = ["authorize_params", "form_fields", "pkce_pair", "query", "sign_in"]


def form_fields(html: str) -> tuple[str | None, dict[str, str]]:
    """Return the login form's action and hidden fields."""
    parser = LoginForm()
    parser.feed(html)
    return parser.action, parser.fields


def query(location: str) -> dict[str, str]:
    """The query parameters of a redirect Location (one value each)."""
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def authorize_params(
    client_id: str, redirect_uri: str, challenge: str, **extra: str
) -> dict[str, Any]:
    """A standard code + PKCE authorization request."""
    return {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid profile email",
        "state": secrets.token_urlsafe(8),
        "nonce": secrets.token_urlsafe(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }


def sign_in(
    http: httpx.Client, base: str, params: dict[str, Any], username: str, password: str
) -> httpx.Response:
    """GET the login page, post the credentials; return the POST's response (unfollowed)."""
    page = http.get(f"{base}/authorize", params=params)
    assert page.status_code == 200, page.text
    action, fields = form_fields(page.text)
    assert action == "/authorize"
    return http.post(f"{base}{action}", data={**fields, "username": username, "password": password})
