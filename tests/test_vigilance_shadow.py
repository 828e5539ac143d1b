"""Shadow trials through the real pipeline: a second version of the head-CT model in shadow
runs on every study without touching the study or the worklist; the shadow report matches
an independent computation; promotion and rollback change which version writes the SR of
new studies and are in both audit trails."""

from __future__ import annotations

import io
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pydicom
import pytest
import yaml
from fastapi.testclient import TestClient
from rq import Queue
from scipy.stats import binomtest

from tests.conftest import Servers
from tests.headct import HeadCT, study_uid, write_head_ct
from tests.senders import storescu
from tests.test_pipeline import our_srs, watch_until
from triage import audit, jobs
from triage.api.app import create_app
from triage.priority import PriorityClass
from triage.settings import PROJECT_ROOT, Settings
from triage.tokens import Role, create_token
from triage.vigilance import trail
from triage.vigilance.db import connect, migrate
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist

pytestmark = pytest.mark.servers
HEAD_CT = PROJECT_ROOT / "models" / "head-ct-hyperdensity"
MODEL = "head-ct-hyperdensity"
ACTIVE, TRIAL = "1.1.0", "2.0.0-trial"
TRIAL_THRESHOLD = 0.05
# Disc diameters (mm) and the probabilities they give (tests/headct.py): the version on
# trial, with its lower threshold, also flags the 6 and 6.5 mm discs.
DISCS = [0, 0, 0, 5, 6, 6, 6.5, 6.5, 7, 8, 10, 0]


@pytest.fixture
def trial(tmp_path: Path, clean_servers: Servers, vigilance_database: Settings
          ) -> Iterator[Settings]:
    """The installed version and a second one with a lower threshold, the records database
    configured, and states read at every study."""
    models = tmp_path / "models"
    shutil.copytree(HEAD_CT, models / "current")
    shutil.copytree(HEAD_CT, models / "trial")
    manifest = yaml.safe_load((models / "trial" / "manifest.yaml").read_text())
    manifest["version"] = TRIAL
    manifest["outputs"][0]["threshold"] = TRIAL_THRESHOLD
    (models / "trial" / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with connect(vigilance_database) as conn:
        migrate(conn)
        conn.commit()
    saved = dict(os.environ)
    os.environ.update(TRIAGE_MODELS_DIR=str(models),
                      TRIAGE_DATABASE_URL=str(vigilance_database.database_url),
                      TRIAGE_VIGILANCE_STATES_SECONDS="0.01")
    jobs.context.cache_clear()
    try:
        yield Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
        jobs.context.cache_clear()


def _send(servers: Servers, tmp_path: Path, studies: list[HeadCT], total: int) -> None:
    files = [p for s in studies for p in write_head_ct(tmp_path / "studies", s)]
    storescu(servers.settings, files)
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), total)
    run_worker(burst=True)


