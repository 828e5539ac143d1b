"""The Kubernetes manifests (deploy/kubernetes) render, validate and agree with the code.

No cluster is started: every overlay is rendered with the real ``kubectl kustomize`` (Debian
12's ``kubernetes-client``, installed by deploy/install-debian-packages.sh), each rendered
object is validated against the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``
(strict: unknown fields are errors), and the KEDA objects, which have no schema there, are
checked field by field. The queue names come from ``triage.queues``, the Redis list keys from
the installed ``rq``, the image names from deploy/Dockerfile and docker-compose.yml. The RIS
listener's probe is run against a real Redis and a real ``triage ris-listener`` started with
the manifest's environment.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml
from kubernetes_validate.utils import SchemaNotFoundError
from pydantic import ValidationError
from rq import Queue

from tests.conftest import free_port
from triage.queues import QUEUE_ORDER, QueueName
from triage.ris.listener import heartbeat_key
from triage.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("single-server", "cluster-gpu")
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
GPU_DOCKERFILE = KUBERNETES / "Dockerfile.gpu"
COMPOSE_FILE = ROOT / "docker-compose.yml"

# A Kubernetes version kubernetes-validate ships schemas for (also what current clusters run).
KUBERNETES_VERSION = "1.30.0"
# Custom resources without a schema in kubernetes-validate: test_keda_objects checks them.
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Every workload of the stack, by app.kubernetes.io/component.
COMPONENTS = {
    ("Deployment", "triage-api"): "api",
    ("Deployment", "triage-worker"): "worker",
    ("Deployment", "triage-watcher"): "watcher",
    ("Deployment", "triage-ris-listener"): "ris-listener",
    ("StatefulSet", "redis"): "redis",
    ("StatefulSet", "orthanc"): "orthanc",
    ("StatefulSet", "postgres"): "postgres",
}
# The Secrets the hospital creates (deploy/README.md); none is committed.
SECRETS = {"triage-secrets", "triage-tls", "triage-extra-env", "triage-ris-tls"}
# Keys of triage-secrets (deploy/README.md, kubectl create secret generic triage-secrets).
SECRET_KEYS = {"orthanc-password", "redis-password", "postgres-password", "database-password",
               "vigilance-export-key"}
# What Debian 12's kubectl 1.20 (kustomize v2.0.3) does not understand.
NEWER_KUSTOMIZE_FIELDS = {"patches", "labels", "components", "replacements", "sortOptions"}


@cache
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed: the Kubernetes manifests cannot be rendered. "
                    "Install Debian's kubernetes-client (deploy/install-debian-packages.sh).")
    return path


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {overlay} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in rendered(overlay) if obj["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in objects(overlay, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(overlay: str) -> list[dict[str, Any]]:
    return [obj for obj in rendered(overlay) if obj["kind"] in WORKLOAD_KINDS]


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector with matchLabels only (all ours have) selects ``labels``."""
    assert set(selector) <= {"matchLabels"}, selector
    match = selector.get("matchLabels", {})
    return all(labels.get(key) == value for key, value in match.items())


def image_name(image: str) -> str:
    """The repository of an image reference, without its tag."""
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


def queue_keys() -> set[str]:
    """The Redis lists RQ keeps the waiting jobs of the service's queues in (no connection
    is opened: redis-py connects on first command)."""
    connection = redis.Redis()
    return {Queue(name.value, connection=connection).key for name in QUEUE_ORDER}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


# -- rendering and schemas ------------------------------------------------------------------


def test_kubectl_is_installed() -> None:
    """Fails, never skips, where kubectl is missing: the other tests would prove nothing."""
    version = subprocess.run([kubectl(), "version", "--client"], capture_output=True,
                             text=True, timeout=30, check=False)
    assert version.returncode == 0, version.stderr


def test_kustomizations_use_the_syntax_of_debian_kubectl() -> None:
    files = sorted(KUBERNETES.rglob("kustomization.yaml"))
    assert len(files) == 1 + len(OVERLAYS)
    for path in files:
        fields = set(yaml.safe_load(path.read_text()))
        assert not fields & NEWER_KUSTOMIZE_FIELDS, f"{path}: {fields & NEWER_KUSTOMIZE_FIELDS}"
        # kustomize v2.0.3 reads only files under `resources`; directories go under `bases`.
        for entry in yaml.safe_load(path.read_text()).get("resources", []):
            assert (path.parent / entry).is_file(), f"{path}: {entry} is not a file"


