"""The audit trail under concurrent writers: many threads (``record``) and the API's asyncio
group commit, one intact chain, each caller its own record."""

from __future__ import annotations

import asyncio
import threading

import pytest
from pydantic_core import PydanticSerializationError

from tests.conftest import Servers
from triage.api.deps import LoopRedis
from triage.audit import AsyncAuditWriter, AuditAction, record, records, verify

pytestmark = pytest.mark.servers


def test_concurrent_records_form_one_intact_chain(clean_servers: Servers) -> None:
    written: list[tuple[str, int]] = []
    lock = threading.Lock()

    def view(n: int) -> None:
        for k in range(20):
            entry = record(clean_servers.redis, actor=f"user-{n}", role="radiologist",
                           source="127.0.0.1", action=AuditAction.WORKLIST_VIEWED,
                           details={"k": k})
            assert entry.actor == f"user-{n}" and entry.details == {"k": k}
            with lock:
                written.append((entry.actor, entry.seq))

    # Another process's writer (a worker) appends at the same time.
    def worker() -> None:
        for _ in range(20):
            record(clean_servers.redis, actor="worker", source="host:1",
                   action=AuditAction.RESULT_PRODUCED)

    threads = [threading.Thread(target=view, args=(n,)) for n in range(16)]
    threads.append(threading.Thread(target=worker))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    result = verify(clean_servers.redis)
    assert result.ok, result.problem
    assert result.records == 16 * 20 + 20
    assert len({seq for _, seq in written}) == len(written) == 16 * 20  # one record each
    stored = [raw for _, raw in records(clean_servers.redis)]
    assert len(stored) == result.records


def test_a_failed_append_is_raised_to_its_caller(clean_servers: Servers) -> None:
    writer = AsyncAuditWriter(LoopRedis(clean_servers.settings.redis_connection_url))

    async def appends() -> int:
        with pytest.raises(PydanticSerializationError):
            await writer.record(actor="x", source="y", action=AuditAction.WORKLIST_VIEWED,
                                details={"not json": object()})
        # The writer carries on.
        entry = await writer.record(actor="x", source="y",
                                    action=AuditAction.WORKLIST_VIEWED)
        return entry.seq

    assert asyncio.run(appends()) >= 1
    assert verify(clean_servers.redis).ok


def test_concurrent_async_records_form_one_intact_chain(clean_servers: Servers) -> None:
    writer = AsyncAuditWriter(LoopRedis(clean_servers.settings.redis_connection_url))

    async def views() -> list[int]:
        async def one(n: int) -> int:
            entry = await writer.record(actor=f"user-{n}", source="127.0.0.1",
                                        action=AuditAction.WORKLIST_VIEWED, details={"n": n})
            assert entry.details == {"n": n}
            return entry.seq

        return await asyncio.gather(*(one(n) for n in range(200)))

    seqs = asyncio.run(views())
    assert sorted(seqs) == list(range(1, 201))  # each caller got its own record
    result = verify(clean_servers.redis)
    assert result.ok and result.records == 200