def _sr_versions(servers: Servers, uid: str) -> list[str]:
    item = Worklist(servers.redis).get(uid)
    assert item is not None
    versions = []
    for instance in our_srs(servers, item):
        sr = pydicom.dcmread(io.BytesIO(servers.orthanc.instance_file(instance)))
        versions += [str(e.SoftwareVersions) for e in sr.ContributingEquipmentSequence
                     if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
    return versions


def _analyses(conn: psycopg.Connection, version: str) -> dict[str, tuple[str, float, bool]]:
    rows = conn.execute(
        "SELECT a.study_uid, a.role, o.score, o.flagged, a.sr_sop_instance_uid "
        "FROM analyses a JOIN analysis_outputs o ON o.analysis_id = a.id "
        "WHERE a.model_id = %s AND a.version = %s", (MODEL, version)).fetchall()
    for row in rows:
        assert (row[4] is None) == (row[1] == "shadow")  # a shadow run names no SR
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_shadow_trial_promotion_and_rollback(trial: Settings, clean_servers: Servers,
                                             tmp_path: Path) -> None:
    servers = clean_servers
    studies = [HeadCT(f"shadow-{n}", disc_mm=d) for n, d in enumerate(DISCS)]
    _send(servers, tmp_path, studies, len(studies))

    # Exactly one SR per study, by the active version; the worklist knows only it.
    worklist = Worklist(servers.redis)
    for study in studies:
        item = worklist.get(study_uid(study))
        assert item is not None and item.status is StudyStatus.ANALYSED, item
        assert _sr_versions(servers, item.study_instance_uid) == [ACTIVE]
        assert {f.model_version for f in item.findings} == {ACTIVE}
        assert {r.model_version for r in item.results} == {ACTIVE}
        assert not any(TRIAL in reason for reason in item.priority_reasons)
        [finding] = item.findings
        assert finding.positive == (finding.probability >= 0.5)
        expected = PriorityClass.CRITICAL if finding.positive else PriorityClass.ROUTINE
        assert item.priority is expected
        assert not item.deliveries

    client = TestClient(create_app(trial))
    admin = {"Authorization": "Bearer " + create_token(servers.redis, role=Role.ADMIN,
                                                       owner="dr.committee")}
    with connect(trial) as conn:
        active = _analyses(conn, ACTIVE)
        shadow = _analyses(conn, TRIAL)
    uids = {study_uid(s) for s in studies}
    assert set(active) == uids and {r for r, _, _ in active.values()} == {"active"}
    assert set(shadow) == uids and {r for r, _, _ in shadow.values()} == {"shadow"}
    for uid in uids:  # the same graph: the same score, judged by each version's threshold
        assert shadow[uid][1] == pytest.approx(active[uid][1])
        assert shadow[uid][2] == (shadow[uid][1] >= TRIAL_THRESHOLD)

    # The report against the test's own computation.
    answer = client.get("/api/v1/admin/vigilance/shadow",
                        params={"model": MODEL, "version": TRIAL}, headers=admin)
    assert answer.status_code == 200, answer.text
    [label] = answer.json()["labels"]
    a = [active[u][2] for u in sorted(uids)]
    s = [shadow[u][2] for u in sorted(uids)]
    pairs = list(zip(a, s, strict=True))
    both = sum(x and y for x, y in pairs)
    a_only = sum(x and not y for x, y in pairs)
    s_only = sum(y and not x for x, y in pairs)
    neither = len(a) - both - a_only - s_only
    assert (label["paired"], label["both_flagged"], label["active_only"],
            label["shadow_only"], label["neither"]) == (len(a), both, a_only, s_only, neither)
    assert s_only == 4 and a_only == 0  # the 6 and 6.5 mm discs
    n = len(a)
    observed = (both + neither) / n
    expected_agreement = ((both + a_only) * (both + s_only)
                          + (neither + s_only) * (neither + a_only)) / n**2
    kappa = (observed - expected_agreement) / (1 - expected_agreement)
    assert label["kappa"] == pytest.approx(kappa)
    assert label["mcnemar_p"] == pytest.approx(
        binomtest(min(a_only, s_only), a_only + s_only, 0.5).pvalue)
    assert "exact" in label["mcnemar_test"]
    discordant = {d["study_uid"] for d in label["discordant"]}
    assert discordant == {u for u in uids if active[u][2] != shadow[u][2]}
    assert label["discordant_total"] == len(discordant)

    # Promotion: the trial version writes the SRs of new studies, the old one goes to shadow.
    promoted = client.post(f"/api/v1/admin/vigilance/models/{MODEL}/versions/{TRIAL}/promote",
                           headers=admin)
    assert promoted.status_code == 200, promoted.text
    assert {(c["version"], c["new_state"]) for c in promoted.json()["changes"]} == {
        (TRIAL, "active"), (ACTIVE, "shadow")}
    after = [HeadCT("after-promotion", disc_mm=6)]
    _send(servers, tmp_path, after, len(studies) + 1)
    assert _sr_versions(servers, study_uid(after[0])) == [TRIAL]
    item = worklist.get(study_uid(after[0]))
    assert item is not None and item.priority is PriorityClass.CRITICAL  # 0.09 >= 0.05
    with connect(trial) as conn:
        assert _analyses(conn, ACTIVE)[study_uid(after[0])][0] == "shadow"

    # Rollback is promoting the earlier version again.
    rolled = client.post(f"/api/v1/admin/vigilance/models/{MODEL}/versions/{ACTIVE}/promote",
                         headers=admin)
    assert rolled.status_code == 200, rolled.text
    back = [HeadCT("after-rollback", disc_mm=6)]
    _send(servers, tmp_path, back, len(studies) + 2)
    assert _sr_versions(servers, study_uid(back[0])) == [ACTIVE]
    item = worklist.get(study_uid(back[0]))
    assert item is not None and item.priority is PriorityClass.ROUTINE
    # Studies analysed before keep their one SR.
    assert _sr_versions(servers, study_uid(after[0])) == [TRIAL]

    # Both audit trails name who did it.
    with connect(trial) as conn:
        entries = [(e.action, e.version, e.actor)
                   for e in reversed(trail.entries(conn, model_id=MODEL))]
    assert entries[-4:] == [("model.demoted", ACTIVE, "dr.committee"),
                            ("model.promoted", TRIAL, "dr.committee"),
                            ("model.demoted", TRIAL, "dr.committee"),
                            ("model.promoted", ACTIVE, "dr.committee")]
    records = [audit.AuditRecord.model_validate_json(raw)
               for _, raw in audit.records(servers.redis)]
    changes = [r.details for r in records
               if r.action is audit.AuditAction.MODEL_STATE_CHANGED]
    assert [(c["version"], c["to"]) for c in changes] == [
        (ACTIVE, "shadow"), (TRIAL, "active"), (TRIAL, "shadow"), (ACTIVE, "active")]

    models = client.get("/api/v1/admin/vigilance/models", headers=admin).json()["models"]
    assert {(v["version"], v["state"]) for m in models for v in m["versions"]} == {
        (ACTIVE, "active"), (TRIAL, "shadow")}


def test_a_busy_host_defers_the_shadow_job(trial: Settings, clean_servers: Servers,
                                           tmp_path: Path) -> None:
    """One shadow analysis at a time per host: a job that finds the slot taken by a live
    worker goes back to the queue; a slot left by a dead worker is taken over."""
    servers = clean_servers
    study = HeadCT("deferred", disc_mm=8)
    storescu(servers.settings, write_head_ct(tmp_path / "s", study))
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
    item = Worklist(servers.redis).get(study_uid(study))
    assert item is not None
    lock = jobs.SHADOW_HOST_LOCK.format(host=socket.gethostname())
    servers.redis.set("triage:worker:busy-one:alive", "1")
    servers.redis.set(lock, "busy-one|token")
    status = jobs.analyse_shadow(item.orthanc_id, item.study_instance_uid, item.inputs,
                                 MODEL, TRIAL)
    assert status == "deferred"
    assert Queue("shadow", connection=servers.redis).count == 1
    servers.redis.delete("triage:worker:busy-one:alive")  # that worker died
    status = jobs.analyse_shadow(item.orthanc_id, item.study_instance_uid, item.inputs,
                                 MODEL, TRIAL)
    assert status == "recorded"
    assert servers.redis.get(lock) is None  # released after the run
