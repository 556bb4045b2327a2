"""Serving the dashboard with uvicorn: in the foreground (``fleet dashboard``) or on a background
thread (tests, the benchmark).

The listening socket is bound before uvicorn starts, so port 0 (any free port) works and the
URL is known up front. Open event streams get ``GRACEFUL_SHUTDOWN_S`` seconds to end when the
server stops; then they are cut.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from types import TracebackType

import uvicorn

from fleet.web.app import DashboardSettings, create_app
from fleet.web.auth import check_bind

GRACEFUL_SHUTDOWN_S = 1


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one), IPv4 or IPv6 by the address."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class DashboardServer:
    """A uvicorn server for ``settings`` on ``host:port``; ``check_bind`` is enforced here, so no
    caller can serve a token-less dashboard beyond loopback."""

    def __init__(
        self,
        settings: DashboardSettings,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        access_log: bool = False,
    ) -> None:
        check_bind(host, settings.token)
        self.app, self.dashboard = create_app(settings)
        self.socket = bind_socket(host, port)
        self.url = url_of(self.socket)
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            access_log=access_log,
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        self.server = uvicorn.Server(config)

    def run(self) -> None:
        """Serve until stopped (Ctrl-C in the foreground; ``stop`` from another thread)."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def stop(self) -> None:
        self.server.should_exit = True


class ServerThread:
    """``with ServerThread(settings) as server:`` serves on a free loopback port meanwhile."""

    def __init__(self, settings: DashboardSettings, *, host: str = "127.0.0.1") -> None:
        self.server = DashboardServer(settings, host=host)
        self.url = self.server.url
        self._thread = threading.Thread(target=self.server.run, name="dashboard", daemon=True)

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.stop()
        self._thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
