"""Rebuilding the worklist from Orthanc after Redis lost everything (``triage reindex``)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rq import Queue

from tests.conftest import Servers
from tests.senders import storescu
from tests.test_pipeline import SAMPLE, our_srs, watch_until, write_study
from triage.ingest import snapshot_study
from triage.queues import QueueName
from triage.registry import ModelRegistry
from triage.reindex import UNKNOWN_REGULATORY_STATUS, reindex
from triage.samples import build_sample
from triage.watcher import CURSOR_KEY, Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist, WorklistItem

pytestmark = pytest.mark.servers
REPO = Path(__file__).resolve().parents[1]


def analyse(servers: Servers, watcher: Watcher, n_studies: int) -> list[WorklistItem]:
    """Watch until ``n_studies`` are listed, analyse them all, and return the worklist."""
    watch_until(servers, watcher, n_studies)
    run_worker(burst=True)
    items, total = Worklist(servers.redis).page()
    assert total == n_studies
    assert all(i.status.terminal for i in items), [(i.patient_name, i.status) for i in items]
    return items


def wait_stable(servers: Servers) -> None:
    """Every study quiet for its stable age (the SRs just stored change the studies too)."""
    servers.wait_until(lambda: all(servers.orthanc.study(s)["IsStable"]
                                   for s in servers.orthanc.studies()),
                       timeout=30, what="every study to be stable")


def view(item: WorklistItem) -> dict[str, Any]:
    """What a radiologist sees of an item, and what ties it to Orthanc."""
    return {
        "study": item.study_instance_uid, "status": item.status,
        "reason": item.status_reason, "priority": item.priority,
        "clinical": item.clinical_priority, "reasons": item.priority_reasons,
        "sr": item.sr_sop_instance_uid, "received_at": item.received_at,
        "job_id": item.job_id, "inputs": item.inputs, "patient": item.patient_name,
        "findings": [(f.code, f.scheme, f.meaning, f.model, f.model_version, f.threshold,
                      f.positive, f.priority, f.key_sop_instance_uid) for f in item.findings],
        "results": [(r.model, r.model_version, r.model_name, r.weights_sha256,
                     r.regulatory_status, r.series_instance_uid, r.n_instances)
                    for r in item.results],
    }


def assert_same_worklist(before: list[WorklistItem], after: list[WorklistItem]) -> None:
    assert [i.study_instance_uid for i in after] == [i.study_instance_uid for i in before]
    for old, new in zip(before, after, strict=True):
        assert view(new) == view(old)
        assert [f.probability for f in new.findings] == pytest.approx(
            [f.probability for f in old.findings], abs=1e-9)
        assert new.score == pytest.approx(old.score, abs=1e-9)
        if old.analysed_at is not None:  # the SR's content time: when the worker wrote it
            assert new.analysed_at is not None
            assert abs((new.analysed_at - old.analysed_at).total_seconds()) < 5


def test_reindex_rebuilds_the_worklist_redis_lost(clean_servers: Servers,
                                                  tmp_path: Path) -> None:
    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path, "head-ct-normal")
             + write_study(tmp_path, "mr-small")
             + write_study(tmp_path, "head-ct-hyperdense"))
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    before = analyse(servers, watcher, 3)
    assert [i.status for i in before].count(StudyStatus.ANALYSED) == 2
    assert before[0].priority.value == "critical"
    wait_stable(servers)

    servers.redis.flushall()
    report = reindex(servers.settings, servers.orthanc, servers.redis)
    assert (report.studies, report.analysed_from_sr, report.queued) == (3, 2, 1)
    assert int(servers.redis.get(CURSOR_KEY) or 0) == servers.orthanc.last_change()
    rebuilt = Worklist(servers.redis).page()[0]
    by_uid = {i.study_instance_uid: i for i in rebuilt}
    # The MR was skipped (no SR): it is queued again, and skipped again by the worker.
    mr = next(i for i in before if i.patient_name == "DEMO^MR")
    assert by_uid[mr.study_instance_uid].status is StudyStatus.QUEUED
    assert watcher.poll_once() == 0  # nothing indexed is queued a second time
    run_worker(burst=True)
    assert_same_worklist(before, Worklist(servers.redis).page()[0])
    # The analysed items are back as the worker wrote them, without a new analysis.
    for item in before:
        if item.status is StudyStatus.ANALYSED:
            assert len(our_srs(servers, item)) == 1

    # The command does the same, and a second run over a complete worklist changes nothing.
    servers.redis.flushall()
    env = {**os.environ, **servers.env}
    done = subprocess.run([sys.executable, "-m", "triage.cli", "reindex"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "3 studies: 2 analysed" in done.stdout and "1 queued" in done.stdout
    run_worker(burst=True)
    assert_same_worklist(before, Worklist(servers.redis).page()[0])
    again = reindex(servers.settings, servers.orthanc, servers.redis)
    assert (again.analysed_from_sr, again.queued, again.unchanged) == (0, 0, 3)


def test_images_newer_than_the_sr_are_analysed_again(clean_servers: Servers,
                                                     tmp_path: Path) -> None:
    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path, "head-ct-hyperdense"))
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    [first] = analyse(servers, watcher, 1)
    assert first.status is StudyStatus.ANALYSED and first.priority.value == "critical"

    # One more slice arrives after the analysis, and Redis is lost before the watcher sees it.
    *_, late = build_sample(dataclasses.replace(SAMPLE["head-ct-hyperdense"], slices=9))
    path = tmp_path / "late.dcm"
    late.save_as(path, enforce_file_format=True)
    storescu(servers.settings, [path])
    wait_stable(servers)
    servers.redis.flushall()

    report = reindex(servers.settings, servers.orthanc, servers.redis)
    assert (report.analysed_from_sr, report.queued, report.late_images) == (0, 1, 1)
    [queued] = Worklist(servers.redis).page()[0]
    snapshot = snapshot_study(servers.orthanc, first.orthanc_id)
    assert queued.status is StudyStatus.QUEUED
    assert queued.inputs == snapshot.inputs != first.inputs
    # The earlier findings stay until the new analysis replaces them; nothing is lowered.
    assert queued.findings == first.findings and queued.priority.value == "critical"
    assert queued.sr_sop_instance_uid == first.sr_sop_instance_uid
    assert Queue(QueueName.URGENT.value, connection=servers.redis).count == 1

    run_worker(burst=True)
    second = Worklist(servers.redis).get(first.study_instance_uid)
    assert second is not None and second.status is StudyStatus.ANALYSED
    assert second.sr_sop_instance_uid != first.sr_sop_instance_uid
    assert len(our_srs(servers, second)) == 2

    # Lost once more: the latest SR (the one superseding the first) is the one read back.
    wait_stable(servers)
    servers.redis.flushall()
    report = reindex(servers.settings, servers.orthanc, servers.redis)
    assert (report.analysed_from_sr, report.queued) == (1, 0)
    assert_same_worklist([second], Worklist(servers.redis).page()[0])


def test_findings_of_a_model_no_longer_installed_raise_nothing(clean_servers: Servers,
                                                              tmp_path: Path) -> None:
    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path, "head-ct-hyperdense"))
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    [item] = analyse(servers, watcher, 1)
    wait_stable(servers)
    servers.redis.flushall()

    report = reindex(servers.settings, servers.orthanc, servers.redis,
                     registry=ModelRegistry())
    assert report.analysed_from_sr == 1
    [rebuilt] = Worklist(servers.redis).page()[0]
    assert rebuilt.status is StudyStatus.ANALYSED
    assert rebuilt.sr_sop_instance_uid == item.sr_sop_instance_uid
    assert rebuilt.priority.value == "routine" and rebuilt.priority_reasons == []
    assert "no longer installed" in rebuilt.status_reason
    [finding] = rebuilt.findings
    assert (finding.code, finding.model, finding.model_version) == (
        item.findings[0].code, item.findings[0].model, item.findings[0].model_version)
    assert finding.probability == pytest.approx(item.findings[0].probability, abs=1e-9)
    assert not finding.positive and finding.priority is None
    [result] = rebuilt.results
    assert result.model_name == item.results[0].model_name
    assert result.regulatory_status == UNKNOWN_REGULATORY_STATUS
