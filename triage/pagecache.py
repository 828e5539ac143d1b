"""Worklist pages as the API sends them (JSON), reused until the worklist changes.

Every radiologist's list asks for the same few pages, many times a minute, while the worklist
changes a few times a minute. Each page is therefore built once per worklist version (items
read back and validated, then encoded) and served from memory until any item changes. A
request costs one Redis round trip, made without blocking the API's event loop: the
worklist's version and whether any claim has expired (which a fresh query would release).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from triage.worklist import (
    CLAIMS_KEY,
    EPOCH_KEY,
    VERSION_KEY,
    Worklist,
    WorklistQuery,
    utcnow,
    version_token,
)

DEFAULT_PAGES = 256


@dataclass(frozen=True)
class EncodedPage:
    """A worklist page (``WorklistPage`` as JSON) and how many items it shows."""

    body: bytes
    shown: int


class PageCache:
    """The last ``size`` pages asked for, each valid for the worklist version it was built
    at. Used from one event loop; pages are built in threads, with the synchronous client."""

    def __init__(self, worklist: Worklist, connection: Callable[[], aioredis.Redis],
                 size: int = DEFAULT_PAGES) -> None:
        self.worklist = worklist
        self.connection = connection  # the client of the running event loop
        self.size = size
        self._pages: OrderedDict[tuple[str, int, int], tuple[str, EncodedPage]] = OrderedDict()
        # Builds under way: requests that miss on the same page and version wait for the one
        # build rather than each read and encode the page again (a change invalidates every
        # page while dozens of requests are in flight).
        self._building: dict[tuple[tuple[str, int, int], str | None],
                             asyncio.Future[EncodedPage]] = {}
        self.hits = 0
        self.builds = 0

    async def get(self, query: WorklistQuery, *, limit: int, offset: int) -> EncodedPage:
        """The page of ``query`` as JSON, built now or at the current worklist version."""
        key = (query.model_dump_json(), limit, offset)
        # Read before the page is built: a change in between leaves the page tagged with the
        # older version, so the next request builds it again rather than keep a stale one.
        version = await self._version()
        cached = self._pages.get(key)
        if cached is not None and version is not None and cached[0] == version:
            self._pages.move_to_end(key)
            self.hits += 1
            return cached[1]
        pending = self._building.get((key, version))
        if pending is not None:
            return await asyncio.shield(pending)
        build = asyncio.ensure_future(run_in_threadpool(self._build, query, limit, offset))
        self._building[(key, version)] = build
        try:
            encoded = await asyncio.shield(build)
        finally:
            if self._building.get((key, version)) is build:
                del self._building[(key, version)]
        if version is not None:
            self._pages[key] = (version, encoded)
            self._pages.move_to_end(key)
            while len(self._pages) > self.size:
                self._pages.popitem(last=False)
        return encoded

    async def _version(self) -> str | None:
        now = utcnow()
        async with self.connection().pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(CLAIMS_KEY, 0, now.timestamp(), start=0, num=1)
            pipe.mget([EPOCH_KEY, VERSION_KEY])
            expired, (epoch, version) = await pipe.execute()
        if expired:  # released (a change) and read again, as a fresh query would
            return await run_in_threadpool(self.worklist.version, now)
        return version_token(epoch, version)

    def _build(self, query: WorklistQuery, limit: int, offset: int) -> EncodedPage:
        self.builds += 1
        page = self.worklist.query(query, limit=limit, offset=offset)
        return EncodedPage(body=page.model_dump_json().encode(), shown=len(page.items))
