"""The one settings object of the service: environment variables prefixed ``TRIAGE_``.

Every process of a stack (API, watcher, workers, the ``triage`` commands) builds the same
``Settings`` from the same environment and data directory, so they all talk to the same
Orthanc, Redis and PostgreSQL. Secrets that are not given in the environment are generated once
into the data directory (``secrets.json``, mode 0600) by the local stack and read back from
there.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Where a checkout keeps its model packages and the Orthanc configuration template.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_STABLE_AGE = 5
DEFAULT_WORKERS = 2
SECRETS_FILE = "secrets.json"
_PLACEHOLDERS = {"", "changeme", "change-me", "password", "secret", "orthanc", "postgres"}


class Destination(BaseModel):
    """A DICOM node (the hospital PACS) that receives the results."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    aet: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    send: Literal["all", "positive", "critical"] = "all"
    key_images: bool = Field(default=False, description="also send a burned-in key image")


class DicomSender(BaseModel):
    """A modality or PACS allowed to C-STORE into Orthanc (``TRIAGE_DICOM_SENDERS``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    aet: str = Field(pattern=r"^[ -~]{1,16}$", description="its calling AE title")
    host: str | None = Field(
        default=None, description="its IP address: when any sender gives one, Orthanc also "
        "checks the address of every sender (then all must give one)")

    @field_validator("aet")
    @classmethod
    def _aet(cls, value: str) -> str:
        if value != value.strip() or "\\" in value:
            raise ValueError(f"AE title {value!r}: no backslash, no leading/trailing spaces")
        return value

    @field_validator("host")
    @classmethod
    def _ip_address(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"sender host {value!r}: an IP address, not a name (Orthanc "
                                 "compares it with the caller's address)") from None
        return value


class Webhook(BaseModel):
    """An HTTP endpoint (paging, RIS, messaging) notified of results."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    url: str = Field(pattern=r"^https?://")
    on: Literal["critical", "urgent", "positive"] = "critical"
    timeout_seconds: float = Field(default=10.0, gt=0)
    preliminary: bool = Field(
        default=False, description="Also told of preliminary results, raised while a study's "
        "images are still arriving (streaming); the final result then follows as usual, "
        "even when it no longer meets the rule")


class RisSender(BaseModel):
    """A RIS (or order placer) allowed to send orders to the MLLP listener
    (``TRIAGE_RIS_SENDERS``). Each given value must match; an omitted one matches anything."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    host: str | None = Field(default=None, description="its IP address")
    application: str | None = Field(
        default=None, max_length=180, description="MSH-3 (Sending Application), first component")
    facility: str | None = Field(
        default=None, max_length=180, description="MSH-4 (Sending Facility), first component")

    @field_validator("host")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value


class RisDestination(BaseModel):
    """A RIS that receives each result as an HL7 v2 ORU^R01 over MLLP, preliminary."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    version: Literal["2.3", "2.5.1"] = "2.5.1"
    send: Literal["all", "positive", "critical"] = "all"
    # HD-1 (IS) of MSH-5 and MSH-6: at most 20 characters.
    receiving_application: str = Field(default="RIS", max_length=20)
    receiving_facility: str = Field(default="", max_length=20)
    timeout_seconds: float = Field(default=10.0, gt=0, description="Connect and ACK wait")


