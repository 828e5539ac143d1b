"""The ``triage`` command: runs the stack and its parts, and administers it.

Every command builds its settings from the same ``TRIAGE_`` environment and data directory as
the stack it talks to.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import redis

from triage.audit import AuditAction, export, record, verify
from triage.logs import configure_logging
from triage.settings import DEFAULT_WORKERS, Settings
from triage.tokens import (
    DEFAULT_TOKEN_DAYS,
    Role,
    TokenNotFound,
    create_token,
    list_tokens,
    revoke_token,
    verify_token,
)
from triage.worklist import utcnow

log = logging.getLogger("triage")


def _settings(data_dir: Path | None = None) -> Settings:
    if data_dir is not None:
        # Child processes inherit the environment: they must see the same data directory.
        os.environ["TRIAGE_DATA_DIR"] = str(data_dir.resolve())
    return Settings()


@click.group()
def main() -> None:
    """PACS-side AI triage service."""


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Data directory (default TRIAGE_DATA_DIR or ./var).")
@click.option("--workers", type=int, default=DEFAULT_WORKERS, show_default=True)
@click.option("--samples/--no-samples", default=False,
              help="Send the bundled sample studies once the stack is up.")
def up(data_dir: Path | None, workers: int, samples: bool) -> None:
    """Start Orthanc, Redis, the watcher, the workers and the API; Ctrl-C stops them all."""
    from triage.stack import Stack, install_signal_handlers

    configure_logging("up")
    settings = _settings(data_dir)
    stack = Stack(settings, workers=workers)
    install_signal_handlers(stack)
    try:
        stack.start()
        token = create_token(redis.Redis.from_url(settings.redis_connection_url),
                             role=Role.ADMIN, owner="local-admin", days=1)
        if samples:
            _send_samples(settings)
        _announce(settings, token)
        stack.supervise()
    finally:
        stack.stop()
        click.echo("stack stopped")


def _announce(settings: Settings, token: str) -> None:
    click.echo(
        f"\nTriage is running (data in {settings.data_dir}).\n"
        f"  Worklist:       {settings.api_base_url}/\n"
        f"  API docs:       {settings.api_base_url}/docs\n"
        f"  Admin token:    {token}\n"
        f"  Send studies:   storescu -aec {settings.orthanc_aet} 127.0.0.1 "
        f"{settings.orthanc_dicom_port} FILES...\n"
        f"  Orthanc:        {settings.orthanc_base_url} (user {settings.orthanc_username}, "
        f"password in {settings.data_dir / 'secrets.json'})\n"
        f"  RIS orders:     MLLP {settings.ris_listen_host}:{settings.ris_listen_port} "
        f"({len(settings.ris_senders) or 'no'} senders admitted: TRIAGE_RIS_SENDERS)\n"
        "Press Ctrl-C to stop.\n",
    )


def _send_samples(settings: Settings) -> None:
    from triage.samples import write_samples

    folders = write_samples(settings.data_dir / "samples")
    for folder in folders:
        send_with_storescu(settings, sorted(folder.glob("*.dcm")))
    click.echo(f"sent {len(folders)} sample studies with storescu")


def send_with_storescu(settings: Settings, files: list[Path]) -> None:
    """C-STORE ``files`` to the stack's Orthanc with dcmtk's storescu."""
    storescu = shutil.which("storescu")
    if storescu is None:
        raise click.ClickException("storescu not found: install Debian package dcmtk")
    subprocess.run(
        [storescu, "-aet", "TRIAGE-DEMO", "-aec", settings.orthanc_aet, "127.0.0.1",
         str(settings.orthanc_dicom_port), *map(str, files)],
        check=True, env={**os.environ, "TCP_NODELAY": "1"},
    )


@main.command()
@click.option("--name", default="watcher", show_default=True,
              help="Name of this watcher in the lease and the logs (no ':').")
def watcher(name: str) -> None:
    """Follow Orthanc's change log and queue stable studies, while holding the lease (a
    second watcher stands by and takes over when this one dies)."""
    import redis as redis_lib

    from triage.lease import Lease, holder_id
    from triage.orthanc import OrthancClient
    from triage.watcher import Watcher

    configure_logging("watcher")
    settings = Settings()
    stop = threading.Event()
    _stop_on_signals(stop)
    connection = redis_lib.Redis.from_url(settings.redis_connection_url)
    lease = Lease(connection, seconds=settings.watcher_lease_seconds, holder=holder_id(name))
    Watcher(settings, OrthancClient.from_settings(settings), connection, lease).run(stop)


@main.command("ris-listener")
def ris_listener() -> None:
    """Receive orders from the RIS (HL7 v2 ORM^O01 and OMI^O23 over MLLP) on
    TRIAGE_RIS_LISTEN_HOST:TRIAGE_RIS_LISTEN_PORT, until SIGTERM."""
    import redis as redis_lib

    from triage.ris.listener import serve

    configure_logging("ris")
    settings = Settings()
    serve(settings, redis_lib.Redis.from_url(settings.redis_connection_url))


@main.command()
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
def worker(burst: bool) -> None:
    """Analyse queued studies (urgent first, then default, then bulk)."""
    from triage.workers import lower_priority, run_worker

    configure_logging("worker")
    lower_priority(Settings().worker_nice)
    run_worker(burst=burst)


@main.command()
def api() -> None:
    """Serve the API and web pages."""
    import uvicorn

    from triage.api.app import create_app

    configure_logging("api")
    settings = Settings()
    _migrate_records(settings)
    # Worklist pages refresh now and then: a connection idle for a while is kept rather
    # than reopened (longer than the usual 60 s idle timeout of a proxy in front).
    options: dict[str, Any] = {"host": settings.api_host, "port": settings.api_port,
                               "log_level": "warning", "timeout_keep_alive": 75}
    if settings.api_tls_cert and settings.api_tls_key:
        # HTTPS with the hospital's certificate (chain first, then the intermediates).
        options.update(ssl_certfile=str(settings.api_tls_cert),
                       ssl_keyfile=str(settings.api_tls_key))
    if settings.api_workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    # Several processes share the port; each builds the app from the same TRIAGE_ settings.
    uvicorn.run("triage.api.app:create_app", factory=True, workers=settings.api_workers,
                **options)


def _migrate_records(settings: Settings) -> None:
    """Bring the vigilance records' schema up to date (advisory-locked: any number of processes
    may do it at once). The worklist does not depend on PostgreSQL: if it is unreachable the
    API starts anyway, and the vigilance pages say the records are unavailable."""
    from triage.vigilance.db import connect, migrate

    try:
        with connect(settings) as connection:
            applied = migrate(connection)
    except Exception as exc:  # noqa: BLE001 - any database failure only delays vigilance
        log.warning("vigilance records not migrated (%s); the API starts without them",
                    type(exc).__name__)
        return
    if applied:
        log.info("vigilance record migrations applied: %s", ", ".join(applied))


@main.group()
def token() -> None:
    """API tokens."""


@token.command("create")
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True)
@click.option("--owner", default=None, help="Who the token is for (default: the OS user).")
@click.option("--days", type=int, default=DEFAULT_TOKEN_DAYS, show_default=True,
              help="Days until it expires; 0 for never.")
def token_create(role: str, owner: str | None, days: int) -> None:
    """Print a new bearer token; only its hash is stored."""
    connection = _redis()
    owner = owner or _os_user()
    secret = create_token(connection, role=Role(role), owner=owner, days=days or None)
    created = verify_token(connection, secret)
    assert created is not None
    _audit_cli(connection, AuditAction.TOKEN_CREATED,
               {"token_id": created.id, "owner": owner, "role": role})
    click.echo(secret)


@token.command("list")
def token_list() -> None:
    """Every token: id, owner, role, expiry, revocation."""
    now = utcnow()
    for entry in list_tokens(_redis()):
        state = ("revoked" if entry.revoked_at else
                 "expired" if not entry.valid(now) else "valid")
        expires = f"{entry.expires_at:%Y-%m-%d}" if entry.expires_at else "never"
        click.echo(f"{entry.id}  {entry.owner:<20} {entry.role.value:<12} "
                   f"expires {expires}  {state}")


@token.command("revoke")
@click.argument("token_id")
def token_revoke(token_id: str) -> None:
    """Revoke the token with TOKEN_ID (from `triage token list`)."""
    connection = _redis()
    try:
        revoked = revoke_token(connection, token_id)
    except TokenNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    _audit_cli(connection, AuditAction.TOKEN_REVOKED, {"token_id": token_id})
    click.echo(f"revoked {revoked.id} ({revoked.owner}, {revoked.role.value})")


@main.group()
def destinations() -> None:
    """DICOM destinations (the PACS) that receive the results."""


@destinations.command("list")
def destinations_list() -> None:
    """The configured destinations and webhooks."""
    settings = Settings()
    for d in settings.destinations:
        click.echo(f"{d.name}  {d.aet}@{d.host}:{d.port}  send {d.send}"
                   f"{'  with key images' if d.key_images else ''}")
    for w in settings.webhooks:
        click.echo(f"{w.name}  webhook on {w.on}")
    if not settings.destinations and not settings.webhooks:
        click.echo("no destinations (set TRIAGE_DESTINATIONS and TRIAGE_WEBHOOKS)")


@destinations.command("test")
@click.argument("name")
def destinations_test(name: str) -> None:
    """C-ECHO destination NAME through Orthanc."""
    from triage.errors import TriageError
    from triage.orthanc import OrthancClient

    settings = Settings()
    destination = next((d for d in settings.destinations if d.name == name), None)
    if destination is None:
        raise click.ClickException(f"no destination {name} is configured")
    orthanc = OrthancClient.from_settings(settings)
    try:
        orthanc.register_modality(destination.name, destination.aet, destination.host,
                                  destination.port)
        orthanc.echo(destination.name)
    except TriageError as exc:
        raise click.ClickException(
            f"{name} ({destination.aet}@{destination.host}:{destination.port}) did not "
            f"answer C-ECHO: {exc}") from exc
    click.echo(f"{name} ({destination.aet}@{destination.host}:{destination.port}) "
               "answered C-ECHO")


@main.group("audit")
def audit_group() -> None:
    """The audit trail."""


@audit_group.command("verify")
def audit_verify() -> None:
    """Check the hash chain; exits 1 naming the first altered or missing record."""
    result = verify(_redis())
    if not result.ok:
        raise click.ClickException(f"audit trail broken: {result.problem}")
    click.echo(f"audit trail intact: {result.records} records")


@audit_group.command("export")
@click.option("--start", type=click.DateTime(), default=None)
@click.option("--end", type=click.DateTime(), default=None)
def audit_export(start: datetime | None, end: datetime | None) -> None:
    """Write the records between START and END (UTC) as JSON lines."""
    connection = _redis()
    start = start.replace(tzinfo=UTC) if start else None
    end = end.replace(tzinfo=UTC) if end else None
    _audit_cli(connection, AuditAction.AUDIT_EXPORTED,
               {"start": start.isoformat() if start else None,
                "end": end.isoformat() if end else None})
    for line in export(connection, start, end):
        click.echo(line, nl=False)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(Settings().redis_connection_url)


def _os_user() -> str:
    return os.environ.get("USER") or getpass.getuser()


def _audit_cli(connection: redis.Redis, action: AuditAction, details: dict[str, Any]) -> None:
    record(connection, actor=_os_user(), role="cli", source=f"cli@{socket.gethostname()}",
           action=action, details=details)


@main.group()
def models() -> None:
    """Model packages: list, validate, run on files; the states of their versions."""


@models.command("list")
def models_list() -> None:
    """The packages in TRIAGE_MODELS_DIR, and those refused with the reason."""
    from triage.registry import ModelRegistry

    settings = Settings()
    registry = ModelRegistry.load(settings.models_dir)
    for package in registry.packages:
        m = package.manifest
        click.echo(f"{m.id} {m.version}  {m.name}  [{m.regulatory_status}]  "
                   f"{'/'.join(m.applicability.modalities)}  sha256 {m.sha256[:12]}  ok")
    for folder, error in registry.errors.items():
        click.echo(f"{folder}  REFUSED: {error}")
    if not registry.packages and not registry.errors:
        click.echo(f"no model packages in {settings.models_dir}")


@models.command("validate")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def models_validate(path: Path) -> None:
    """Check a package: manifest, SHA-256, and one run of the graph on a blank input."""
    from triage.errors import ModelPackageError
    from triage.inference import self_test
    from triage.registry import ModelPackage

    try:
        package = ModelPackage.load(path)
        probabilities = self_test(package)
    except ModelPackageError as exc:
        raise click.ClickException(str(exc)) from exc
    m = package.manifest
    click.echo(f"{m.id} {m.version}: valid ({len(m.outputs)} outputs; blank input gives "
               + ", ".join(f"{k} {v:.3f}" for k, v in probabilities.items()) + ")")


@models.command("run")
@click.argument("model")
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
def models_run(model: str, paths: tuple[Path, ...]) -> None:
    """Run MODEL (an id in TRIAGE_MODELS_DIR, or a package folder) on DICOM files or folders.

    Needs no server: prints the findings, the priority and the timings of each study.
    """
    from triage.errors import ModelPackageError
    from triage.offline import analyse_files, describe
    from triage.registry import ModelPackage

    folder = Path(model) if Path(model).is_dir() else Settings().models_dir / model
    try:
        package = ModelPackage.load(folder)
    except ModelPackageError as exc:
        raise click.ClickException(str(exc)) from exc
    outcomes = analyse_files(package, paths)
    if not outcomes:
        raise click.ClickException("no DICOM studies found in the given paths")
    for outcome in outcomes:
        click.echo(describe(outcome))


@models.command("versions")
@click.argument("model", required=False)
def models_versions(model: str | None) -> None:
    """The registered versions of MODEL (or of every model) and the state of each."""
    from triage.vigilance.records import versions

    with _vigilance_db(Settings()) as connection:
        rows = versions(connection, model)
    if not rows:
        click.echo("no registered versions" + (f" of {model}" if model else ""))
        return
    click.echo(f"{'MODEL':<28} {'VERSION':<12} {'STATE':<8} {'SINCE (UTC)':<17} "
               f"{'BY':<16} SHA-256")
    for v in rows:
        click.echo(f"{v.model_id:<28} {v.version:<12} {v.state:<8} "
                   f"{v.changed_at.astimezone(UTC):%Y-%m-%d %H:%M} {v.changed_by:<16} "
                   f"{v.sha256[:12]}")


@models.command("state")
@click.argument("model")
@click.argument("version")
@click.argument("state", type=click.Choice(["shadow", "active", "retired"]))
def models_state(model: str, version: str, state: str) -> None:
    """Put VERSION of MODEL in STATE (active: as `promote`; shadow or retired: the model
    may be left with no active version)."""
    from triage.vigilance.records import set_state

    _change_model_state(lambda connection, actor: set_state(connection, model, version,
                                                            state, actor),
                        f"{model} {version} is already {state}")


@models.command("promote")
@click.argument("model")
@click.argument("version")
def models_promote(model: str, version: str) -> None:
    """Make VERSION the active version of MODEL; the version active until then goes to
    shadow, so promoting it again rolls back."""
    from triage.vigilance.records import promote

    _change_model_state(lambda connection, actor: promote(connection, model, version, actor),
                        f"{model} {version} is already active")


def _change_model_state(change: Callable[[Any, str], list[Any]], unchanged: str) -> None:
    """Make a change of model version states, audit each transition and print it."""
    from triage.errors import TriageError

    audit_connection = _audit_reachable()
    actor = _os_user()
    try:
        with _vigilance_db(Settings()) as connection:
            transitions = change(connection, actor)
    except TriageError as exc:
        raise click.ClickException(str(exc)) from exc
    for t in transitions:
        _audit_cli(audit_connection, AuditAction.MODEL_STATE_CHANGED,
                   {"model": t.model_id, "version": t.version, "old_state": t.old_state,
                    "new_state": t.new_state, "actor": actor})
        click.echo(f"{t.model_id} {t.version}: {t.old_state} -> {t.new_state}")
    if not transitions:
        click.echo(unchanged)


def _audit_reachable() -> redis.Redis:
    """The audit trail's Redis, checked before a change that must be audited."""
    connection = _redis()
    try:
        connection.ping()
    except redis.RedisError as exc:
        raise click.ClickException("the audit trail (Redis) is unreachable; nothing was "
                                   "changed") from exc
    return connection


