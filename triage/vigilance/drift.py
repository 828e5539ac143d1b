"""Drift detection and volume watch over the vigilance records.

**Baselines.** A version's expected daily flag rate is learnt, per output label, over a period
of its analyses (as active or shadow model alike: the role changes what a result is used for,
not what the version computes): the mean of the daily flag rates of the UTC days that had
studies, and their standard deviation, never below the binomial spread of a day of average
size (a baseline of unusually even days must not make every later day an alarm). An admin sets
one (``set_baseline``); otherwise the first ``vigilance_baseline_days`` days of a version's
analyses become its baseline once they are over (longer when they hold too few studies). The
scores and acquisition attributes of the baseline period are read from the analyses of that
period when needed.

**Checks** (``run_checks``), over complete UTC days only, so that every check of a day judges
the same records:

- ``output-cusum``: a two-sided tabular CUSUM (k, h in baseline sigmas; the FDA AIM-CU
  defaults) over the daily flag rates since the end of the baseline, days without studies
  skipped. The alert names the latest alarm day; a later alarm day is new evidence.
- ``score-ks``: the scores of the last ``vigilance_window_days`` days against those of the
  baseline period, two-sample Kolmogorov-Smirnov, per label; the p-values of every label and
  version of a check are corrected together (Benjamini-Hochberg) and held at
  ``vigilance_score_alpha``.
- ``input-drift``: the same window against the baseline period, chi-square on manufacturer,
  model name and reconstruction kernel (an absent value is a category; categories seen fewer
  than ``RARE_CATEGORY`` times in both periods together are pooled, so that the test's
  large-sample approximation holds), KS on slice thickness, kVp and the two pixel spacings;
  all of a check's input tests, every version's, are corrected together at the
  false-discovery rate ``vigilance_input_fdr``. One alert per version lists what drifted.
- ``volume``: the studies of each modality that arrived in the last ``vigilance_volume_hours``
  complete hours against the mean of the same hours of the week over the past
  ``vigilance_volume_weeks`` weeks (only weeks after the modality's first recorded arrival);
  an alert when a Poisson count with that mean would be below ``vigilance_volume_p`` to be
  as low, unless fewer than ``vigilance_volume_min_expected`` were expected (quiet nights).
  Also for a model whose versions analysed nothing for ``vigilance_silent_hours`` while the
  studies of its modality kept arriving in the number that, at its usual share of them,
  should have given it at least ``vigilance_volume_min_expected``.

A window test's evidence is its window: once its alert is acknowledged, a drift that persists
alerts again on the first window that does not overlap it (a week later by default), unless
an admin sets a new baseline that accepts the new normal.

**Scheduling.** Checks run as an RQ job every ``vigilance_check_minutes`` on the vigilance
queue, which every worker serves after the analysis queues (``triage.queues``),
at the same wall-clock slots on every worker: each slot's job has its own id, created once
(RQ's unique jobs) by whichever worker or previous check asks first.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import redis
from psycopg.rows import TupleRow
from rq import Queue
from rq.exceptions import DuplicateJobError
from scipy.stats import poisson

from triage.queues import FAILURE_TTL, VIGILANCE_QUEUE
from triage.settings import Settings
from triage.vigilance import clock, trail
from triage.vigilance.alerts import Alert, AlertKind, notify_pending, publish_open, raise_alert
from triage.vigilance.figures import day_start
from triage.vigilance.records import RecordError
from triage.vigilance.statistics import (
    DriftTest,
    chi_square_test,
    correct,
    cusum,
    ks_test,
)

log = logging.getLogger(__name__)

Connection = psycopg.Connection[TupleRow]

ACTOR = "vigilance"
CHECK_JOB = "triage.vigilance.drift.check_job"
CHECK_QUEUE = VIGILANCE_QUEUE
CHECK_TIMEOUT_SECONDS = 600
CHECK_RESULT_TTL = 24 * 3600
DEFAULT_BASELINE_MIN_DAYS = 7
DEFAULT_BASELINE_MIN_STUDIES = 100
# Categories seen fewer times than this in both periods together are pooled before a
# chi-square test (Cochran's rule of expected counts of at least 5).
RARE_CATEGORY = 5
POOLED = "(other)"
ABSENT = "(absent)"
CATEGORICAL_INPUTS = ("manufacturer", "manufacturer_model_name", "reconstruction_kernel")
NUMERIC_INPUTS = ("slice_thickness_mm", "kvp", "pixel_spacing_row_mm",
                  "pixel_spacing_column_mm")
INPUTS = CATEGORICAL_INPUTS + NUMERIC_INPUTS
WEEK = timedelta(days=7)
HOUR = timedelta(hours=1)


# -- arrivals --------------------------------------------------------------------------------

def record_arrival(conn: Connection, study_uid: str, modality: str,
                   received_at: datetime) -> bool:
    """Record that a study arrived, in the caller's transaction; False when it was recorded
    before (its first arrival is kept)."""
    cursor = conn.execute("INSERT INTO arrivals (study_uid, modality, received_at) "
                          "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                          (study_uid, modality, received_at))
    return cursor.rowcount == 1


# -- daily flag rates and baselines ---------------------------------------------------------

@dataclass(frozen=True)
class Day:
    """Studies analysed and flagged by one output label on one UTC day."""

    date: date
    analysed: int
    flagged: int

    @property
    def rate(self) -> float:
        return self.flagged / self.analysed


@dataclass(frozen=True)
class LabelBaseline:
    """The expected daily flag rate of one output label, learnt over
    ``[period_start, period_end)``."""

    id: int
    model_id: str
    version: str
    label: str
    period_start: datetime
    period_end: datetime
    studies: int
    days: int
    mean: float
    sigma: float
    created_at: datetime
    created_by: str


def _aware(moment: datetime, name: str) -> datetime:
    if moment.utcoffset() is None:
        raise RecordError(f"{name} needs a UTC offset")
    return moment.astimezone(UTC)


def daily_rates(conn: Connection, model_id: str, version: str, start: datetime,
                end: datetime) -> dict[str, list[Day]]:
    """The days of ``[start, end)`` on which ``version`` analysed studies, per output label,
    oldest first (days without studies are absent)."""
    rows = conn.execute(
        "SELECT o.label, (a.analysed_at AT TIME ZONE 'UTC')::date, count(*), "
        "count(*) FILTER (WHERE o.flagged) "
        "FROM analyses a JOIN analysis_outputs o ON o.analysis_id = a.id "
        "WHERE a.model_id = %s AND a.version = %s AND a.analysed_at >= %s "
        "AND a.analysed_at < %s GROUP BY 1, 2 ORDER BY 1, 2",
        (model_id, version, start, end)).fetchall()
    days: dict[str, list[Day]] = defaultdict(list)
    for label, day, analysed, flagged in rows:
        days[str(label)].append(Day(day, int(analysed), int(flagged)))
    return dict(days)


def baseline_figures(days: Sequence[Day]) -> tuple[float, float]:
    """Mean and sigma of the daily flag rates of ``days`` (see the module docstring)."""
    rates = np.array([d.rate for d in days], dtype=float)
    mean = float(rates.mean())
    spread = float(rates.std(ddof=1)) if len(rates) > 1 else 0.0
    total = sum(d.analysed for d in days)
    # The binomial spread of a day of average size, with the rate kept off 0 and 1 so that a
    # label never flagged in the baseline still has a positive sigma.
    edge = 0.5 / total
    p = min(max(mean, edge), 1 - edge)
    binomial = math.sqrt(p * (1 - p) / (total / len(days)))
    return mean, max(spread, binomial)


def _version_known(conn: Connection, model_id: str, version: str) -> None:
    if conn.execute("SELECT 1 FROM model_versions WHERE model_id = %s AND version = %s",
                    (model_id, version)).fetchone() is None:
        raise RecordError(f"{model_id} has no registered version {version}")


def _studies(conn: Connection, model_id: str, version: str, start: datetime,
             end: datetime) -> int:
    row = conn.execute("SELECT count(*) FROM analyses WHERE model_id = %s AND version = %s "
                       "AND analysed_at >= %s AND analysed_at < %s",
                       (model_id, version, start, end)).fetchone()
    return int(row[0]) if row else 0


def _shortfall(days: Iterable[Day], studies: int, min_days: int, min_studies: int
               ) -> str | None:
    with_studies = len({d.date for d in days})
    if with_studies >= min_days and studies >= min_studies:
        return None
    return (f"{with_studies} days with studies and {studies} studies; a baseline needs at "
            f"least {min_days} days and {min_studies} studies")


def set_baseline(conn: Connection, model_id: str, version: str, start: datetime,
                 end: datetime, actor: str, *, min_days: int = DEFAULT_BASELINE_MIN_DAYS,
                 min_studies: int = DEFAULT_BASELINE_MIN_STUDIES) -> list[LabelBaseline]:
    """Learn the baseline of ``version`` of ``model_id`` over ``[start, end)``, one per output
    label, and record it with who set it (audit trail action ``baseline.set``); it replaces
    the previous baseline from the next check on.

    Raises ``RecordError``, recording nothing, for an unknown version, a period that is not
    ordered or has no UTC offset, or one with fewer than ``min_days`` days with studies or
    ``min_studies`` studies.
    """
    if not actor.strip():
        raise RecordError("a baseline needs the name of who set it")
    start, end = _aware(start, "the start"), _aware(end, "the end")
    if end <= start:
        raise RecordError(f"the period must end after it starts, got {start:%Y-%m-%d %H:%M} "
                          f"to {end:%Y-%m-%d %H:%M}")
    _version_known(conn, model_id, version)
    by_label = daily_rates(conn, model_id, version, start, end)
    if not by_label:
        raise RecordError(f"{model_id} {version} recorded no outputs over {start:%Y-%m-%d} "
                          f"to {end:%Y-%m-%d}")
    studies = _studies(conn, model_id, version, start, end)
    problem = _shortfall((d for days in by_label.values() for d in days), studies, min_days,
                         min_studies)
    if problem is not None:
        raise RecordError(f"no baseline for {model_id} {version} over {start:%Y-%m-%d %H:%M} "
                          f"to {end:%Y-%m-%d %H:%M} UTC: {problem}")
    with conn.transaction():
        stored = [_store(conn, model_id, version, label, start, end, days, actor)
                  for label, days in sorted(by_label.items())]
        trail.record(conn, actor=actor, action="baseline.set", model_id=model_id,
                     version=version, details={
                         "period_start": start.isoformat(), "period_end": end.isoformat(),
                         "studies": studies,
                         "labels": {b.label: {"mean": b.mean, "sigma": b.sigma, "days": b.days}
                                    for b in stored}})
    conn.commit()
    return stored


_BASELINE_COLUMNS = ("id, model_id, version, label, period_start, period_end, studies, days, "
                     "flag_rate_mean, flag_rate_sigma, created_at, created_by")


def _store(conn: Connection, model_id: str, version: str, label: str, start: datetime,
           end: datetime, days: Sequence[Day], actor: str) -> LabelBaseline:
    mean, sigma = baseline_figures(days)
    row = conn.execute(
        "INSERT INTO baselines (model_id, version, label, period_start, period_end, studies, "
        "days, flag_rate_mean, flag_rate_sigma, created_by) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        f"RETURNING {_BASELINE_COLUMNS}",
        (model_id, version, label, start, end, sum(d.analysed for d in days), len(days),
         mean, sigma, actor)).fetchone()
    assert row is not None
    return LabelBaseline(*row)


def baselines(conn: Connection, model_id: str, version: str) -> dict[str, LabelBaseline]:
    """The latest baseline of each output label of the version."""
    rows = conn.execute(
        f"SELECT DISTINCT ON (label) {_BASELINE_COLUMNS} FROM baselines "
        "WHERE model_id = %s AND version = %s AND label IS NOT NULL "
        "ORDER BY label, created_at DESC, id DESC", (model_id, version)).fetchall()
    return {str(row[3]): LabelBaseline(*row) for row in rows}


def automatic_baseline(conn: Connection, settings: Settings, model_id: str, version: str,
                       today: date) -> list[LabelBaseline]:
    """Set the version's first baseline from its first analyses when it has none and they
    are over: ``vigilance_baseline_days`` days from the day of its first analysis, extended
    by whole days (up to yesterday) until they hold the minimum of days and studies. Returns
    what was set (nothing when the version has a baseline or not enough analyses yet)."""
    if conn.execute("SELECT 1 FROM baselines WHERE model_id = %s AND version = %s LIMIT 1",
                    (model_id, version)).fetchone() is not None:
        return []
    row = conn.execute("SELECT min(analysed_at) FROM analyses WHERE model_id = %s "
                       "AND version = %s", (model_id, version)).fetchone()
    if row is None or row[0] is None:
        return []
    first = row[0].astimezone(UTC).date()
    counts: dict[date, int] = {day: int(n) for day, n in conn.execute(
        "SELECT (analysed_at AT TIME ZONE 'UTC')::date, count(*) FROM analyses "
        "WHERE model_id = %s AND version = %s AND analysed_at < %s GROUP BY 1",
        (model_id, version, day_start(today))).fetchall()}
    end = first + timedelta(days=settings.vigilance_baseline_days)
    while end <= today:
        inside = [n for day, n in counts.items() if day < end]
        if (len(inside) >= settings.vigilance_baseline_min_days
                and sum(inside) >= settings.vigilance_baseline_min_studies):
            try:
                return set_baseline(conn, model_id, version, day_start(first),
                                    day_start(end), ACTOR,
                                    min_days=settings.vigilance_baseline_min_days,
                                    min_studies=settings.vigilance_baseline_min_studies)
            except RecordError:  # studies without outputs: nothing to learn yet
                conn.rollback()
                return []
        end += timedelta(days=1)
    return []


def labels(conn: Connection, model_id: str, version: str) -> list[str]:
    """The output labels the version has recorded or has a baseline for."""
    rows = conn.execute(
        "SELECT label FROM baselines WHERE model_id = %(model)s AND version = %(version)s "
        "AND label IS NOT NULL UNION SELECT o.label FROM analyses a JOIN analysis_outputs o "
        "ON o.analysis_id = a.id WHERE a.model_id = %(model)s AND a.version = %(version)s "
        "ORDER BY 1", {"model": model_id, "version": version}).fetchall()
    return [str(row[0]) for row in rows]


# -- the flag-rate chart -------------------------------------------------------------------

@dataclass(frozen=True)
class ChartDay:
    """One day of the flag-rate chart; the CUSUM statistics are None before the baseline
    ends (the chart starts there)."""

    date: date
    analysed: int
    flagged: int
    rate: float
    cusum_high: float | None
    cusum_low: float | None
    alarm: bool


@dataclass(frozen=True)
class FlagRateChart:
    baseline: LabelBaseline | None
    k: float
    h: float
    days: list[ChartDay]


def flag_rate_chart(conn: Connection, settings: Settings, model_id: str, version: str,
                    label: str, start: datetime, end: datetime) -> FlagRateChart:
    """The daily flag rates of one label of a version over ``[start, end)`` (days with
    studies), with the CUSUM of the checks from the end of the latest baseline on."""
    k, h = settings.vigilance_cusum_k, settings.vigilance_cusum_h
    baseline = baselines(conn, model_id, version).get(label)
    first = min(start, baseline.period_end) if baseline else start
    days = daily_rates(conn, model_id, version, first, end).get(label, [])
    charted: dict[date, tuple[float, float, bool]] = {}
    if baseline is not None:
        watched = [d for d in days if day_start(d.date) >= baseline.period_end]
        result = cusum([d.rate for d in watched], baseline.mean, baseline.sigma, k, h)
        alarms = set(result.alarms)
        charted = {d.date: (result.upper[i], result.lower[i], i in alarms)
                   for i, d in enumerate(watched)}
    shown = []
    for d in days:
        if day_start(d.date) < start:
            continue
        high, low, alarm = charted.get(d.date, (None, None, False))
        shown.append(ChartDay(d.date, d.analysed, d.flagged, d.rate, high, low, alarm))
    return FlagRateChart(baseline=baseline, k=k, h=h, days=shown)


# -- checks ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alarm:
    """What a check found: the subject of an alert, its detail and its evidence."""

    kind: AlertKind
    model_id: str | None
    version: str | None
    label: str | None
    detail: dict[str, Any]
    evidence_start: datetime
    evidence_end: datetime


@dataclass(frozen=True)
class Watched:
    """A model version the checks watch (active or shadow) and its latest baselines."""

    model_id: str
    version: str
    state: str
    baselines: dict[str, LabelBaseline] = field(default_factory=dict)

    @property
    def period(self) -> tuple[datetime, datetime] | None:
        """The period of the latest baseline setting of the version."""
        if not self.baselines:
            return None
        latest = max(self.baselines.values(), key=lambda b: (b.created_at, b.id))
        return latest.period_start, latest.period_end


def run_checks(conn: Connection, settings: Settings, now: datetime, *,
               connection: redis.Redis | None = None) -> list[Alert]:
    """Run every check at ``now`` (``clock.now(settings)``): automatic baselines, CUSUM of the
    flag rates, score and input drift, volume; raise the alerts they call for; send the
    webhook notifications still pending; publish the open alerts to Redis (``connection``).
    Returns the alerts raised."""
    today = now.astimezone(UTC).date()
    notify_pending(conn, settings)
    watched = []
    for model_id, version, state in conn.execute(
            "SELECT model_id, version, state FROM model_versions "
            "WHERE state IN ('active', 'shadow') ORDER BY model_id, version").fetchall():
        automatic_baseline(conn, settings, model_id, version, today)
        watched.append(Watched(model_id, version, state, baselines(conn, model_id, version)))
    conn.commit()
    alarms = [alarm for w in watched for alarm in cusum_alarms(conn, settings, w, today)]
    alarms += score_alarms(conn, settings, watched, today)
    alarms += input_alarms(conn, settings, watched, today)
    alarms += volume_alarms(conn, settings, now)
    alarms += silent_model_alarms(conn, settings, [w for w in watched if w.state == "active"],
                                  now)
    conn.commit()
    raised = []
    for alarm in alarms:
        alert = raise_alert(conn, settings, kind=alarm.kind, model_id=alarm.model_id,
                            version=alarm.version, label=alarm.label, detail=alarm.detail,
                            evidence_start=alarm.evidence_start,
                            evidence_end=alarm.evidence_end, now=now, connection=connection)
        if alert is not None:
            raised.append(alert)
    if connection is not None:
        publish_open(conn, connection)
    return raised


def cusum_alarms(conn: Connection, settings: Settings, watched: Watched,
                 today: date) -> list[Alarm]:
    """The output-cusum alarm of each label of the version whose chart alarmed since its
    baseline ended (the latest alarm day)."""
    k, h = settings.vigilance_cusum_k, settings.vigilance_cusum_h
    alarms = []
    for label, baseline in sorted(watched.baselines.items()):
        days = daily_rates(conn, watched.model_id, watched.version, baseline.period_end,
                           day_start(today)).get(label, [])
        result = cusum([d.rate for d in days], baseline.mean, baseline.sigma, k, h)
        if not result.alarms:
            continue
        index = result.alarms[-1]
        day = days[index]
        detail = {
            "baseline_id": baseline.id, "mean": baseline.mean, "sigma": baseline.sigma,
            "k": k, "h": h, "alarm_day": day.date.isoformat(), "analysed": day.analysed,
            "flagged": day.flagged, "rate": day.rate,
            "direction": "rose" if result.upper[index] > h else "fell",
            "cusum_high": result.upper[index], "cusum_low": result.lower[index],
            "alarm_days": [days[i].date.isoformat() for i in result.alarms],
            "days_monitored": len(days)}
        alarms.append(Alarm(AlertKind.OUTPUT_CUSUM, watched.model_id, watched.version, label,
                            detail, day_start(day.date), day_start(day.date + timedelta(1))))
    return alarms


def _window(settings: Settings, watched: Watched, today: date
            ) -> tuple[datetime, datetime] | None:
    """The complete days compared with the baseline period: the last window days, never
    reaching into the baseline period."""
    period = watched.period
    if period is None:
        return None
    end = day_start(today)
    start = max(end - timedelta(days=settings.vigilance_window_days), period[1])
    return (start, end) if start < end else None


def _scores(conn: Connection, watched: Watched, start: datetime, end: datetime
            ) -> dict[str, list[float]]:
    rows = conn.execute(
        "SELECT o.label, o.score FROM analyses a JOIN analysis_outputs o "
        "ON o.analysis_id = a.id WHERE a.model_id = %s AND a.version = %s "
        "AND a.analysed_at >= %s AND a.analysed_at < %s",
        (watched.model_id, watched.version, start, end)).fetchall()
    scores: dict[str, list[float]] = defaultdict(list)
    for label, score in rows:
        scores[str(label)].append(float(score))
    return scores


def score_alarms(conn: Connection, settings: Settings, watched: Sequence[Watched],
                 today: date) -> list[Alarm]:
    """The score-ks alarms of the check: every label of every version tested, corrected
    together."""
    minimum = settings.vigilance_window_min_studies
    tests: list[DriftTest] = []
    subjects: list[tuple[Watched, str, datetime, datetime, int, int]] = []
    for w in watched:
        window, period = _window(settings, w, today), w.period
        if window is None or period is None:
            continue
        before, recent = _scores(conn, w, *period), _scores(conn, w, *window)
        for label in sorted(w.baselines):
            if len(before[label]) < minimum or len(recent[label]) < minimum:
                continue
            tests.append(ks_test(label, before[label], recent[label]))
            subjects.append((w, label, *window, len(before[label]), len(recent[label])))
    alarms = []
    for test, (w, label, start, end, n_before, n_recent) in zip(
            correct(tests, settings.vigilance_score_alpha), subjects, strict=True):
        if not test.alarm:
            continue
        detail = {"statistic": test.statistic, "p_value": test.p_value,
                  "adjusted_p": test.adjusted_p, "alpha": settings.vigilance_score_alpha,
                  "window_start": start.isoformat(), "window_end": end.isoformat(),
                  "baseline_studies": n_before, "window_studies": n_recent}
        alarms.append(Alarm(AlertKind.SCORE_KS, w.model_id, w.version, label, detail, start,
                            end))
    return alarms


def _inputs(conn: Connection, watched: Watched, start: datetime, end: datetime
            ) -> list[tuple[Any, ...]]:
    return conn.execute(
        f"SELECT {', '.join(INPUTS)} FROM analyses WHERE model_id = %s AND version = %s "
        "AND analysed_at >= %s AND analysed_at < %s",
        (watched.model_id, watched.version, start, end)).fetchall()


def _pooled(baseline: list[str], current: list[str]) -> tuple[list[str], list[str]]:
    counts: dict[str, int] = defaultdict(int)
    for value in (*baseline, *current):
        counts[value] += 1

    def pool(values: list[str]) -> list[str]:
        return [v if counts[v] >= RARE_CATEGORY else POOLED for v in values]

    return pool(baseline), pool(current)


def input_tests(baseline: Sequence[Sequence[Any]], current: Sequence[Sequence[Any]],
                minimum: int) -> list[DriftTest]:
    """The input-drift tests of one version, uncorrected: rows are the ``INPUTS`` of each
    study of the baseline period and of the window. A numeric attribute known in fewer than
    ``minimum`` studies of either period is not tested."""
    tests = []
    for index, name in enumerate(INPUTS):
        if name in CATEGORICAL_INPUTS:
            before, recent = _pooled([r[index] or ABSENT for r in baseline],
                                     [r[index] or ABSENT for r in current])
            if len(before) >= minimum and len(recent) >= minimum:
                tests.append(chi_square_test(name, before, recent))
        else:
            numbers = ([float(r[index]) for r in rows if r[index] is not None]
                       for rows in (baseline, current))
            known_before, known_recent = numbers
            if len(known_before) >= minimum and len(known_recent) >= minimum:
                tests.append(ks_test(name, known_before, known_recent))
    return tests


def _shares(values: Iterable[Any]) -> dict[str, float]:
    listed = [str(v) if v is not None else ABSENT for v in values]
    counts: dict[str, int] = defaultdict(int)
    for value in listed:
        counts[value] += 1
    top = sorted(counts.items(), key=lambda item: -item[1])[:10]
    return {value: round(n / len(listed), 4) for value, n in top}


def input_alarms(conn: Connection, settings: Settings, watched: Sequence[Watched],
                 today: date) -> list[Alarm]:
    """The input-drift alarms of the check: every version's tests corrected together."""
    tests: list[DriftTest] = []
    owners: list[int] = []
    samples: list[tuple[Watched, datetime, datetime, list[Any], list[Any]]] = []
    for w in watched:
        window, period = _window(settings, w, today), w.period
        if window is None or period is None:
            continue
        before, recent = _inputs(conn, w, *period), _inputs(conn, w, *window)
        found = input_tests(before, recent, settings.vigilance_window_min_studies)
        tests += found
        owners += [len(samples)] * len(found)
        samples.append((w, *window, before, recent))
    drifted: dict[int, list[DriftTest]] = defaultdict(list)
    for owner, test in zip(owners, correct(tests, settings.vigilance_input_fdr), strict=True):
        if test.alarm:
            drifted[owner].append(test)
    alarms = []
    for owner, found in sorted(drifted.items()):
        w, start, end, before, recent = samples[owner]
        listed = []
        for test in found:
            column = INPUTS.index(test.name)
            entry: dict[str, Any] = {"attribute": test.name, "test": test.kind.value,
                                     "statistic": test.statistic, "p_value": test.p_value,
                                     "adjusted_p": test.adjusted_p}
            if test.name in CATEGORICAL_INPUTS:
                entry["baseline_shares"] = _shares(r[column] for r in before)
                entry["window_shares"] = _shares(r[column] for r in recent)
            else:
                entry["baseline_median"] = float(np.median(
                    [r[column] for r in before if r[column] is not None]))
                entry["window_median"] = float(np.median(
                    [r[column] for r in recent if r[column] is not None]))
            listed.append(entry)
        detail = {"drifted": listed, "fdr": settings.vigilance_input_fdr,
                  "window_start": start.isoformat(), "window_end": end.isoformat(),
                  "baseline_studies": len(before), "window_studies": len(recent)}
        alarms.append(Alarm(AlertKind.INPUT_DRIFT, w.model_id, w.version, None, detail,
                            start, end))
    return alarms


