"""The shadow report: a version on trial against the active version, on the same studies.

For each output label, the studies both versions analysed in the period (the shadow run's
time decides the period) are paired: the 2x2 table of their decisions, the share of studies
where they agree, Cohen's kappa, and McNemar's test on the discordant pairs in its exact
binomial form (the two-sided probability of a split at least as uneven as the one seen,
when each discordant study was equally likely to go either way; preferred to the
chi-square form because trials here often have few discordant pairs). The discordant
studies are listed for review, by Study Instance UID only. Where ground truth exists for a
paired study, both versions are judged against it (PPV, specificity, agreement; the same
rules as the figures: the latest truth per study and finding).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from triage.vigilance.figures import Truth, latest_truth
from triage.vigilance.records import Connection
from triage.vigilance.statistics import Confusion, ShadowComparison, compare_shadow, confusion

# How many discordant studies a report lists per label, most different scores first.
DISCORDANT_LISTED = 200

_PAIRS = """
SELECT s.study_uid, so.label, so.code, ao.score, ao.flagged, so.score, so.flagged
FROM analyses s
JOIN analysis_outputs so ON so.analysis_id = s.id
JOIN analyses a ON a.study_uid = s.study_uid AND a.model_id = s.model_id
                AND a.version = %(active)s
JOIN analysis_outputs ao ON ao.analysis_id = a.id AND ao.label = so.label
WHERE s.model_id = %(model)s AND s.version = %(shadow)s
  AND s.analysed_at >= %(start)s AND s.analysed_at < %(end)s
ORDER BY s.study_uid, so.label
"""

_TRUTH = """
SELECT g.study_uid, g.code, g.present, g.source, g.recorded_at
FROM ground_truth g
WHERE (g.model_id IS NULL OR g.model_id = %(model)s)
  AND g.study_uid IN (
      SELECT s.study_uid FROM analyses s
      WHERE s.model_id = %(model)s AND s.version = %(shadow)s
        AND s.analysed_at >= %(start)s AND s.analysed_at < %(end)s)
"""


@dataclass(frozen=True)
class Discordant:
    study_uid: str
    active_score: float
    shadow_score: float
    active_flagged: bool
    shadow_flagged: bool


@dataclass(frozen=True)
class LabelComparison:
    label: str
    code: str
    paired: int
    comparison: ShadowComparison
    discordant: list[Discordant]
    discordant_total: int
    # Against ground truth, on the paired studies that have it (None when none has).
    active_truth: Confusion | None
    shadow_truth: Confusion | None


@dataclass(frozen=True)
class ShadowReport:
    model_id: str
    active_version: str
    shadow_version: str
    start: datetime
    end: datetime
    labels: list[LabelComparison]


@dataclass(frozen=True)
class _Pair:
    study_uid: str
    active_score: float
    active_flagged: bool
    shadow_score: float
    shadow_flagged: bool


def report(conn: Connection, model_id: str, active_version: str, shadow_version: str,
           start: datetime, end: datetime) -> ShadowReport:
    """Compare ``shadow_version`` with ``active_version`` over [start, end)."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("the period needs aware datetimes (with a time zone)")
    if end <= start:
        raise ValueError(f"the period must end after it starts, got {start} to {end}")
    params = {"model": model_id, "active": active_version, "shadow": shadow_version,
              "start": start, "end": end}
    by_label: dict[tuple[str, str], list[_Pair]] = defaultdict(list)
    for uid, label, code, a_score, a_flag, s_score, s_flag in conn.execute(_PAIRS, params):
        by_label[(str(label), str(code))].append(
            _Pair(str(uid), float(a_score), bool(a_flag), float(s_score), bool(s_flag)))
    truths = [Truth(study_uid=r[0], code=r[1], present=r[2], source=r[3], recorded_at=r[4])
              for r in conn.execute(_TRUTH, params)]
    latest = latest_truth(truths)
    labels = []
    for (label, code), pairs in sorted(by_label.items()):
        discordant = sorted(
            (Discordant(p.study_uid, p.active_score, p.shadow_score, p.active_flagged,
                        p.shadow_flagged) for p in pairs if p.active_flagged != p.shadow_flagged),
            key=lambda d: (-abs(d.active_score - d.shadow_score), d.study_uid))
        known = [(p, latest[(p.study_uid, code)]) for p in pairs
                 if (p.study_uid, code) in latest]
        labels.append(LabelComparison(
            label=label, code=code, paired=len(pairs),
            comparison=compare_shadow([p.active_flagged for p in pairs],
                                      [p.shadow_flagged for p in pairs]),
            discordant=discordant[:DISCORDANT_LISTED], discordant_total=len(discordant),
            active_truth=confusion([p.active_flagged for p, _ in known],
                                   [t for _, t in known]) if known else None,
            shadow_truth=confusion([p.shadow_flagged for p, _ in known],
                                   [t for _, t in known]) if known else None))
    return ShadowReport(model_id=model_id, active_version=active_version,
                        shadow_version=shadow_version, start=start, end=end, labels=labels)
