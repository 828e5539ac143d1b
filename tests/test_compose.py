"""The Docker Compose deployment agrees with the settings, the CLI and the image.

No container engine is needed: the compose file is parsed with PyYAML, its ``${VAR}``
references are interpolated the way Docker Compose does, and the resulting environment of the
app services is fed to the real ``Settings``.
"""

from __future__ import annotations

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
PYPROJECT = ROOT / "pyproject.toml"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"

APP_SERVICES = ("api", "worker", "watcher", "ris-listener")
# The images the repository builds (deploy/build-images.sh), by service, with the uid and gid
# their Dockerfile gives the service user (the Kubernetes manifests use the same ids).
PROJECT_IMAGES = {
    "postgres": ("triage-postgres", "deploy/postgres/Dockerfile", 10102),
    "orthanc": ("triage-orthanc", "deploy/orthanc/Dockerfile", 10101),
    "redis": ("triage-redis", "deploy/redis/Dockerfile", 10103),
    "api": ("triage", "deploy/Dockerfile", 10001),
    "worker": ("triage", "deploy/Dockerfile", 10001),
    "watcher": ("triage", "deploy/Dockerfile", 10001),
}
# Variables of .env that are no setting of the service: they configure other containers.
DEPLOYMENT_VARIABLES = {"TRIAGE_POSTGRES_PASSWORD", "TRIAGE_DATABASE_PASSWORD",
                        "TRIAGE_DICOM_PORT", "TRIAGE_HTTPS_PORT", "TRIAGE_MLLP_PORT",
                        "TRIAGE_CERTS_DIR"}

# What a hospital writes in .env (token_urlsafe: the form deploy/env.example asks for).
EXAMPLE_ENV = {
    "TRIAGE_ORTHANC_PASSWORD": secrets.token_urlsafe(32),
    "TRIAGE_REDIS_PASSWORD": secrets.token_urlsafe(32),
    "TRIAGE_POSTGRES_PASSWORD": secrets.token_urlsafe(32),
    "TRIAGE_DATABASE_PASSWORD": secrets.token_urlsafe(32),
    "TRIAGE_VIGILANCE_EXPORT_KEY": secrets.token_urlsafe(32),
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
    assert set(services) >= {"postgres", "orthanc", "redis", *APP_SERVICES}


def test_compose_format_honours_health_conditions(raw: dict[str, Any]) -> None:
    """docker-compose 1.29 honours `condition: service_healthy` in format 2.x, not in 3."""
    assert str(raw["version"]) == "2.4"
    assert "name" not in raw  # no top-level name in format 2.4 (docker-compose 1.29 refuses it)


def test_services_run_the_project_images_as_their_users(services: dict[str, Any]) -> None:
    version = re.search(r'^version *= *"(.*)"', PYPROJECT.read_text(), re.MULTILINE)
    assert version
    for name, (image, dockerfile, uid) in PROJECT_IMAGES.items():
        service = services[name]
        assert service["image"] == f"{image}:{version.group(1)}", name
        build = service["build"]
        path = ROOT / build.get("context", ".") / build["dockerfile"]
        assert path.resolve() == (ROOT / dockerfile).resolve() and path.is_file(), name
        text = path.read_text()
        # Non-root, with the fixed ids the Dockerfile gives its service user.
        assert service["user"] == f"{uid}:{uid}", name
        assert f"--uid {uid}" in text and f"--gid {uid}" in text, name
        users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), name
        assert service["restart"] in ("always", "unless-stopped"), name
        assert "ALL" in service["cap_drop"], name


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
    # HTTPS only, with the certificate and key of the mounted certificate directory.
    assert [host for _ip, host, _container in mappings] == [443]
    assert f"https://127.0.0.1:{port}/healthz" in " ".join(api["healthcheck"]["test"])
    mount = next(v for v in api["volumes"] if v.endswith(":ro"))
    directory = mount.split(":")[1]
    for key in ("TRIAGE_API_TLS_CERT", "TRIAGE_API_TLS_KEY"):
        assert env[key].startswith(directory + "/"), key
    # Settings accept the pair (both or neither) when the files exist.
    assert {"api_tls_cert", "api_tls_key"} <= set(Settings.model_fields)