# -- volume ----------------------------------------------------------------------------------

def _hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def expected_arrivals(hourly: dict[datetime, int], first_seen: datetime,
                      window: Sequence[datetime], weeks: int) -> float | None:
    """The expected arrivals over the hours of ``window``: for each hour, the mean count of
    the same hour of the week in the past ``weeks`` weeks that began after ``first_seen``
    (hours before a modality's first arrival were not recorded, not quiet). None when no
    past week is usable."""
    total = 0.0
    for hour in window:
        past = [hour - WEEK * k for k in range(1, weeks + 1)]
        usable = [moment for moment in past if moment >= first_seen]
        if not usable:
            return None
        total += sum(hourly.get(moment, 0) for moment in usable) / len(usable)
    return total


def volume_alarms(conn: Connection, settings: Settings, now: datetime) -> list[Alarm]:
    """A volume alarm for each modality whose arrivals over the last complete hours fell far
    below those of the same hours of past weeks."""
    hours = settings.vigilance_volume_hours
    weeks = settings.vigilance_volume_weeks
    end = _hour(now)
    start = end - HOUR * hours
    window = [start + HOUR * i for i in range(hours)]
    rows = conn.execute(
        "SELECT modality, date_trunc('hour', received_at AT TIME ZONE 'UTC'), count(*) "
        "FROM arrivals WHERE received_at >= %s AND received_at < %s GROUP BY 1, 2",
        (start - WEEK * weeks, end)).fetchall()
    hourly: dict[str, dict[datetime, int]] = defaultdict(dict)
    for modality, hour, n in rows:
        hourly[str(modality)][hour.replace(tzinfo=UTC)] = int(n)
    first_seen: dict[str, datetime] = {str(modality): at for modality, at in conn.execute(
        "SELECT modality, min(received_at) FROM arrivals WHERE modality = ANY(%s) "
        "GROUP BY 1", (list(hourly),)).fetchall()}
    alarms = []
    for modality, counts in sorted(hourly.items()):
        expected = expected_arrivals(counts, _hour(first_seen[modality]), window, weeks)
        if expected is None or expected < settings.vigilance_volume_min_expected:
            continue
        observed = sum(counts.get(hour, 0) for hour in window)
        p = float(poisson.cdf(observed, expected))
        if p >= settings.vigilance_volume_p:
            continue
        detail = {"reason": "arrivals-low", "modality": modality, "observed": observed,
                  "expected": expected, "p_value": p, "hours": hours, "weeks": weeks,
                  "window_start": start.isoformat(), "window_end": end.isoformat()}
        alarms.append(Alarm(AlertKind.VOLUME, None, None, modality, detail, start, end))
    return alarms


