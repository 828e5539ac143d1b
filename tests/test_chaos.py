"""Chaos: studies keep arriving while workers are killed, Redis and Orthanc restart.

At the end every study is in a terminal state, each analysed study has exactly one SR, and
Orthanc holds exactly the source instances that were sent: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.senders import storescu
from tests.studies import ct_studies
from tests.test_pipeline import our_srs
from triage.errors import TransientError
from triage.servers import ManagedProcess, wait_for_orthanc, wait_for_redis
from triage.uids import sr_series_uid
from triage.worklist import Worklist

pytestmark = [pytest.mark.servers, pytest.mark.chaos]
STUDIES = 120
BATCH = 10
WORKERS = 2


def triage_process(servers: Servers, command: str, log: Path) -> ManagedProcess:
    process = ManagedProcess(command, [sys.executable, "-m", "triage.cli", command], log,
                             env=servers.env)
    process.start()
    return process


def send_all(servers: Servers, studies: list[list[Path]], done: threading.Event) -> None:
    """Send in batches, as a modality would: a refused association is tried again."""
    for start in range(0, len(studies), BATCH):
        files = [p for s in studies[start:start + BATCH] for p in s]
        for _attempt in range(60):
            try:
                storescu(servers.settings, files)
                break
            except subprocess.CalledProcessError:
                time.sleep(1)
        time.sleep(0.3)
    done.set()


def source_instances(servers: Servers) -> int:
    count = 0
    for study in servers.orthanc.studies():
        uid = servers.orthanc.study(study)["MainDicomTags"]["StudyInstanceUID"]
        for series in servers.orthanc.study_series(study):
            if series["MainDicomTags"]["SeriesInstanceUID"] != str(sr_series_uid(uid)):
                count += len(series["Instances"])
    return count


def test_nothing_lost_or_duplicated_under_chaos(clean_servers: Servers, tmp_path: Path) -> None:
    servers = clean_servers
    studies = ct_studies(tmp_path, STUDIES, tag="chaos")
    rng = random.Random(7)
    logs = tmp_path / "logs"
    apps = [triage_process(servers, "watcher", logs / "watcher.log")]
    apps += [triage_process(servers, "worker", logs / f"worker-{n}.log") for n in range(WORKERS)]
    sent = threading.Event()
    sender = threading.Thread(target=send_all, args=(servers, studies, sent), daemon=True)
    sender.start()
    kills = 0
    redis_restarted = orthanc_restarted = False
    started = time.monotonic()
    try:
        while not sent.is_set() or time.monotonic() - started < 20:
            time.sleep(1.5)
            victim = rng.choice(apps[1:])
            victim.signal(signal.SIGKILL)
            kills += 1
            elapsed = time.monotonic() - started
            if not redis_restarted and elapsed > 5:
                servers.redis_process.stop()  # a clean restart: the AOF keeps everything
                servers.redis_process.start()
                wait_for_redis(servers.settings, servers.redis_process)
                redis_restarted = True
            elif not orthanc_restarted and elapsed > 10:
                servers.orthanc_process.stop()
                servers.orthanc_process.start()
                wait_for_orthanc(servers.settings, servers.orthanc_process)
                orthanc_restarted = True
            for process in apps:  # the supervisor's job: restart what died
                if not process.alive():
                    process.start()
        assert redis_restarted and orthanc_restarted and kills >= 5

        worklist = Worklist(servers.redis)

        def all_terminal() -> bool:
            try:
                items, total = worklist.page(1000)
            except TransientError:
                return False
            return total == STUDIES and all(i.status.terminal for i in items)

        try:
            servers.wait_until(all_terminal, timeout=240, what="every study terminal")
        except AssertionError as exc:
            items, total = worklist.page(1000)
            states = Counter((i.status.value, i.status_reason) for i in items)
            raise AssertionError(f"{exc}: {total} studies, {dict(states)}") from exc
    finally:
        for process in apps:
            process.stop()

    items, total = Worklist(servers.redis).page(1000)
    assert total == STUDIES
    assert all(i.status.terminal for i in items)
    analysed = [i for i in items if i.status.value == "analysed"]
    assert len(analysed) == STUDIES, Counter((i.status.value, i.status_reason) for i in items)
    duplicates = [i.patient_id for i in analysed if len(our_srs(servers, i)) != 1]
    assert duplicates == []
    assert source_instances(servers) == STUDIES
