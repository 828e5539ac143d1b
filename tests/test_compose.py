"""The Docker Compose deployment agrees with the settings, the CLI and the image.

No container engine is needed: the compose file is parsed with PyYAML, its ``${VAR}``
references are interpolated the way Docker Compose does, and the resulting environment of the
app services is fed to the real ``Settings``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError

from triage.api.routes.docs import PACKAGE as DOCS_PACKAGE
from triage.cli import main
from triage.settings import Settings
from triage.web.render import VENDOR

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"

APP_SERVICES = ("api", "worker", "watcher")
# Services without a healthcheck: no port, no heartbeat; PID 1 of their container, restarted
# by the restart policy when it exits.
NO_HEALTHCHECK = {"watcher"}

# What a hospital writes in .env (token_urlsafe: the form deploy/env.example asks for).
EXAMPLE_ENV = {
    "TRIAGE_ORTHANC_PASSWORD": secrets.token_urlsafe(32),
    "TRIAGE_REDIS_PASSWORD": secrets.token_urlsafe(32),
}

_REFERENCE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Docker Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        value = env.get(name)
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return arg
        return value or ""

    return _REFERENCE.sub(replace, text)


def interpolated(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    return node


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def container_ports(service: dict[str, Any]) -> list[tuple[str | None, int | None, int]]:
    """``(host ip, host port, container port)`` of each short-syntax port mapping."""
    mappings = []
    for entry in service.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        container = int(parts[-1])
        host = int(parts[-2]) if len(parts) >= 2 and parts[-2] else None
        ip = parts[-3] if len(parts) == 3 else None
        mappings.append((ip, host, container))
    return mappings


def settings_fields() -> set[str]:
    return {f"TRIAGE_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The compose file as Docker Compose sees it with the example ``.env``."""
    return interpolated(raw, EXAMPLE_ENV)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def test_services_exist(services: dict[str, Any]) -> None:
    assert set(services) >= {"orthanc", "redis", *APP_SERVICES}


def test_passwords_are_required(raw: dict[str, Any]) -> None:
    for missing in EXAMPLE_ENV:
        env = {**EXAMPLE_ENV, missing: ""}
        with pytest.raises(MissingVariable, match=missing):
            interpolated(raw, env)


def test_app_services_use_only_settings_variables(services: dict[str, Any]) -> None:
    known = settings_fields()
    for name in APP_SERVICES:
        triage_vars = {key for key in environment(services[name]) if key.startswith("TRIAGE_")}
        assert triage_vars, name
        assert triage_vars <= known, (name, sorted(triage_vars - known))