def test_overlay_renders_the_whole_stack(overlay: str) -> None:
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in rendered(overlay)}
    assert set(COMPONENTS) <= kinds
    for expected in [("Service", "triage-api"), ("Ingress", "triage-api"),
                     ("Service", "redis"), ("Service", "orthanc"), ("Service", "postgres"),
                     ("Service", "orthanc-dicom"), ("Service", "ris-listener"),
                     ("PodDisruptionBudget", "triage-ris-listener"),
                     ("ConfigMap", "triage-config"),
                     ("ScaledObject", "triage-worker"),
                     ("TriggerAuthentication", "triage-redis"), ("Namespace", "triage")]:
        assert expected in kinds, f"{overlay}: {expected} missing"
    for (kind, name), component in COMPONENTS.items():
        labels = pod_labels(one(overlay, kind, name))
        assert labels["app.kubernetes.io/component"] == component, name
    for obj in rendered(overlay):
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "triage", obj["metadata"]


def test_every_object_validates_strictly(overlay: str) -> None:
    for obj in rendered(overlay):
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue
        name = f"{overlay}: {obj['kind']} {obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except SchemaNotFoundError:
            pytest.fail(f"{name}: no schema for {obj['apiVersion']} in Kubernetes "
                        f"{KUBERNETES_VERSION} (only {sorted(CRDS)} may lack one)")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")


