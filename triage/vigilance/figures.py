"""Performance figures of a model version over a period, read from the vigilance records.

The figures cover the studies the version analysed as the active model, ``start <= analysed_at
< end``; shadow runs are compared elsewhere. Each output label of the version gets its own
figures: how many studies were analysed and flagged (over the period and per UTC day), how many
have a ground truth, and how often the flags were right.

The ground truth of a study for a finding is its latest ground-truth row for that code
(``recorded_at``), from any source and observer, counting rows recorded for this model and rows
recorded for no model in particular. Rows stated at the same instant that disagree resolve to
"present": the conservative reading, which never hides a finding someone recorded.

PPV, specificity and agreement use every study with a ground truth. Sensitivity and NPV need
the studies the model did not flag as much as those it did; feedback on flagged studies alone
would inflate them (verification bias). They are therefore computed only from report outcomes,
and only when every study analysed in the period has one; otherwise they are None and
``sensitivity_note`` says why.

Subgroups split the same figures by acquisition attributes and patient band. A cell with fewer
studies than the minimum count shows its dimension and value but no count or proportion, so
that small groups cannot be singled out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import psycopg
from psycopg.rows import TupleRow

from triage.vigilance.statistics import Confusion, Proportion, confusion, proportion

# The source whose outcomes cover every study (each study gets a signed report).
COMPLETE_SOURCE = "report"
DEFAULT_MIN_COUNT = 5
UNKNOWN = "unknown"
SENSITIVITY_NOTE = ("needs report outcomes for every analysed study of the period "
                    "(verification bias)")
NO_STUDIES_NOTE = "no studies analysed in the period"
DIMENSIONS = ("manufacturer", "station", "institution", "age_band", "sex",
              "slice_thickness_band")
# Upper bounds (inclusive, in mm) of the slice-thickness bands, thinnest first.
SLICE_THICKNESS_BANDS = ((1.0, "<=1 mm"), (2.5, "1-2.5 mm"), (5.0, "2.5-5 mm"))
THICKEST_BAND = ">5 mm"


@dataclass(frozen=True)
class DayFigures:
    """Studies analysed and flagged on one UTC day."""

    date: date
    analysed: int
    flagged: Proportion


@dataclass(frozen=True)
class VersionFigures:
    """The figures of one output label of a model version over ``[start, end)``."""

    model_id: str
    version: str
    label: str
    code: str
    start: datetime
    end: datetime
    analysed: int
    flagged: Proportion
    daily: list[DayFigures]
    coverage: Proportion
    report_coverage: Proportion
    ppv: Proportion
    specificity: Proportion
    agreement: Proportion
    sensitivity: Proportion | None
    npv: Proportion | None
    sensitivity_note: str | None


@dataclass(frozen=True)
class SubgroupCell:
    """The figures of one output label in one subgroup (``dimension`` = ``value``).

    ``suppressed`` cells had fewer studies than the minimum count: every count and proportion
    is None.
    """

    dimension: str
    value: str
    label: str
    code: str
    suppressed: bool
    analysed: int | None
    flagged: Proportion | None
    coverage: Proportion | None
    ppv: Proportion | None
    specificity: Proportion | None


@dataclass(frozen=True)
class _Output:
    """One output of one analysed study, with the attributes that define subgroups."""

    study_uid: str
    analysed_at: datetime
    label: str
    code: str
    flagged: bool
    attributes: dict[str, str]


@dataclass(frozen=True)
class Truth:
    """One ground-truth row: whether ``study_uid`` had the finding ``code``."""

    study_uid: str
    code: str
    present: bool
    source: str
    recorded_at: datetime


_OUTPUTS = """
SELECT a.study_uid, a.analysed_at, o.label, o.code, o.flagged,
       a.manufacturer, a.manufacturer_model_name, a.station_name, a.calling_aet,
       a.institution, a.age_band, a.sex, a.slice_thickness_mm
FROM analyses a JOIN analysis_outputs o ON o.analysis_id = a.id
WHERE a.model_id = %(model)s AND a.version = %(version)s AND a.role = 'active'
  AND a.analysed_at >= %(start)s AND a.analysed_at < %(end)s
  AND (%(label)s::text IS NULL OR o.label = %(label)s)
