"""Browser sessions: signing in once (a pasted token or the hospital's identity provider)
opens a session kept in Redis and carried by a cookie, so pages, images and the live stream
work without a token in any URL.

- The cookie holds only a random id (HttpOnly, SameSite=Lax, Secure over HTTPS); Redis keeps
  the SHA-256 of that id with the user, the role, a CSRF token and the session's times.
- A session ends after ``TRIAGE_SESSION_IDLE_MINUTES`` without a user action (background
  refreshes and the live stream do not count) and ``TRIAGE_SESSION_MAX_HOURS`` after signing
  in, whatever happens. Signing out deletes it at once.
- A session opened with a token lasts no longer than the token: revoking the token or its
  expiry ends the session at once (each request checks the token's record again).
- A locked session (the page's idle lock) serves nothing until the same user signs in again,
  which opens a new session.
- Requests that change something (POST, DELETE) with the cookie must carry the session's
  CSRF token (``X-CSRF-Token`` header or ``csrf_token`` form field) and, when the browser
  names one, an Origin of this site.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from datetime import datetime, timedelta

import redis.asyncio as aioredis
from pydantic import BaseModel

from triage.settings import Settings
from triage.tokens import Role, TokenRecord
from triage.worklist import KEY_PREFIX, utcnow

COOKIE = "triage_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
# Page requests that refresh data on their own (not a user action) say so with this header:
# they do not keep a session alive.
BACKGROUND_HEADER = "x-triage-background"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Session(BaseModel):
    owner: str
    role: Role
    token_id: str
    via: str  # "token" or "oidc"
    csrf: str
    created_at: datetime
    last_active: datetime
    locked: bool = False
    # Where the service token it was opened with is kept (its SHA-256, never the secret):
    # checked again on every request, so that revoking the token ends the session.
    token_field: str | None = None
    # When the credential it was opened with expires (a token's expiry, a JWT's exp).
    credential_expires_at: datetime | None = None

    def user(self) -> TokenRecord:
        return TokenRecord(id=self.token_id, owner=self.owner, role=self.role,
                           created_at=self.created_at)

    def expires_at(self, settings: Settings) -> datetime:
        ends = [self.last_active + timedelta(minutes=settings.session_idle_minutes),
                self.created_at + timedelta(hours=settings.session_max_hours)]
        if self.credential_expires_at is not None:
            ends.append(self.credential_expires_at)
        return min(ends)


def _key(session_id: str) -> str:
    return f"{KEY_PREFIX}:session:{hashlib.sha256(session_id.encode()).hexdigest()}"


# Changes one field of a stored session unless it is locked (or gone), keeping the key's
# expiry in step: a lock, a sign-out and an activity stamp racing each other never bring a
# session back or undo a lock. KEYS[1]: the session; ARGV: field, JSON value, seconds to live.
_SET_FIELD = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local session = cjson.decode(raw)
if session['locked'] then return 0 end
session[ARGV[1]] = cjson.decode(ARGV[2])
redis.call('SET', KEYS[1], cjson.encode(session), 'EX', tonumber(ARGV[3]))
return 1
"""


class Sessions:
    """Opens, reads, touches, locks and ends browser sessions (asyncio Redis)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def open(self, connection: aioredis.Redis, user: TokenRecord, via: str, *,
                   token_field: str | None = None,
                   credential_expires_at: datetime | None = None) -> str:
        """A new session for ``user``; returns the id the cookie carries."""
        session_id = secrets.token_urlsafe(32)
        now = utcnow()
        session = Session(owner=user.owner, role=user.role, token_id=user.id, via=via,
                          csrf=secrets.token_urlsafe(24), created_at=now, last_active=now,
                          token_field=token_field,
                          credential_expires_at=credential_expires_at or user.expires_at)
        await self._store(connection, session_id, session)
        return session_id

    async def get(self, connection: aioredis.Redis, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        raw = await connection.get(_key(session_id))
        if raw is None:
            return None
        session = Session.model_validate_json(raw)
        if session.expires_at(self.settings) <= utcnow():
            await connection.delete(_key(session_id))
            return None
        return session

    async def touch(self, connection: aioredis.Redis, session_id: str,
                    session: Session) -> None:
        """Record a user action: the idle time starts again."""
        now = utcnow()
        if (now - session.last_active).total_seconds() < 5:
            return  # a burst of requests from one action is one write
        touched = session.model_copy(update={"last_active": now})
        await self._set_field(connection, session_id, "last_active", now.isoformat(), touched)

    async def lock(self, connection: aioredis.Redis, session_id: str, session: Session) -> None:
        await self._set_field(connection, session_id, "locked", True, session)

    async def _set_field(self, connection: aioredis.Redis, session_id: str, name: str,
                         value: object, after: Session) -> None:
        seconds = max(1, int((after.expires_at(self.settings) - utcnow()).total_seconds()) + 1)
        await connection.eval(_SET_FIELD, 1, _key(session_id), name,  # type: ignore[misc]
                              json.dumps(value), str(seconds))

    async def end(self, connection: aioredis.Redis, session_id: str | None) -> None:
        if session_id:
            await connection.delete(_key(session_id))

    async def _store(self, connection: aioredis.Redis, session_id: str,
                     session: Session) -> None:
        ttl = session.expires_at(self.settings) - utcnow()
        seconds = max(1, int(ttl.total_seconds()) + 1)
        await connection.set(_key(session_id), session.model_dump_json(), ex=seconds)

    def secure(self, scheme: str) -> bool:
        """Whether the cookie is marked Secure."""
        if self.settings.cookie_secure is not None:
            return self.settings.cookie_secure
        public = self.settings.public_url or ""
        return public.startswith("https://") or scheme == "https"


def csrf_matches(session: Session, offered: str | None) -> bool:
    return bool(offered) and hmac.compare_digest(session.csrf.encode(), str(offered).encode())


def same_origin(origin: str | None, host: str | None, public_url: str | None) -> bool:
    """Whether a request's Origin header (when the browser sent one) is this site."""
    if origin is None:
        return True
    if origin == "null":
        return False
    allowed = set()
    if host:
        allowed |= {f"http://{host}", f"https://{host}"}
    if public_url:
        allowed.add(public_url.rstrip("/"))
    return origin.rstrip("/") in allowed