def silent_model_alarms(conn: Connection, settings: Settings, watched: Sequence[Watched],
                        now: datetime) -> list[Alarm]:
    """A volume alarm for each model (by its active version) that analysed nothing for
    ``vigilance_silent_hours`` while the studies of its usual modality kept arriving."""
    silent = timedelta(hours=settings.vigilance_silent_hours)
    start, end = now - silent, now
    history = start - WEEK * settings.vigilance_volume_weeks
    alarms = []
    for w in watched:
        recent = conn.execute("SELECT 1 FROM analyses WHERE model_id = %s AND analysed_at >= %s "
                              "AND analysed_at < %s LIMIT 1", (w.model_id, start, end)
                              ).fetchone()
        if recent is not None:
            continue
        usual = conn.execute(
            "SELECT modality, count(*) FROM analyses WHERE model_id = %s AND modality IS NOT "
            "NULL AND analysed_at >= %s AND analysed_at < %s GROUP BY 1 ORDER BY 2 DESC "
            "LIMIT 1", (w.model_id, history, start)).fetchone()
        if usual is None:
            continue
        modality, analysed = str(usual[0]), int(usual[1])
        arrived_before, arrived = (int(row[0]) if row else 0 for row in (
            conn.execute("SELECT count(*) FROM arrivals WHERE modality = %s AND received_at "
                         ">= %s AND received_at < %s", (modality, a, b)).fetchone()
            for a, b in ((history, start), (start, end))))
        if arrived_before == 0:
            continue
        share = min(1.0, analysed / arrived_before)
        expected = share * arrived
        if expected < settings.vigilance_volume_min_expected or (
                float(poisson.cdf(0, expected)) >= settings.vigilance_volume_p):
            continue
        detail = {"reason": "model-silent", "modality": modality, "hours":
                  settings.vigilance_silent_hours, "arrived": arrived, "share": share,
                  "expected": expected, "window_start": start.isoformat(),
                  "window_end": end.isoformat()}
        alarms.append(Alarm(AlertKind.VOLUME, w.model_id, w.version, modality, detail, start,
                            end))
    return alarms