ORDER BY a.analysed_at, a.study_uid, o.label
"""

_TRUTH = """
SELECT g.study_uid, g.code, g.present, g.source, g.recorded_at
FROM ground_truth g
WHERE (g.model_id IS NULL OR g.model_id = %(model)s)
  AND g.study_uid IN (
      SELECT a.study_uid FROM analyses a
      WHERE a.model_id = %(model)s AND a.version = %(version)s AND a.role = 'active'
        AND a.analysed_at >= %(start)s AND a.analysed_at < %(end)s)
"""


def figures(conn: psycopg.Connection[TupleRow], model_id: str, version: str, start: datetime,
            end: datetime, *, label: str | None = None) -> list[VersionFigures]:
    """The figures of each output label (or only ``label``) of a version over the period.

    ``start`` and ``end`` are aware datetimes; the period includes ``start`` and excludes
    ``end``. Labels without analyses in the period are absent.
    """
    outputs, truths = _read(conn, model_id, version, start, end, label)
    latest = latest_truth(truths)
    latest_report = latest_truth(t for t in truths if t.source == COMPLETE_SOURCE)
    days = _days(start, end)
    result: list[VersionFigures] = []
    for (name, code), group in _by_label(outputs).items():
        per_day: dict[date, list[bool]] = defaultdict(list)
        for output in group:
            per_day[output.analysed_at.astimezone(UTC).date()].append(output.flagged)
        flags = [output.flagged for output in group]
        known = _decisions_with_truth(group, latest)
        reported = _decisions_with_truth(group, latest_report)
        table = _confusion(known)
        complete = bool(group) and len(reported) == len(group)
        report_table = _confusion(reported) if complete else None
        result.append(VersionFigures(
            model_id=model_id, version=version, label=name, code=code, start=start, end=end,
            analysed=len(group), flagged=proportion(sum(flags), len(flags)),
            daily=[DayFigures(date=day, analysed=len(per_day[day]),
                              flagged=proportion(sum(per_day[day]), len(per_day[day])))
                   for day in days],
            coverage=proportion(len(known), len(group)),
            report_coverage=proportion(len(reported), len(group)),
            ppv=table.ppv(), specificity=table.specificity(), agreement=table.agreement(),
            sensitivity=report_table.sensitivity() if report_table else None,
            npv=report_table.npv() if report_table else None,
            sensitivity_note=None if complete else (
                SENSITIVITY_NOTE if group else NO_STUDIES_NOTE)))
    return result


def subgroups(conn: psycopg.Connection[TupleRow], model_id: str, version: str, start: datetime,
              end: datetime, *, min_count: int = DEFAULT_MIN_COUNT) -> list[SubgroupCell]:
    """The figures of each output label per subgroup of every dimension of ``DIMENSIONS``.

    Missing attributes form the subgroup ``unknown``. Cells are ordered by dimension (in the
    order of ``DIMENSIONS``), value and label; cells with fewer than ``min_count`` studies are
    suppressed.
    """
    if min_count < 1:
        raise ValueError(f"the minimum count of a subgroup must be at least 1, got {min_count}")
    outputs, truths = _read(conn, model_id, version, start, end, None)
    latest = latest_truth(truths)
    cells: list[SubgroupCell] = []
    for dimension in DIMENSIONS:
        groups: dict[tuple[str, str, str], list[_Output]] = defaultdict(list)
        for output in outputs:
            groups[(output.attributes[dimension], output.label, output.code)].append(output)
        for (value, name, code), group in sorted(groups.items()):
            if len(group) < min_count:
                cells.append(SubgroupCell(dimension=dimension, value=value, label=name,
                                          code=code, suppressed=True, analysed=None,
                                          flagged=None, coverage=None, ppv=None,
                                          specificity=None))
                continue
            known = _decisions_with_truth(group, latest)
            table = _confusion(known)
            cells.append(SubgroupCell(
                dimension=dimension, value=value, label=name, code=code, suppressed=False,
                analysed=len(group),
                flagged=proportion(sum(o.flagged for o in group), len(group)),
                coverage=proportion(len(known), len(group)), ppv=table.ppv(),
                specificity=table.specificity()))
    return cells


def latest_truth(truths: Iterable[Truth]) -> dict[tuple[str, str], bool]:
    """Whether each (study, code) has the finding, by its latest row; a tie counts present."""
    chosen: dict[tuple[str, str], tuple[datetime, bool]] = {}
    for truth in truths:
        key = (truth.study_uid, truth.code)
        candidate = (truth.recorded_at, truth.present)
        if key not in chosen or candidate > chosen[key]:
            chosen[key] = candidate
    return {key: present for key, (_, present) in chosen.items()}


def slice_thickness_band(thickness_mm: float | None) -> str:
    """The band of a slice thickness: ``<=1 mm``, ``1-2.5 mm``, ``2.5-5 mm``, ``>5 mm``.

    Each band includes its upper bound; an unknown thickness is ``unknown``.
    """
    if thickness_mm is None:
        return UNKNOWN
    for upper, band in SLICE_THICKNESS_BANDS:
        if thickness_mm <= upper:
            return band
    return THICKEST_BAND


def _read(conn: psycopg.Connection[TupleRow], model_id: str, version: str, start: datetime,
          end: datetime, label: str | None) -> tuple[list[_Output], list[Truth]]:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("the period needs aware datetimes (with a time zone)")
    if end <= start:
        raise ValueError(f"the period must end after it starts, got {start} to {end}")
    params = {"model": model_id, "version": version, "start": start, "end": end, "label": label}
    outputs = [_output(row) for row in conn.execute(_OUTPUTS, params)]
    truths = [Truth(study_uid=row[0], code=row[1], present=row[2], source=row[3],
                     recorded_at=row[4]) for row in conn.execute(_TRUTH, params)]
    return outputs, truths


def _output(row: TupleRow) -> _Output:
    (study_uid, analysed_at, label, code, flagged, manufacturer, manufacturer_model,
     station_name, calling_aet, institution, age_band, sex, thickness) = row
    attributes = {
        "manufacturer": _known(" ".join(part for part in (_text(manufacturer),
                                                           _text(manufacturer_model)) if part)),
        "station": _known(_text(station_name) or _text(calling_aet)),
        "institution": _known(_text(institution)),
        "age_band": _known(_text(age_band)),
        "sex": _known(_text(sex)),
        "slice_thickness_band": slice_thickness_band(thickness),
    }
    return _Output(study_uid=study_uid, analysed_at=analysed_at, label=label, code=code,
                   flagged=flagged, attributes=attributes)


def _text(value: str | None) -> str:
    return (value or "").strip()


def _known(value: str) -> str:
    return value or UNKNOWN


def _by_label(outputs: Sequence[_Output]) -> dict[tuple[str, str], list[_Output]]:
    groups: dict[tuple[str, str], list[_Output]] = defaultdict(list)
    for output in outputs:
        groups[(output.label, output.code)].append(output)
    return dict(sorted(groups.items()))


def _decisions_with_truth(group: Sequence[_Output], truth: dict[tuple[str, str], bool]
                          ) -> list[tuple[bool, bool]]:
    return [(o.flagged, truth[(o.study_uid, o.code)]) for o in group
            if (o.study_uid, o.code) in truth]


def _confusion(pairs: Sequence[tuple[bool, bool]]) -> Confusion:
    return confusion([decision for decision, _ in pairs], [truth for _, truth in pairs])


def _days(start: datetime, end: datetime) -> list[date]:
    """Every UTC day the period overlaps, in order."""
    first = start.astimezone(UTC).date()
    last_instant = end.astimezone(UTC) - timedelta(microseconds=1)
    last = last_instant.date()
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def day_start(day: date) -> datetime:
    """The instant a UTC day begins."""
    return datetime.combine(day, time(), tzinfo=UTC)


def version_exists(conn: psycopg.Connection[TupleRow], model_id: str, version: str) -> bool:
    """Whether the records know this version of the model."""
    row = conn.execute("SELECT 1 FROM model_versions WHERE model_id = %s AND version = %s",
                       (model_id, version)).fetchone()
    return row is not None


def active_version(conn: psycopg.Connection[TupleRow], model_id: str) -> str | None:
    """The version of the model that is active now, if any."""
    row = conn.execute("SELECT version FROM model_versions WHERE model_id = %s "
                       "AND state = 'active'", (model_id,)).fetchone()
    return None if row is None else str(row[0])
