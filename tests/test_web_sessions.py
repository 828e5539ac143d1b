"""Browser sessions over HTTP: the cookie, CSRF and same-origin checks, idle and absolute
expiry, the idle lock, roles on the pages, and no open redirect after signing in."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import Servers
from tests.test_workflow import make_item
from triage.api.app import create_app
from triage.priority import PriorityClass
from triage.tokens import Role, create_token, list_tokens, revoke_token
from triage.web.sessions import COOKIE, _key
from triage.worklist import Worklist, utcnow

pytestmark = pytest.mark.servers
BASE = "http://testserver"


@pytest.fixture
def web(clean_servers: Servers) -> TestClient:
    Worklist(clean_servers.redis).put(make_item(1, PriorityClass.URGENT, 1))
    return TestClient(create_app(clean_servers.settings), base_url=BASE,
                      follow_redirects=False)


def _sign_in(client: TestClient, servers: Servers, role: Role = Role.RADIOLOGIST,
             owner: str = "dr.a", next: str = "/") -> str:
    token = create_token(servers.redis, role=role, owner=owner)
    answer = client.post("/login", data={"token": token, "next": next})
    assert answer.status_code == 303, answer.text
    return answer.headers["location"]


def _csrf(client: TestClient) -> str:
    page = client.get("/")
    assert page.status_code == 200
    return page.text.split('data-csrf="', 1)[1].split('"', 1)[0]


def test_pages_send_strangers_to_sign_in_and_back(web: TestClient,
                                                  clean_servers: Servers) -> None:
    answer = web.get("/studies/1.2.3.1?x=1")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?next=%2Fstudies%2F1.2.3.1%3Fx%3D1"
    assert web.get("/api/v1/worklist").status_code == 401
    assert _sign_in(web, clean_servers, next="/studies/1.2.3.1") == "/studies/1.2.3.1"
    for target in ("//elsewhere.example/", "https://elsewhere.example/", "/\\elsewhere"):
        assert _sign_in(web, clean_servers, next=target) == "/"


def test_the_cookie_carries_only_a_session_id(web: TestClient, clean_servers: Servers) -> None:
    token = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="dr.a")
    answer = web.post("/login", data={"token": token})
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and token not in cookie
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    session_id = answer.cookies[COOKIE]
    stored = clean_servers.redis.get(_key(session_id))
    assert stored is not None and session_id.encode() not in stored
    assert web.get("/api/v1/worklist").status_code == 200
    assert web.get("/ui/session").status_code == 204

    secure = TestClient(create_app(clean_servers.settings.model_copy(
        update={"public_url": "https://triage.hospital.example"})), base_url=BASE)
    answer = secure.post("/login", data={"token": token}, follow_redirects=False)
    assert "Secure" in answer.headers["set-cookie"]


def test_changes_need_the_csrf_token_and_this_site(web: TestClient,
                                                   clean_servers: Servers) -> None:
    _sign_in(web, clean_servers)
    csrf = _csrf(web)
    claim = "/api/v1/studies/1.2.3.1/claim"
    assert web.post(claim).status_code == 403
    assert web.post(claim, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert web.post(claim, headers={"X-CSRF-Token": csrf,
                                    "Origin": "https://elsewhere.example"}).status_code == 403
    assert web.post(claim, headers={"X-CSRF-Token": csrf, "Origin": BASE}).status_code == 200
    # A form post carries it as a field.
    assert web.post("/ui/studies/1.2.3.1/release", data={"csrf_token": csrf}).status_code == 200
    assert web.post("/ui/studies/1.2.3.1/release", data={"csrf_token": "x"}).status_code == 403
    # Bearer tokens need no CSRF token: no browser sends them by itself.
    token = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="dr.b")
    fresh = TestClient(create_app(clean_servers.settings), base_url=BASE)
    assert fresh.post(claim, headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_sessions_end_when_idle_and_after_their_maximum(web: TestClient,
                                                        clean_servers: Servers) -> None:
    _sign_in(web, clean_servers)
    key = _key(web.cookies[COOKIE])
    stored = json.loads(clean_servers.redis.get(key))
    idle = clean_servers.settings.session_idle_minutes
    stored["last_active"] = (utcnow() - timedelta(minutes=idle + 1)).isoformat()
    clean_servers.redis.set(key, json.dumps(stored))
    assert web.get("/api/v1/worklist").status_code == 401
    page = web.get("/")
    assert page.status_code == 303 and "reason=expired" in page.headers["location"]

    _sign_in(web, clean_servers)
    key = _key(web.cookies[COOKIE])
    stored = json.loads(clean_servers.redis.get(key))
    stored["created_at"] = (utcnow() - timedelta(
        hours=clean_servers.settings.session_max_hours, minutes=1)).isoformat()
    clean_servers.redis.set(key, json.dumps(stored))
    assert web.get("/api/v1/worklist").status_code == 401
    # Background refreshes do not keep a session alive; user requests do.
    _sign_in(web, clean_servers)
    key = _key(web.cookies[COOKIE])
    stored = json.loads(clean_servers.redis.get(key))
    before = (utcnow() - timedelta(minutes=5)).isoformat()
    stored["last_active"] = before
    clean_servers.redis.set(key, json.dumps(stored))
    web.get("/ui/worklist/rows", headers={"X-Triage-Background": "1"})
    assert json.loads(clean_servers.redis.get(key))["last_active"] == before
    web.get("/")
    assert json.loads(clean_servers.redis.get(key))["last_active"] != before


def test_a_locked_session_opens_only_for_its_user(web: TestClient,
                                                  clean_servers: Servers) -> None:
    _sign_in(web, clean_servers, owner="dr.a")
    session_id = web.cookies[COOKIE]
    csrf = _csrf(web)
    assert web.post("/session/lock", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert web.get("/api/v1/worklist").status_code == 401
    page = web.get("/")
    assert page.status_code == 303 and "reason=locked" in page.headers["location"]
    # A locked screen can still sign out.
    assert web.post("/logout", data={"csrf_token": "wrong"}).status_code == 403
    _sign_in(web, clean_servers, owner="dr.a")
    # Signing in again opens a new session (a new id: no fixation) and ends the old one.
    assert web.cookies[COOKIE] != session_id
    assert clean_servers.redis.get(_key(session_id)) is None
    assert web.get("/api/v1/worklist").status_code == 200
    csrf = _csrf(web)
    web.post("/session/lock", headers={"X-CSRF-Token": csrf})
    locked = web.cookies[COOKIE]
    assert web.post("/logout", data={"csrf_token": csrf}).status_code == 303
    assert clean_servers.redis.get(_key(locked)) is None


def test_revoking_the_token_ends_its_sessions(web: TestClient, clean_servers: Servers) -> None:
    token = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="dr.a")
    assert web.post("/login", data={"token": token}).status_code == 303
    assert web.get("/api/v1/worklist").status_code == 200
    [record] = [r for r in list_tokens(clean_servers.redis) if r.owner == "dr.a"]
    revoke_token(clean_servers.redis, record.id)
    assert web.get("/api/v1/worklist").status_code == 401
    assert web.get("/").status_code == 303
    # A session lasts no longer than its token.
    short = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="dr.b", days=1)
    web.post("/login", data={"token": short})
    stored = json.loads(clean_servers.redis.get(_key(web.cookies[COOKIE])))
    assert stored["credential_expires_at"] is not None


def test_the_live_stream_ends_with_its_session(live_api: str,
                                               clean_servers: Servers) -> None:
    token = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="dr.a")
    with httpx.Client(base_url=live_api, timeout=20) as client:
        assert client.post("/login", data={"token": token}).status_code == 303
        page = client.get("/")
        csrf = page.text.split('data-csrf="', 1)[1].split('"', 1)[0]
        with client.stream("GET", "/api/v1/worklist/events") as stream:
            lines = stream.iter_lines()
            assert next(lines) == ": connected"
            locked = client.post("/session/lock", headers={"X-CSRF-Token": csrf})
            assert locked.status_code == 204
            started = time.monotonic()
            rest = list(lines)  # the server ends the stream
        assert "event: ended" in rest
        assert time.monotonic() - started < 15


def test_sign_out_ends_the_session_at_once(web: TestClient, clean_servers: Servers) -> None:
    _sign_in(web, clean_servers)
    session_id = web.cookies[COOKIE]
    csrf = _csrf(web)
    assert web.post("/logout").status_code == 403  # no CSRF token
    answer = web.post("/logout", data={"csrf_token": csrf})
    assert answer.status_code == 303
    assert clean_servers.redis.get(_key(session_id)) is None
    web.cookies.set(COOKIE, session_id)
    assert web.get("/api/v1/worklist").status_code == 401


def test_console_pages_are_for_admins(web: TestClient, clean_servers: Servers) -> None:
    _sign_in(web, clean_servers, role=Role.RADIOLOGIST)
    csrf = _csrf(web)
    for path in ("/admin", "/ui/admin/panel/jobs", "/ui/admin/panel/tokens"):
        assert web.get(path).status_code == 403, path
    for path in ("/ui/admin/jobs/requeue-failed", "/ui/admin/deliveries/retry",
                 "/ui/admin/audit/verify"):
        assert web.post(path, data={"csrf_token": csrf}).status_code == 403, path
    _sign_in(web, clean_servers, role=Role.ADMIN, owner="root")
    assert web.get("/admin").status_code == 200
    for panel in ("queues", "workers", "jobs", "deliveries", "models", "tokens"):
        assert web.get(f"/ui/admin/panel/{panel}").status_code == 200, panel
    csrf = _csrf(web)
    created = web.post("/ui/admin/tokens", data={"csrf_token": csrf, "owner": "dr.new",
                                                 "role": "radiologist", "days": "30"})
    assert created.status_code == 200 and 'id="created-token"' in created.text
    token = created.text.split('id="created-token">', 1)[1].split("<", 1)[0]
    other = TestClient(create_app(clean_servers.settings), base_url=BASE)
    assert other.get("/api/v1/worklist",
                     headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert "The chain holds" in web.post("/ui/admin/audit/verify",
                                         data={"csrf_token": csrf}).text


def test_a_mangled_filter_url_shows_the_whole_list(web: TestClient,
                                                   clean_servers: Servers) -> None:
    _sign_in(web, clean_servers)
    page = web.get("/?priority=nonsense&start=not-a-date&offset=-5")
    assert page.status_code == 200 and "1.2.3.1" in page.text
    filtered = web.get("/?priority=critical")
    assert filtered.status_code == 200 and 'data-uid="1.2.3.1"' not in filtered.text
    urgent = web.get("/ui/worklist/rows?priority=urgent&claimed=unclaimed&read=unread")
    assert 'data-uid="1.2.3.1"' in urgent.text
