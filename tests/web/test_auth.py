"""Who may see and act: loopback without a token, the token everywhere else, and write actions
only with the token.

A dashboard reachable from the network without a token would show the fleet to anyone, and a
write action without one would let anyone cordon the fleet; both must be impossible.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.datastructures import Headers

from device.errors import ConfigError
from fleet.state.store import Store
from fleet.web.auth import COOKIE_NAME, TokenAuth, check_bind, check_token, is_loopback
from tests.web.conftest import ClientFactory

TOKEN = "correct-horse-battery-staple"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, None)  # allowed without a token


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "fleet.example", "10.0.0.1"])
def test_binding_beyond_loopback_without_a_token_is_refused(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match="without a token") as info:
        check_bind(host, None)
    assert "\n" not in str(info.value)
    check_bind(host, TOKEN)  # allowed with one


def test_short_tokens_are_refused_and_empty_means_none() -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        check_token("hunter2")
    assert check_token("") is None and check_token(None) is None
    assert check_token(TOKEN) == TOKEN


def test_the_session_cookie_is_not_the_token() -> None:
    auth = TokenAuth(TOKEN)
    assert TOKEN not in auth.session_value()
    assert auth.authenticated(Headers({"cookie": f"{COOKIE_NAME}={auth.session_value()}"}))
    assert auth.authenticated(Headers({"authorization": f"Bearer {TOKEN}"}))
    assert not auth.authenticated(Headers({"authorization": "Bearer wrong-token-wrong-token"}))
    assert not auth.authenticated(Headers({"cookie": f"{COOKIE_NAME}={TOKEN}"}))
    assert not auth.authenticated(Headers({"cookie": "garbage;;=;\x00"}))


@pytest.mark.parametrize("path", ["/runs", "/api/runs", "/api/devices", "/metrics", "/api/events"])
def test_requests_without_the_token_get_401(client: ClientFactory, path: str) -> None:
    response = client(token=TOKEN).get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "dev-0001" not in response.text and "done" not in response.text


def test_a_page_without_the_token_offers_the_login_form(client: ClientFactory) -> None:
    response = client(token=TOKEN).get("/fleet?state=online")
    assert response.status_code == 401
    assert 'action="/login"' in response.text
    assert 'value="/fleet?state=online"' in response.text


def test_static_files_and_health_need_no_token(client: ClientFactory) -> None:
    c = client(token=TOKEN)
    assert c.get("/static/dashboard.js").status_code == 200
    assert c.get("/healthz").text == "ok\n"


def test_bearer_token_opens_the_api_and_metrics(client: ClientFactory) -> None:
    c = client(token=TOKEN)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/api/runs", headers=headers).status_code == 200
    assert "sparsefleet_rounds_completed_total" in c.get("/metrics", headers=headers).text


def test_login_sets_a_strict_http_only_cookie_and_goes_back(client: ClientFactory) -> None:
    c = client(token=TOKEN)
    response = c.post("/login", data={"token": TOKEN, "next": "/runs/done"}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/runs/done"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert c.get("/runs/done").status_code == 200  # the client keeps the cookie


def test_login_with_a_wrong_token_is_refused(client: ClientFactory) -> None:
    c = client(token=TOKEN)
    response = c.post("/login", data={"token": "not-the-token-at-all"}, follow_redirects=False)
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert c.get("/api/runs").status_code == 401


def test_login_does_not_redirect_to_another_site(client: ClientFactory) -> None:
    c = client(token=TOKEN)
    response = c.post(
        "/login", data={"token": TOKEN, "next": "//evil.example/x"}, follow_redirects=False
    )
    assert response.headers["location"] == "/runs"


def test_without_a_token_there_are_no_write_actions(client: ClientFactory, filled: Path) -> None:
    c = client()
    assert "data-action" not in c.get("/devices/dev-0001").text
    response = c.post("/api/devices/dev-0001/cordon")
    assert response.status_code == 403
    with Store(filled, create=False) as store:
        device = store.get_device("dev-0001")
        assert device is not None and not device.cordoned


def test_with_the_token_an_operator_can_cordon_and_uncordon(
    client: ClientFactory, filled: Path
) -> None:
    c = client(token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert "data-action" in c.get("/devices/dev-0001", headers=auth).text
    assert c.post("/api/devices/dev-0001/cordon").status_code == 401  # no token, no action
    response = c.post("/api/devices/dev-0001/cordon", headers=auth)
    assert response.status_code == 200 and response.json()["cordoned"] is True
    with Store(filled, create=False) as store:
        device = store.get_device("dev-0001")
        assert device is not None and device.cordoned
    assert c.post("/api/devices/dev-0001/uncordon", headers=auth).json()["cordoned"] is False
    assert c.post("/api/devices/nobody/cordon", headers=auth).status_code == 404
    assert c.post("/api/devices/dev-0001/reboot", headers=auth).status_code == 404


def test_a_write_from_another_site_is_refused(client: ClientFactory) -> None:
    c = client(token=TOKEN)
    c.post("/login", data={"token": TOKEN}, follow_redirects=False)
    response = c.post("/api/devices/dev-0001/drain", headers={"Origin": "http://evil.example"})
    assert response.status_code == 403
    same_site = c.post("/api/devices/dev-0001/drain", headers={"Origin": "http://testserver"})
    assert same_site.status_code == 200 and same_site.json()["drained"] is True
