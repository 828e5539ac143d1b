"""Dependencies shared by the route modules: settings, Redis, the authenticated user."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request, status
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


def current_user(
    connection: RedisDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenRecord:
    record = verify_token(connection, credentials.credentials) if credentials else None
    if record is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return record


def require(*roles: Role) -> Callable[[TokenRecord], TokenRecord]:
    """A dependency that admits only users with one of ``roles``."""

    def check(user: Annotated[TokenRecord, Depends(current_user)]) -> TokenRecord:
        if user.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {user.role.value} may not")
        return user

    return check


ReaderDep = Annotated[TokenRecord, Depends(require(Role.RADIOLOGIST, Role.ADMIN))]