# -- scheduling ------------------------------------------------------------------------------

def schedule_check(connection: redis.Redis, settings: Settings) -> str | None:
    """Schedule the check of the next wall-clock slot (every ``vigilance_check_minutes``) on
    the vigilance queue, unless it already is; return its job id when this call created it."""
    period = settings.vigilance_check_minutes * 60
    slot = (int(time.time()) // period + 1) * period
    job_id = f"vigilance-check-{slot}"
    try:
        Queue(CHECK_QUEUE, connection=connection).enqueue_at(
            datetime.fromtimestamp(slot, UTC), CHECK_JOB, job_id=job_id, unique=True,
            job_timeout=CHECK_TIMEOUT_SECONDS, result_ttl=CHECK_RESULT_TTL,
            failure_ttl=FAILURE_TTL, description="vigilance checks")
    except DuplicateJobError:
        return None
    return job_id


def check_now(settings: Settings, connection: redis.Redis | None) -> list[Alert]:
    """Connect to the records (migrating them if needed) and run the checks at the vigilance
    clock's now. Raises ``TransientError`` when PostgreSQL cannot be reached."""
    from triage.vigilance.db import connect, migrate

    with connect(settings) as conn:
        migrate(conn)
        conn.commit()
        return run_checks(conn, settings, clock.now(settings), connection=connection)


def check_job() -> str:
    """RQ job: run the checks, then schedule the next ones. A down database is logged and
    waits for the next slot."""
    from triage.jobs import context

    ctx = context()
    try:
        raised = check_now(ctx.settings, ctx.redis)
        return f"{len(raised)} alerts raised"
    except Exception as error:  # the next slot tries again; the worker goes on
        log.warning("vigilance checks not run (%s: %s)", type(error).__name__, error)
        return "not run"
    finally:
        schedule_check(ctx.redis, ctx.settings)
