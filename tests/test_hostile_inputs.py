"""A corpus of hostile studies (tests/hostile.py) through the whole pipeline: each ends in a
terminal state with a specific reason, the worker stays up, and the next normal study is
analysed."""

from __future__ import annotations

import io
import time

import pydicom
import pytest
from rq.registry import FailedJobRegistry

from tests.conftest import Servers
from tests.hostile import ANALYSED, REFUSED, HostileCase, hostile_cases
from tests.test_pipeline import watch_until
from triage.errors import PermanentError
from triage.queues import queues
from triage.samples import SAMPLES, build_sample
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist


def test_the_corpus_is_large_and_every_case_is_its_own_study() -> None:
    cases = hostile_cases()
    assert len(cases) >= 30
    assert len({c.study_instance_uid for c in cases}) == len(cases)
    assert sum(c.status == REFUSED for c in cases) < len(cases) // 4  # mostly accepted
    assert sum(c.status == ANALYSED for c in cases) < len(cases) // 2  # mostly hostile


@pytest.mark.servers
def test_hostile_studies_end_terminal_with_specific_reasons(clean_servers: Servers) -> None:
    servers = clean_servers
    started = time.monotonic()
    cases = hostile_cases()
    problems: list[str] = []
    accepted: list[HostileCase] = []
    for case in cases:
        refused = _store(servers, case)
        if case.status == REFUSED:
            if not refused:
                problems.append(f"{case.name}: expected {REFUSED}, but Orthanc stored it")
            elif servers.orthanc.lookup_study(case.study_instance_uid) is not None:
                problems.append(f"{case.name}: refused, yet the study is in Orthanc")
        elif refused:
            problems.append(f"{case.name}: expected {case.status}, but {REFUSED}: {refused}")
        else:
            accepted.append(case)

    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    watch_until(servers, watcher, len(accepted))
    assert run_worker(burst=True)  # the worker returns: no hostile study took it down

    worklist = Worklist(servers.redis)
    for case in accepted:
        item = worklist.get(case.study_instance_uid)
        if item is None:
            problems.append(f"{case.name}: not on the worklist")
            continue
        got = f"{item.status.value} ({item.status_reason!r})"
        print(f"{case.name:34} {got}")
        if not item.status.terminal:
            problems.append(f"{case.name}: not terminal: {got}")
        elif item.status.value != case.status or case.reason not in item.status_reason:
            problems.append(f"{case.name}: expected {case.status} ({case.reason!r}), got {got}")
        elif case.status == ANALYSED:
            if not item.findings or not item.sr_sop_instance_uid:
                problems.append(f"{case.name}: analysed without findings or SR")
            used = {r.series_instance_uid for r in item.results}
            if case.analysed_series is not None and used != {case.analysed_series}:
                problems.append(f"{case.name}: analysed series {used}, "
                                f"expected {case.analysed_series}")
        if "HOSTILE" in item.status_reason.upper():
            problems.append(f"{case.name}: reason carries patient data: {item.status_reason}")
    # Nothing ended as an unexpected exception in RQ's failed jobs.
    failed_jobs = [job for queue in queues(servers.redis)
                   for job in FailedJobRegistry(queue=queue).get_job_ids()]
    if failed_jobs and not any(c.status == "failed" for c in cases):
        problems.append(f"jobs failed with exceptions: {failed_jobs}")
    assert not problems, f"{len(problems)} of {len(cases)} cases wrong:\n" + "\n".join(problems)

    # The same worker process then analyses the next normal study.
    normal = next(s for s in SAMPLES if s.key == "head-ct-normal")
    datasets = list(build_sample(normal))
    for ds in datasets:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        servers.orthanc.store(buffer.getvalue())
    watch_until(servers, watcher, len(accepted) + 1)
    assert run_worker(burst=True)
    item = worklist.get(str(datasets[0].StudyInstanceUID))
    assert item is not None and item.status is StudyStatus.ANALYSED, item
    assert item.findings and item.sr_sop_instance_uid
    print(f"\n{len(cases)} hostile cases ({len(cases) - len(accepted)} refused by Orthanc) "
          f"in {time.monotonic() - started:.1f} s")


def _store(servers: Servers, case: HostileCase) -> str:
    """Store a case's files; the error text when Orthanc refuses one, else ''."""
    for data in case.files:
        try:
            servers.orthanc.store(data)
        except PermanentError as exc:
            return str(exc)
    return ""
