"""Liveness for load balancers and container health checks (no authentication)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Response, status

from triage.api.deps import RedisDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(connection: RedisDep, response: Response) -> dict[str, str]:
    """``ok`` while the API can reach Redis, which holds the worklist."""
    try:
        connection.ping()
    except redis.RedisError:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "unavailable", "redis": "unreachable"}
    return {"status": "ok", "redis": "ok"}
