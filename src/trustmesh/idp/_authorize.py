"""``/authorize``: the login page and the authorization code response.

``GET /authorize`` validates the authorization request with Authlib (registered
client, exactly registered redirect URI, ``response_type=code``, PKCE S256) and
shows the sign-in form. ``POST /authorize`` checks the form token, validates the
request again, checks the password (with lockout) and redirects to the client with
``code``, ``state`` and ``iss`` (RFC 9207).

Errors before the redirect URI is known to be registered are shown as an HTML page
and never redirected (RFC 6749 section 4.1.2.1: an open redirector otherwise);
later ones redirect to the client with the standard ``error`` parameters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from authlib.common.urls import add_params_to_uri
from authlib.oauth2.base import OAuth2Error
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from trustmesh.limits import RateLimiter

from ._app import oauth_request
from ._context import IdpContext
from ._login import AUTHORIZE_PARAMS, LOGIN_COOKIE, error_page, login_page, security_headers
from ._oauth import IdpOAuth2Request
from ._user_grants import UserSide

__all__ = ["AuthorizeEndpoint"]

log = logging.getLogger("trustmesh.idp")

_MAX_FIELD = 4096  # longest accepted value of one form or query parameter


class AuthorizeEndpoint:
    """The ASGI handler of ``/authorize`` (GET shows the form, POST signs in).

    Args:
        ctx: The server context (its Authlib server has the user grants registered).
        side: The user side (store, users, form signer, issuer).
        path: Where the form posts to.
        login_rate: Sign-in attempts per second per address (token bucket) before 429,
            in front of the lockout counters.
        login_burst: Bucket size of ``login_rate``.
        page_rate: Login page views per second per address (bounds the audit writes
            that refused requests cause).
        page_burst: Bucket size of ``page_rate``.
    """

    def __init__(
        self,
        ctx: IdpContext,
        side: UserSide,
        *,
        path: str = "/authorize",
        login_rate: float = 2.0,
        login_burst: int = 20,
        page_rate: float = 20.0,
        page_burst: int = 100,
    ) -> None:
        self.ctx = ctx
        self.server = ctx.authorization_server()
        self.side = side
        self.path = path
        self.limiter = RateLimiter(login_rate, login_burst)
        self.page_limiter = RateLimiter(page_rate, page_burst)

    async def __call__(self, request: Request) -> Response:
        """Dispatch on the method."""
        if request.method == "GET":
            return await self.get(request)
        if request.method == "POST":
            return await self.post(request)
        return error_page(
            "Method not allowed",
            "Use GET to open the sign-in page or POST to submit it.",
            status=405,
            headers={"Allow": "GET, POST"},
        )

    # -- helpers ------------------------------------------------------------------

    @staticmethod
    def _oauth_request(request: Request, items: list[tuple[str, str]]) -> IdpOAuth2Request:
        """An Authlib request holding only the authorization parameters."""
        lists: dict[str, list[str]] = {}
        for key, value in items:
            lists.setdefault(key, []).append(value)
        single = {k: v[0] for k, v in lists.items()}
        return IdpOAuth2Request(
            request.method,
            str(request.url),
            request.headers,
            form=single if request.method == "POST" else {},
            args=single if request.method == "GET" else {},
            lists=lists,
            client_host=request.client.host if request.client else "?",
        )

    def _validate(self, oauth: Any) -> tuple[Any, str] | Response:
        """Return ``(grant, redirect_uri)``, or the response that refuses the request."""
        try:
            grant = self.server.get_authorization_grant(oauth)
            grant.validate_no_multiple_request_parameter(oauth)
            redirect_uri = grant.validate_consent_request()
        except OAuth2Error as error:
            error.state = oauth.payload.state
            self._deny(oauth, error.error, error.get_error_description() or "")
            return self._error(error)
        except ValueError:
            # Authlib puts request values into its descriptions and refuses characters
            # RFC 6749 forbids there (quotes, backslashes, non-ASCII).
            self._deny(oauth, "invalid_request", "forbidden characters in a parameter")
            return error_page(
                "Invalid authorization request",
                "A parameter of the authorization request contains characters OAuth does "
                "not allow (such as quotes or non-ASCII). Check the link that sent you here.",
                status=400,
            )
        client = grant.request.client
        if getattr(client, "disabled", False):
            self._deny(oauth, "unauthorized_client", "client disabled")
            return error_page(
                "Cannot sign in to this application",
                f"The application {client.get_client_id()} is disabled on this identity "
                f"server; ask its administrator.",
                status=400,
            )
        return grant, str(redirect_uri)

    def _deny(self, oauth: IdpOAuth2Request, error: str, description: str) -> None:
        """Log, count and audit a refused authorization request (no secrets in it)."""
        client_id = str(oauth.payload.client_id or "")[:64]
        self.ctx.metrics.denied.labels(route="/authorize", reason=error).inc()
        log.info(
            "refused /authorize: %s",
            description,
            extra={
                "event": "deny",
                "route": "/authorize",
                "reason": error,
                "status": 400,
                "client": oauth.client_host,
                "client_id": client_id,
            },
        )
        self.ctx.audit(
            "idp.deny",
            client_id or oauth.client_host,
            actor=f"ip:{oauth.client_host}",
            details={
                "route": "/authorize",
                "error": error,
                "reason": description[:200],
                "redirect_uri": str(oauth.payload.redirect_uri or "")[:500],
            },
        )

    def _error(self, error: Any) -> Response:
        if error.redirect_uri:
            params = [*error.get_body(), ("iss", self.side.issuer)]
            location = add_params_to_uri(error.redirect_uri, params)
            return RedirectResponse(location, status_code=302, headers=security_headers())
        description = error.get_error_description() or error.error
        return error_page(
            "Cannot sign in to this application",
            f"{description} ({error.error}). The application that sent you here is not "
            f"set up correctly for this identity server; nothing was sent back to it.",
            status=400,
        )

    def _client_name(self, grant: Any) -> str:
        client = grant.request.client
        return str(getattr(client, "name", None) or client.get_client_id())

    def _form(
        self,
        grant: Any,
        params: Mapping[str, str],
        cookie: str,
        *,
        set_cookie: bool,
        error: str | None = None,
        username: str = "",
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        response = login_page(
            action=self.path,
            params=params,
            form_token=self.side.forms.issue(cookie, params),
            client_name=self._client_name(grant),
            username=username,
            error=error,
            status=status,
            cookie=cookie if set_cookie else None,
        )
        response.headers.update(headers or {})
        return response

    def _slow_down(self, wait: float) -> Response:
        self.ctx.metrics.denied.labels(route="/authorize", reason="rate_limited_ip").inc()
        return error_page(
            "Too many requests",
            f"Too many sign-in requests from your address; wait {int(wait) + 1} seconds and "
            f"try again.",
            status=429,
            headers={"Retry-After": str(int(wait) + 1)},
        )

    @staticmethod
    def _too_long(items: list[tuple[str, str]]) -> Response | None:
        if any(len(v) > _MAX_FIELD for _, v in items):
            return error_page(
                "Invalid authorization request",
                f"A parameter is longer than {_MAX_FIELD} characters.",
                status=400,
            )
        return None

    # -- GET ------------------------------------------------------------------------

    async def get(self, request: Request) -> Response:
        """Validate the authorization request and show the sign-in form."""
        address = request.client.host if request.client else "unknown"
        wait = self.page_limiter.allow(address)
        if wait:
            return self._slow_down(wait)
        items = list(request.query_params.multi_items())
        refused = self._too_long(items)
        if refused is not None:
            return refused
        oauth = self._oauth_request(request, items)
        checked = await run_in_threadpool(self._validate, oauth)
        if isinstance(checked, Response):
            return checked
        grant, redirect_uri = checked
        if oauth.payload.data.get("prompt") == "none":
            # There is no sign-in session to reuse: say so instead of showing a page.
            query = [("error", "login_required"), ("iss", self.side.issuer)]
            if oauth.payload.state:
                query.append(("state", oauth.payload.state))
            return RedirectResponse(
                add_params_to_uri(redirect_uri, query), 302, headers=security_headers()
            )
        params = {k: v for k, v in items if k in AUTHORIZE_PARAMS}
        existing = request.cookies.get(LOGIN_COOKIE)
        cookie = existing if existing and len(existing) <= 64 else self.side.forms.new_cookie()
        return self._form(
            grant,
            params,
            cookie,
            set_cookie=True,  # (re)start its lifetime with the new form token
            username=params.get("login_hint", "")[:128],
        )

    # -- POST -----------------------------------------------------------------------

    async def post(self, request: Request) -> Response:
        """Check the form token and the password; redirect with a code."""
        address = request.client.host if request.client else "unknown"
        wait = self.limiter.allow(address)
        if wait:
            return self._slow_down(wait)
        read = await oauth_request(self.ctx, request)  # size- and time-capped body
        if isinstance(read, Response):
            detail = json.loads(bytes(read.body)).get("error_description", "")
            return error_page("Cannot read the sign-in form", detail, status=read.status_code)
        items = [(k, v) for k, v in read.form.items()]
        refused = self._too_long(items)
        if refused is not None:
            return refused
        fields = dict(items)
        params = {k: v for k, v in items if k in AUTHORIZE_PARAMS}
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        problem = self.side.forms.check(fields.get("form_token", ""), cookie, params)
        if problem is not None:
            log.info("login form refused: form token %s from %s", problem, address)
            return error_page(
                "Sign-in form expired",
                "This sign-in form expired or was not submitted from this server's own "
                "page (cookies must be enabled). Go back to the application and start "
                "again.",
                status=400,
            )
        oauth = self._oauth_request(request, [(k, v) for k, v in items if k in AUTHORIZE_PARAMS])
        checked = await run_in_threadpool(self._validate, oauth)
        if isinstance(checked, Response):
            return checked
        grant, redirect_uri = checked
        username = fields.get("username", "")
        password = fields.get("password", "")
        if not username or not password:
            return self._form(
                grant,
                params,
                cookie,
                set_cookie=False,
                error="Enter your username and password.",
                username=username,
                status=400,
            )
        client_id = grant.request.client.get_client_id()
        result = await run_in_threadpool(
            self.side.users.authenticate, username, password, ip=address, client_id=client_id
        )
        if result.reason == "locked":
            minutes = max(1, (result.retry_after + 59) // 60)
            return self._form(
                grant,
                params,
                cookie,
                set_cookie=False,
                error=f"Too many failed sign-ins for this account or from your address. "
                f"Try again in {minutes} minute{'s' if minutes != 1 else ''}.",
                username=username,
                status=429,
                headers={"Retry-After": str(result.retry_after)},
            )
        if result.reason == "disabled":
            return self._form(
                grant,
                params,
                cookie,
                set_cookie=False,
                error="This account is disabled. Ask an administrator.",
                username=username,
                status=403,
            )
        if result.user is None:
            return self._form(
                grant,
                params,
                cookie,
                set_cookie=False,
                error="Wrong username or password.",
                username=username,
                status=401,
            )
        oauth.user = result.user
        oauth.auth_time = self.side.clock()
        try:
            status, _, headers = await run_in_threadpool(
                grant.create_authorization_response, redirect_uri, result.user
            )
        except OAuth2Error as error:
            error.state = oauth.payload.state
            return self._error(error)
        location = add_params_to_uri(dict(headers)["Location"], [("iss", self.side.issuer)])
        return RedirectResponse(location, status_code=status, headers=security_headers())
