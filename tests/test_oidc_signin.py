"""Signing in with the hospital account: the authorization code flow with PKCE against a real
OpenID provider (idpyoidc's server, ``tests/oidc_provider.py``, in a process of its own), the
API served by uvicorn with a real Redis, driven by httpx and by Chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import ManagedProcess, Servers, free_port
from triage.api.app import create_app
from triage.audit import AuditAction, AuditRecord, records
from triage.oidc import SignInError, verify_id_token
from triage.web.oidc_signin import FLOW_COOKIE
from triage.web.sessions import COOKIE

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CLIENT_ID = "triage-pacs"
SCOPES = "openid profile roles"


@dataclass
class Provider:
    """An identity provider process and the API port its registration names."""

    url: str
    api_port: int
    client_secret: str | None
    process: ManagedProcess

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/auth/oidc/callback"


def _start_provider(log_dir: Path, *, user: str, roles: str, roles_in: str,
                    client_secret: str | None) -> Provider:
    port, api_port = free_port(), free_port()
    argv = [sys.executable, "-m", "tests.oidc_provider", "--port", str(port),
            "--client-id", CLIENT_ID,
            "--redirect-uri", f"http://127.0.0.1:{api_port}/auth/oidc/callback",
            "--user", user, "--roles", roles, "--roles-in", roles_in]
    if client_secret:
        argv += ["--client-secret", client_secret]
    process = ManagedProcess(name=f"oidc-provider-{user}", argv=argv, cwd=ROOT,
                             log_path=log_dir / f"oidc-provider-{user}.log")
    process.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        assert process.alive(), process.log_path.read_text()
        try:
            if httpx.get(f"{url}/.well-known/openid-configuration", timeout=1).is_success:
                return Provider(url, api_port, client_secret, process)
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the identity provider did not start"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    """A confidential client (client_secret_basic); the roles claim is in the ID token."""
    provider = _start_provider(tmp_path_factory.mktemp("idp"), user="alice",
                               roles="rad-staff", roles_in="id_token",
                               client_secret=secrets.token_urlsafe(24))
    yield provider
    provider.process.stop()


@pytest.fixture(scope="module")
def public_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    """A public client (PKCE alone); the roles claim only comes from userinfo."""
    provider = _start_provider(tmp_path_factory.mktemp("idp"), user="bob",
                               roles="night-reader", roles_in="userinfo", client_secret=None)
    yield provider
    provider.process.stop()


@pytest.fixture
def serve(clean_servers: Servers) -> Iterator[Callable[..., str]]:
    """Starts the API, configured for a provider, on the port the provider redirects to."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(provider: Provider, role_map: dict[str, str]) -> str:
        discovery = httpx.get(f"{provider.url}/.well-known/openid-configuration").json()
        settings = clean_servers.settings.model_copy(update={
            "oidc_issuer": provider.url, "oidc_audience": CLIENT_ID,
            "oidc_jwks_url": discovery["jwks_uri"], "oidc_client_id": CLIENT_ID,
            "oidc_client_secret": provider.client_secret, "oidc_scopes": SCOPES,
            "oidc_role_map": role_map})
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1",
                                               port=provider.api_port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{provider.api_port}"

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(10)


def _set_cookie(response: httpx.Response, name: str) -> str | None:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return header
    return None


@dataclass
class SignIn:
    """One sign-in driven step by step, redirects followed by hand."""

    browser: httpx.Client
    api: str
    authorization_url: str = ""
    flow_id: str = ""
    callback_url: str = ""

    def start(self, next: str = "/") -> httpx.Response:
        response = self.browser.get(f"{self.api}/auth/oidc/start", params={"next": next})
        assert response.status_code == 303, response.text
        self.authorization_url = response.headers["location"]
        self.flow_id = response.cookies[FLOW_COOKIE]
        return response

    @property
    def request(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.authorization_url).query).items()}

    def at_provider(self) -> str:
        answer = self.browser.get(self.authorization_url)
        assert answer.status_code in (302, 303), answer.text
        self.callback_url = answer.headers["location"]
        return self.callback_url

    def finish(self, callback_url: str | None = None) -> httpx.Response:
        return self.browser.get(callback_url or self.callback_url)


def _audit(servers: Servers, action: AuditAction) -> list[AuditRecord]:
    entries = [AuditRecord.model_validate_json(raw) for _, raw in records(servers.redis)]
    return [e for e in entries if e.action == action]


