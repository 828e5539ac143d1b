"""Sign-in with the hospital account: the OpenID Connect authorization code flow with PKCE
(RFC 7636), the pages' half (the protocol is ``triage.oidc.OidcClient``).

``/auth/oidc/start`` keeps the sign-in's state, nonce and PKCE code verifier in Redis for ten
minutes under a random id that the browser carries in a short-lived HttpOnly cookie
(SameSite=Lax, so that it comes back with the provider's redirect), then sends the browser to
the provider. ``/auth/oidc/callback`` takes them back once, exchanges the code, verifies the
ID token and opens the browser session. Tokens never reach a log, the browser or a URL of
this site.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import RedirectResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from triage.api.deps import client_address
from triage.audit import AuditAction
from triage.oidc import OidcClient, SignInError, account_name, pkce_pair, user_record
from triage.web.render import page
from triage.web.sessions import Sessions
from triage.web.signin import safe_next, start_session
from triage.worklist import KEY_PREFIX

router = APIRouter(include_in_schema=False)
log = logging.getLogger(__name__)

FLOW_COOKIE = "triage_oidc"
FLOW_PATH = "/auth/oidc"
CALLBACK_PATH = f"{FLOW_PATH}/callback"
# A sign-in not completed at the provider within this time starts again.
DEFAULT_FLOW_SECONDS = 600
# Provider error codes (RFC 6749 §4.1.2.1) are kept in the audit trail when they look like one.
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")


class Flow(BaseModel):
    """One sign-in in progress, as kept in Redis."""

    state: str
    nonce: str
    code_verifier: str
    redirect_uri: str
    next: str


def _flow_key(flow_id: str) -> str:
    return f"{KEY_PREFIX}:oidc-flow:{hashlib.sha256(flow_id.encode()).hexdigest()}"


def _client(request: Request) -> OidcClient:
    """The relying party of this process, made on first use (it caches the discovery)."""
    settings = request.app.state.settings
    if not (settings.oidc_issuer and settings.oidc_client_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "single sign-on is not configured")
    client: OidcClient | None = getattr(request.app.state, "oidc_client", None)
    if client is None:
        client = request.app.state.oidc_client = OidcClient(settings)
    return client


def _callback_url(request: Request) -> str:
    base = request.app.state.settings.public_url or str(request.base_url)
    return f"{base.rstrip('/')}{CALLBACK_PATH}"


def _forget_flow(request: Request, response: Response) -> None:
    sessions: Sessions = request.app.state.sessions
    response.delete_cookie(FLOW_COOKIE, path=FLOW_PATH, httponly=True, samesite="lax",
                           secure=sessions.secure(request.url.scheme))


async def _take_flow(request: Request) -> Flow | None:
    """The sign-in the browser's cookie names, removed so that it serves once."""
    flow_id = request.cookies.get(FLOW_COOKIE)
    if not flow_id or len(flow_id) > 128:
        return None
    connection: aioredis.Redis = request.app.state.aredis()
    raw = await connection.getdel(_flow_key(flow_id))
    return Flow.model_validate_json(raw) if raw is not None else None


async def _refused(request: Request, error: SignInError, *, actor: str = "unknown",
                   details: dict[str, Any] | None = None) -> Response:
    log.warning("hospital-account sign-in refused (%s) from %s", error.reason,
                client_address(request))
    await request.app.state.audit.record(
        actor=actor, role=None, source=client_address(request),
        action=AuditAction.SIGN_IN_REFUSED,
        details={"via": "oidc", "reason": error.reason, **(details or {})})
    response = page(request, "login.html", status_code=error.status_code, next="/",
                    error=str(error), message=None, oidc=True)
    _forget_flow(request, response)
    return response


@router.get(f"{FLOW_PATH}/start")
async def start(request: Request, next: str | None = None) -> Response:
    """Send the browser to the identity provider's sign-in."""
    client = _client(request)
    verifier, challenge = pkce_pair()
    flow = Flow(state=secrets.token_urlsafe(32), nonce=secrets.token_urlsafe(32),
                code_verifier=verifier, redirect_uri=_callback_url(request),
                next=safe_next(next))
    try:
        url = await client.authorization_url(redirect_uri=flow.redirect_uri, state=flow.state,
                                             nonce=flow.nonce, code_challenge=challenge)
    except SignInError as exc:
        return await _refused(request, exc)
    flow_id = secrets.token_urlsafe(32)
    connection: aioredis.Redis = request.app.state.aredis()
    await connection.set(_flow_key(flow_id), flow.model_dump_json(), ex=DEFAULT_FLOW_SECONDS)
    response = RedirectResponse(url, status_code=status.HTTP_303_SEE_OTHER)
    sessions: Sessions = request.app.state.sessions
    response.set_cookie(FLOW_COOKIE, flow_id, max_age=DEFAULT_FLOW_SECONDS, path=FLOW_PATH,
                        httponly=True, samesite="lax", secure=sessions.secure(request.url.scheme))
    return response


@router.get(CALLBACK_PATH)
async def callback(request: Request, code: str | None = None, state: str | None = None,
                   error: str | None = None, iss: str | None = None) -> Response:
    """The provider's answer (RFC 6749 §4.1.2): open the session, or say why not."""
    client = _client(request)
    flow = await _take_flow(request)
    try:
        if flow is None:
            raise SignInError("no-sign-in", "This sign-in has expired or was already used. "
                              "Start again.")
        if state is None or not hmac.compare_digest(state.encode(), flow.state.encode()):
            raise SignInError("wrong-state", "This answer does not belong to your sign-in. "
                              "Start again.")
        if error is not None:
            code_name = error if _ERROR_CODE.fullmatch(error) else "other"
            return await _refused(request, SignInError(
                "provider-error", "The identity provider did not sign you in."),
                details={"provider_error": code_name})
        # RFC 9207: an answer naming another issuer is a mix-up attack.
        if iss is not None and iss != client.issuer:
            raise SignInError("wrong-issuer", "This answer comes from another identity "
                              "provider.")
        if not code:
            raise SignInError("no-code", "The identity provider's answer is incomplete.")
        tokens = await client.exchange_code(code=code, code_verifier=flow.code_verifier,
                                            redirect_uri=flow.redirect_uri)
        access_token = tokens.get("access_token")
        access_token = access_token if isinstance(access_token, str) else None
        jwks_uri = (await client.metadata())["jwks_uri"]
        # PyJWKClient reads the provider's keys with blocking I/O: never on the event loop.
        claims = await run_in_threadpool(client.id_token_claims, tokens["id_token"],
                                         nonce=flow.nonce, jwks_uri=jwks_uri,
                                         access_token=access_token)
        role = await client.role(claims, access_token)
    except SignInError as exc:
        return await _refused(request, exc)
    if role is None:
        return await _refused(request, SignInError(
            "no-role", "Your account has no role in this service. Ask your administrator "
            "for access.", status_code=status.HTTP_403_FORBIDDEN), actor=account_name(claims))
    response = await start_session(request, user_record(claims, role), "oidc", flow.next)
    _forget_flow(request, response)
    return response
