"""Dependencies shared by the route modules: settings, Redis, the authenticated user."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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


def _authenticate(connection: redis.Redis, token: str | None) -> TokenRecord:
    record = verify_token(connection, token) if token else None
    if record is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return record


def current_user(
    connection: RedisDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenRecord:
    return _authenticate(connection, credentials.credentials if credentials else None)


def stream_user(
    connection: RedisDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    access_token: Annotated[str | None, Query(description="for EventSource clients")] = None,
) -> TokenRecord:
    """Like ``current_user``, also accepting the token as a query parameter: browsers'
    EventSource cannot send an Authorization header."""
    return _authenticate(connection, credentials.credentials if credentials else access_token)


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
ReaderDep = Annotated[TokenRecord, Depends(require(Role.RADIOLOGIST, Role.ADMIN))]
StreamReaderDep = Annotated[TokenRecord, Depends(_require(stream_user, (Role.RADIOLOGIST,
                                                                           Role.ADMIN)))]