def test_no_secret_values_are_committed(overlay: str) -> None:
    assert not objects(overlay, "Secret"), "Secrets are created by the hospital"
    referenced: set[tuple[str, str | None]] = set()
    for workload in workloads(overlay):
        for container in containers(workload):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], ref["key"]))
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] == "triage-extra-env"
                    assert source["secretRef"].get("optional") is True
    assert {name for name, _ in referenced} == {"triage-secrets"}
    assert {key for _, key in referenced} == SECRET_KEYS
    # Files from Secrets: only the RIS listener's TLS certificate and key, which the hospital
    # may leave out (MLLP without TLS), mounted read-only.
    mounted: set[tuple[str, str]] = set()
    for workload in workloads(overlay):
        pod = workload["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "secret" not in volume:
                continue
            assert volume["secret"].get("optional") is True, volume
            mounted.add((workload["metadata"]["name"], volume["secret"]["secretName"]))
            mounts = [m for c in containers(workload) for m in c.get("volumeMounts", [])
                      if m["name"] == volume["name"]]
            assert mounts and all(m.get("readOnly") is True for m in mounts), mounts
    assert mounted == {("triage-ris-listener", "triage-ris-tls")}
    tls = [entry["secretName"] for entry in one(overlay, "Ingress", "triage-api")["spec"]["tls"]]
    assert tls == ["triage-tls"]
    readme = (ROOT / "deploy" / "README.md").read_text()
    for secret in SECRETS | SECRET_KEYS:
        assert secret in readme, f"deploy/README.md does not say how to create {secret}"


# -- KEDA -----------------------------------------------------------------------------------


def test_keda_objects(overlay: str) -> None:
    scaled = one(overlay, "ScaledObject", "triage-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount",
                         "pollingInterval", "cooldownPeriod", "triggers", "advanced"}
    assert spec["scaleTargetRef"] == {"name": "triage-worker"}
    one(overlay, "Deployment", "triage-worker")
    assert "replicas" not in one(overlay, "Deployment", "triage-worker")["spec"], \
        "KEDA's autoscaler owns the worker count"
    # At least one worker always listens: urgent studies never wait for a pod to start.
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= 64
    auth = one(overlay, "TriggerAuthentication", "triage-redis")
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    assert auth["spec"] == {"secretTargetRef": [
        {"parameter": "password", "name": "triage-secrets", "key": "redis-password"}]}
    redis_service = one(overlay, "Service", "redis")
    address = f"redis.{redis_service['metadata']['namespace']}.svc.cluster.local:6379"
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis"
        assert trigger["authenticationRef"] == {"name": "triage-redis"}
        metadata = trigger["metadata"]
        assert set(metadata) <= {"address", "listName", "listLength", "databaseIndex"}
        assert metadata["address"] == address
        assert metadata.get("databaseIndex", "0") == "0"  # TRIAGE_REDIS_URL: .../0
        assert metadata["listName"].startswith("rq:queue:")
        assert isinstance(metadata["listLength"], str) and int(metadata["listLength"]) >= 1


def test_keda_triggers_name_exactly_the_queues_of_the_code(overlay: str) -> None:
    triggers = one(overlay, "ScaledObject", "triage-worker")["spec"]["triggers"]
    names = [trigger["metadata"]["listName"] for trigger in triggers]
    assert len(names) == len(set(names)), "one trigger per queue"
    assert set(names) == queue_keys()
    assert set(QUEUE_ORDER) == set(QueueName)


def test_rq_keeps_queues_in_the_lists_the_triggers_read() -> None:
    """The key format the triggers assume is the installed rq's."""
    assert queue_keys() == {f"rq:queue:{name.value}" for name in QueueName}


# -- network --------------------------------------------------------------------------------


def test_every_workload_has_its_own_network_policy(overlay: str) -> None:
    policies = objects(overlay, "NetworkPolicy")
    deny = [p for p in policies if p["metadata"]["name"] == "default-deny"]
    assert deny and deny[0]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for workload in workloads(overlay):
        labels = pod_labels(workload)
        own = [p for p in policies if p["spec"]["podSelector"]
               and selects(p["spec"]["podSelector"], labels)]
        types = {t for p in own for t in p["spec"]["policyTypes"]}
        assert types == {"Ingress", "Egress"}, f"{workload['metadata']['name']}: {types}"


def _peers(policy: dict[str, Any], direction: str) -> Iterator[tuple[dict, list]]:
    key, peers = ("ingress", "from") if direction == "ingress" else ("egress", "to")
    for rule in policy["spec"].get(key, []):
        assert rule.get(peers), f"{policy['metadata']['name']}: a rule open to every peer"
        assert rule.get("ports"), f"{policy['metadata']['name']}: a rule open on every port"
        for peer in rule[peers]:
            yield peer, rule["ports"]


def test_from_outside_only_the_api_dicom_and_mllp_ports_are_admitted(overlay: str) -> None:
    outside: set[tuple[str, str, int]] = set()
    for policy in objects(overlay, "NetworkPolicy"):
        component = policy["spec"]["podSelector"].get("matchLabels", {}).get(
            "app.kubernetes.io/component")
        for peer, ports in _peers(policy, "ingress"):
            if set(peer) == {"podSelector"}:
                assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/part-of"] == "triage"
                continue
            source = "ipBlock" if "ipBlock" in peer else \
                peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            assert set(peer) in ({"ipBlock"}, {"namespaceSelector"}), peer
            outside |= {(component, source, port["port"]) for port in ports}
    assert outside == {
        ("api", "ingress-nginx", 8000),   # the API, from the ingress controller
        ("orthanc", "ipBlock", 4242),     # DICOM, from the hospital network
        ("ris-listener", "ipBlock", 2575),  # MLLP orders, from the hospital network (the RIS)
        ("redis", "keda", 6379),          # queue lengths, read by KEDA's operator
    }


def test_egress_leaves_the_namespace_only_for_configured_destinations(overlay: str) -> None:
    leaving: set[tuple[str | None, str, int]] = set()
    for policy in objects(overlay, "NetworkPolicy"):
        component = policy["spec"]["podSelector"].get("matchLabels", {}).get(
            "app.kubernetes.io/component")
        for peer, ports in _peers(policy, "egress"):
            if set(peer) == {"podSelector"}:
                continue
            assert set(peer) in ({"ipBlock"}, {"namespaceSelector"}), peer
            target = "ipBlock" if "ipBlock" in peer else \
                peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            leaving |= {(component, target, port["port"]) for port in ports}
    assert {(c, t) for c, t, _ in leaving} == {
        (None, "kube-system"),            # DNS
        ("orthanc", "ipBlock"),           # the PACS (TRIAGE_DESTINATIONS, sent by Orthanc)
        ("worker", "ipBlock"),            # webhooks, RIS and FHIR servers (results)
        ("api", "ipBlock"),               # the identity provider (TRIAGE_OIDC_*)
    }
    assert {p for c, t, p in leaving if c is None} == {53}


def test_dicom_and_mllp_services_keep_the_senders_address(overlay: str) -> None:
    for name, port in (("orthanc-dicom", 4242), ("ris-listener", 2575)):
        service = one(overlay, "Service", name)["spec"]
        assert service["type"] == "LoadBalancer", name
        assert service["externalTrafficPolicy"] == "Local", name
        assert [p["port"] for p in service["ports"]] == [port], name
    for name in ("triage-api", "orthanc", "redis", "postgres"):
        assert one(overlay, "Service", name)["spec"].get("type", "ClusterIP") == "ClusterIP"


def _allowed(overlay: str, direction: str, selected: dict[str, str],
             peer_labels: dict[str, str], port: int) -> bool:
    """Whether a policy that selects pods labelled ``selected`` admits, in ``direction``,
    the pods labelled ``peer_labels`` (same namespace) on TCP ``port``."""
    for policy in objects(overlay, "NetworkPolicy"):
        if not policy["spec"]["podSelector"] or direction.capitalize() not in policy[
                "spec"]["policyTypes"] or not selects(policy["spec"]["podSelector"], selected):
            continue
        for peer, ports in _peers(policy, direction):
            if set(peer) == {"podSelector"} and selects(peer["podSelector"], peer_labels) \
                    and any(p["port"] == port and p.get("protocol", "TCP") == "TCP"
                            for p in ports):
                return True
    return False


def _reaches(overlay: str, source: str, target: str, port: int) -> bool:
    """Whether workload ``source`` may open connections to workload ``target`` on ``port``:
    its own egress and the target's ingress both admit them."""
    by_name = {w["metadata"]["name"]: pod_labels(w) for w in workloads(overlay)}
    return (_allowed(overlay, "egress", by_name[source], by_name[target], port)
            and _allowed(overlay, "ingress", by_name[target], by_name[source], port))


def test_ris_listener_reaches_redis_only(overlay: str) -> None:
    assert _reaches(overlay, "triage-ris-listener", "redis", 6379)
    # It needs neither Orthanc nor PostgreSQL.
    assert not _reaches(overlay, "triage-ris-listener", "orthanc", 8042)
    assert not _reaches(overlay, "triage-ris-listener", "postgres", 5432)
    # The rest of the stack still reaches Redis.
    for name in ("triage-api", "triage-worker", "triage-watcher"):
        assert _reaches(overlay, name, "redis", 6379), name
    labels = pod_labels(one(overlay, "Deployment", "triage-ris-listener"))
    egress = {(next(iter(peer)), port["port"])
              for policy in objects(overlay, "NetworkPolicy")
              if selects(policy["spec"]["podSelector"], labels)
              and "Egress" in policy["spec"]["policyTypes"]
              for peer, ports in _peers(policy, "egress") for port in ports}
    assert egress == {("podSelector", 6379), ("namespaceSelector", 53)}  # Redis and DNS


def test_mllp_is_admitted_from_the_hospital_network_only(overlay: str) -> None:
    labels = pod_labels(one(overlay, "Deployment", "triage-ris-listener"))
    admitted = [(peer, ports) for policy in objects(overlay, "NetworkPolicy")
                if selects(policy["spec"]["podSelector"], labels)
                for peer, ports in _peers(policy, "ingress")]
    assert admitted, "no ingress to the RIS listener"
    for peer, ports in admitted:
        assert set(peer) == {"ipBlock"}, peer
        assert [(p.get("protocol", "TCP"), p["port"]) for p in ports] == [("TCP", 2575)]
    # The hospital's addresses: those of the overlay's hospital-network.yaml.
    site = _site_policies(overlay)["ris-listener-from-hospital"]["spec"]["ingress"]
    assert [peer for peer, _ in admitted] == [peer for rule in site for peer in rule["from"]]
    # The Service and the listener agree on the port.
    container = one(overlay, "Deployment", "triage-ris-listener")["spec"]["template"]["spec"][
        "containers"][0]
    assert container["ports"] == [{"name": "mllp", "containerPort": 2575}]
    service = one(overlay, "Service", "ris-listener")["spec"]
    assert selects({"matchLabels": service["selector"]}, labels)
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(2575, "mllp")]
    env = {var["name"]: var.get("value") for var in container["env"]}
    assert env["TRIAGE_RIS_LISTEN_HOST"] == "0.0.0.0"
    assert env["TRIAGE_RIS_LISTEN_PORT"] == "2575"


