"""Signing in and out of the web pages, and the idle lock.

A token pasted once (``triage token create``, or a JWT from the hospital's identity provider)
opens a browser session; so does the OIDC sign-in (``triage.web.oidc_signin``). Both end in
``start_session``, which always opens a new session (a new id in the cookie) and ends the
one the browser had, locked or not.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import urlsplit

import jwt
import redis.asyncio as aioredis
from fastapi import APIRouter, Form, HTTPException, Request, Response, status
from fastapi.responses import RedirectResponse

from triage.api.deps import _authenticate, check_change, client_address, session_user
from triage.audit import AuditAction
from triage.tokens import TokenRecord, token_field
from triage.web.render import page
from triage.web.sessions import COOKIE, Sessions, same_origin

router = APIRouter(include_in_schema=False)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


async def start_session(request: Request, user: TokenRecord, via: str, target: str, *,
                        token: str | None = None) -> RedirectResponse:
    """Open a new browser session for ``user`` (ending the browser's earlier one) and send
    the browser to ``target``. ``token``: the token signed in with, whose revocation or
    expiry ends the session."""
    sessions: Sessions = request.app.state.sessions
    connection: aioredis.Redis = request.app.state.aredis()
    await sessions.end(connection, request.cookies.get(COOKIE))
    session_id = await sessions.open(connection, user, via,
                                     token_field=token_field(token) if token else None,
                                     credential_expires_at=_jwt_expiry(token))
    response = RedirectResponse(safe_next(target), status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(COOKIE, session_id, httponly=True, samesite="lax", path="/",
                        secure=sessions.secure(request.url.scheme))
    await request.app.state.audit.record(
        actor=user.owner, role=user.role.value, source=client_address(request),
        action=AuditAction.SIGNED_IN, details={"via": via})
    return response


def _jwt_expiry(token: str | None) -> datetime | None:
    """When a JWT signed in with (already verified) expires; ``None`` for other tokens."""
    if not token or token_field(token) is not None or token.count(".") != 2:
        return None
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return datetime.fromtimestamp(int(exp), UTC) if isinstance(exp, int | float) else None


@router.get("/login")
async def login_page(request: Request, next: str | None = None,
                     reason: str | None = None) -> Response:
    messages = {"expired": "Your session ended. Sign in again.",
                "locked": "The screen was locked. Sign in again to continue.",
                "signed-out": "You are signed out."}
    return page(request, "login.html", next=safe_next(next), error=None,
                message=messages.get(reason or ""),
                oidc=bool(request.app.state.settings.oidc_client_id))


@router.post("/login")
async def login(request: Request, token: Annotated[str, Form(max_length=4096)],
                next: Annotated[str, Form(max_length=2048)] = "/") -> Response:
    settings = request.app.state.settings
    if not same_origin(request.headers.get("origin"), request.headers.get("host"),
                       settings.public_url):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "request from another site")
    try:
        user = await _authenticate(request, token.strip())
    except HTTPException as exc:
        await request.app.state.audit.record(
            actor="unknown", role=None, source=client_address(request),
            action=AuditAction.SIGN_IN_REFUSED, details={"via": "token"})
        error = ("Too many failed attempts; wait a minute." if exc.status_code == 429
                 else "This token is not valid (unknown, expired or revoked).")
        return page(request, "login.html", status_code=exc.status_code, next=safe_next(next),
                    error=error, message=None, oidc=bool(settings.oidc_client_id))
    return await start_session(request, user, "token", next, token=token.strip())


def _signed_out(target: str) -> RedirectResponse:
    response = RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the browser's session, locked or not (a locked screen can still sign out)."""
    sessions: Sessions = request.app.state.sessions
    session_id = request.cookies.get(COOKIE)
    session = await sessions.get(request.app.state.aredis(), session_id)
    if session is not None:
        await check_change(request, session)
        await sessions.end(request.app.state.aredis(), session_id)
        await request.app.state.audit.record(
            actor=session.owner, role=session.role.value, source=client_address(request),
            action=AuditAction.SIGNED_OUT, details={})
    return _signed_out("/login?reason=signed-out")


@router.post("/session/lock", status_code=status.HTTP_204_NO_CONTENT)
async def lock(request: Request) -> Response:
    """The page's idle lock: the session serves nothing until its user signs in again."""
    user = await session_user(request)
    session_id = request.cookies.get(COOKIE)
    if user is None or session_id is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    sessions: Sessions = request.app.state.sessions
    connection: aioredis.Redis = request.app.state.aredis()
    await sessions.lock(connection, session_id, request.state.session)
    await request.app.state.audit.record(
        actor=user.owner, role=user.role.value, source=client_address(request),
        action=AuditAction.SESSION_LOCKED, details={})
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/ui/session")
async def session_state(request: Request) -> Response:
    """204 while the browser's session is valid and unlocked, else 401 (for the pages'
    script after a dropped live connection)."""
    try:
        user = await session_user(request)
    except HTTPException:
        user = None
    return Response(status_code=status.HTTP_204_NO_CONTENT if user
                    else status.HTTP_401_UNAUTHORIZED)
