"""The dashboard's Starlette application: pages, JSON endpoints, events, metrics, login.

========================================  ===================================================
``GET /runs``, ``/runs/{run}``            the runs list; one run, live
``GET /fleet``, ``/devices/{device}``     the fleet table (``?q=&state=&tag=&sort=&order=``);
                                          one device with its history
``GET /api/runs[/{run}[/layers]]``        the pages' data as JSON
``GET /api/devices[/{device}]``           (same query parameters as the pages)
``GET /api/events``                       server-sent events (``?runs=1&fleet=1&run=ID``)
``POST /api/devices/{device}/{action}``   cordon, drain, uncordon: only with a token
``GET /metrics``                          Prometheus exposition format
``GET|POST /login``, ``GET /healthz``     the token form; liveness
========================================  ===================================================

Unknown runs and devices answer 404 (an HTML page, or ``{"error": ...}`` under ``/api/``),
malformed query parameters 400, a missing token 401; no error shows a traceback. Store reads run
in the dashboard's own pool of ``read_threads`` threads (the endpoints that read are plain
``def`` functions handed to it), so a slow read never stalls the event streams. The pool's
threads live as long as the dashboard: each holds one SQLite connection (the store's are per
thread), so the connections stay few and are closed with it, where a thread pool that retires
idle threads (anyio's, after 10 s) would leave one open connection behind per retired thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from device.errors import NotFoundError
from fleet.web import fleet_view, pages, run_view
from fleet.web.auth import COOKIE_NAME, AuthMiddleware, TokenAuth
from fleet.web.feed import ChangeFeed
from fleet.web.metrics import CONTENT_TYPE, exposition, make_registry
from fleet.web.query import (
    QueryError,
    parse_device_query,
    parse_events,
    parse_no_params,
    parse_run_status,
)
from fleet.web.reader import FleetReader

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
WRITE_ACTIONS = ("cordon", "drain", "uncordon")
MAX_LOGIN_BODY = 4096  # bytes of the login form; more is refused
LOGIN_FAILURE_DELAY_S = 0.5  # slows down guessing
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


@dataclass(frozen=True)
class DashboardSettings:
    """How one dashboard serves one state directory.

    ``token``: None for the read-only loopback dashboard (see ``fleet.web.auth``).
    ``poll_interval_s``: seconds between the change feed's reads of the store.
    ``max_runs``: runs exported to Prometheus (the most recently updated ones).
    ``read_threads``: threads that read the store (each with its own SQLite connection).
    """

    state_dir: Path
    token: str | None = None
    poll_interval_s: float = 0.3
    max_runs: int = 50
    read_threads: int = 4

    def __post_init__(self) -> None:
        if self.read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {self.read_threads}")


def _wants_json(path: str) -> bool:
    return path.startswith("/api/") or path == "/metrics"


def _error(request_path: str, status: int, title: str, message: str) -> Response:
    if _wants_json(request_path):
        return JSONResponse({"error": message}, status_code=status)
    return HTMLResponse(pages.error_page(status, title, message), status_code=status)


def _unauthorized(scope: Scope) -> Response:
    path = scope["path"]
    headers = {"WWW-Authenticate": 'Bearer realm="sparsefleet"'}
    message = "this dashboard needs its token: Authorization: Bearer <token>, or sign in"
    if _wants_json(path):
        return JSONResponse({"error": message}, status_code=401, headers=headers)
    query = scope.get("query_string", b"").decode("latin-1")
    next_path = path + (f"?{query}" if query else "")
    return HTMLResponse(pages.login_page(next_path), status_code=401, headers=headers)


class SecurityHeaders:
    """Adds the CSP and friends to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _safe_next(value: str) -> str:
    """Only same-site paths: ``/x`` but not ``//evil.example`` or ``https://...``."""
    return value if value.startswith("/") and not value.startswith("//") else "/runs"