class FhirDestination(BaseModel):
    """A FHIR server that receives each result as a preliminary DiagnosticReport with one
    Observation per finding (conditional create, or PUT on the report's id)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    base_url: str = Field(pattern=r"^https?://")
    fhir_version: Literal["R4", "R5"] = "R4"
    token: str | None = Field(default=None, description="Bearer token sent with each request")
    method: Literal["conditional-create", "put"] = "conditional-create"
    send: Literal["all", "positive", "critical"] = "all"
    timeout_seconds: float = Field(default=10.0, gt=0)


class Settings(BaseSettings):
    """Configuration of one triage stack. Field ``x`` is read from ``TRIAGE_X``."""

    model_config = SettingsConfigDict(env_prefix="TRIAGE_", extra="ignore")

    data_dir: Path = Path("var")
    models_dir: Path = PROJECT_ROOT / "models"
    web_assets_dir: Path = Field(
        default=PROJECT_ROOT / "node_modules", description="Where the front-end packages "
        "from package-lock.json are installed (Swagger UI for /docs)")

    orthanc_url: str | None = Field(
        default=None, description="Base URL of an Orthanc run elsewhere (compose); local if unset"
    )
    orthanc_http_port: int = 8042
    orthanc_dicom_port: int = 4242
    orthanc_aet: str = "TRIAGE"
    dicom_senders: list[DicomSender] = Field(
        default_factory=list, description="JSON list of the modalities/PACS allowed to store "
        "(see README, Security); unset: any AE title may store (development only)")
    dicom_tls_cert: Path | None = Field(
        default=None, description="Orthanc's DICOM TLS certificate (PEM); with the key and "
        "the trusted bundle, Orthanc's DICOM port accepts only mutually authenticated TLS")
    dicom_tls_key: Path | None = Field(
        default=None, description="Private key of TRIAGE_DICOM_TLS_CERT (PEM, unencrypted)")
    dicom_tls_trusted: Path | None = Field(
        default=None, description="Certificates (PEM bundle) of the senders, or of the CA "
        "that signs them")
    orthanc_username: str = "triage"
    orthanc_password: str | None = None
    orthanc_public_url: str | None = Field(
        default=None, description="Orthanc's address as people's browsers reach it (viewer "
        "links); the internal URL if unset"
    )

    redis_url: str | None = Field(
        default=None, description="URL of a running Redis; the local stack starts one if unset"
    )
    redis_port: int = 6379
    redis_password: str | None = None

    database_url: str | None = Field(
        default=None, description="postgresql://user:password@host:port/db of the service's "
        "records (vigilance); the local stack starts its own PostgreSQL if unset")
    database_password: str | None = Field(
        default=None, description="Password for TRIAGE_DATABASE_URL when the URL carries none "
        "(a secret kept apart from the address, as Kubernetes Secrets are)")
    postgres_port: int = 5432
    vigilance_export_key: SecretStr | None = Field(
        default=None, description="Key of the study pseudonyms of the vigilance evaluation "
        "export (HMAC-SHA256 of the Study Instance UID): the same key gives the same "
        "pseudonyms in every export. At least 16 characters; generated once into the data "
        "directory in development if unset, required otherwise")
    vigilance_clock_offset_days: float = Field(
        default=0.0, description="Days added to the clock of the vigilance records (analysis "
        "and arrival times, checks, alerts); for validation drills that replay weeks of "
        "studies in an hour. Leave 0 in production")
    vigilance_states_seconds: float = Field(
        default=30.0, gt=0, description="How often a worker reads the model version states "
        "(active, shadow, retired) from PostgreSQL; a change made by an admin applies within it")
    vigilance_check_minutes: int = Field(
        default=60, ge=1, description="How often the workers run the drift and volume checks "
        "(an RQ job on the vigilance queue, served after the analyses); `triage vigilance "
        "check` runs them at once")
    vigilance_baseline_days: int = Field(
        default=14, ge=1, description="Days of a version's first analyses that become its "
        "baseline when no admin set one (longer when they hold too few studies)")
    vigilance_baseline_min_days: int = Field(
        default=7, ge=2, description="A baseline needs at least this many days with studies")
    vigilance_baseline_min_studies: int = Field(
        default=100, ge=1, description="A baseline needs at least this many studies")
    vigilance_cusum_k: float = Field(
        default=0.5, gt=0, description="CUSUM reference value of the daily flag rate, in "
        "baseline sigmas (0.5: tuned to a shift of one sigma; FDA AIM-CU default)")
    vigilance_cusum_h: float = Field(
        default=4.0, gt=0, description="CUSUM decision threshold, in baseline sigmas (FDA "
        "AIM-CU default); higher: fewer false alarms, later detection")
    vigilance_window_days: int = Field(
        default=7, ge=1, description="The last complete UTC days whose scores and inputs are "
        "compared with the baseline period (KS and chi-square tests)")
    vigilance_window_min_studies: int = Field(
        default=30, ge=5, description="A score or input test needs at least this many values "
        "in the window and in the baseline period; fewer: the test is not run")
    vigilance_score_alpha: float = Field(
        default=0.01, gt=0, lt=1, description="Level of the score-distribution tests (KS), "
        "held as a false-discovery rate across the labels and versions of a check "
        "(Benjamini-Hochberg)")
    vigilance_input_fdr: float = Field(
        default=0.05, gt=0, lt=1, description="False-discovery rate of the input-drift tests "
        "(manufacturer, model name, kernel, slice thickness, kVp, pixel spacing), corrected "
        "together across the versions of a check (Benjamini-Hochberg)")
    vigilance_volume_weeks: int = Field(
        default=4, ge=1, description="Past weeks whose same hours of the week give the "
        "expected arrivals of a modality")
    vigilance_volume_hours: int = Field(
        default=3, ge=1, description="The last complete hours whose arrivals are compared "
        "with the expectation")
    vigilance_volume_p: float = Field(
        default=0.001, gt=0, lt=1, description="A volume alert when so few studies arrived "
        "that a Poisson count with the expected mean would be this unlikely to be as low")
    vigilance_volume_min_expected: float = Field(
        default=10.0, gt=0, description="No volume alert when fewer studies than this were "
        "expected over the hours compared (quiet nights)")
    vigilance_silent_hours: int = Field(
        default=6, ge=1, description="A volume alert for a model that analysed nothing this "
        "long while the studies it usually analyses kept arriving")
    vigilance_webhooks: list[str] = Field(
        default_factory=list, description="Names of the webhooks (TRIAGE_WEBHOOKS) told of "
        "vigilance alerts; empty: every configured webhook")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(
        default=2, ge=1, description="API processes; more serve more concurrent readers"
    )
    api_tls_cert: Path | None = Field(
        default=None, description="The API's HTTPS certificate (PEM, with its chain); with "
        "TRIAGE_API_TLS_KEY, the API answers over HTTPS only")
    api_tls_key: Path | None = Field(default=None, description="Its private key (PEM)")
    public_url: str | None = Field(
        default=None, description="URL people use to reach the web pages (printed by triage up)"
    )

    stable_age: int = Field(default=DEFAULT_STABLE_AGE, ge=1)
    watcher_poll_seconds: float = Field(
        default=0.1, gt=0, description="How often the leading watcher reads Orthanc's change "
        "log: a study is found complete up to this long after its stable age")
    streaming: bool = Field(
        default=True, description="Analyse the images of streaming models (manifest "
        "preprocessing.streaming) as they arrive, raise the priority on a preliminary "
        "result, and leave the analysis at stability only the images not seen yet")
    stream_batch_seconds: float = Field(
        default=0.25, gt=0, description="Longest wait of an arrived image before its batch "
        "is sent for streaming analysis (a batch also goes when it reaches the model's "
        "batch size)")
    stream_max_waiting: int = Field(
        default=8, ge=1, description="Streaming batches waiting at most; beyond that, and "
        "while any analysis of a complete study waits, arrivals are left to the analysis at "
        "stability (no backlog of streaming work)")
    stream_cache_hours: float = Field(
        default=6.0, gt=0, description="How long per-image scores are kept (a re-analysis "
        "after late images within this time computes only the new ones)")
    watcher_lease_seconds: float = Field(
        default=10.0, gt=0, description="How long the leading watcher's lease lasts unrenewed: "
        "a standby watcher takes over within this time after the leader dies")
    job_timeout: int = Field(default=600, ge=10)
    job_retries: int = Field(default=3, ge=0)
    fetch_threads: int = Field(default=4, ge=1)
    worker_nice: int = Field(
        default=10, ge=0, le=19, description="CPU priority workers give up: image reception "
        "by Orthanc comes first when the server is busy (0: same priority)"
    )
    max_study_instances: int = Field(
        default=5000, ge=1, description="Larger studies are skipped, not analysed"
    )
    max_study_megabytes: int = Field(
        default=4096, ge=1, description="Studies taking more space (uncompressed) are skipped"
    )
    max_wait_minutes: int = Field(
        default=60, ge=1, description="A routine study waiting longer is promoted to urgent"
    )
    emergency_locations: list[str] = Field(
        default=["*EMERG*", "ED", "ER", "A&E", "*ACCIDENT*", "*URGENCE*", "*NOTAUFNAHME*"],
        description="Patterns of department, requesting service or patient location that "
        "mean the emergency department",
    )
    emergency_aets: list[str] = Field(
        default_factory=list, description="Calling AE titles of emergency-department modalities"
    )
    claim_minutes: int = Field(default=30, ge=1, description="How long a claim lasts")
    viewer_url_template: str = Field(
        default="{orthanc_url}/app/explorer.html#study?uuid={orthanc_id}",
        description="Link to open a study; fields: orthanc_url, orthanc_id, "
        "study_instance_uid, accession_number",
    )
    oidc_issuer: str | None = Field(default=None, description="Enables single sign-on")
    oidc_audience: str | None = None
    oidc_jwks_file: Path | None = None
    oidc_jwks_url: str | None = None
    oidc_client_id: str | None = Field(
        default=None, description="This service's client id at the identity provider: enables "
        "the 'Sign in with the hospital account' button (authorization code with PKCE)")
    oidc_client_secret: str | None = Field(
        default=None, description="Client secret, for a confidential client; a public client "
        "relies on PKCE alone")
    oidc_scopes: str = "openid profile"
    oidc_role_claim: str = "roles"
    oidc_role_map: dict[str, str] = Field(
        default_factory=dict, description="identity-provider role -> service role"
    )
    session_lock_minutes: int = Field(
        default=10, ge=1, description="A page left without keyboard or mouse input this long "
        "hides patient data behind a lock screen; unlocking needs signing in again")
    session_idle_minutes: int = Field(
        default=60, ge=1, description="A browser session unused this long is signed out")
    session_max_hours: int = Field(
        default=12, ge=1, description="A browser session ends this long after signing in")
    cookie_secure: bool | None = Field(
        default=None, description="Mark the session cookie Secure; unset: when the page is "
        "served over HTTPS (TRIAGE_PUBLIC_URL or the request)")
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed to call the API from a browser"
    )
    max_request_bytes: int = Field(default=1_000_000, ge=1024)
    auth_failures_per_minute: int = Field(
        default=20, ge=1, description="Failed authentications from one address before 429"
    )
    destinations: list[Destination] = Field(
        default_factory=list, description="JSON list of DICOM destinations (see README)"
    )
    webhooks: list[Webhook] = Field(
        default_factory=list, description="JSON list of webhooks notified of results"
    )
    ris_destinations: list[RisDestination] = Field(
        default_factory=list, description="JSON list of RIS that receive each result as an "
        "HL7 v2 ORU^R01 (preliminary) over MLLP (see README)")
    fhir_destinations: list[FhirDestination] = Field(
        default_factory=list, description="JSON list of FHIR servers that receive each result "
        "as a preliminary DiagnosticReport (see README)")
    hl7_application: str = Field(
        default="TRIAGE", min_length=1, max_length=20,
        description="This service in HL7 v2 messages: MSH-3 of results, MSH-5 expected of "
        "orders when the sender fills it")
    hl7_facility: str = Field(default="", max_length=20, description="MSH-4 of results")
    ris_listen_host: str = Field(default="127.0.0.1", description="Address of the MLLP listener")
    ris_listen_port: int = Field(default=2575, ge=0, le=65535)
    ris_senders: list[RisSender] = Field(
        default_factory=list, description="JSON list of the RIS allowed to send orders; none: "
        "only clients presenting a certificate of TRIAGE_RIS_TLS_CA (when set)")
    ris_tls_cert: Path | None = Field(default=None, description="MLLP over TLS: certificate")
    ris_tls_key: Path | None = Field(default=None, description="MLLP over TLS: private key")
    ris_tls_ca: Path | None = Field(
        default=None, description="MLLP over TLS: clients must present a certificate signed "
        "by this CA (then admitted as senders)")
    ris_max_message_bytes: int = Field(
        default=262_144, ge=1024, description="Larger messages close the connection")
    ris_idle_seconds: float = Field(
        default=60.0, gt=0, description="A client silent this long is disconnected")
    ris_order_days: int = Field(default=30, ge=1, description="How long orders are kept")
    delivery_retry_seconds: list[int] = Field(
        default=[10, 30, 60, 120, 300, 600],
        description="Waits between delivery attempts; the last repeats")
    delivery_retries: int = Field(
        default=24, ge=0, description="Attempts after the first (24: a bit over 3 hours)")
    timezone: str = Field(
        default="UTC", description="The site's time zone (IANA name, e.g. Europe/Paris): the "
        "UTC offset written into results of studies that do not state their own. Containers "
        "run in UTC, so the process's zone is never used"
    )
    development: bool = Field(
        default=True, description="Allows generated secrets; hospitals set it to false"
    )

    @field_validator("ris_tls_cert", "ris_tls_key", "ris_tls_ca", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        # Compose passes an unset variable as an empty string.
        return None if value == "" else value

    @field_validator("data_dir", "models_dir", "web_assets_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("orthanc_password", "redis_password", "database_password")
    @classmethod
    def _no_placeholder(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() in _PLACEHOLDERS:
            raise ValueError(f"placeholder secret {value!r} refused: set a real one")
        return value

    @field_validator("vigilance_export_key")
    @classmethod
    def _export_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        secret = value.get_secret_value().strip()
        if secret.lower() in _PLACEHOLDERS:
            raise ValueError("placeholder TRIAGE_VIGILANCE_EXPORT_KEY refused: set a real one")
        if len(secret) < 16:
            raise ValueError("TRIAGE_VIGILANCE_EXPORT_KEY must have at least 16 characters")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("TRIAGE_DATABASE_URL: postgresql://user:password@host:port/db")
        password = unquote(parts.password) if parts.password is not None else None
        if password is not None and password.strip().lower() in _PLACEHOLDERS:
            raise ValueError(f"placeholder secret {password!r} in TRIAGE_DATABASE_URL refused: "
                             "set a real one")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        given = [p for p in (self.api_tls_cert, self.api_tls_key) if p is not None]
        if len(given) == 1:
            raise ValueError("set both TRIAGE_API_TLS_CERT and TRIAGE_API_TLS_KEY, or neither")
        for path in given:
            if not path.is_file():
                raise ValueError(f"API TLS file {path} does not exist")
        return self

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}: use an IANA name such as "
                             "Europe/Paris") from None
        return value

    # -- derived values -------------------------------------------------------------------

    @property
    def site_zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def local_orthanc(self) -> bool:
        return self.orthanc_url is None

    @property
    def local_redis(self) -> bool:
        return self.redis_url is None

    @property
    def local_postgres(self) -> bool:
        return self.database_url is None

    @property
    def orthanc_base_url(self) -> str:
        return (self.orthanc_url or f"http://127.0.0.1:{self.orthanc_http_port}").rstrip("/")

    @property
    def orthanc_browser_url(self) -> str:
        return (self.orthanc_public_url or self.orthanc_base_url).rstrip("/")

    @property
    def api_base_url(self) -> str:
        scheme = "https" if self.api_tls_cert else "http"
        return (self.public_url or f"{scheme}://{self.api_host}:{self.api_port}").rstrip("/")

    @cached_property
    def stored_secrets(self) -> dict[str, str]:
        """Secrets generated for the local stack, created on first use."""
        return load_or_create_secrets(self.data_dir)

    @property
    def orthanc_secret(self) -> str:
        if self.orthanc_password:
            return self.orthanc_password
        if not self.development:
            raise ValueError("TRIAGE_ORTHANC_PASSWORD must be set outside development")
        return self.stored_secrets["orthanc_password"]

    @property
    def vigilance_export_secret(self) -> bytes:
        """The key of the export's study pseudonyms."""
        if self.vigilance_export_key is not None:
            return self.vigilance_export_key.get_secret_value().strip().encode()
        if not self.development:
            raise ValueError("TRIAGE_VIGILANCE_EXPORT_KEY must be set outside development")
        return self.stored_secrets["vigilance_export_key"].encode()

    @property
    def redis_secret(self) -> str | None:
        if self.redis_password:
            return self.redis_password
        if self.local_redis:
            return self.stored_secrets["redis_password"]
        return None

    @property
    def redis_connection_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        secret = quote(self.redis_secret or "", safe="")
        return f"redis://:{secret}@127.0.0.1:{self.redis_port}/0"

    @property
    def database_connection_url(self) -> str:
        if self.database_url:
            parts = urlsplit(self.database_url)
            if self.database_password and parts.password is None and parts.username:
                secret = quote(self.database_password, safe="")
                host = parts.netloc.rsplit("@", 1)[1]
                return parts._replace(netloc=f"{parts.username}:{secret}@{host}").geturl()
            return self.database_url
        # The local PostgreSQL asks for the generated password over TCP, like the local Redis.
        secret = quote(self.stored_secrets["postgres_password"], safe="")
        return f"postgresql://triage:{secret}@127.0.0.1:{self.postgres_port}/triage"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"


def load_or_create_secrets(data_dir: Path) -> dict[str, str]:
    """Read ``secrets.json`` in ``data_dir``, generating any missing secret (mode 0600)."""
    path = data_dir / SECRETS_FILE
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    wanted = ("orthanc_password", "redis_password", "postgres_password",
              "vigilance_export_key")
    if all(stored.get(name) for name in wanted):
        return stored
    for name in wanted:
        stored.setdefault(name, secrets.token_urlsafe(24))
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(stored, handle)
    os.replace(tmp, path)
    return stored


def get_settings() -> Settings:
    return Settings()
