"""Adapter over Orthanc's REST API (through pyorthanc), the service's source of truth.

Every HTTP or connection error is translated here, once, into ``TransientError`` (retry later:
Orthanc is down, restarting, overloaded) or ``PermanentError`` (the resource is gone or the
request is invalid).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pydicom
import urllib3
from pyorthanc import Orthanc

from triage.errors import PermanentError, StudyGone, TransientError
from triage.settings import Settings

DEFAULT_TIMEOUT = 60.0
# Connections kept open for downloading instance files: one per fetch thread of a worker.
FILE_CONNECTIONS = 8
# Orthanc answers these while starting or overloaded; anything else 4xx is permanent.
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Change:
    """One entry of Orthanc's change log (``/changes``)."""

    seq: int
    change_type: str
    resource_id: str
    resource_type: str


@dataclass(frozen=True)
class ChangesPage:
    changes: list[Change]
    last: int
    done: bool


def orthanc_time(value: str) -> datetime | None:
    """Orthanc's timestamps (``ReceptionDate``, ``LastUpdate``: ``20261122T140005``, UTC)."""
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _transport_problem(exc: Exception) -> str:
    """A connection failure in words (the exception itself stays chained for the logs)."""
    timeout = (httpx.TimeoutException, urllib3.exceptions.TimeoutError)
    return "timed out" if isinstance(exc, timeout) else "connection failed"


@contextmanager
def _reachable(what: str) -> Iterator[None]:
    try:
        yield
    except httpx.TransportError as exc:
        raise TransientError(f"Orthanc unreachable for {what}: {_transport_problem(exc)}"
                             ) from exc


def _check_status(what: str, status: int) -> None:
    """Raise a non-2xx answer as the worker's error: retry later, gone, or refused."""
    if status in _TRANSIENT_STATUS:
        raise TransientError(f"Orthanc answered {status} to {what}")
    if status == 404:
        raise StudyGone(f"not found in Orthanc: {what}")
    if not 200 <= status < 300:
        raise PermanentError(f"Orthanc refused {what} ({status})")


def _body(what: str, response: httpx.Response) -> Any:
    """The decoded body of a 2xx answer; any other status raised as the worker's error."""
    _check_status(what, response.status_code)
    content_type = response.headers.get("content-type", "")
    if "json" in content_type:
        return response.json()
    if content_type.startswith("text/"):
        return response.text
    return response.content