def test_ris_listener_publishes_the_mllp_port_and_beats(services: dict[str, Any]) -> None:
    ris = services["ris-listener"]
    env = environment(ris)
    assert ris["command"] == ["triage", "ris-listener"]
    assert env["TRIAGE_RIS_LISTEN_HOST"] == "0.0.0.0"
    assert [(host, container) for _ip, host, container in container_ports(ris)] == [
        (2575, int(env["TRIAGE_RIS_LISTEN_PORT"]))]
    assert "heartbeat_key" in " ".join(ris["healthcheck"]["test"])
    # Unset TLS variables reach the listener as empty strings: no TLS, not a path.
    settings = Settings(ris_tls_cert="", ris_tls_key="", ris_tls_ca="")
    assert (settings.ris_tls_cert, settings.ris_tls_key, settings.ris_tls_ca) == (None,) * 3


def test_orthanc_url_matches_orthanc_service(raw: dict[str, Any],
                                            services: dict[str, Any]) -> None:
    # The image's fixed ports (deploy/orthanc/entrypoint.py).
    http_port, dicom_port = 8042, 4242
    for name in APP_SERVICES:
        url = urlsplit(environment(services[name])["TRIAGE_ORTHANC_URL"])
        assert url.hostname == "orthanc", name
        assert (url.port or 80) == http_port, name
    ports = container_ports(services["orthanc"])
    # DICOM for the PACS and modalities; the REST API is never published.
    assert ports == [(None, dicom_port, dicom_port)]
    # The host port follows TRIAGE_DICOM_PORT.
    changed = interpolated(raw, {**EXAMPLE_ENV, "TRIAGE_DICOM_PORT": "11112"})["services"]
    assert container_ports(changed["orthanc"]) == [(None, 11112, dicom_port)]


def test_orthanc_authentication_and_stable_age(raw: dict[str, Any],
                                               services: dict[str, Any]) -> None:
    """The Orthanc image renders orthanc/orthanc.json.template from the same TRIAGE_ values
    as the app services' settings (authentication is always on in the template)."""
    env = environment(services["orthanc"])
    app_env = environment(services["api"])
    assert {key for key in env if key.startswith("TRIAGE_")} <= settings_fields()
    for key in ("TRIAGE_ORTHANC_USERNAME", "TRIAGE_ORTHANC_PASSWORD", "TRIAGE_ORTHANC_AET",
                "TRIAGE_STABLE_AGE"):
        assert env[key] == app_env[key], key
    assert env["TRIAGE_ORTHANC_PASSWORD"] == EXAMPLE_ENV["TRIAGE_ORTHANC_PASSWORD"]
    assert env["TRIAGE_STABLE_AGE"] == "5"
    # The stable age follows TRIAGE_STABLE_AGE in .env.
    changed = interpolated(raw, {**EXAMPLE_ENV, "TRIAGE_STABLE_AGE": "12"})["services"]
    assert environment(changed["orthanc"])["TRIAGE_STABLE_AGE"] == "12"
    assert any(volume.endswith(":/var/lib/orthanc/db") for volume in services["orthanc"]["volumes"])