def test_app_services_build_from_deploy_dockerfile(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        build = services[name]["build"]
        context = ROOT / build.get("context", ".")
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE, name
    assert DOCKERFILE.is_file()


def test_app_commands_are_triage_subcommands(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        command = services[name]["command"]
        if isinstance(command, str):
            command = command.split()
        assert command[0] == "triage", name
        assert command[1] == name, name
        assert command[1] in main.commands, name


def test_app_services_wait_for_healthy_orthanc_and_redis(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        depends = services[name]["depends_on"]
        for dependency in ("orthanc", "redis"):
            assert depends[dependency]["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency]


def test_api_publishes_its_port(services: dict[str, Any]) -> None:
    api = services["api"]
    env = environment(api)
    port = int(env["TRIAGE_API_PORT"])
    assert env["TRIAGE_API_HOST"] == "0.0.0.0"
    mappings = container_ports(api)
    assert mappings, "the api publishes no port"
    assert {container for _ip, _host, container in mappings} == {port}
    assert f":{port}/healthz" in " ".join(api["healthcheck"]["test"])


def test_orthanc_url_matches_orthanc_service(services: dict[str, Any]) -> None:
    orthanc_env = environment(services["orthanc"])
    http_port = int(orthanc_env.get("ORTHANC__HTTP_PORT", "8042"))
    dicom_port = int(orthanc_env.get("ORTHANC__DICOM_PORT", "4242"))
    for name in APP_SERVICES:
        url = urlsplit(environment(services[name])["TRIAGE_ORTHANC_URL"])
        assert url.hostname == "orthanc", name
        assert (url.port or 80) == http_port, name
    ports = container_ports(services["orthanc"])
    # DICOM for the PACS and modalities; the REST API only on this host, if at all.
    assert (None, dicom_port, dicom_port) in ports
    for ip, _host, container in ports:
        if container == http_port:
            assert ip == "127.0.0.1"
        else:
            assert container == dicom_port


def test_orthanc_authentication_and_stable_age(raw: dict[str, Any],
                                               services: dict[str, Any]) -> None:
    env = environment(services["orthanc"])
    assert env["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    assert env["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    app_env = environment(services["api"])
    users = json.loads(env["ORTHANC__REGISTERED_USERS"])
    assert users == {app_env["TRIAGE_ORTHANC_USERNAME"]: EXAMPLE_ENV["TRIAGE_ORTHANC_PASSWORD"]}
    assert env["ORTHANC__STABLE_AGE"] == app_env["TRIAGE_STABLE_AGE"] == "5"
    # The stable age follows TRIAGE_STABLE_AGE in .env.
    changed = interpolated(raw, {**EXAMPLE_ENV, "TRIAGE_STABLE_AGE": "12"})["services"]
    assert environment(changed["orthanc"])["ORTHANC__STABLE_AGE"] == "12"
    assert any("/var/lib/orthanc/db" in volume for volume in services["orthanc"]["volumes"])


def test_redis_is_durable_and_protected(services: dict[str, Any]) -> None:
    redis_service = services["redis"]
    command = redis_service["command"]
    if isinstance(command, str):
        command = command.split()
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1] == EXAMPLE_ENV["TRIAGE_REDIS_PASSWORD"]
    assert "ports" not in redis_service
    assert any(volume.endswith(":/data") for volume in redis_service["volumes"])
    assert "ping" in " ".join(redis_service["healthcheck"]["test"])
    for name in APP_SERVICES:
        url = urlsplit(environment(services[name])["TRIAGE_REDIS_URL"])
        assert (url.hostname, url.port) == ("redis", 6379), name
        assert url.password == EXAMPLE_ENV["TRIAGE_REDIS_PASSWORD"], name


def test_worker_scales(raw: dict[str, Any]) -> None:
    worker = raw["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_workers_yield_the_cpu_to_orthanc(services: dict[str, Any]) -> None:
    """Workers weigh less than the default CPU weight that Orthanc keeps."""
    assert services["worker"]["cpu_shares"] < 1024
    assert "cpu_shares" not in services["orthanc"]


def test_healthchecks(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in NO_HEALTHCHECK:
            assert "ports" not in service, name
            assert service.get("restart") in ("always", "unless-stopped"), name
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), name
    # Workers have no port either, but RQ keeps a heartbeat of each one in Redis.
    assert "rq.Worker.all" in " ".join(services["worker"]["healthcheck"]["test"])


def test_dockerfile_installs_package_and_models() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    stages = [line for line in instructions if line.startswith("FROM ")]
    assert stages[-1] == "FROM debian:bookworm-slim"  # the image that runs
    # Swagger UI for /docs comes from the locked npm packages, into the image.
    assert "COPY package.json package-lock.json .npmrc ./" in instructions
    assert "/app/web-assets" in DOCKERFILE.read_text()
    # Every npm package the service serves travels into the image (the pages and /docs).
    served = {package for package, _, _ in VENDOR.values()} | {DOCS_PACKAGE}
    for package in served:
        assert f"COPY --from=web-assets /build/node_modules/{package} ./web-assets/{package}" \
            in instructions, package
    assert any(re.match(r"COPY\s+models/?\s+\S*models/?$", line) for line in instructions)
    assert any(re.search(r"pip install (\S+ )*\.(\s|$)", line) for line in instructions)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "/app/models" in DOCKERFILE.read_text()
    ignored = set(DOCKERIGNORE.read_text().split())
    assert {".venv", "var", ".git", "tests", ".env"} <= ignored


def test_env_example(raw: dict[str, Any]) -> None:
    example: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    # Every variable the compose file reads is documented, and is a setting.
    referenced = {m.group("name") for m in _REFERENCE.finditer(COMPOSE_FILE.read_text())
                  if m.group("name")}
    assert referenced == set(example)
    assert set(example) <= settings_fields()
    # Passwords are empty: compose refuses to start until the hospital sets them.
    for secret in EXAMPLE_ENV:
        assert example[secret] == ""
    with pytest.raises(MissingVariable):
        interpolated(raw, example)


@pytest.fixture
def api_env(services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The process environment of the api container (only its TRIAGE_ variables)."""
    for key in list(os.environ):
        if key.startswith("TRIAGE_"):
            monkeypatch.delenv(key)
    env = environment(services["api"])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_settings_from_api_environment(api_env: dict[str, str]) -> None:
    settings = Settings()
    assert settings.development is False
    assert settings.orthanc_base_url == "http://orthanc:8042"
    assert settings.orthanc_secret == EXAMPLE_ENV["TRIAGE_ORTHANC_PASSWORD"]
    assert settings.redis_connection_url == api_env["TRIAGE_REDIS_URL"]
    assert (settings.api_host, settings.api_port) == ("0.0.0.0", 8000)
    assert settings.models_dir == Path("/app/models")
    assert not settings.local_orthanc and not settings.local_redis


@pytest.mark.parametrize("placeholder", ["changeme", "password", "orthanc"])
def test_placeholder_password_refused(api_env: dict[str, str], raw: dict[str, Any],
                                      monkeypatch: pytest.MonkeyPatch, placeholder: str) -> None:
    services = interpolated(raw, {**EXAMPLE_ENV, "TRIAGE_ORTHANC_PASSWORD": placeholder})
    monkeypatch.setenv("TRIAGE_ORTHANC_PASSWORD",
                       environment(services["services"]["api"])["TRIAGE_ORTHANC_PASSWORD"])
    with pytest.raises(ValidationError, match="placeholder"):
        Settings()


def test_missing_password_refused_outside_development(api_env: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIAGE_ORTHANC_PASSWORD")
    with pytest.raises(ValueError, match="TRIAGE_ORTHANC_PASSWORD"):
        _ = Settings().orthanc_secret