class OrthancClient:
    """The few Orthanc calls the service needs, with errors translated."""

    def __init__(self, base_url: str, username: str | None, password: str | None,
                 *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        # Raw responses: pyorthanc reports every non-2xx answer as one generic error, and the
        # worker needs the status to tell "retry later" from "give up".
        self._api = Orthanc(self.base_url, username=username, password=password,
                            return_raw_response=True, timeout=timeout)
        # Instance files are the bulk of what a worker reads (a 300-slice CT is 150 MB);
        # urllib3 reads them about 2.5 times faster than httpx, with a thread-safe pool.
        url = urllib3.util.parse_url(self.base_url)
        self._file_prefix = (url.path or "").rstrip("/")
        pools = urllib3.PoolManager(num_pools=1, maxsize=FILE_CONNECTIONS)
        self._files = pools.connection_from_url(self.base_url)
        self._file_headers = urllib3.make_headers(
            basic_auth=f"{username}:{password}" if username is not None else None)
        # Per connection attempt and per read, as for the other calls: a large file on a
        # slow link is not cut off while it keeps arriving.
        self._file_timeout = urllib3.Timeout(connect=timeout, read=timeout)

    @classmethod
    def from_settings(cls, settings: Settings) -> OrthancClient:
        return cls(settings.orthanc_base_url, settings.orthanc_username, settings.orthanc_secret)

    def close(self) -> None:
        self._api.close()
        self._files.close()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with _reachable(what):
            response = fn(*args, **kwargs)
        return _body(what, response)

    # -- system and change feed -------------------------------------------------------------

    def system(self) -> dict[str, Any]:
        return self._call("GET /system", self._api.get_system)

    def changes(self, since: int, limit: int = 200) -> ChangesPage:
        raw = self._call("GET /changes", self._api.get_changes,
                         params={"since": since, "limit": limit})
        changes = [
            Change(seq=c["Seq"], change_type=c["ChangeType"], resource_id=c["ID"],
                   resource_type=c["ResourceType"])
            for c in raw["Changes"]
        ]
        return ChangesPage(changes=changes, last=int(raw["Last"]), done=bool(raw["Done"]))

    def bulk_content(self, resource_ids: list[str], level: str) -> list[dict[str, Any]]:
        """The resources at ``level`` (Patient, Study, Series, Instance) that hold the given
        resources, each once, in one call; ids Orthanc no longer has are left out.

        Orthanc leaves out ids it does not know, but a resource deleted while it reads the
        others fails the whole call (404); the ids are then asked for one by one.
        """
        if not resource_ids:
            return []
        try:
            return self._bulk_content(resource_ids, level)
        except StudyGone:
            found: dict[str, dict[str, Any]] = {}
            for resource_id in resource_ids:
                try:
                    found.update((r["ID"], r) for r in self._bulk_content([resource_id], level))
                except StudyGone:
                    continue
            return list(found.values())

    def _bulk_content(self, resource_ids: list[str], level: str) -> list[dict[str, Any]]:
        return self._call("POST /tools/bulk-content", self._api.post_tools_bulk_content,
                          json={"Resources": resource_ids, "Level": level})

    def last_change(self) -> int:
        raw = self._call("GET /changes?last", self._api.get_changes, params={"last": ""})
        return int(raw["Last"])

    # -- studies --------------------------------------------------------------------------

    def study(self, study_id: str) -> dict[str, Any]:
        return self._call(f"study {study_id}", self._api.get_studies_id, study_id)

    def series(self, series_id: str) -> dict[str, Any]:
        return self._call(f"series {series_id}", self._api.get_series_id, series_id)

    def study_statistics(self, study_id: str) -> dict[str, Any]:
        """Instance count and sizes of a study (``DiskSize``, ``UncompressedSize`` in bytes)."""
        return self._call(f"statistics of study {study_id}",
                          self._api.get_studies_id_statistics, study_id)

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        return self._call(f"series of study {study_id}", self._api.get_studies_id_series,
                          study_id)

    def series_instances(self, series_id: str) -> list[dict[str, Any]]:
        return self._call(f"instances of series {series_id}",
                          self._api.get_series_id_instances, series_id)

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Simplified tags of one instance (no pixel data)."""
        return self._call(f"tags of instance {instance_id}", self._api.get_instances_id_tags,
                          instance_id, params={"simplify": ""})

    def instance_metadata(self, instance_id: str) -> dict[str, str]:
        """Everything Orthanc recorded about how an instance arrived (e.g. ``RemoteAET``)."""
        return self._call(f"metadata of instance {instance_id}",
                          self._api.get_instances_id_metadata, instance_id,
                          params={"expand": ""})

    def lookup_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc id of the instance with this SOP Instance UID, if Orthanc has it."""
        found = self._call("lookup", self._api.post_tools_lookup, sop_instance_uid)
        ids = [r["ID"] for r in found if r["Type"] == "Instance"]
        return ids[0] if ids else None

    # -- DICOM destinations -------------------------------------------------------------

    def register_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or update) a DICOM node Orthanc may send to. The node may only be sent
        to: Orthanc would otherwise let its AE title store, query and retrieve as well."""
        self._call(f"PUT /modalities/{name}", self._api.put_modalities_id, name,
                   json={"AET": aet, "Host": host, "Port": port, "AllowEcho": True,
                         "AllowStore": False, "AllowFind": False, "AllowFindWorklist": False,
                         "AllowGet": False, "AllowMove": False, "AllowStorageCommitment": False,
                         "AllowTranscoding": True})

    def echo(self, name: str, timeout: int = 10) -> None:
        """C-ECHO the node; raises TransientError when it does not answer."""
        self._call(f"C-ECHO to {name}", self._api.post_modalities_id_echo, name,
                   json={"Timeout": timeout})

    def send(self, name: str, instance_ids: list[str], timeout: int = 60) -> dict[str, Any]:
        """C-STORE instances to a node through an Orthanc store job (synchronous)."""
        return self._call(f"C-STORE to {name}", self._api.post_modalities_id_store, name,
                          json={"Resources": instance_ids, "Synchronous": True,
                                "Timeout": timeout})

    def lookup_study(self, study_instance_uid: str) -> str | None:
        """Orthanc id of the study with this Study Instance UID, if Orthanc has it."""
        found = self._call("lookup", self._api.post_tools_lookup, study_instance_uid)
        ids = [r["ID"] for r in found if r["Type"] == "Study"]
        return ids[0] if ids else None

    def studies(self) -> list[str]:
        return self._call("GET /studies", self._api.get_studies)

    # -- instances ------------------------------------------------------------------------

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of one instance, as Orthanc stored it (safe from several threads)."""
        what = f"file of instance {instance_id}"
        try:
            response = self._files.request(
                "GET", f"{self._file_prefix}/instances/{instance_id}/file",
                headers=self._file_headers, timeout=self._file_timeout, retries=False)
        except urllib3.exceptions.HTTPError as exc:
            raise TransientError(f"Orthanc unreachable for {what}: {_transport_problem(exc)}"
                                 ) from exc
        _check_status(what, response.status)
        return response.data

    def instance_dataset(self, instance_id: str) -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(self.instance_file(instance_id)))

    def store(self, dicom_bytes: bytes) -> dict[str, Any]:
        """Store one DICOM file; an instance Orthanc already has is reported, not duplicated."""
        return self._call("POST /instances", self._api.post_instances, dicom_bytes)