def test_orthanc_index_in_postgres(services: dict[str, Any]) -> None:
    env = environment(services["orthanc"])
    postgres = services["postgres"]
    postgres_env = environment(postgres)
    assert env["POSTGRES_HOST"] == "postgres"
    assert env["POSTGRES_PASSWORD"] == postgres_env["POSTGRES_PASSWORD"] \
        == EXAMPLE_ENV["TRIAGE_POSTGRES_PASSWORD"]
    for key in ("POSTGRES_DB", "POSTGRES_USER"):
        assert env[key] == postgres_env[key], key
    assert services["orthanc"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "ports" not in postgres
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_redis_is_durable_and_protected(services: dict[str, Any]) -> None:
    redis_service = services["redis"]
    command = redis_service["command"]
    if isinstance(command, str):
        command = command.split()
    assert command[command.index("--appendonly") + 1] == "yes"
    # The image's entrypoint hands the password to redis-server on standard input: never on
    # a command line that `ps` shows.
    assert environment(redis_service)["REDIS_PASSWORD"] == EXAMPLE_ENV["TRIAGE_REDIS_PASSWORD"]
    assert "--requirepass" not in command
    assert EXAMPLE_ENV["TRIAGE_REDIS_PASSWORD"] not in " ".join(command)
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
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), name
        assert service.get("restart") in ("always", "unless-stopped"), name
    # Workers have no port, but RQ keeps a heartbeat of each one in Redis.
    assert "rq.Worker.all" in " ".join(services["worker"]["healthcheck"]["test"])
    # Watchers have none either: healthy while one of them holds the lease.
    from triage.lease import LEASE_KEY
    assert LEASE_KEY in " ".join(services["watcher"]["healthcheck"]["test"])
    # podman 4.3's Docker API splits CMD arguments at spaces: arguments with spaces need
    # CMD-SHELL (one string).
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        if test[0] == "CMD":
            assert not any(" " in argument for argument in test[1:]), name


def test_two_watchers_share_the_lease(raw: dict[str, Any]) -> None:
    watcher = raw["services"]["watcher"]
    assert watcher["scale"] == 2
    assert "container_name" not in watcher and "ports" not in watcher


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
    assert set(example) <= settings_fields() | DEPLOYMENT_VARIABLES
    # Passwords are empty: compose refuses to start until the hospital sets them.
    for secret in EXAMPLE_ENV:
        assert example[secret] == ""
    with pytest.raises(MissingVariable):
        interpolated(raw, example)


@pytest.fixture
def api_env(services: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
            tmp_path: Path) -> dict[str, str]:
    """The process environment of the api container (only its TRIAGE_ variables), with the
    certificate directory it mounts standing in a temporary directory here."""
    for key in list(os.environ):
        if key.startswith("TRIAGE_"):
            monkeypatch.delenv(key)
    env = environment(services["api"])
    mount = next(v for v in services["api"]["volumes"] if v.endswith(":ro")).split(":")[1]
    for key in ("TRIAGE_API_TLS_CERT", "TRIAGE_API_TLS_KEY"):
        local = tmp_path / env[key].removeprefix(mount + "/")
        local.write_text("(the hospital's PEM file)\n")
        env[key] = str(local)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_settings_from_api_environment(api_env: dict[str, str]) -> None:
    settings = Settings()
    assert settings.development is False
    assert settings.orthanc_base_url == "http://orthanc:8042"
    assert settings.orthanc_secret == EXAMPLE_ENV["TRIAGE_ORTHANC_PASSWORD"]
    assert settings.redis_connection_url == api_env["TRIAGE_REDIS_URL"]
    assert (settings.api_host, settings.api_port) == ("0.0.0.0", 8443)
    assert settings.api_tls_cert is not None and settings.api_tls_key is not None
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


def test_app_services_keep_their_records_in_the_postgres_service(
        services: dict[str, Any]) -> None:
    postgres_env = environment(services["postgres"])
    password = EXAMPLE_ENV["TRIAGE_DATABASE_PASSWORD"]
    assert postgres_env["POSTGRES_RECORDS_PASSWORD"] == password
    for name in APP_SERVICES:
        url = urlsplit(environment(services[name])["TRIAGE_DATABASE_URL"])
        assert (url.hostname, url.port, url.username, url.password, url.path) == (
            "postgres", 5432, "triage", password, "/triage"), name
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        settings = Settings(database_url=urlsplit(url.geturl()).geturl())
        assert not settings.local_postgres
