"""Clinical urgency sets the floor, AI only raises it, urgent work jumps the queue, and no
study waits at the bottom forever."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.senders import storescu
from tests.studies import ct_studies
from tests.test_pipeline import SAMPLE, watch_until
from triage.priority import PriorityClass, clinical_priority
from triage.queues import QUEUE_ORDER, QueueName, queues
from triage.samples import build_sample
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist, WorklistItem, utcnow

BACKLOG = 200


@pytest.mark.parametrize(("attributes", "aet", "expected"), [
    ({"RequestedProcedurePriority": "STAT"}, "", "clinical: STAT request"),
    ({"ScheduledProcedureStepPriority": "HIGH"}, "", "clinical: HIGH priority request"),
    ({"InstitutionalDepartmentName": "Emergency Radiology"}, "",
     "clinical: emergency department"),
    ({"CurrentPatientLocation": "ED"}, "", "clinical: emergency department"),
    ({}, "ED_CT1", "clinical: sent by an emergency-department modality"),
])
def test_clinical_urgency(attributes: dict[str, str], aet: str, expected: str) -> None:
    floor = clinical_priority(attributes, calling_aet=aet,
                              emergency_locations=["*EMERG*", "ED"], emergency_aets=["ED_CT1"])
    assert floor.priority is PriorityClass.URGENT
    assert floor.reasons == (expected,)


def test_routine_request_stays_routine() -> None:
    floor = clinical_priority({"RequestedProcedurePriority": "ROUTINE",
                               "InstitutionalDepartmentName": "Outpatients"},
                              calling_aet="CT2", emergency_locations=["*EMERG*"],
                              emergency_aets=["ED_CT1"])
    assert floor.priority is PriorityClass.ROUTINE and floor.reasons == ()


@pytest.mark.servers
def test_stat_study_is_analysed_before_a_routine_backlog(clean_servers: Servers,
                                                         tmp_path: Path) -> None:
    servers = clean_servers
    routine = ct_studies(tmp_path, BACKLOG, tag="backlog")
    storescu(servers.settings, [p for s in routine for p in s])
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    watch_until(servers, watcher, BACKLOG)
    default = queues(servers.redis)[QUEUE_ORDER.index(QueueName.DEFAULT)]
    assert default.count == BACKLOG

    [stat] = ct_studies(tmp_path, 1, tag="stat", RequestedProcedurePriority="STAT")
    storescu(servers.settings, stat)
    watch_until(servers, watcher, BACKLOG + 1)
    run_worker(burst=True)

    items = Worklist(servers.redis).page(1000)[0]
    assert all(i.status is StudyStatus.ANALYSED for i in items)
    stat_item = next(i for i in items if i.patient_id == "stat-0")
    others = [i for i in items if i is not stat_item]
    assert stat_item.analysed_at is not None
    assert all(o.analysed_at is not None and stat_item.analysed_at < o.analysed_at
               for o in others), "the STAT study waited behind routine work"
    # On the worklist it is above every routine study, whatever its arrival.
    assert items[0].study_instance_uid == stat_item.study_instance_uid
    assert stat_item.priority is PriorityClass.URGENT
    assert "clinical: STAT request" in stat_item.priority_reasons


@pytest.mark.servers
def test_ai_raises_routine_and_never_lowers_stat(clean_servers: Servers) -> None:
    servers = clean_servers
    normal_stat = list(build_sample(SAMPLE["head-ct-normal"]))
    for ds in normal_stat:
        ds.RequestedProcedurePriority = "STAT"
    storescu_datasets(servers, tmp_name="stat-normal", datasets=normal_stat)
    storescu_datasets(servers, tmp_name="positive",
                      datasets=list(build_sample(SAMPLE["head-ct-hyperdense"])))
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 2)
    run_worker(burst=True)
    items = {i.patient_name: i for i in Worklist(servers.redis).page()[0]}
    stat = items["DEMO^HEADCT NORMAL"]
    assert stat.status is StudyStatus.ANALYSED and not stat.findings[0].positive
    assert stat.priority is PriorityClass.URGENT  # a negative AI result does not lower STAT
    positive = items["DEMO^HEADCT PHANTOM"]
    assert positive.clinical_priority is PriorityClass.ROUTINE
    assert positive.priority is PriorityClass.CRITICAL  # AI raised a routine study


def storescu_datasets(servers: Servers, *, tmp_name: str, datasets: list) -> None:
    folder = Path(servers.settings.data_dir) / "sent" / tmp_name
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.InstanceNumber:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    storescu(servers.settings, paths)


@pytest.mark.servers
def test_anti_starvation_promotes_old_unread_routine_studies(clean_servers: Servers) -> None:
    worklist = Worklist(clean_servers.redis)
    now = utcnow()

    def item(n: int, minutes_ago: int, **extra: object) -> WorklistItem:
        return WorklistItem(study_instance_uid=f"1.2.9.{n}", orthanc_id=str(n),
                            received_at=now - timedelta(minutes=minutes_ago), **extra)

    worklist.put(item(1, 90))                                  # overdue: promoted
    worklist.put(item(2, 30))                                  # recent: stays routine
    worklist.put(item(3, 120, read_at=now, read_by="dr.a"))    # read already: left alone
    worklist.put(item(4, 80, priority=PriorityClass.CRITICAL))  # already above routine
    promoted = worklist.promote_overdue(now=now, max_wait=timedelta(minutes=60))
    assert promoted == ["1.2.9.1"]
    first = worklist.get("1.2.9.1")
    assert first is not None and first.priority is PriorityClass.URGENT
    assert first.priority_reasons[-1] == "waited more than 60 min"
    # An hour later (the clock is an argument) the second one is promoted too, once.
    later = worklist.promote_overdue(now=now + timedelta(minutes=31),
                                     max_wait=timedelta(minutes=60))
    assert later == ["1.2.9.2"]
    assert worklist.promote_overdue(now=now + timedelta(minutes=31),
                                    max_wait=timedelta(minutes=60)) == []
    order = [i.study_instance_uid for i in worklist.page()[0]]
    assert order == ["1.2.9.4", "1.2.9.1", "1.2.9.2", "1.2.9.3"]