def test_hospital_account_signs_in_with_pkce(hospital: Provider, serve: Callable[..., str],
                                            clean_servers: Servers) -> None:
    api = serve(hospital, {"rad-staff": "radiologist"})
    with httpx.Client(timeout=10) as browser:
        flow = SignIn(browser, api)
        started = flow.start(next="/studies/1.2.3")
        flow_cookie = (_set_cookie(started, FLOW_COOKIE) or "").lower()
        assert "httponly" in flow_cookie and "samesite=lax" in flow_cookie
        assert flow.authorization_url.startswith(f"{hospital.url}/authorization?")
        request = flow.request
        assert request["code_challenge_method"] == "S256"
        assert 43 <= len(request["code_challenge"]) <= 128
        assert request["response_type"] == "code" and request["client_id"] == CLIENT_ID
        assert request["redirect_uri"] == f"{api}/auth/oidc/callback"
        assert request["scope"] == SCOPES and request["state"] and request["nonce"]
        assert flow.at_provider().startswith(f"{api}/auth/oidc/callback?")
        done = flow.finish()
        assert done.status_code == 303, done.text
        assert done.headers["location"] == "/studies/1.2.3"
        session_cookie = (_set_cookie(done, COOKIE) or "").lower()
        assert "httponly" in session_cookie and "samesite=lax" in session_cookie
        assert "max-age=0" in (_set_cookie(done, FLOW_COOKIE) or "").lower()  # removed
        session = done.cookies[COOKIE]
    answer = httpx.get(f"{api}/api/v1/worklist", cookies={COOKIE: session}, timeout=10)
    assert answer.status_code == 200
    assert httpx.get(f"{api}/api/v1/worklist", timeout=10).status_code == 401
    [signed_in] = _audit(clean_servers, AuditAction.SIGNED_IN)
    assert signed_in.actor == "alice" and signed_in.role == "radiologist"
    assert signed_in.details == {"via": "oidc"}


