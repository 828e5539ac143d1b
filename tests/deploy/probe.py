"""Reads the stack's state from inside the api container, where Orthanc's REST API and Redis
are reachable (neither is published): `python - QUERY < probe.py` prints one JSON document.

  lease      the watcher lease's value and the watcher cursor
  worklist   every worklist item: study, status, priority, job
  queues     the job ids on each RQ queue, in order
  workers    each registered RQ worker's hostname and current job
  progress   the workers and the studies not yet terminal, read together
  srs        per Study Instance UID in Orthanc: its number of SR instances
  cursor     the watcher cursor, one line every 50 ms, until killed
"""

from __future__ import annotations

import json
import sys
import time

import httpx
import redis
import rq

from triage.lease import LEASE_KEY
from triage.queues import QueueName
from triage.settings import Settings
from triage.watcher import CURSOR_KEY
from triage.worklist import Worklist

settings = Settings()
connection = redis.Redis.from_url(settings.redis_connection_url)


def lease() -> dict[str, object]:
    raw = connection.get(LEASE_KEY)
    return {"holder": raw.decode() if raw else None,
            "cursor": int(connection.get(CURSOR_KEY) or 0)}


def worklist() -> list[dict[str, object]]:
    items, _total = Worklist(connection).page(10_000)
    return [{"study": i.study_instance_uid, "status": i.status.value,
             "priority": i.priority.value, "job": i.job_id, "orthanc_id": i.orthanc_id}
            for i in items]


def queues() -> dict[str, list[str]]:
    return {q.value: [raw.decode() for raw in connection.lrange(f"rq:queue:{q.value}", 0, -1)]
            for q in QueueName}


def workers() -> list[dict[str, object]]:
    return [{"hostname": w.hostname, "name": w.name, "job": w.get_current_job_id()}
            for w in rq.Worker.all(connection=connection)]


def progress() -> dict[str, object]:
    """The workers and the studies not yet in a terminal status, read together (one exec),
    so that a test can act while a batch is still under way."""
    items, _total = Worklist(connection).page(10_000)
    return {"workers": workers(),
            "pending": [i.study_instance_uid for i in items if not i.status.terminal]}


def srs() -> dict[str, int]:
    auth = (settings.orthanc_username, settings.orthanc_secret or "")
    counts: dict[str, int] = {}
    with httpx.Client(base_url=settings.orthanc_base_url, auth=auth, timeout=30) as orthanc:
        for study in orthanc.get("/studies", params={"expand": ""}).json():
            uid = study["MainDicomTags"]["StudyInstanceUID"]
            series = orthanc.get(f"/studies/{study['ID']}/series",
                                 params={"expand": ""}).json()
            counts[uid] = sum(len(s["Instances"]) for s in series
                              if s["MainDicomTags"].get("Modality") == "SR")
    return counts


def cursor() -> None:
    while True:
        try:
            print(int(connection.get(CURSOR_KEY) or 0), flush=True)
        except redis.RedisError as error:  # a sample lost, not the sampler
            print(f"unread: {type(error).__name__}", file=sys.stderr, flush=True)
        time.sleep(0.05)


QUERIES = {"lease": lease, "worklist": worklist, "queues": queues, "workers": workers,
           "progress": progress, "srs": srs}

if __name__ == "__main__":
    if sys.argv[1] == "cursor":
        cursor()
    print(json.dumps(QUERIES[sys.argv[1]]()))
