"""Every route's authorization, API robustness, the audit trail, SSO, HTTP hardening."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from tests.conftest import Servers
from tests.test_api import make_item
from triage.api.app import create_app
from triage.audit import AUDIT_KEY, HEAD_KEY, AuditAction, record, verify
from triage.priority import PriorityClass
from triage.settings import Settings
from triage.tokens import Role, create_token, revoke_token, verify_token
from triage.worklist import Worklist

pytestmark = pytest.mark.servers

READERS = {Role.RADIOLOGIST, Role.ADMIN}
ADMINS = {Role.ADMIN}
SYSTEMS = {Role.INTEGRATION, Role.ADMIN}
# Who may call what: every route of the OpenAPI schema must be listed here.
POLICY: dict[str, set[Role] | None] = {
    "/healthz": None,  # no authentication
    "/metrics": SYSTEMS,
    "/api/v1/worklist": READERS,
    "/api/v1/worklist/events": READERS,
    "/api/v1/studies/{study_instance_uid}": READERS,
    "/api/v1/studies/{study_instance_uid}/claim": READERS,
    "/api/v1/studies/{study_instance_uid}/release": READERS,
    "/api/v1/studies/{study_instance_uid}/read": READERS,
    "/api/v1/studies/{study_instance_uid}/feedback": READERS,
    "/api/v1/integration/results": SYSTEMS,
    "/api/v1/integration/results/{study_instance_uid}": SYSTEMS,
    "/api/v1/integration/outcomes": SYSTEMS,
    "/api/v1/admin/queues": ADMINS,
    "/api/v1/admin/workers": ADMINS,
    "/api/v1/admin/jobs": ADMINS,
    "/api/v1/admin/jobs/{job_id}": ADMINS,
    "/api/v1/admin/jobs/failed": ADMINS,
    "/api/v1/admin/jobs/failed/requeue": ADMINS,
    "/api/v1/admin/jobs/{job_id}/requeue": ADMINS,
    "/api/v1/admin/tokens": ADMINS,
    "/api/v1/admin/tokens/{token_id}": ADMINS,
    "/api/v1/admin/models": ADMINS,
    "/api/v1/admin/audit": ADMINS,
    "/api/v1/admin/audit/verify": ADMINS,
    "/api/v1/admin/charts": ADMINS,
    "/api/v1/admin/deliveries": ADMINS,
    "/api/v1/admin/ris/rejected": ADMINS,
    "/api/v1/admin/deliveries/retry": ADMINS,
    "/api/v1/admin/vigilance/figures": ADMINS,
    "/api/v1/admin/vigilance/subgroups": ADMINS,
    "/api/v1/admin/vigilance/export": ADMINS,
    "/api/v1/admin/vigilance/alerts": ADMINS,
    "/api/v1/admin/vigilance/alerts/{alert_id}/acknowledge": ADMINS,
    "/api/v1/admin/vigilance/baselines": ADMINS,
    "/api/v1/admin/vigilance/flag-rate": ADMINS,
    "/api/v1/admin/vigilance/models": ADMINS,
    "/api/v1/admin/vigilance/models/{model_id}/versions/{version}/promote": ADMINS,
    "/api/v1/admin/vigilance/models/{model_id}/versions/{version}/state": ADMINS,
    "/api/v1/admin/vigilance/shadow": ADMINS,
}
BODIES = {
    "/api/v1/studies/{study_instance_uid}/feedback": {"findings": [], "outcomes": {}},
    "/api/v1/admin/tokens": {"owner": "someone", "role": "radiologist"},
    "/api/v1/integration/outcomes": {"outcomes": [
        {"study_instance_uid": "1.2.3.1", "finding_code": "SCT:1", "present": True}]},
}
PARAMS = {"/api/v1/integration/results": {"accession_number": "A1"}}


@pytest.fixture
def app(clean_servers: Servers, vigilance_database: Settings, vigilance_db: object):
    # Many deliberate failures below: keep the throttle out of the way of the matrix. The
    # vigilance routes read a real, migrated (empty) records database.
    return create_app(clean_servers.settings.model_copy(
        update={"auth_failures_per_minute": 100_000,
                "database_url": vigilance_database.database_url}))


def call(client: TestClient, method: str, path: str, token: str | None) -> int:
    url = (path.replace("{study_instance_uid}", "1.2.3.1").replace("{job_id}", "no-job")
           .replace("{token_id}", "no-token").replace("{alert_id}", "1")
           .replace("{model_id}", "no-model").replace("{version}", "1.0"))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with client.stream(method.upper(), url, headers=headers, params=PARAMS.get(path),
                       json=BODIES.get(path) if method == "post" else None) as response:
        return response.status_code  # streams (events) are not read


def test_every_route_enforces_its_roles(app, clean_servers: Servers) -> None:
    Worklist(clean_servers.redis).put(make_item(1, PriorityClass.CRITICAL, 5))
    tokens = {role: create_token(clean_servers.redis, role=role, owner=f"matrix-{role.value}")
              for role in Role}
    client = TestClient(app)
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == set(POLICY), "a route is missing from the policy table"
    problems = []
    for path, operations in schema["paths"].items():
        allowed = POLICY[path]
        for method in operations:
            anonymous = call(client, method, path, None)
            if allowed is None:
                if anonymous != 200:
                    problems.append(f"{method} {path} anonymous -> {anonymous}")
                continue
            if anonymous != 401:
                problems.append(f"{method} {path} without token -> {anonymous}")
            for role in Role:
                code = call(client, method, path, tokens[role])
                if role in allowed and (code in (401, 403) or code >= 500):
                    problems.append(f"{method} {path} as {role.value} -> {code}")
                if role not in allowed and code != 403:
                    problems.append(f"{method} {path} as {role.value} -> {code}, not 403")
    assert problems == []


def test_api_never_answers_5xx_to_generated_requests(app, clean_servers: Servers) -> None:
    """Requests generated from the API's own OpenAPI schema (schemathesis), as an admin."""
    Worklist(clean_servers.redis).put(make_item(1, PriorityClass.CRITICAL, 5))
    headers = {"Authorization": "Bearer "
               + create_token(clean_servers.redis, role=Role.ADMIN, owner="fuzzer")}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(
        path="/api/v1/worklist/events")  # an endless stream; covered by its own test
    errors: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:  # noqa: ANN001 - schemathesis' Case
            response = case.call(headers=headers)
            if response.status_code >= 500:
                errors.append(f"{case.method} {case.formatted_path} -> {response.status_code}")

        check()
    assert operations >= 15
    assert errors == []