@contextmanager
def _vigilance_db(settings: Settings) -> Iterator[Any]:
    """A connection to the vigilance records, migrated (a fresh database works)."""
    from triage.errors import TriageError
    from triage.vigilance.db import connect, migrate

    try:
        connection = connect(settings)
    except TriageError as exc:
        raise click.ClickException(str(exc)) from exc
    with connection:
        try:
            migrate(connection)
        except TriageError as exc:
            raise click.ClickException(str(exc)) from exc
        connection.commit()
        yield connection


@contextmanager
def _study_resolver(settings: Settings) -> Iterator[Callable[[str, str], list[str]]]:
    """Finds studies by accession number and patient ID in Orthanc."""
    from triage.orthanc import OrthancClient
    from triage.vigilance.records import orthanc_resolver

    client = OrthancClient.from_settings(settings)
    try:
        yield orthanc_resolver(client)
    finally:
        client.close()


@main.group()
def outcomes() -> None:
    """Ground truth of the vigilance: what was found in the studies."""


@outcomes.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--source", type=click.Choice(["feedback", "report", "pathology", "follow-up"]),
              default="report", show_default=True, help="Source of the rows that name none.")
@click.option("--observer", default=None,
              help="Who stated the outcomes (default: import:<file name>).")
def outcomes_import(file: Path, source: str, observer: str | None) -> None:
    """Import outcomes from FILE (CSV with a header row: accession_number, patient_id,
    finding_code, present; optional source, recorded_at, label, study_instance_uid).

    Each study is found in Orthanc by its accession number and patient ID together. Prints
    what was inserted, what was already recorded, and the rejected rows with their line
    number and reason; exits 1 when a row was rejected.
    """
    from triage.errors import TriageError
    from triage.vigilance.records import import_outcomes_csv

    settings = Settings()
    audit_connection = _audit_reachable()
    try:
        with (_vigilance_db(settings) as connection, _study_resolver(settings) as resolve,
              file.open(newline="", encoding="utf-8-sig") as stream):
            report = import_outcomes_csv(connection, stream, resolve, default_source=source,
                                         observer=observer or f"import:{file.name}")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{file.name} is not UTF-8 text") from exc
    except TriageError as exc:
        raise click.ClickException(str(exc)) from exc
    _audit_cli(audit_connection, AuditAction.OUTCOMES_IMPORTED,
               {"inserted": report.inserted, "duplicates": report.duplicates,
                "rejected": len(report.rejected)})
    click.echo(report.summary())
    for line, reason in report.rejected:
        click.echo(f"line {line}: {reason}")
    if report.rejected:
        sys.exit(1)


