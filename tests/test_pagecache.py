"""Worklist pages served from memory: the same answer as a fresh query, at every change."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Servers
from tests.test_api import auth, make_item
from triage.api.app import create_app
from triage.api.deps import LoopRedis
from triage.pagecache import PageCache
from triage.priority import PriorityClass
from triage.worklist import StudyStatus, Worklist, WorklistQuery, utcnow

pytestmark = pytest.mark.servers


def _fresh(worklist: Worklist, query: WorklistQuery, limit: int = 100,
           offset: int = 0) -> dict:
    return json.loads(worklist.query(query, limit=limit, offset=offset).model_dump_json())


def _run(servers: Servers, check: Callable[[PageCache], Awaitable[Any]]) -> None:
    """Run ``check`` with a page cache on one event loop, as the API does."""
    cache = PageCache(Worklist(servers.redis),
                      LoopRedis(servers.settings.redis_connection_url))
    asyncio.run(check(cache))


def test_cached_pages_are_the_fresh_answer_after_every_change(clean_servers: Servers) -> None:
    worklist = Worklist(clean_servers.redis)
    for n in range(30):
        worklist.put(make_item(n, (PriorityClass.ROUTINE, PriorityClass.CRITICAL)[n % 2], n))
    _run(clean_servers, lambda cache: _pages_follow_changes(cache, worklist))


async def _pages_follow_changes(cache: PageCache, worklist: Worklist) -> None:
    queries = [(WorklistQuery(), 10, 0), (WorklistQuery(), 10, 10),
               (WorklistQuery(priority=PriorityClass.CRITICAL), 5, 0),
               (WorklistQuery(status=StudyStatus.ANALYSED, modality="CT"), 100, 0)]
    for query, limit, offset in queries:
        page = await cache.get(query, limit=limit, offset=offset)
        assert json.loads(page.body) == _fresh(worklist, query, limit, offset)
        assert page.shown == len(json.loads(page.body)["items"])
        assert await cache.get(query, limit=limit, offset=offset) is page  # from memory
    hits = cache.hits

    # Any change to any item is seen by the very next request.
    worklist.update("1.2.3.4", lambda item: item.model_copy(update={
        "priority": PriorityClass.CRITICAL, "status": StudyStatus.FAILED}))
    for query, limit, offset in queries:
        page = await cache.get(query, limit=limit, offset=offset)
        assert json.loads(page.body) == _fresh(worklist, query, limit, offset)
    assert cache.hits == hits

    # A claim that expired is released as a fresh query would release it.
    expired = utcnow() - timedelta(seconds=1)
    worklist.update("1.2.3.1", lambda item: item.model_copy(update={
        "claimed_by": "dr-a", "claim_expires_at": expired}))
    body = json.loads((await cache.get(WorklistQuery(), limit=100, offset=0)).body)
    [item] = [i for i in body["items"] if i["study_instance_uid"] == "1.2.3.1"]
    assert item["claimed_by"] is None


def test_an_emptied_redis_never_serves_an_old_page(clean_servers: Servers) -> None:
    """Version numbers count again from 1 after Redis is emptied; the epoch tells them apart."""
    worklist = Worklist(clean_servers.redis)
    worklist.put(make_item(1, PriorityClass.ROUTINE, 1))

    async def check(cache: PageCache) -> None:
        before = await cache.get(WorklistQuery(), limit=10, offset=0)
        version = worklist.version(utcnow())
        clean_servers.redis.flushall()
        assert worklist.version(utcnow()) is None
        worklist.put(make_item(2, PriorityClass.ROUTINE, 1))  # version 1 again
        assert worklist.version(utcnow()) != version
        after = json.loads((await cache.get(WorklistQuery(), limit=10, offset=0)).body)
        assert after != json.loads(before.body)
        assert [i["study_instance_uid"] for i in after["items"]] == ["1.2.3.2"]

    _run(clean_servers, check)


def test_the_worklist_route_answers_the_page_and_audits_each_view(
        clean_servers: Servers) -> None:
    from triage.audit import records, verify

    worklist = Worklist(clean_servers.redis)
    for n in range(5):
        worklist.put(make_item(n, PriorityClass.ROUTINE, n))
    client = TestClient(create_app(clean_servers.settings))
    headers = auth(clean_servers)
    answers = [client.get("/api/v1/worklist?limit=3", headers=headers) for _ in range(3)]
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == _fresh(worklist, WorklistQuery(), limit=3)
    viewed = [json.loads(raw) for _, raw in records(clean_servers.redis)
              if json.loads(raw)["action"] == "worklist.viewed"]
    assert len(viewed) == 3 and all(v["details"]["shown"] == 3 for v in viewed)
    assert verify(clean_servers.redis).ok


def test_concurrent_requests_share_one_build(clean_servers: Servers) -> None:
    worklist = Worklist(clean_servers.redis)
    for n in range(30):
        worklist.put(make_item(n, PriorityClass.ROUTINE, n))

    async def check(cache: PageCache) -> None:
        async def twenty() -> list[Any]:
            return await asyncio.gather(*(cache.get(WorklistQuery(), limit=20, offset=0)
                                          for _ in range(20)))

        first = await twenty()
        assert cache.builds == 1 and all(page is first[0] for page in first)
        worklist.update("1.2.3.3", lambda item: item.model_copy(update={"score": 0.5}))
        second = await twenty()
        assert cache.builds == 2 and all(page is second[0] for page in second)
        assert json.loads(second[0].body) == _fresh(worklist, WorklistQuery(), limit=20)

    _run(clean_servers, check)