def test_audit_trail_detects_altered_removed_and_cut_records(clean_servers: Servers,
                                                             tmp_path: Path) -> None:
    connection = clean_servers.redis
    for n in range(5):
        record(connection, actor=f"user{n}", action=AuditAction.STUDY_VIEWED,
               source="10.0.0.1", study_instance_uid=f"1.2.{n}")
    assert verify(connection).ok and verify(connection).records == 5
    cli = [sys.executable, "-m", "triage.cli", "audit", "verify"]
    ok = subprocess.run(cli, env=os.environ, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "intact: 5 records" in ok.stdout

    original = connection.lindex(AUDIT_KEY, 2)
    edited = json.loads(original)
    edited["actor"] = "someone-else"
    connection.lset(AUDIT_KEY, 2, json.dumps(edited))
    assert verify(connection).problem == "record 3 was altered"
    broken = subprocess.run(cli, env=os.environ, capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1 and "record 3 was altered" in broken.stderr
    connection.lset(AUDIT_KEY, 2, original)
    assert verify(connection).ok

    connection.lrem(AUDIT_KEY, 1, connection.lindex(AUDIT_KEY, 1))
    assert verify(connection).problem == "record 2 is missing"
    connection.delete(AUDIT_KEY, HEAD_KEY)
    for _ in range(3):
        record(connection, actor="x", action=AuditAction.STUDY_VIEWED, source="cli")
    connection.rpop(AUDIT_KEY)
    assert "were removed" in (verify(connection).problem or "")


def test_api_actions_are_audited(app, clean_servers: Servers) -> None:
    Worklist(clean_servers.redis).put(make_item(1, PriorityClass.CRITICAL, 5))
    token = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="dr.audit")
    client = TestClient(app)
    headers = {"Authorization": f"Bearer {token}"}
    client.get("/api/v1/worklist", headers=headers)
    client.get("/api/v1/studies/1.2.3.1", headers=headers)
    client.post("/api/v1/studies/1.2.3.1/claim", headers=headers)
    entries = [json.loads(r) for r in clean_servers.redis.lrange(AUDIT_KEY, 0, -1)]
    assert [(e["actor"], e["action"]) for e in entries] == [
        ("dr.audit", "worklist.viewed"), ("dr.audit", "study.viewed"),
        ("dr.audit", "study.claimed")]
    assert entries[1]["study_instance_uid"] == "1.2.3.1"
    assert entries[1]["source"] == "testclient"
    assert verify(clean_servers.redis).ok


def test_tokens_expire_and_are_revoked(clean_servers: Servers) -> None:
    token = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="temp", days=1)
    record_ = verify_token(clean_servers.redis, token)
    assert record_ is not None and record_.expires_at is not None
    revoke_token(clean_servers.redis, record_.id)
    assert verify_token(clean_servers.redis, token) is None
    client = TestClient(create_app(clean_servers.settings))
    assert client.get("/api/v1/worklist",
                      headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_repeated_authentication_failures_are_throttled(clean_servers: Servers) -> None:
    client = TestClient(create_app(clean_servers.settings.model_copy(
        update={"auth_failures_per_minute": 5})))
    codes = [client.get("/api/v1/worklist", headers={"Authorization": "Bearer trg_wrong"})
             .status_code for _ in range(7)]
    assert codes == [401] * 5 + [429] * 2
    good = create_token(clean_servers.redis, role=Role.ADMIN, owner="admin")
    blocked = client.get("/api/v1/worklist", headers={"Authorization": f"Bearer {good}"})
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "60"


def test_headers_size_limit_and_closed_cors(clean_servers: Servers) -> None:
    client = TestClient(create_app(clean_servers.settings))
    page = client.get("/healthz", headers={"Origin": "https://elsewhere.example"})
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "access-control-allow-origin" not in page.headers
    token = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="big")
    huge = client.post("/api/v1/studies/1.2.3/feedback", content=b"x" * 2_000_000,
                       headers={"Authorization": f"Bearer {token}",
                                "Content-Type": "application/json"})
    assert huge.status_code == 413
    opened = TestClient(create_app(clean_servers.settings.model_copy(
        update={"cors_origins": ["https://ris.hospital.example"]})))
    allowed = opened.get("/healthz", headers={"Origin": "https://ris.hospital.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://ris.hospital.example"


def test_single_sign_on_tokens(clean_servers: Servers, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    app = create_app(clean_servers.settings.model_copy(update={
        "oidc_issuer": "https://idp.hospital.example", "oidc_audience": "triage",
        "oidc_jwks_file": jwks, "oidc_role_map": {"rad-staff": "radiologist"}}))
    client = TestClient(app)

    def token(**claims: object) -> str:
        payload = {"iss": "https://idp.hospital.example", "aud": "triage", "sub": "u-17",
                   "preferred_username": "dr.sso", "roles": ["rad-staff"],
                   "exp": int(time.time()) + 300, **claims}
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})

    def status(value: str, path: str = "/api/v1/worklist") -> int:
        return client.get(path, headers={"Authorization": f"Bearer {value}"}).status_code

    assert status(token()) == 200
    assert status(token(), "/api/v1/admin/queues") == 403  # mapped to radiologist only
    assert status(token(roles=["admin"]), "/api/v1/admin/queues") == 200
    assert status(token(iss="https://other.example")) == 401
    assert status(token(aud="someone-else")) == 401
    assert status(token(exp=int(time.time()) - 10)) == 401
    assert status(token(roles=["visitor"])) == 401
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"iss": "https://idp.hospital.example", "aud": "triage", "sub": "x",
                         "roles": ["admin"], "exp": int(time.time()) + 300}, stranger,
                        algorithm="RS256", headers={"kid": "k1"})
    assert status(forged) == 401


