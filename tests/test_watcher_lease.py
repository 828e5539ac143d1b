"""Two watchers and a lease: the standby takes over when the leader dies, and a leader that
was paused past its lease writes nothing when it wakes up.

The lease unit tests run against the real Redis; the handover tests run two real
``triage watcher`` processes against the real Orthanc and Redis, with a 2 s lease.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.client import Pipeline

from tests.conftest import Servers
from tests.senders import storescu
from tests.studies import ct_studies
from triage.lease import LEASE_KEY, Lease, LeaseLost
from triage.priority import PriorityClass
from triage.queues import QueueName, enqueue_analysis
from triage.servers import ManagedProcess
from triage.watcher import CURSOR_KEY
from triage.worklist import StudyStatus, Worklist, WorklistItem, utcnow

pytestmark = pytest.mark.servers
LEASE_SECONDS = 2.0
# A standby checks the lease every third of its time; process start-up and scheduling.
TAKEOVER_MARGIN = 2.0


# --- the lease itself -----------------------------------------------------------------------

def test_acquire_renew_and_release(clean_servers: Servers) -> None:
    first = Lease(clean_servers.redis, seconds=5, holder="a")
    second = Lease(clean_servers.redis, seconds=5, holder="b")
    assert first.acquire_or_renew() and first.held
    token = first.token
    assert not second.acquire_or_renew() and not second.held
    assert first.acquire_or_renew() and first.token == token  # a renewal keeps the token
    first.release()
    assert not first.held
    assert second.acquire_or_renew() and second.token is not None and token is not None
    assert second.token > token


def test_a_lost_lease_fences_every_write(clean_servers: Servers) -> None:
    connection = clean_servers.redis
    old = Lease(connection, seconds=0.3, holder="old")
    new = Lease(connection, seconds=5, holder="new")
    assert old.acquire_or_renew()
    assert old.set_max(CURSOR_KEY, 10)
    time.sleep(0.4)  # "paused" past its lease
    assert new.acquire_or_renew()
    stale = old.value
    assert stale is not None and stale != new.value

    def believing() -> Lease:
        """The old holder as it wakes up, still believing its lease (its clock did not
        tell it yet): only Redis can refuse its writes."""
        old.value, old._valid_until = stale, time.monotonic() + 5
        return old

    with pytest.raises(LeaseLost):
        believing().set_max(CURSOR_KEY, 20)
    with pytest.raises(LeaseLost):
        believing().write(lambda pipe: pipe.set("triage:test:fenced", "1"))
    with pytest.raises(LeaseLost):
        Worklist(believing().fenced_connection()).put(_any_item())
    with pytest.raises(LeaseLost):
        believing().check()

    def enqueue(pipe: Pipeline) -> None:  # as the watcher queues a study
        pipe.multi()
        enqueue_analysis(connection, clean_servers.settings, queue=QueueName.DEFAULT,
                         job_id="stale-job", orthanc_id="o", study_instance_uid="1.2.3",
                         inputs="i", pipeline=pipe)

    with pytest.raises(LeaseLost):
        believing().transaction(enqueue)
    assert connection.llen("rq:queue:default") == 0 and not connection.exists(
        "rq:job:stale-job")
    assert not old.held  # each refusal makes it forget the lease
    assert connection.get("triage:test:fenced") is None
    assert Worklist(connection).page()[1] == 0
    assert int(connection.get(CURSOR_KEY) or 0) == 10
    assert not old.acquire_or_renew()  # it cannot renew what it lost


def test_the_cursor_never_goes_down(clean_servers: Servers) -> None:
    lease = Lease(clean_servers.redis, seconds=5, holder="a")
    assert lease.acquire_or_renew()
    assert lease.set_max(CURSOR_KEY, 7)
    assert not lease.set_max(CURSOR_KEY, 5)
    assert int(clean_servers.redis.get(CURSOR_KEY) or 0) == 7
    assert lease.set_max(CURSOR_KEY, 0, allow_lower=True)  # Orthanc's log restarted


def test_a_transaction_is_refused_when_the_lease_expires_before_exec(
        clean_servers: Servers) -> None:
    lease = Lease(clean_servers.redis, seconds=0.2, holder="a")
    assert lease.acquire_or_renew()

    def slow(pipe: redis.client.Pipeline) -> None:
        time.sleep(0.3)  # the lease runs out between WATCH and EXEC
        pipe.multi()
        pipe.set("triage:test:fenced", "1")

    lease._valid_until = time.monotonic() + 5
    with pytest.raises(LeaseLost):
        lease.transaction(slow)
    assert clean_servers.redis.get("triage:test:fenced") is None


def _any_item() -> WorklistItem:
    return WorklistItem(study_instance_uid="1.2.3", orthanc_id="x", received_at=utcnow(),
                        status=StudyStatus.QUEUED, priority=PriorityClass.ROUTINE,
                        clinical_priority=PriorityClass.ROUTINE)


# --- two watcher processes ------------------------------------------------------------------

class Watchers:
    def __init__(self, servers: Servers, log_dir: Path) -> None:
        env = {**servers.env, "TRIAGE_WATCHER_LEASE_SECONDS": str(LEASE_SECONDS)}
        self.servers = servers
        self.processes = {
            name: ManagedProcess(name, [sys.executable, "-m", "triage.cli", "watcher",
                                        "--name", name], log_dir / f"{name}.log", env=env)
            for name in ("watcher-a", "watcher-b")}

    def start(self) -> None:
        for process in self.processes.values():
            process.start()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.alive():
                process.signal(signal.SIGCONT)
            process.stop()

    def holder(self) -> str | None:
        raw = self.servers.redis.get(LEASE_KEY)
        return raw.decode().split("@", 1)[0] if raw else None

    def wait_leader(self, other_than: str | None = None, timeout: float = 15) -> str:
        self.servers.wait_until(lambda: self.holder() not in (None, other_than),
                                timeout=timeout, what="a leading watcher")
        leader = self.holder()
        assert leader is not None
        log = self.processes[leader].log_path
        self.servers.wait_until(lambda: f"leading (watcher {leader}@" in log.read_text(),
                                timeout=5, what=f"{leader} leading")
        return leader


@pytest.fixture
def watchers(clean_servers: Servers, tmp_path: Path) -> Iterator[Watchers]:
    running = Watchers(clean_servers, tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _queued_once(servers: Servers, n_studies: int) -> None:
    """Every study is on the worklist with one job, and that job is on a queue once."""
    items, total = Worklist(servers.redis).page(1000)
    assert total == n_studies
    on_queues = Counter(raw.decode() for name in QueueName
                        for raw in servers.redis.lrange(f"rq:queue:{name.value}", 0, -1))
    assert sorted(on_queues) == sorted(i.job_id for i in items)
    assert set(on_queues.values()) == {1}, on_queues


def test_standby_takes_over_when_the_leader_is_killed(
        watchers: Watchers, tmp_path: Path) -> None:
    servers = watchers.servers
    worklist = Worklist(servers.redis)
    studies = ct_studies(tmp_path, 4, tag="lease-kill")
    leader = watchers.wait_leader()
    storescu(servers.settings, studies[0])
    servers.wait_until(lambda: worklist.page()[1] == 1, timeout=10, what="first study queued")

    watchers.processes[leader].signal(signal.SIGKILL)
    killed = time.monotonic()
    storescu(servers.settings, [p for s in studies[1:] for p in s])
    successor = watchers.wait_leader(other_than=leader,
                                     timeout=LEASE_SECONDS + TAKEOVER_MARGIN + 2)
    assert time.monotonic() - killed < LEASE_SECONDS + TAKEOVER_MARGIN
    assert successor != leader
    servers.wait_until(lambda: worklist.page()[1] == len(studies), timeout=15,
                       what="the studies sent after the kill queued")
    time.sleep(servers.settings.stable_age + 1.5)  # Orthanc's own announcements come too
    _queued_once(servers, len(studies))


def test_a_paused_leader_steps_down_without_writing(
        watchers: Watchers, tmp_path: Path) -> None:
    servers = watchers.servers
    worklist = Worklist(servers.redis)
    studies = ct_studies(tmp_path, 6, tag="lease-pause")
    leader = watchers.wait_leader()
    cursors: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        sampler = redis.Redis.from_url(servers.settings.redis_connection_url)
        while not sampling.is_set():
            cursors.append(int(sampler.get(CURSOR_KEY) or 0))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        storescu(servers.settings, [p for s in studies[:3] for p in s])
        # Paused with the arrivals noted and the studies not yet complete.
        time.sleep(0.5)
        watchers.processes[leader].signal(signal.SIGSTOP)
        successor = watchers.wait_leader(other_than=leader,
                                         timeout=LEASE_SECONDS + TAKEOVER_MARGIN + 2)
        storescu(servers.settings, [p for s in studies[3:] for p in s])
        servers.wait_until(lambda: worklist.page()[1] == len(studies), timeout=20,
                           what="every study queued by the new leader")
        watchers.processes[leader].signal(signal.SIGCONT)
        log = watchers.processes[leader].log_path
        servers.wait_until(lambda: "standby (watcher" in log.read_text(), timeout=10,
                           what="the old leader stepping down")
        time.sleep(servers.settings.stable_age + 1.5)
        assert watchers.holder() == successor
        assert watchers.processes[leader].alive()
    finally:
        sampling.set()
        thread.join(5)
    _queued_once(servers, len(studies))
    assert cursors and all(a <= b for a, b in zip(cursors, cursors[1:], strict=False)), \
        "the stored cursor went down"
    assert cursors[-1] == servers.orthanc.last_change() or cursors[-1] > 0
