"""The login page: server-rendered HTML, a CSRF-safe form, strict security headers.

The page is plain HTML with no script. Every value written into it is escaped with
:func:`html.escape`. The form is protected against cross-site request forgery by a
double-submit pair: ``GET /authorize`` sets a random ``__Host-`` cookie and renders a
form token that is an HMAC (server secret) over that cookie, the authorization
request's parameters and an expiry; ``POST /authorize`` needs both, matching. A page
on another site can neither read the token nor set the cookie, so it cannot sign a
victim in to an account of its choosing (login CSRF) or alter the request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
import time
from collections.abc import Mapping

from starlette.responses import HTMLResponse

__all__ = [
    "AUTHORIZE_PARAMS",
    "FORM_TOKEN_LIFETIME",
    "LOGIN_COOKIE",
    "FormSigner",
    "error_page",
    "login_page",
    "security_headers",
]

#: Name of the cookie half of the form token pair (``__Host-``: Secure, path /, no domain).
LOGIN_COOKIE = "__Host-trustmesh-login"
#: Seconds a rendered login form stays valid.
FORM_TOKEN_LIFETIME = 600
#: The authorization request parameters the login form carries from GET to POST.
AUTHORIZE_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "prompt",
    "max_age",
    "login_hint",
    "response_mode",
)

_STYLE = (
    "body{font-family:system-ui,sans-serif;background:#f4f5f7;margin:0}"
    "main{max-width:22rem;margin:4rem auto;background:#fff;padding:2rem;"
    "border-radius:8px;box-shadow:0 1px 4px rgba(0,0,0,.15)}"
    "h1{font-size:1.3rem;margin-top:0}label{display:block;margin:.8rem 0 .2rem}"
    "input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:.5rem}"
    "button{margin-top:1.2rem;width:100%;padding:.6rem;font-size:1rem}"
    ".error{color:#a40000;background:#fde8e8;padding:.6rem;border-radius:4px}"
    ".client{color:#555}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()


def security_headers() -> dict[str, str]:
    """Return the headers every login and error page carries.

    No framing (clickjacking), no caching (the page holds a form token), no referrer
    (the URL holds the authorization request), no script at all.
    """
    return {
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class FormSigner:
    """Issue and check login form tokens bound to a cookie and the request parameters.

    Args:
        secret: HMAC key; random per process unless given (a restart only
            invalidates forms already on screen).
        lifetime: Seconds a form token stays valid.
    """

    def __init__(self, secret: bytes | None = None, *, lifetime: int = FORM_TOKEN_LIFETIME):
        self._secret = secret or secrets.token_bytes(32)
        self.lifetime = lifetime

    @staticmethod
    def new_cookie() -> str:
        """Return a fresh random cookie value."""
        return secrets.token_urlsafe(32)

    def _mac(self, cookie: str, params: Mapping[str, str], expires: int) -> bytes:
        bound = {k: params.get(k, "") for k in AUTHORIZE_PARAMS}
        message = json.dumps([cookie, bound, expires], sort_keys=True).encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def issue(self, cookie: str, params: Mapping[str, str], *, now: float | None = None) -> str:
        """Return a form token for this cookie and these authorization parameters."""
        expires = int(now if now is not None else time.time()) + self.lifetime
        return f"{expires}.{_b64(self._mac(cookie, params, expires))}"

    def check(
        self, token: str, cookie: str, params: Mapping[str, str], *, now: float | None = None
    ) -> str | None:
        """Return None if the token is valid, else why not: missing, expired or mismatch."""
        if not token or not cookie:
            return "missing"
        expires_text, _, mac = token.partition(".")
        if not expires_text.isdigit() or not mac:
            return "mismatch"
        expires = int(expires_text)
        expected = _b64(self._mac(cookie, params, expires))
        if not hmac.compare_digest(expected, mac):
            return "mismatch"
        if expires < int(now if now is not None else time.time()):
            return "expired"
        return None


def _page(title: str, body: str, status: int) -> HTMLResponse:
    document = (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta name="referrer" content="no-referrer"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
    return HTMLResponse(document, status_code=status, headers=security_headers())


def login_page(
    *,
    action: str,
    params: Mapping[str, str],
    form_token: str,
    client_name: str,
    username: str = "",
    error: str | None = None,
    status: int = 200,
    cookie: str | None = None,
) -> HTMLResponse:
    """Render the sign-in form.

    Args:
        action: The URL the form posts to (``/authorize``).
        params: The authorization request, carried in hidden fields.
        form_token: From :meth:`FormSigner.issue`.
        client_name: Shown so people see which application asks.
        username: Pre-filled after a failed attempt.
        error: A message shown above the form.
        status: HTTP status (401 after a failed attempt, 429 when locked).
        cookie: When given, (re)set the form cookie to this value.
    """
    esc = html.escape
    hidden = "".join(
        f'<input type="hidden" name="{esc(k)}" value="{esc(params[k])}">'
        for k in AUTHORIZE_PARAMS
        if params.get(k)
    )
    message = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    body = (
        "<h1>Sign in</h1>"
        f'<p class="client">to continue to <strong>{esc(client_name)}</strong></p>'
        f"{message}"
        f'<form method="post" action="{esc(action)}">'
        f'<input type="hidden" name="form_token" value="{esc(form_token)}">{hidden}'
        '<label for="username">Username</label>'
        f'<input type="text" id="username" name="username" value="{esc(username)}" '
        'autocomplete="username" autocapitalize="none" required autofocus>'
        '<label for="password">Password</label>'
        '<input type="password" id="password" name="password" '
        'autocomplete="current-password" required>'
        '<button type="submit">Sign in</button></form>'
    )
    response = _page("Sign in", body, status)
    if cookie is not None:
        response.set_cookie(
            LOGIN_COOKIE,
            cookie,
            max_age=FORM_TOKEN_LIFETIME,
            path="/",
            secure=True,
            httponly=True,
            samesite="lax",
        )
    return response


def error_page(
    title: str, message: str, *, status: int = 400, headers: Mapping[str, str] | None = None
) -> HTMLResponse:
    """Render an error the browser shows instead of redirecting (e.g. unknown redirect URI)."""
    body = f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
    response = _page(title, body, status)
    response.headers.update(headers or {})
    return response