def test_the_provider_requires_pkce(hospital: Provider, serve: Callable[..., str],
                                    clean_servers: Servers) -> None:
    request = {"response_type": "code", "client_id": CLIENT_ID, "scope": SCOPES,
               "redirect_uri": hospital.redirect_uri, "state": "s", "nonce": "n"}
    for extra in ({}, {"code_challenge": "x" * 43, "code_challenge_method": "plain"}):
        answer = httpx.get(f"{hospital.url}/authorization", params={**request, **extra})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "invalid_request"
    # A code obtained with another code challenge (an injected code) cannot be exchanged:
    # the service sends its own code verifier, which the provider refuses.
    api = serve(hospital, {"rad-staff": "radiologist"})
    with httpx.Client(timeout=10) as browser:
        flow = SignIn(browser, api)
        flow.start()
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(
            hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        forged = {**flow.request, "code_challenge": challenge, "nonce": "attacker"}
        stolen = httpx.get(f"{hospital.url}/authorization", params=forged)
        refused = flow.finish(stolen.headers["location"])
        assert refused.status_code == 400
        assert COOKIE not in refused.cookies
    [entry] = _audit(clean_servers, AuditAction.SIGN_IN_REFUSED)
    assert entry.details == {"via": "oidc", "reason": "token-refused"}


def test_wrong_replayed_and_refused_answers_open_no_session(
        hospital: Provider, serve: Callable[..., str], clean_servers: Servers) -> None:
    api = serve(hospital, {"rad-staff": "radiologist"})
    with httpx.Client(timeout=10) as browser:
        flow = SignIn(browser, api)
        flow.start()
        callback = urlsplit(flow.at_provider())
        query = {k: v[0] for k, v in parse_qs(callback.query).items()}
        wrong = flow.finish(callback._replace(query=urlencode({**query, "state": "forged"}))
                            .geturl())
        assert wrong.status_code == 400
        assert "does not belong to your sign-in" in wrong.text
        assert 'href="/auth/oidc/start' in wrong.text  # the way back to signing in
        assert COOKIE not in wrong.cookies
    with httpx.Client(timeout=10) as browser:
        flow = SignIn(browser, api)
        flow.start()
        denied = flow.finish(f"{api}/auth/oidc/callback?" + urlencode(
            {"error": "access_denied", "state": flow.request["state"]}))
        assert denied.status_code == 400 and COOKIE not in denied.cookies
    with httpx.Client(timeout=10) as browser:
        flow = SignIn(browser, api)
        flow.start(next="//elsewhere.example/")  # not a path of this site
        flow.at_provider()
        done = flow.finish()
        assert done.status_code == 303 and done.headers["location"] == "/"
    with httpx.Client(timeout=10, cookies={FLOW_COOKIE: flow.flow_id}) as attacker:
        replayed = attacker.get(flow.callback_url)
        assert replayed.status_code == 400
        assert "expired or was already used" in replayed.text
        assert COOKIE not in replayed.cookies
    refusals = _audit(clean_servers, AuditAction.SIGN_IN_REFUSED)
    assert [e.details.get("reason") for e in refusals] == [
        "wrong-state", "provider-error", "no-sign-in"]
    assert refusals[1].details["provider_error"] == "access_denied"
    assert all(e.actor == "unknown" and e.role is None for e in refusals)


@pytest.mark.parametrize(("role_map", "role"), [
    ({"night-reader": "radiologist"}, "radiologist"),
    ({"rad-staff": "radiologist"}, None),
])
def test_the_role_comes_from_userinfo_for_a_public_client(
        public_client: Provider, serve: Callable[..., str], clean_servers: Servers,
        role_map: dict[str, str], role: str | None) -> None:
    api = serve(public_client, role_map)
    with httpx.Client(timeout=10) as browser:
        flow = SignIn(browser, api)
        flow.start()
        flow.at_provider()
        done = flow.finish()
    if role is not None:
        assert done.status_code == 303 and COOKIE in done.cookies
        [entry] = _audit(clean_servers, AuditAction.SIGNED_IN)
        assert (entry.actor, entry.role) == ("bob", role)
    else:
        assert done.status_code == 403
        assert "Your account has no role in this service" in done.text
        assert COOKIE not in done.cookies
        [entry] = _audit(clean_servers, AuditAction.SIGN_IN_REFUSED)
        assert entry.actor == "bob" and entry.details["reason"] == "no-role"


# -- ID token checks, with tokens signed here --------------------------------------------

ISSUER = "https://idp.hospital.example"
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _id_token(key: Any = _KEY, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "u-1", "aud": CLIENT_ID, "iat": now, "exp": now + 300,
               "nonce": "n-1", **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key,
                      algorithm="RS256")


def _tampered() -> str:
    """A token of the provider whose subject was changed after signing."""
    token = _id_token()
    header, _, signature = token.split(".")
    claims = {**jwt.decode(token, options={"verify_signature": False}), "sub": "admin"}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{payload}.{signature}"


def _at_hash(access_token: str) -> str:
    digest = hashlib.sha256(access_token.encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


@pytest.mark.parametrize(("token", "reason"), [
    (lambda: _id_token(_OTHER_KEY), "invalid-id-token"),
    (_tampered, "invalid-id-token"),
    (lambda: _id_token(nonce="n-2"), "wrong-nonce"),
    (lambda: _id_token(nonce=None), "wrong-nonce"),
    (lambda: _id_token(iss="https://other.example"), "invalid-id-token"),
    (lambda: _id_token(aud="another-client"), "invalid-id-token"),
    (lambda: _id_token(aud=[CLIENT_ID, "another-client"]), "invalid-id-token"),
    (lambda: _id_token(exp=int(time.time()) - 3600), "invalid-id-token"),
    (lambda: _id_token(at_hash=_at_hash("another-token")), "invalid-id-token"),
])
def test_id_tokens_that_do_not_verify_are_refused(token: Callable[[], str],
                                                  reason: str) -> None:
    with pytest.raises(SignInError) as refused:
        verify_id_token(token(), _KEY.public_key(), issuer=ISSUER, client_id=CLIENT_ID,
                        nonce="n-1", access_token="the-access-token")
    assert refused.value.reason == reason


def test_a_valid_id_token_is_accepted() -> None:
    token = _id_token(at_hash=_at_hash("the-access-token"), roles=["rad-staff"],
                      aud=[CLIENT_ID, "another-client"], azp=CLIENT_ID)
    claims = verify_id_token(token, _KEY.public_key(), issuer=ISSUER, client_id=CLIENT_ID,
                             nonce="n-1", access_token="the-access-token")
    assert claims["sub"] == "u-1" and claims["roles"] == ["rad-staff"]


# -- in a browser ---------------------------------------------------------------------------


def test_signing_in_from_the_login_page_in_chromium(hospital: Provider,
                                                    serve: Callable[..., str]) -> None:
    from playwright import sync_api

    # Installed by the project's set-up (deploy/install-debian-packages.sh): never skipped.
    assert Path("/usr/bin/chromium").exists(), "Debian's chromium is not installed"
    api = serve(hospital, {"rad-staff": "radiologist"})
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{api}/login")
            with page.expect_navigation(url=f"{api}/", wait_until="load") as landing:
                page.click("#oidc-signin")
            status = page.evaluate(
                "fetch('/api/v1/worklist', {credentials: 'same-origin'}).then(r => r.status)")
            page.screenshot(path=str(ARTIFACTS / "oidc-signin.png"), full_page=True)
            assert status == 200
            response = landing.value
            if response is not None and response.status == 200:
                assert "alice" in page.inner_text(".user")
            cookies = {c["name"]: c for c in page.context.cookies()}
            assert cookies[COOKIE]["httpOnly"] and cookies[COOKIE]["sameSite"] == "Lax"
            assert FLOW_COOKIE not in cookies
        finally:
            browser.close()
