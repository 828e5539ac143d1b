"""Dependencies shared by the route modules: settings, Redis, the authenticated user."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import redis
import redis.asyncio as aioredis
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from triage.audit import AuditAction, record
from triage.pagecache import PageCache
from triage.settings import Settings
from triage.tokens import TOKENS_KEY, Role, TokenRecord, token_field, valid_record
from triage.web.sessions import (
    BACKGROUND_HEADER,
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    SAFE_METHODS,
    Session,
    csrf_matches,
    same_origin,
)
from triage.worklist import Worklist

_bearer = HTTPBearer(auto_error=False, description="A token from `triage token create`")


class LoopRedis:
    """An asyncio Redis client for the running event loop: its connections belong to the loop
    that opened them. The API has one loop; an in-process test client may start one per
    request."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary())

    def __call__(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = aioredis.Redis.from_url(self.url)
        return client


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


RedisDep = Annotated[redis.Redis, Depends(get_redis)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_worklist(connection: RedisDep) -> Worklist:
    return Worklist(connection)


WorklistDep = Annotated[Worklist, Depends(get_worklist)]


def get_pages(request: Request) -> PageCache:
    return request.app.state.pages


PagesDep = Annotated[PageCache, Depends(get_pages)]


# Failed authentications are counted per client address over this window.
AUTH_FAILURE_WINDOW_SECONDS = 60


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _authenticate(request: Request, token: str | None) -> TokenRecord:
    """The caller's token record: this service's tokens and the failures counted against
    the caller's address are read in one Redis round trip, before any route runs."""
    connection: aioredis.Redis = request.app.state.aredis()
    settings: Settings = request.app.state.settings
    failures_key = f"triage:auth-failures:{client_address(request)}"
    field = token_field(token) if token else None
    async with connection.pipeline(transaction=False) as pipe:
        pipe.get(failures_key)
        if field:
            pipe.hget(TOKENS_KEY, field)
        failures, *stored = await pipe.execute()
    if int(failures or 0) >= settings.auth_failures_per_minute:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            "too many failed authentications; try again later",
                            headers={"Retry-After": str(AUTH_FAILURE_WINDOW_SECONDS)})
    record = valid_record(stored[0]) if stored else None
    if record is None and token and request.app.state.oidc is not None:
        # May fetch the identity provider's keys: never on the event loop.
        record = await run_in_threadpool(request.app.state.oidc.validate, token)
    if record is None:
        async with connection.pipeline(transaction=False) as pipe:
            pipe.incr(failures_key)
            pipe.expire(failures_key, AUTH_FAILURE_WINDOW_SECONDS)
            await pipe.execute()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return record


async def check_change(request: Request, session: Session) -> None:
    """A request that changes something with the session's cookie must come from this site
    and carry the session's CSRF token (header, or form field for plain forms)."""
    if request.method in SAFE_METHODS:
        return
    settings: Settings = request.app.state.settings
    if not same_origin(request.headers.get("origin"), request.headers.get("host"),
                       settings.public_url):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "request from another site")
    offered = request.headers.get(CSRF_HEADER)
    if offered is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(CSRF_FIELD)
        offered = value if isinstance(value, str) else None
    if not csrf_matches(session, offered):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token")


async def valid_session(request: Request) -> tuple[str, Session] | None:
    """The browser session the cookie names (locked or not), if it still holds: not
    expired, and the token it was opened with neither revoked nor expired."""
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        return None
    connection: aioredis.Redis = request.app.state.aredis()
    session = await request.app.state.sessions.get(connection, session_id)
    if session is None:
        return None
    if session.token_field and valid_record(
            await connection.hget(TOKENS_KEY, session.token_field)) is None:
        await request.app.state.sessions.end(connection, session_id)
        return None
    return session_id, session


async def session_user(request: Request) -> TokenRecord | None:
    """The user of the browser session the request's cookie names, if it is valid.

    Requests that change something must carry the session's CSRF token and come from this
    site. A locked session answers 401 until the user signs in again. User actions (anything
    but background refreshes and the live stream) restart the session's idle time.
    """
    found = await valid_session(request)
    if found is None:
        return None
    session_id, session = found
    if session.locked:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "session locked: sign in again")
    await check_change(request, session)
    request.state.session = session
    if not request.headers.get(BACKGROUND_HEADER) and not request.url.path.endswith(
            "/events"):
        await request.app.state.sessions.touch(request.app.state.aredis(), session_id,
                                               session)
    return session.user()


async def still_valid(request: Request) -> bool:
    """Whether the credentials a long request (the live stream) was admitted with still
    hold: the bearer token is not revoked or expired, the session not ended or locked."""
    credentials = await _bearer(request)
    if credentials is None:
        found = await valid_session(request)
        return found is not None and not found[1].locked
    token = credentials.credentials
    field = token_field(token)
    if field is not None:
        connection: aioredis.Redis = request.app.state.aredis()
        return valid_record(await connection.hget(TOKENS_KEY, field)) is not None
    oidc = request.app.state.oidc
    return oidc is not None and await run_in_threadpool(oidc.validate, token) is not None


async def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenRecord:
    """The caller: a bearer token (API clients) or a browser session (the web pages)."""
    if credentials is None:
        user = await session_user(request)
        if user is not None:
            return user
    return await _authenticate(request, credentials.credentials if credentials else None)


def _require(identify: Callable[..., Awaitable[TokenRecord]], roles: tuple[Role, ...]
             ) -> Callable[[TokenRecord], Awaitable[TokenRecord]]:
    # A default rather than Annotated: the annotation is a string here (postponed
    # evaluation) and would not see the local ``identify``.
    async def check(user: TokenRecord = Depends(identify)) -> TokenRecord:  # noqa: B008
        if user.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {user.role.value} may not")
        return user

    return check


def require(*roles: Role) -> Callable[[TokenRecord], Awaitable[TokenRecord]]:
    """A dependency that admits only users with one of ``roles``."""
    return _require(current_user, roles)


AdminDep = Annotated[TokenRecord, Depends(require(Role.ADMIN))]
IntegrationDep = Annotated[TokenRecord, Depends(require(Role.INTEGRATION, Role.ADMIN))]
ReaderDep = Annotated[TokenRecord, Depends(require(Role.RADIOLOGIST, Role.ADMIN))]


def audit(request: Request, user: TokenRecord, action: AuditAction, *,
          study_instance_uid: str | None = None, details: dict[str, Any] | None = None) -> None:
    """Record in the audit trail what ``user`` did, from where (before the answer is sent)."""
    record(request.app.state.redis, actor=user.owner, role=user.role.value,
           source=client_address(request), action=action,
           study_instance_uid=study_instance_uid, details=details)


async def audit_async(request: Request, user: TokenRecord, action: AuditAction, *,
                      details: dict[str, Any] | None = None) -> None:
    """``audit`` for asyncio routes."""
    await request.app.state.audit.record(actor=user.owner, role=user.role.value,
                                          source=client_address(request), action=action,
                                          details=details)