def test_orthanc_refuses_requests_without_credentials(clean_servers: Servers) -> None:
    base = clean_servers.settings.orthanc_base_url
    assert httpx.get(f"{base}/system", timeout=10).status_code == 401
    assert httpx.get(f"{base}/studies", auth=("triage", "guess"), timeout=10).status_code == 401
    secrets_file = clean_servers.settings.data_dir / "secrets.json"
    assert secrets_file.stat().st_mode & 0o077 == 0


def test_token_commands(clean_servers: Servers) -> None:
    def triage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "triage.cli", "token", *args],
                              env={**os.environ, "USER": "it-admin"}, capture_output=True,
                              text=True, timeout=60)

    created = triage("create", "--role", "integration", "--owner", "ris-gateway", "--days", "7")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    record_ = verify_token(clean_servers.redis, secret)
    assert record_ is not None and record_.owner == "ris-gateway"
    listed = triage("list").stdout
    assert record_.id in listed and "ris-gateway" in listed and "valid" in listed
    assert secret not in listed
    revoked = triage("revoke", record_.id)
    assert revoked.returncode == 0 and verify_token(clean_servers.redis, secret) is None
    assert "revoked" in triage("list").stdout
    assert triage("revoke", "no-such-id").returncode == 1
    actions = [json.loads(r)["action"] for r in clean_servers.redis.lrange(AUDIT_KEY, 0, -1)]
    assert actions == ["token.created", "token.revoked"]