def _site_policies(overlay: str) -> dict[str, dict[str, Any]]:
    path = KUBERNETES / "overlays" / overlay / "hospital-network.yaml"
    return {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(path.read_text())
            if doc}


def test_every_site_address_is_in_the_overlays_network_file(overlay: str) -> None:
    """Each base policy with a placeholder address (ipBlock) is patched by the overlay's
    hospital-network.yaml, and what renders is the overlay's."""
    base = [doc for doc in yaml.safe_load_all(
        (KUBERNETES / "base" / "networkpolicies.yaml").read_text()) if doc]
    placeholders = {doc["metadata"]["name"] for doc in base
                    for direction in ("ingress", "egress")
                    for peer, _ in _peers(doc, direction) if "ipBlock" in peer}
    assert {"ris-listener-from-hospital", "triage-worker-egress-ris",
            "triage-worker-egress-fhir"} <= placeholders
    site = _site_policies(overlay)
    assert set(site) == placeholders
    for name, patch in site.items():
        policy = one(overlay, "NetworkPolicy", name)["spec"]
        for direction in ("ingress", "egress"):
            if direction in patch["spec"]:
                assert policy[direction] == patch["spec"][direction], name


def test_workers_send_results_to_the_ris_and_fhir_servers(overlay: str) -> None:
    labels = pod_labels(one(overlay, "Deployment", "triage-worker"))
    for name, port in (("triage-worker-egress-ris", None), ("triage-worker-egress-fhir", 443)):
        policy = one(overlay, "NetworkPolicy", name)["spec"]
        assert selects(policy["podSelector"], labels)
        assert policy["policyTypes"] == ["Egress"]
        rules = list(_peers({"metadata": {"name": name}, "spec": policy}, "egress"))
        assert rules and all(set(peer) == {"ipBlock"} for peer, _ in rules)
        ports = {p["port"] for _, ports in rules for p in ports}
        assert port is None or ports == {port}, (name, ports)


