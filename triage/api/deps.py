"""Dependencies shared by the route modules: settings, Redis, the authenticated user."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import redis
from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from triage.audit import AuditAction
from triage.pagecache import PageCache
from triage.settings import Settings
from triage.tokens import Role, TokenRecord, verify_token
from triage.worklist import Worklist

_bearer = HTTPBearer(auto_error=False, description="A token from `triage token create`")


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


def _authenticate(request: Request, token: str | None) -> TokenRecord:
    connection: redis.Redis = request.app.state.redis
    settings: Settings = request.app.state.settings
    failures_key = f"triage:auth-failures:{client_address(request)}"
    failures = int(connection.get(failures_key) or 0)
    if failures >= settings.auth_failures_per_minute:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            "too many failed authentications; try again later",
                            headers={"Retry-After": str(AUTH_FAILURE_WINDOW_SECONDS)})
    record = None
    if token:
        record = verify_token(connection, token)
        if record is None and request.app.state.oidc is not None:
            record = request.app.state.oidc.validate(token)
    if record is None:
        with connection.pipeline() as pipe:
            pipe.incr(failures_key)
            pipe.expire(failures_key, AUTH_FAILURE_WINDOW_SECONDS)
            pipe.execute()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return record


def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenRecord:
    return _authenticate(request, credentials.credentials if credentials else None)


def stream_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    access_token: Annotated[str | None, Query(description="for EventSource clients")] = None,
) -> TokenRecord:
    """Like ``current_user``, also accepting the token as a query parameter: browsers'
    EventSource cannot send an Authorization header."""
    return _authenticate(request, credentials.credentials if credentials else access_token)


def _require(identify: Callable[..., TokenRecord], roles: tuple[Role, ...]
             ) -> Callable[[TokenRecord], TokenRecord]:
    # A default rather than Annotated: the annotation is a string here (postponed
    # evaluation) and would not see the local ``identify``.
    def check(user: TokenRecord = Depends(identify)) -> TokenRecord:  # noqa: B008
        if user.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {user.role.value} may not")
        return user

    return check


def require(*roles: Role) -> Callable[[TokenRecord], TokenRecord]:
    """A dependency that admits only users with one of ``roles``."""
    return _require(current_user, roles)


AdminDep = Annotated[TokenRecord, Depends(require(Role.ADMIN))]
IntegrationDep = Annotated[TokenRecord, Depends(require(Role.INTEGRATION, Role.ADMIN))]
ReaderDep = Annotated[TokenRecord, Depends(require(Role.RADIOLOGIST, Role.ADMIN))]
StreamReaderDep = Annotated[TokenRecord, Depends(_require(stream_user, (Role.RADIOLOGIST,
                                                                           Role.ADMIN)))]


def audit(request: Request, user: TokenRecord, action: AuditAction, *,
          study_instance_uid: str | None = None, details: dict[str, Any] | None = None) -> None:
    """Record in the audit trail what ``user`` did, from where (before the answer is sent)."""
    request.app.state.audit.record(actor=user.owner, role=user.role.value,
                                   source=client_address(request), action=action,
                                   study_instance_uid=study_instance_uid, details=details)
