"""Failures end visibly and can be retried; a killed worker's study is analysed again; a
study Orthanc forgot across a restart is still queued."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.conftest import Servers
from tests.senders import storescu
from tests.test_api import auth
from tests.test_pipeline import our_srs, watch_until, write_study
from triage import jobs
from triage.api.app import create_app
from triage.recovery import ALIVE_TTL_SECONDS
from triage.servers import ManagedProcess
from triage.settings import PROJECT_ROOT
from triage.tokens import Role
from triage.uids import derived_uid
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist, utcnow

pytestmark = pytest.mark.servers
HEAD_CT = PROJECT_ROOT / "models" / "head-ct-hyperdensity"


def use_models(models: Path) -> None:
    os.environ["TRIAGE_MODELS_DIR"] = str(models)
    jobs.context.cache_clear()


@pytest.fixture
def broken_model(tmp_path: Path, clean_servers: Servers):
    """A package whose weights match but whose manifest names an input the graph lacks."""
    models = tmp_path / "models"
    shutil.copytree(HEAD_CT, models / "head-ct-hyperdensity")
    manifest_path = models / "head-ct-hyperdensity" / "manifest.yaml"
    good = manifest_path.read_text()
    manifest = yaml.safe_load(good)
    manifest["preprocessing"]["input"] = "no-such-input"
    manifest_path.write_text(yaml.safe_dump(manifest))
    use_models(models)
    yield manifest_path, good
    del os.environ["TRIAGE_MODELS_DIR"]
    jobs.context.cache_clear()


def test_failed_jobs_are_listed_and_requeued_by_an_admin(
        clean_servers: Servers, broken_model: tuple[Path, str], tmp_path: Path) -> None:
    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path / "s", "head-ct-normal"))
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
    run_worker(burst=True)
    [item] = Worklist(servers.redis).page()[0]
    assert item.status is StudyStatus.FAILED
    # Radiologists read a sentence; the technical cause is for admins.
    assert item.status_reason.startswith("a model could not run on this study")
    assert "Error" not in item.status_reason and "no-such-input" not in item.status_reason

    client = TestClient(create_app(servers.settings))
    admin = auth(servers, Role.ADMIN)
    assert client.get("/api/v1/admin/jobs/failed",
                      headers=auth(servers, Role.RADIOLOGIST)).status_code == 403
    [failed] = client.get("/api/v1/admin/jobs/failed", headers=admin).json()
    assert failed["study_instance_uid"] == item.study_instance_uid
    assert "ModelPackageError" in failed["error"]
    assert "no model input no-such-input" in failed["error"]
    depths = {q["name"]: q for q in client.get("/api/v1/admin/queues", headers=admin).json()}
    assert depths["default"]["failed"] == 1 and depths["default"]["queued"] == 0

    manifest_path, good = broken_model
    manifest_path.write_text(good)  # the admin fixes the package, restarts the workers...
    jobs.context.cache_clear()
    requeued = client.post(f"/api/v1/admin/jobs/{failed['job_id']}/requeue", headers=admin)
    assert requeued.status_code == 200
    after = Worklist(servers.redis).get(item.study_instance_uid)
    assert after is not None and after.status is StudyStatus.QUEUED
    assert after.status_reason == "requeued by test-admin"
    run_worker(burst=True)
    done = Worklist(servers.redis).get(item.study_instance_uid)
    assert done is not None and done.status is StudyStatus.ANALYSED
    assert client.get("/api/v1/admin/jobs/failed", headers=admin).json() == []
    assert client.post("/api/v1/admin/jobs/nope/requeue", headers=admin).status_code == 404


def big_head_ct(directory: Path, slices: int) -> list[Path]:
    """A head CT of ``slices`` real 512 x 512 slices: long enough to be killed mid-analysis."""
    from triage.samples import SAMPLES, build_sample

    sample = next(s for s in SAMPLES if s.key == "head-ct-normal")
    paths = []
    directory.mkdir(parents=True, exist_ok=True)
    template = list(build_sample(sample))[0]
    for n in range(slices):
        template.SOPInstanceUID = derived_uid("big-ct", str(n))
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.StudyInstanceUID = derived_uid("big-ct-study")
        template.SeriesInstanceUID = derived_uid("big-ct-series")
        template.InstanceNumber = n + 1
        template.ImagePositionPatient = [0, 0, n * 1.0]
        path = directory / f"{n:04d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_a_sigkilled_worker_study_is_analysed_again(clean_servers: Servers,
                                                    tmp_path: Path) -> None:
    servers = clean_servers
    storescu(servers.settings, big_head_ct(tmp_path / "big", 400))
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    watch_until(servers, watcher, 1)
    worklist = Worklist(servers.redis)
    env = {**servers.env, "TRIAGE_FETCH_THREADS": "1"}
    worker = ManagedProcess("worker", [sys.executable, "-m", "triage.cli", "worker"],
                            tmp_path / "worker.log", env=env)
    worker.start()
    try:
        servers.wait_until(lambda: worklist.page()[0][0].status is StudyStatus.ANALYSING,
                           what="analysis started")
        worker.signal(signal.SIGKILL)
        worker.stop()
        assert worklist.page()[0][0].status is StudyStatus.ANALYSING  # killed mid-study
        # Nothing can be said of a dead worker until its heartbeat lapses.
        assert watcher.maintain(utcnow()) is None and _queued(servers) == 0
        time.sleep(ALIVE_TTL_SECONDS + 1)
        watcher.maintain(utcnow())
        assert _queued(servers) == 1
        assert worklist.page()[0][0].status is StudyStatus.QUEUED
    finally:
        worker.stop()
    run_worker(burst=True)
    [item] = worklist.page()[0]
    assert item.status is StudyStatus.ANALYSED and item.analysis_runs == 2
    assert len(our_srs(servers, item)) == 1


def _queued(servers: Servers) -> int:
    from triage.queues import queues

    return sum(q.count for q in queues(servers.redis))


def _crash_orthanc(servers: Servers) -> None:
    servers.orthanc_process.signal(signal.SIGKILL)
    servers.orthanc_process.stop()
    servers.orthanc_process.start()
    servers.wait_until(lambda: _reachable(servers), what="Orthanc back")


def test_study_orthanc_forgot_is_queued_by_the_watchers_own_clock(clean_servers: Servers,
                                                                   tmp_path: Path) -> None:
    """The watcher times completeness from the arrivals it saw, not from Orthanc's
    announcement: a study Orthanc forgot in a crash is queued at its stable age."""
    servers = clean_servers
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    storescu(servers.settings, write_study(tmp_path / "s", "head-ct-normal"))
    assert watcher.poll_once() == 0  # the arrivals are seen; the stable age has not passed
    _crash_orthanc(servers)  # within the stable age: Orthanc will never announce the study
    servers.wait_until(lambda: watcher.poll_once() == 1, timeout=servers.settings.stable_age + 5,
                       what="the study queued by the watcher's clock")
    [item] = Worklist(servers.redis).page()[0]
    assert item.status is StudyStatus.QUEUED
    assert watcher.poll_once() == 0  # queued once


def test_study_orthanc_forgot_across_a_restart_of_both_is_queued(clean_servers: Servers,
                                                                  tmp_path: Path) -> None:
    servers = clean_servers
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    storescu(servers.settings, write_study(tmp_path / "s", "head-ct-normal"))
    watcher.poll_once()  # sees the new study; Orthanc has not called it stable yet
    _crash_orthanc(servers)  # Orthanc crashes within the stable age...
    # ...and the watcher restarts too (the server rebooted): the arrivals it saw are gone.
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    time.sleep(servers.settings.stable_age + 1)
    assert watcher.poll_once() == 0  # Orthanc never reports this study stable
    assert Worklist(servers.redis).page()[1] == 0
    assert watcher.sweep_unstable(utcnow()) == 0  # too early to give up on Orthanc
    assert watcher.sweep_unstable(utcnow() + timedelta(minutes=2)) == 1
    [item] = Worklist(servers.redis).page()[0]
    assert item.status is StudyStatus.QUEUED


def _reachable(servers: Servers) -> bool:
    from triage.errors import TransientError

    try:
        servers.orthanc.system()
    except TransientError:
        return False
    return True


def test_a_job_taken_by_a_worker_that_died_before_starting_it_is_queued_again(
        clean_servers: Servers, tmp_path: Path) -> None:
    """Workers take jobs from several queues with BLPOP: one killed right after leaves the
    job on no queue and in no registry. The study must not wait forever."""
    from triage.queues import queues
    from triage.recovery import recover_abandoned

    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path / "s", "head-ct-normal"))
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
    [item] = Worklist(servers.redis).page()[0]
    default = queues(servers.redis)[1]
    assert servers.redis.lrem(default.key, 0, item.job_id) == 1  # what the BLPOP did
    assert recover_abandoned(servers.redis, stranded_after=1) == []  # first sighting
    time.sleep(1.2)
    assert recover_abandoned(servers.redis, stranded_after=1) == [item.job_id]
    assert default.count == 1
    assert recover_abandoned(servers.redis, stranded_after=1) == []  # queued again: found
    run_worker(burst=True)
    done = Worklist(servers.redis).get(item.study_instance_uid)
    assert done is not None and done.status is StudyStatus.ANALYSED


def test_a_job_left_in_rqs_taken_list_or_started_by_a_dead_worker_is_queued_again(
        clean_servers: Servers, tmp_path: Path) -> None:
    """RQ moves a job it takes into ``<queue>:intermediate``, then registers it as started:
    a worker killed in between (or whose Redis restarted under it) leaves it there, or in
    the started registry without a live worker, while the study still shows queued."""
    from rq.executions import Execution
    from rq.registry import StartedJobRegistry

    from triage.queues import queues
    from triage.recovery import recover_abandoned

    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path / "s", "head-ct-normal"))
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
    [item] = Worklist(servers.redis).page()[0]
    default = queues(servers.redis)[1]
    # Taken: on RQ's list of taken jobs, nowhere else.
    assert servers.redis.lmove(default.key, default.intermediate_queue_key) is not None
    assert recover_abandoned(servers.redis, stranded_after=1) == []  # first sighting
    time.sleep(1.2)
    assert recover_abandoned(servers.redis, stranded_after=1) == [item.job_id]
    assert default.count == 1
    assert servers.redis.llen(default.intermediate_queue_key) == 0  # RQ's clean-up: nothing
    # Registered as started by a worker that is not alive (its job still says queued).
    assert servers.redis.lrem(default.key, 0, item.job_id) == 1
    pipe = servers.redis.pipeline()
    StartedJobRegistry(queue=default).add_execution(
        Execution("dead-worker-run", item.job_id, servers.redis), pipe, ttl=600)
    pipe.execute()
    assert item.job_id in StartedJobRegistry(queue=default)
    assert recover_abandoned(servers.redis, stranded_after=1) == []
    time.sleep(1.2)
    assert recover_abandoned(servers.redis, stranded_after=1) == [item.job_id]
    assert item.job_id not in StartedJobRegistry(queue=default)
    run_worker(burst=True)
    done = Worklist(servers.redis).get(item.study_instance_uid)
    assert done is not None and done.status is StudyStatus.ANALYSED


def test_a_queued_study_whose_job_was_never_created_gets_one(clean_servers: Servers,
                                                             tmp_path: Path) -> None:
    """The watcher writes the worklist item, then enqueues the job: stopped (or Redis gone)
    in between, the study shows queued with no job anywhere. It must not wait forever."""
    from rq.job import Job

    from triage.queues import queues
    from triage.recovery import recover_abandoned

    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path / "s", "head-ct-normal"))
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
    [item] = Worklist(servers.redis).page()[0]
    Job.fetch(item.job_id, connection=servers.redis).delete()  # as if never enqueued
    assert recover_abandoned(servers.redis, stranded_after=1) == []  # first sighting
    time.sleep(1.2)
    assert recover_abandoned(servers.redis, stranded_after=1) == [item.job_id]
    assert queues(servers.redis)[1].count == 1
    run_worker(burst=True)
    done = Worklist(servers.redis).get(item.study_instance_uid)
    assert done is not None and done.status is StudyStatus.ANALYSED


def test_an_overdue_retry_is_queued_when_no_scheduler_runs(clean_servers: Servers,
                                                           tmp_path: Path) -> None:
    """A transient failure schedules a retry that RQ's scheduler queues when due; with the
    scheduler's worker killed, the watcher's recovery queues it once it is overdue."""
    from datetime import UTC, datetime

    from rq.job import Job
    from rq.registry import ScheduledJobRegistry

    from triage.queues import queues
    from triage.recovery import OVERDUE_AFTER_SECONDS, release_overdue

    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path / "s", "head-ct-normal"))
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
    [item] = Worklist(servers.redis).page()[0]
    default = queues(servers.redis)[1]
    assert servers.redis.lrem(default.key, 0, item.job_id) == 1
    registry = ScheduledJobRegistry(queue=default)
    job = Job.fetch(item.job_id, connection=servers.redis)
    due = datetime.now(UTC) - timedelta(seconds=OVERDUE_AFTER_SECONDS / 3)
    registry.schedule(job, due)
    assert release_overdue(servers.redis) == []  # due, but a live scheduler may take it
    registry.schedule(job, datetime.now(UTC) - timedelta(seconds=OVERDUE_AFTER_SECONDS + 5))
    assert release_overdue(servers.redis) == [item.job_id]
    assert default.count == 1 and registry.count == 0
    assert release_overdue(servers.redis) == []
    run_worker(burst=True)
    done = Worklist(servers.redis).get(item.study_instance_uid)
    assert done is not None and done.status is StudyStatus.ANALYSED