# -- workloads ------------------------------------------------------------------------------


def test_every_container_has_requests_limits_and_runs_as_non_root(overlay: str) -> None:
    for workload in workloads(overlay):
        pod = workload["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False
        for container in containers(workload):
            name = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{name}: {kind}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, name
            assert security.get("runAsUser", 0) != 0, name
            assert security.get("allowPrivilegeEscalation") is False, name
            assert security.get("readOnlyRootFilesystem") is True, name
            assert security.get("capabilities", {}).get("drop") == ["ALL"], name
            assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name


def test_every_workload_has_a_disruption_budget(overlay: str) -> None:
    budgets = objects(overlay, "PodDisruptionBudget")
    for workload in workloads(overlay):
        matching = [b for b in budgets if selects(b["spec"]["selector"], pod_labels(workload))]
        assert len(matching) == 1, workload["metadata"]["name"]


def test_stateful_services_keep_their_data(overlay: str) -> None:
    for name in ("redis", "orthanc", "postgres"):
        statefulset = one(overlay, "StatefulSet", name)["spec"]
        assert statefulset["replicas"] == 1
        claims = [claim["metadata"]["name"] for claim in statefulset["volumeClaimTemplates"]]
        mounts = [m["name"] for c in statefulset["template"]["spec"]["containers"]
                  for m in c.get("volumeMounts", [])]
        assert claims == ["data"] and "data" in mounts, name
    # The project's Redis image keeps an append-only file in the volume it mounts.
    redis = one(overlay, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    entrypoint = (ROOT / "deploy" / "redis" / "entrypoint.sh").read_text()
    assert "--appendonly yes" in entrypoint and "--dir /data" in entrypoint
    assert "/data" in [m["mountPath"] for m in redis["volumeMounts"] if m["name"] == "data"]
    assert "args" not in redis  # the password never goes on a command line
    # Orthanc's index in PostgreSQL, configured as the project's image reads it.
    orthanc = one(overlay, "StatefulSet", "orthanc")["spec"]["template"]["spec"]["containers"][0]
    env = {var["name"]: var.get("value") for var in orthanc["env"]}
    assert env["POSTGRES_HOST"] == "postgres" and "POSTGRES_PASSWORD" in env
    image_reads = (ROOT / "deploy" / "orthanc" / "entrypoint.py").read_text()
    assert all(f'"{name}"' in image_reads for name in env if name.startswith(
        ("POSTGRES_", "TRIAGE_")))


def test_two_watchers_and_two_ris_listeners_run(overlay: str) -> None:
    for name in ("triage-watcher", "triage-ris-listener"):
        deployment = one(overlay, "Deployment", name)
        assert deployment["spec"]["replicas"] == 2, name
        # Preferably on different nodes.
        terms = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"]
        assert any(term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
                   and term["podAffinityTerm"]["labelSelector"]["matchLabels"]
                   == pod_labels(deployment) for term in terms), name


def _compose_ris_check() -> str:
    """The Python code of the compose service ris-listener's health check."""
    test = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["ris-listener"][
        "healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    code = re.fullmatch(r'python -c "(.*)"', test[1].strip(), re.DOTALL)
    assert code, test
    return code.group(1)


def _ris_listener_probes(overlay: str) -> dict[str, dict[str, Any]]:
    container = one(overlay, "Deployment", "triage-ris-listener")["spec"]["template"]["spec"][
        "containers"][0]
    return {kind: container[kind] for kind in ("readinessProbe", "livenessProbe")}


def test_ris_listener_probes_check_its_heartbeat(overlay: str) -> None:
    """Exec probes, the compose health check: a TCP probe would be refused and logged by the
    listener as a connection from an address not admitted, every period."""
    expected = " ".join(_compose_ris_check().split())
    for kind, probe in _ris_listener_probes(overlay).items():
        assert set(probe) & {"exec", "tcpSocket", "httpGet", "grpc"} == {"exec"}, kind
        command = probe["exec"]["command"]
        assert command[:2] == ["python", "-c"] and len(command) == 3, kind
        assert " ".join(command[2].split()) == expected, kind
        # The heartbeat is written every 10 s and kept 30 s.
        assert probe["periodSeconds"] >= 10 and probe["timeoutSeconds"] >= 3, kind


@pytest.mark.servers
def test_ris_listener_probe_follows_the_listeners_heartbeat(redis_settings: Settings,
                                                            tmp_path: Path) -> None:
    """The manifest's probe, run against a real Redis, fails before the listener runs and
    passes once `triage ris-listener`, started with the manifest's environment, beats."""
    probe = _ris_listener_probes("single-server")["livenessProbe"]["exec"]["command"]
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("TRIAGE_")}
    env.update(_app_environment("single-server", "triage-ris-listener"))
    # The test's Redis, data directory and port in place of the cluster's.
    env.update(TRIAGE_REDIS_URL=redis_settings.redis_connection_url,
               TRIAGE_DATA_DIR=str(tmp_path), TRIAGE_RIS_LISTEN_HOST="127.0.0.1",
               TRIAGE_RIS_LISTEN_PORT=str(free_port()))
    connection = redis.Redis.from_url(redis_settings.redis_connection_url)
    connection.delete(heartbeat_key(socket.gethostname()))

    def probe_passes() -> bool:
        return subprocess.run([sys.executable, *probe[1:]], env=env, capture_output=True,
                              timeout=30, check=False).returncode == 0

    assert not probe_passes()
    log_path = tmp_path / "ris.log"
    with log_path.open("wb") as log:
        listener = subprocess.Popen(
            [sys.executable, "-m", "triage.cli", "ris-listener"], env=env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not probe_passes():
                assert listener.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "no heartbeat: " + log_path.read_text()
                time.sleep(0.2)
        finally:
            listener.terminate()
            try:
                listener.wait(15)
            except subprocess.TimeoutExpired:
                listener.kill()
                listener.wait(15)
    assert listener.returncode == 0, log_path.read_text()


def test_ris_listener_takes_tls_files_from_the_optional_secret(overlay: str) -> None:
    """The TLS paths are site settings (triage-extra-env), set only where the hospital
    created triage-ris-tls: a path set here would stop the listener where it did not."""
    config = one(overlay, "ConfigMap", "triage-config")["data"]
    pod = one(overlay, "Deployment", "triage-ris-listener")["spec"]["template"]["spec"]
    env = {var["name"] for var in pod["containers"][0]["env"]}
    assert not {name for name in {*config, *env} if name.startswith("TRIAGE_RIS_TLS_")}
    mount = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "ris-tls"]
    assert [m["mountPath"] for m in mount] == ["/run/triage/ris-tls"]
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "/run/triage/ris-tls" in readme and "TRIAGE_RIS_SENDERS" in readme


def _app_environment(overlay: str, deployment: str) -> dict[str, str]:
    """The TRIAGE_ environment of an app container, with made-up secret values, expanded the
    way the kubelet expands $(VAR)."""
    config = one(overlay, "ConfigMap", "triage-config")["data"]
    container = one(overlay, "Deployment", deployment)["spec"]["template"]["spec"][
        "containers"][0]
    environment = dict(config)
    for var in container["env"]:
        if "value" in var:
            environment[var["name"]] = re.sub(r"\$\((\w+)\)",
                                              lambda m: environment[m.group(1)], var["value"])
        else:
            environment[var["name"]] = f"k8s-{var['valueFrom']['secretKeyRef']['key']}"
    return environment


def test_app_environment_makes_valid_settings(overlay: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for deployment in ("triage-api", "triage-worker", "triage-watcher",
                       "triage-ris-listener"):
        environment = _app_environment(overlay, deployment)
        assert all(name.startswith("TRIAGE_") for name in environment)
        for name in list(Settings.model_fields):
            monkeypatch.delenv(f"TRIAGE_{name.upper()}", raising=False)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        try:
            settings = Settings()
        except ValidationError as exc:
            pytest.fail(f"{overlay} {deployment}: {exc}")
        assert settings.development is False
        assert settings.redis_connection_url == "redis://:k8s-redis-password@redis:6379/0"
        if deployment == "triage-ris-listener":
            # Redis only: no Orthanc or PostgreSQL password reaches it.
            assert settings.orthanc_password is None and settings.database_url is None
            assert (settings.ris_listen_host, settings.ris_listen_port) == ("0.0.0.0", 2575)
            continue
        assert settings.orthanc_secret == "k8s-orthanc-password"
        assert settings.database_connection_url == (
            "postgresql://triage:k8s-database-password@postgres:5432/triage")
        assert settings.orthanc_base_url == "http://orthanc:8042"
        assert settings.api_port == 8000 and settings.api_host == "0.0.0.0"


# -- GPU and images -------------------------------------------------------------------------


def _gpu_requests(overlay: str) -> dict[str, Any]:
    return {f"{w['metadata']['name']}/{c['name']}": c["resources"]["limits"]["nvidia.com/gpu"]
            for w in workloads(overlay) for c in containers(w)
            if "nvidia.com/gpu" in c["resources"].get("limits", {})
            or "nvidia.com/gpu" in c["resources"].get("requests", {})}


def test_gpu_overlay_runs_workers_on_gpus() -> None:
    assert _gpu_requests("cluster-gpu") == {"triage-worker/worker": 1}
    worker = one("cluster-gpu", "Deployment", "triage-worker")["spec"]["template"]["spec"]
    assert image_name(worker["containers"][0]["image"]) == "triage-gpu"


def test_single_server_overlay_needs_no_gpu() -> None:
    assert _gpu_requests("single-server") == {}
    worker = one("single-server", "Deployment", "triage-worker")["spec"]["template"]["spec"]
    assert image_name(worker["containers"][0]["image"]) == "triage"


def _built_tag(dockerfile: Path) -> str:
    tags = re.findall(rf"docker build -f {dockerfile.relative_to(ROOT)} -t ([\w.-]+) \.",
                      dockerfile.read_text())
    assert tags, f"{dockerfile}: no `docker build ... -t NAME .` line"
    return tags[0]


def test_images_are_the_ones_the_repository_builds(overlay: str) -> None:
    app = _built_tag(DOCKERFILE)
    gpu = _built_tag(GPU_DOCKERFILE)
    assert re.search(rf"^FROM {app}$", GPU_DOCKERFILE.read_text(), re.MULTILINE)
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert all(compose[name]["build"]["dockerfile"] == "deploy/Dockerfile"
               for name in ("api", "worker", "watcher", "ris-listener"))
    expected = {
        "triage-api": {app},
        "triage-worker": {gpu if overlay == "cluster-gpu" else app},
        "triage-watcher": {app},
        "triage-ris-listener": {app},
        "redis": {image_name(compose["redis"]["image"])},
        "orthanc": {image_name(compose["orthanc"]["image"])},
        "postgres": {image_name(compose["postgres"]["image"])},
    }
    for workload in workloads(overlay):
        images = [c["image"] for c in containers(workload)]
        assert {image_name(i) for i in images} == expected[workload["metadata"]["name"]]
        # Pinned: a tag (not latest), never a moving default.
        assert all(":" in i and not i.endswith(":latest") for i in images), images
    # The same Orthanc and Redis versions as the compose stack.
    for name in ("redis", "orthanc"):
        statefulset = one(overlay, "StatefulSet", name)["spec"]["template"]["spec"]
        assert statefulset["containers"][0]["image"] == compose[name]["image"]
