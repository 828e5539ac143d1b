"""The score cache: what one model version concluded of each image, kept in Redis.

One hash per (model id, version, series): the field is the image's SOP Instance UID, the value
its scores (every model output the manifest uses, as float32 values written exactly) and what
the analysis at stability needs of the image without reading it again: its Orthanc id, its
storage class, the identifiers the SR checks (Study Instance UID, Patient ID as text), its
size, and its place in the series (position along the slice normal, Instance Number).

A counter beside each hash counts the images scored into it: an image scored twice (which the
cache exists to prevent) shows as a count above the number of images.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from pydicom.dataset import Dataset

from triage.copying.header import identifier_text
from triage.pixels import instance_number, position_along_normal
from triage.settings import Settings
from triage.worklist import KEY_PREFIX

SCORES_KEY = KEY_PREFIX + ":stream:scores:{model}@{version}:{series}"
COMPUTED_KEY = KEY_PREFIX + ":stream:computed:{model}@{version}:{series}"


@dataclass(frozen=True)
class ScoredImage:
    """One image's scores and what the analysis needs of its header."""

    sop_instance_uid: str
    sop_class_uid: str
    orthanc_id: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    rows: int
    columns: int
    position: float | None
    number: int
    scores: dict[str, list[float]]

    @classmethod
    def of(cls, header: Dataset, orthanc_id: str, scores: dict[str, list[float]]
           ) -> ScoredImage:
        return cls(
            sop_instance_uid=str(header.SOPInstanceUID),
            sop_class_uid=str(header.SOPClassUID),
            orthanc_id=orthanc_id,
            study_instance_uid=identifier_text(header, "StudyInstanceUID"),
            series_instance_uid=str(header.SeriesInstanceUID),
            patient_id=identifier_text(header, "PatientID"),
            rows=int(header.Rows),
            columns=int(header.Columns),
            position=position_along_normal(header),
            number=instance_number(header),
            scores=scores,
        )

    def header(self) -> Dataset:
        """A header with what the SR reads of an image it references (its UIDs) and checks
        (Study Instance UID and Patient ID are one per study)."""
        ds = Dataset()
        if not self.patient_id.isascii():
            ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.PatientID = self.patient_id
        ds.Rows = self.rows
        ds.Columns = self.columns
        return ds

    def dumps(self) -> str:
        return json.dumps({
            "c": self.sop_class_uid, "o": self.orthanc_id, "u": self.study_instance_uid,
            "s": self.series_instance_uid, "p": self.patient_id, "r": self.rows,
            "k": self.columns, "z": self.position, "n": self.number, "v": self.scores,
        }, separators=(",", ":"))

    @classmethod
    def loads(cls, sop_instance_uid: str, raw: str | bytes) -> ScoredImage:
        value: dict[str, Any] = json.loads(raw)
        return cls(sop_instance_uid=sop_instance_uid, sop_class_uid=value["c"],
                   orthanc_id=value["o"], study_instance_uid=value["u"],
                   series_instance_uid=value["s"], patient_id=value["p"], rows=value["r"],
                   columns=value["k"], position=value["z"], number=value["n"],
                   scores={k: [float(x) for x in v] for k, v in value["v"].items()})


class ScoreCache:
    """The scores of one model version (``model``, ``version``)."""

    def __init__(self, connection: redis.Redis, settings: Settings, model: str,
                 version: str) -> None:
        self.redis = connection
        self.model = model
        self.version = version
        self.ttl = max(1, int(settings.stream_cache_hours * 3600))

    def _keys(self, series_uid: str) -> tuple[str, str]:
        names = {"model": self.model, "version": self.version, "series": series_uid}
        return SCORES_KEY.format(**names), COMPUTED_KEY.format(**names)

    def scored(self, series_uid: str) -> dict[str, ScoredImage]:
        """Every image of the series scored so far, by SOP Instance UID."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self._keys(series_uid)[0]))
        return {k.decode(): ScoredImage.loads(k.decode(), v) for k, v in raw.items()}

    def known(self, series_uid: str, sop_instance_uids: Sequence[str]) -> set[str]:
        """Which of ``sop_instance_uids`` are scored already."""
        if not sop_instance_uids:
            return set()
        values = cast(list[Any], self.redis.hmget(self._keys(series_uid)[0],
                                                  list(sop_instance_uids)))
        return {uid for uid, v in zip(sop_instance_uids, values, strict=True) if v is not None}

    def add(self, series_uid: str, images: Iterable[ScoredImage]) -> int:
        """Keep the scores of ``images`` (one series) and count them as computed; returns
        the number of images of the series scored so far."""
        images = list(images)
        scores, computed = self._keys(series_uid)
        with self.redis.pipeline() as pipe:
            if images:
                pipe.hset(scores, mapping={i.sop_instance_uid: i.dumps() for i in images})
                pipe.incrby(computed, len(images))
            pipe.expire(scores, self.ttl)
            pipe.expire(computed, self.ttl)
            pipe.hlen(scores)
            return int(pipe.execute()[-1])

    def computed(self, series_uid: str) -> int:
        """How many images were scored into the series' cache (an image scored twice counts
        twice)."""
        raw = self.redis.get(self._keys(series_uid)[1])
        return int(cast(bytes, raw)) if raw else 0
