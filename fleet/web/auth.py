"""Who may see the dashboard and who may act through it.

- **Without a token** the dashboard is read-only and must listen on a loopback address only
  (``check_bind`` refuses anything else): whoever can reach it already has a shell on the fleet
  manager's machine. It offers no write action at all.
- **With a token** (``--token`` or ``$SPARSEFLEET_DASHBOARD_TOKEN``, at least
  ``MIN_TOKEN_CHARS`` characters) every request but the login page, the static files and
  ``/healthz`` needs it, as ``Authorization: Bearer <token>`` (scripts, Prometheus) or as the
  session cookie the login form sets (browsers). Only then are the write actions (cordon, drain,
  uncordon) offered and accepted.

The cookie holds an HMAC of the token, not the token, and is ``HttpOnly`` and
``SameSite=Strict``, so another site cannot make a browser send it; a write request whose
``Origin`` names another site is refused as well. Tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from http.cookies import SimpleCookie

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from device.errors import ConfigError

MIN_TOKEN_CHARS = 16
COOKIE_NAME = "sparsefleet_dashboard"
TOKEN_ENV = "SPARSEFLEET_DASHBOARD_TOKEN"
PUBLIC_PATHS = frozenset({"/login", "/healthz", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1); any other name or
    address (``0.0.0.0``, ``::``, a LAN address, a hostname) is treated as reachable by others."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> str | None:
    """The token to require (None: none given); ConfigError if it is too short to guess-proof."""
    if token is None or token == "":
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"the dashboard token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
            "(for example `openssl rand -hex 16`)"
        )
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen on a non-loopback address without a token (ConfigError, one line)."""
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the dashboard on {host} without a token: anyone who can reach "
            f"it would see the fleet; pass --token (or set {TOKEN_ENV}) or use --host 127.0.0.1"
        )


class TokenAuth:
    """The dashboard's access rule for one token (or none)."""

    def __init__(self, token: str | None) -> None:
        self._token = check_token(token)

    @property
    def required(self) -> bool:
        """Whether requests need the token (and write actions exist)."""
        return self._token is not None

    def session_value(self) -> str:
        """The cookie value that proves a login: an HMAC of the token (not the token)."""
        if self._token is None:
            raise ValueError("no token: the dashboard has no sessions")
        key = self._token.encode()
        return hmac.new(key, b"sparsefleet-dashboard-session", hashlib.sha256).hexdigest()

    def token_matches(self, presented: str) -> bool:
        """Constant-time comparison with the configured token (False when there is none)."""
        if self._token is None:
            return False
        return hmac.compare_digest(presented.encode(), self._token.encode())

    def authenticated(self, headers: Headers) -> bool:
        """A bearer token or a session cookie matching the token; always True without one."""
        if self._token is None:
            return True
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(credentials.strip()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is simply no session
            return False
        morsel = cookie.get(COOKIE_NAME)
        return morsel is not None and hmac.compare_digest(
            morsel.value.encode(), self.session_value().encode()
        )

    def can_write(self, headers: Headers) -> bool:
        """Write actions need a configured token, the request authenticated, and no foreign
        ``Origin`` (a browser sends one with every cross-site POST)."""
        if not self.required or not self.authenticated(headers):
            return False
        origin = headers.get("origin")
        if origin is None:
            return True
        host = headers.get("host", "")
        return origin in (f"http://{host}", f"https://{host}")


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class AuthMiddleware:
    """ASGI middleware: with a token, answer ``unauthorized(scope)`` (a 401) to any request for a
    non-public path that does not carry it. Server-sent event streams pass through untouched."""

    def __init__(
        self, app: ASGIApp, auth: TokenAuth, unauthorized: Callable[[Scope], Response]
    ) -> None:
        self.app = app
        self.auth = auth
        self.unauthorized = unauthorized

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.auth.required
            or is_public(scope["path"])
            or self.auth.authenticated(Headers(scope=scope))
        ):
            await self.app(scope, receive, send)
            return
        await self.unauthorized(scope)(scope, receive, send)