@main.group()
def vigilance() -> None:
    """Post-market surveillance of the models."""


@vigilance.command("check")
def vigilance_check() -> None:
    """Run the drift and volume checks now (as the workers do every
    TRIAGE_VIGILANCE_CHECK_MINUTES) and print the alerts raised."""
    from triage.errors import TriageError
    from triage.vigilance import clock
    from triage.vigilance.drift import run_checks

    settings = Settings()
    connection = _redis()
    try:
        connection.ping()
        gauge: redis.Redis | None = connection
    except redis.RedisError:
        gauge = None  # the checks run; only the metrics gauge waits for the next run
    try:
        with _vigilance_db(settings) as records:
            raised = run_checks(records, settings, clock.now(settings), connection=gauge)
    except TriageError as exc:
        raise click.ClickException(str(exc)) from exc
    for alert in raised:
        click.echo(f"alert {alert.id} {alert.kind}: {alert.summary}")
    click.echo(f"{len(raised)} alerts raised")


@vigilance.command("export")
@click.option("--model", required=True, help="The model's identifier.")
@click.option("--version", default=None, help="One version (default: every version).")
@click.option("--start", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="First UTC day (default: from the first record).")
@click.option("--end", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="First UTC day after the period (default: up to now).")
@click.option("--format", "file_format", type=click.Choice(["csv", "parquet"]), default="csv",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="The file to write (replaced if it exists).")
def vigilance_export(model: str, version: str | None, start: datetime | None,
                     end: datetime | None, file_format: str, output: Path) -> None:
    """Write the pseudonymised evaluation dataset of MODEL: one row per analysis and output
    label, studies by keyed pseudonym (TRIAGE_VIGILANCE_EXPORT_KEY), subgroup values shared by
    fewer than 5 studies suppressed. Audited, in the vigilance trail too."""
    from triage.errors import TriageError
    from triage.vigilance import clock
    from triage.vigilance.export import (
        ExportFormat,
        ExportQuery,
        dataset,
        file_chunks,
        record_export,
    )

    settings = Settings()
    export_format = ExportFormat(file_format)
    try:
        query = ExportQuery(model_id=model, version=version,
                            start=start.date() if start else None,
                            end=end.date() if end else None)
        key = settings.vigilance_export_secret
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    audit_connection = _audit_reachable()
    try:
        with _vigilance_db(settings) as connection:
            rows = dataset(connection, key, query)
            record_export(connection, actor=_os_user(), query=query,
                          export_format=export_format, rows=len(rows), at=clock.now(settings))
            # The trail entry commits after the file is written: a failed write leaves none.
            partial = output.with_name(output.name + ".partial")
            with partial.open("wb") as stream:
                partial.chmod(0o600)
                for chunk in file_chunks(rows, export_format):
                    stream.write(chunk)
            partial.replace(output)
    except TriageError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"{output} not written: {exc.strerror}") from exc
    _audit_cli(audit_connection, AuditAction.VIGILANCE_EXPORTED,
               {**query.described(), "format": export_format.value, "rows": len(rows)})
    click.echo(f"{len(rows)} rows written to {output}")


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
def samples(directory: Path) -> None:
    """Write the bundled sample studies as DICOM files under DIRECTORY."""
    from triage.samples import write_samples

    for folder in write_samples(directory):
        click.echo(folder)


@main.command()
def reindex() -> None:
    """Rebuild the worklist from Orthanc (its studies and the SRs the service wrote)."""
    from triage.orthanc import OrthancClient
    from triage.reindex import reindex as rebuild_worklist

    configure_logging("reindex")
    settings = Settings()
    connection = redis.Redis.from_url(settings.redis_connection_url)
    report = rebuild_worklist(settings, OrthancClient.from_settings(settings), connection)
    _audit_cli(connection, AuditAction.WORKLIST_REBUILT, {"summary": report.summary()})
    click.echo(report.summary())


def _stop_on_signals(stop: threading.Event) -> None:
    import signal

    def handler(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