class Dashboard:
    """The handlers over one reader; ``app`` is the ASGI application."""

    def __init__(self, settings: DashboardSettings, reader: FleetReader | None = None) -> None:
        self.settings = settings
        self.reader = reader or FleetReader(settings.state_dir)
        self.auth = TokenAuth(settings.token)
        self.pool = ThreadPoolExecutor(settings.read_threads, thread_name_prefix="dashboard-read")
        self.feed = ChangeFeed(self.reader, interval_s=settings.poll_interval_s, executor=self.pool)
        self.registry = make_registry(self.reader, max_runs=settings.max_runs)
        self.fleet_table = fleet_view.FleetTable(self.reader)
        self.mode = "signed in" if self.auth.required else "read-only"
        self.app = Starlette(
            routes=self._routes(),
            middleware=[
                Middleware(SecurityHeaders),
                Middleware(AuthMiddleware, auth=self.auth, unauthorized=_unauthorized),
            ],
            exception_handlers={
                HTTPException: self._http_error,
                QueryError: self._query_error,
                Exception: self._server_error,
            },
            lifespan=self._lifespan,
        )

    def _routes(self) -> list[Route | Mount]:
        pooled = self._pooled
        return [
            Route("/", _to_runs),
            Route("/runs", pooled(self.runs_page)),
            Route("/runs/{run_id}", pooled(self.run_page)),
            Route("/fleet", pooled(self.fleet_page)),
            Route("/devices/{device_id}", pooled(self.device_page)),
            Route("/api/runs", pooled(self.api_runs)),
            Route("/api/runs/{run_id}", pooled(self.api_run)),
            Route("/api/runs/{run_id}/layers", pooled(self.api_layers)),
            Route("/api/devices", pooled(self.api_devices)),
            Route("/api/devices/{device_id}", pooled(self.api_device)),
            Route("/api/devices/{device_id}/{action}", pooled(self.api_action), methods=["POST"]),
            Route("/api/events", self.api_events),
            Route("/metrics", pooled(self.metrics)),
            Route("/healthz", _healthz),
            Route("/login", self.login, methods=["GET", "POST"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]

    def _pooled(
        self, handler: Callable[[Request], Response]
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` (which reads the store) as an endpoint that runs it in the read pool."""

        async def endpoint(request: Request) -> Response:
            return await asyncio.get_running_loop().run_in_executor(self.pool, handler, request)

        endpoint.__name__ = handler.__name__
        return endpoint

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.feed.close()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.reader.close()

    # -- errors -------------------------------------------------------------------------------

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        titles = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found"}
        title = titles.get(exc.status_code, "Error")
        return _error(request.url.path, exc.status_code, title, str(exc.detail))

    async def _query_error(self, request: Request, exc: Exception) -> Response:
        return _error(request.url.path, 400, "Bad request", str(exc))

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        log.error("dashboard: %s %s failed", request.method, request.url.path, exc_info=exc)
        message = f"the dashboard could not answer: {type(exc).__name__}; see its log"
        return _error(request.url.path, 500, "Server error", message)

    # -- pages --------------------------------------------------------------------------------

    def runs_page(self, request: Request) -> Response:
        parse_run_status(_params(request))
        return HTMLResponse(pages.runs_page(mode=self.mode))

    def run_page(self, request: Request) -> Response:
        parse_no_params(_params(request))
        run_id = request.path_params["run_id"]
        if self.reader.run(run_id) is None:
            raise HTTPException(404, f"there is no run {run_id!r} in {self.reader.root}")
        return HTMLResponse(pages.run_page(run_id, mode=self.mode))

    def fleet_page(self, request: Request) -> Response:
        parse_device_query(_params(request))
        return HTMLResponse(pages.fleet_page(mode=self.mode))

    def device_page(self, request: Request) -> Response:
        parse_no_params(_params(request))
        device_id = request.path_params["device_id"]
        if self.reader.device(device_id) is None:
            raise HTTPException(404, f"there is no device {device_id!r} in {self.reader.root}")
        can_write = self.auth.can_write(request.headers)
        return HTMLResponse(pages.device_page(device_id, mode=self.mode, can_write=can_write))

    # -- data ---------------------------------------------------------------------------------

    def api_runs(self, request: Request) -> Response:
        return JSONResponse(run_view.runs_data(self.reader, parse_run_status(_params(request))))

    def api_run(self, request: Request) -> Response:
        parse_no_params(_params(request))
        run_id = request.path_params["run_id"]
        return _found(run_view.run_detail(self.reader, run_id), f"run {run_id!r}")

    def api_layers(self, request: Request) -> Response:
        parse_no_params(_params(request))
        run_id = request.path_params["run_id"]
        return _found(run_view.layers_data(self.reader, run_id), f"run {run_id!r}")

    def api_devices(self, request: Request) -> Response:
        query = parse_device_query(_params(request))
        return Response(self.fleet_table.body(query), media_type="application/json")

    def api_device(self, request: Request) -> Response:
        parse_no_params(_params(request))
        device_id = request.path_params["device_id"]
        return _found(fleet_view.device_detail(self.reader, device_id), f"device {device_id!r}")

    def api_action(self, request: Request) -> Response:
        """Cordon, drain or uncordon a device: only on a dashboard started with a token."""
        parse_no_params(_params(request))
        device_id = request.path_params["device_id"]
        action = request.path_params["action"]
        if action not in WRITE_ACTIONS:
            raise HTTPException(404, f"no action {action!r}; known: {', '.join(WRITE_ACTIONS)}")
        if not self.auth.required:
            raise HTTPException(403, "write actions need a dashboard started with --token")
        if not self.auth.can_write(request.headers):
            raise HTTPException(403, "write actions are refused from another site")
        registry = self.reader.registry()
        if registry is None:
            raise HTTPException(404, f"there is no device {device_id!r}: no fleet state yet")
        change: dict[str, Callable[[str], Any]] = {
            "cordon": registry.cordon,
            "drain": registry.drain,
            "uncordon": registry.uncordon,
        }
        try:
            info = change[action](device_id)
        except NotFoundError:
            raise HTTPException(404, f"there is no device {device_id!r}") from None
        log.info("dashboard: %s %s", action, device_id)
        return JSONResponse(
            {"device_id": device_id, "cordoned": info.cordoned, "drained": info.drained}
        )

    async def api_events(self, request: Request) -> Response:
        query = parse_events(_params(request))
        return StreamingResponse(
            self.feed.stream(runs=query.runs, fleet=query.fleet, run=query.run),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def metrics(self, request: Request) -> Response:
        parse_no_params(_params(request))
        return Response(exposition(self.registry), media_type=CONTENT_TYPE)

    # -- login --------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        if not self.auth.required:
            raise HTTPException(
                404, "this dashboard has no token, so there is nothing to sign in to"
            )
        if request.method == "GET":
            next_path = _safe_next(request.query_params.get("next", "/runs"))
            return HTMLResponse(pages.login_page(next_path))
        body = await _bounded_body(request, MAX_LOGIN_BODY)
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        next_path = _safe_next((form.get("next") or ["/runs"])[0])
        if not self.auth.token_matches((form.get("token") or [""])[0]):
            await asyncio.sleep(LOGIN_FAILURE_DELAY_S)
            return HTMLResponse(pages.login_page(next_path, failed=True), status_code=401)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            COOKIE_NAME, self.auth.session_value(), httponly=True, samesite="strict", path="/"
        )
        return response


async def _to_runs(request: Request) -> Response:
    return RedirectResponse("/runs", status_code=307)


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def _params(request: Request) -> dict[str, list[str]]:
    """Query parameters with every value kept (``?a=1&a=2`` is refused by the parsers)."""
    out: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        out.setdefault(key, []).append(value)
    return out


def _found(data: dict[str, Any] | None, what: str) -> Response:
    if data is None:
        raise HTTPException(404, f"there is no {what}")
    return JSONResponse(data)


async def _bounded_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(400, f"the form is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    settings: DashboardSettings, reader: FleetReader | None = None
) -> tuple[Starlette, Dashboard]:
    """The ASGI app for ``settings`` (and the ``Dashboard`` behind it, for tests)."""
    dashboard = Dashboard(settings, reader)
    return dashboard.app, dashboard
