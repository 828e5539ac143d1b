"""Worklist requests against the API (``triage api``, uvicorn) from concurrent asyncio clients."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import httpx

from triage.priority import PriorityClass
from triage.worklist import StudyStatus, Worklist, WorklistItem, utcnow

WORKLIST_PATH = "/api/v1/worklist"


def index_studies(worklist: Worklist, target: int) -> int:
    """Put items with ``Worklist.put`` until the worklist holds ``target`` studies; returns
    how many were added. Classes, statuses and modalities are mixed as on a real list."""
    have = int(worklist.redis.zcard("triage:worklist"))
    now = utcnow()
    classes = (PriorityClass.ROUTINE,) * 8 + (PriorityClass.URGENT,) * 2 + (
        PriorityClass.CRITICAL,)
    statuses = (StudyStatus.ANALYSED,) * 6 + (StudyStatus.QUEUED, StudyStatus.SKIPPED)
    added = 0
    for n in range(max(0, target - have)):
        priority = classes[n % len(classes)]
        worklist.put(WorklistItem(
            study_instance_uid=f"2.25.{uuid.uuid4().int}", orthanc_id=uuid.uuid4().hex,
            accession_number=f"BL{n:08d}", patient_name=f"LOAD^{n}", patient_id=f"L{n}",
            modality=("CT", "CR", "MR", "DX")[n % 4], study_description="LOAD TEST",
            status=statuses[n % len(statuses)], clinical_priority=PriorityClass.ROUTINE,
            priority=priority, received_at=now - timedelta(seconds=n * 7),
        ))
        added += 1
    return added


async def _client(http: httpx.AsyncClient, deadline: float, think: float,
                  latencies: list[float], errors: list[str]) -> None:
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            response = await http.get(WORKLIST_PATH)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}")
            else:
                response.json()
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)
        latencies.append(time.perf_counter() - started)
        if think:
            await asyncio.sleep(max(0.0, think - (time.perf_counter() - started)))


async def _load(base_url: str, token: str, clients: int, seconds: float,
                think: float) -> dict[str, object]:
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30.0,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        warm: list[float] = []
        await _client(http, time.perf_counter() + 1.0, 0.0, warm, errors)
        errors.clear()
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(_client(http, deadline, think, latencies, errors)
                               for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "seconds": elapsed}


def run_load(base_url: str, token: str, *, clients: int, seconds: float,
             think: float = 0.0) -> dict[str, object]:
    """``clients`` concurrent clients requesting the worklist (first page, default size) for
    ``seconds``; each waits ``think`` seconds between the starts of its requests (0: back to
    back). Returns every latency, the errors and the elapsed time."""
    return asyncio.run(_load(base_url, token, clients, seconds, think))
