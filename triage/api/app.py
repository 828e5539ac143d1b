"""The FastAPI application: API under /api/v1, health check, and the worklist web page."""

from __future__ import annotations

import redis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from triage import __version__
from triage.api.deps import LoopRedis
from triage.api.routes import (
    admin,
    docs,
    health,
    integration,
    studies,
    trials,
    vigilance,
    worklist,
)
from triage.api.security import RequestSizeLimit, SecurityHeaders
from triage.audit import AsyncAuditWriter
from triage.oidc import OidcValidator
from triage.pagecache import PageCache
from triage.settings import Settings, get_settings
from triage.web import console, oidc_signin, pages, render, signin
from triage.web.sessions import Sessions
from triage.worklist import Worklist


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="Triage",
        version=__version__,
        description="Prioritised worklist of studies analysed by AI models (advisory only).",
        # Served by triage.api.routes.docs with assets of its own, never from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.redis = redis.Redis.from_url(settings.redis_connection_url)
    # The asyncio client serves the hot paths (authentication, the worklist page); routes
    # that run in threads use the other.
    app.state.aredis = LoopRedis(settings.redis_connection_url)
    app.state.audit = AsyncAuditWriter(app.state.aredis)
    app.state.pages = PageCache(Worklist(app.state.redis), app.state.aredis)
    app.state.oidc = OidcValidator(settings) if settings.oidc_issuer else None
    app.state.sessions = Sessions(settings)
    app.add_middleware(RequestSizeLimit, limit=settings.max_request_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(SecurityHeaders)
    app.include_router(health.router)
    app.include_router(docs.router)
    app.include_router(worklist.router)
    app.include_router(studies.router)
    app.include_router(admin.router)
    app.include_router(vigilance.router)
    app.include_router(vigilance.outcomes_router)
    app.include_router(trials.router)
    app.include_router(integration.router)
    app.include_router(render.router)
    app.include_router(signin.router)
    app.include_router(oidc_signin.router)
    app.include_router(pages.router)
    app.include_router(console.router)
    app.add_exception_handler(pages.SignInNeeded, pages.sign_in_redirect)  # type: ignore[arg-type]
    return app
