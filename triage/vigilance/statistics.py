"""Statistics of post-market surveillance: proportions with Wilson intervals, the confusion table
of AI flags against ground truth, two-sided tabular CUSUM with its predicted average run length,
input-drift tests with Benjamini-Hochberg correction, and active-versus-shadow model agreement.

Pure functions without I/O. Intervals, tests and agreement statistics come from scipy and
statsmodels; only the CUSUM recursion and its Markov-chain run-length model are written here.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy.linalg import LinAlgWarning, solve
from scipy.stats import chi2_contingency, ks_2samp, norm
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.inter_rater import cohens_kappa
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

# CUSUM reference value and decision threshold, in standard deviations of the monitored value;
# the same defaults as the FDA DIDSR AIM-CU tool.
DEFAULT_CUSUM_K = 0.5
DEFAULT_CUSUM_H = 4.0
# Number of transient states of the Markov chain that predicts the CUSUM average run length.
DEFAULT_ARL_STATES = 200
# Family-wise level of the input-drift tests of one run (false discovery rate under BH).
DEFAULT_ALPHA = 0.05


@dataclass(frozen=True)
class Proportion:
    """``count`` out of ``total``, with its Wilson score interval (95% by default).

    ``value``, ``low`` and ``high`` are None when ``total`` is 0: nothing was observed.
    """

    count: int
    total: int
    value: float | None
    low: float | None
    high: float | None


def proportion(count: int, total: int, alpha: float = DEFAULT_ALPHA) -> Proportion:
    """The proportion ``count / total`` with its ``1 - alpha`` Wilson score interval."""
    if total < 0 or not 0 <= count <= total:
        raise ValueError(f"a proportion needs 0 <= count <= total, got {count} of {total}")
    if total == 0:
        return Proportion(count=0, total=0, value=None, low=None, high=None)
    low, high = proportion_confint(count, total, alpha=alpha, method="wilson")
    return Proportion(count=count, total=total, value=count / total, low=float(low),
                      high=float(high))


@dataclass(frozen=True)
class Confusion:
    """Counts of the AI decision (flagged or not) against the ground truth (finding present)."""

    tp: int
    fp: int
    fn: int
    tn: int

    def ppv(self) -> Proportion:
        """Positive predictive value: the share of flagged studies that had the finding."""
        return proportion(self.tp, self.tp + self.fp)

    def sensitivity(self) -> Proportion:
        """The share of studies with the finding that were flagged."""
        return proportion(self.tp, self.tp + self.fn)

    def specificity(self) -> Proportion:
        """The share of studies without the finding that were not flagged."""
        return proportion(self.tn, self.tn + self.fp)

    def npv(self) -> Proportion:
        """Negative predictive value: the share of unflagged studies without the finding."""
        return proportion(self.tn, self.tn + self.fn)

    def agreement(self) -> Proportion:
        """The share of studies where the flag matched the ground truth."""
        return proportion(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn)


def confusion(decisions: Sequence[bool], truths: Sequence[bool]) -> Confusion:
    """The confusion table of AI ``decisions`` against ``truths``, study by study."""
    if len(decisions) != len(truths):
        raise ValueError(f"{len(decisions)} decisions but {len(truths)} ground truths")
    pairs = list(zip(decisions, truths, strict=True))
    return Confusion(tp=sum(d and t for d, t in pairs),
                     fp=sum(d and not t for d, t in pairs),
                     fn=sum(not d and t for d, t in pairs),
                     tn=sum(not d and not t for d, t in pairs))


@dataclass(frozen=True)
class CusumResult:
    """The upper and lower CUSUM statistics after each observation, and where they alarmed.

    At an alarm the statistics are reported as computed (above ``h``); the chart then restarts
    from 0 for the next observation.
    """

    upper: list[float]
    lower: list[float]
    alarms: list[int]
    first_alarm: int | None


def cusum(values: Sequence[float], mean: float, sigma: float, k: float = DEFAULT_CUSUM_K,
          h: float = DEFAULT_CUSUM_H) -> CusumResult:
    """Two-sided tabular CUSUM of ``values`` against the in-control ``mean`` and ``sigma``.

    Each value is standardised, z = (x - mean) / sigma; the upper statistic accumulates
    z - k and the lower one -z - k, neither going below 0. An observation where either exceeds
    ``h`` is an alarm, after which both restart at 0. ``k`` and ``h`` are in units of sigma:
    k = 0.5 tunes the chart to a shift of one sigma.
    """
    if sigma <= 0:
        raise ValueError(f"the CUSUM needs a positive sigma, got {sigma}")
    upper: list[float] = []
    lower: list[float] = []
    alarms: list[int] = []
    high = low = 0.0
    for index, value in enumerate(values):
        z = (value - mean) / sigma
        high = max(0.0, high + z - k)
        low = max(0.0, low - z - k)
        upper.append(high)
        lower.append(low)
        if high > h or low > h:
            alarms.append(index)
            high = low = 0.0
    return CusumResult(upper=upper, lower=lower, alarms=alarms,
                       first_alarm=alarms[0] if alarms else None)


def cusum_average_run_length(shift: float, k: float = DEFAULT_CUSUM_K, h: float = DEFAULT_CUSUM_H,
                             *, two_sided: bool = True, states: int = DEFAULT_ARL_STATES) -> float:
    """Predicted number of observations until the first CUSUM alarm (the average run length).

    The observations are standardised normal values with mean ``shift`` (0 when in control).
    The one-sided chart follows the Markov-chain approximation of Brook and Evans (1972):
    ``states`` transient states of width w = 2h / (2 * states - 1), state 0 standing for a
    statistic below w / 2 and state j for one within w / 2 of j * w; a statistic above ``h``
    is the absorbing alarm state. The run lengths L from each state solve (I - Q) L = 1, where Q
    holds the transition probabilities between transient states; the chart starts in state 0.

    The two-sided ARL combines the upper chart (mean ``shift``) and the lower chart (which sees
    mean ``-shift``) by 1 / ARL = 1 / ARL_upper + 1 / ARL_lower, the usual approximation that
    treats the two charts as if they alarmed independently.

    A chart facing away from a large shift practically never alarms: when its run length is
    beyond what double precision resolves (the linear system is singular to working precision)
    it is reported as infinite, and the two-sided ARL is that of the other chart.
    """
    if states < 1:
        raise ValueError(f"the run-length model needs at least one state, got {states}")
    if h <= 0:
        raise ValueError(f"the CUSUM threshold h must be positive, got {h}")
    upper = _one_sided_run_length(shift, k, h, states)
    if not two_sided:
        return upper
    lower = _one_sided_run_length(-shift, k, h, states)
    return 1.0 / (1.0 / upper + 1.0 / lower)


def _one_sided_run_length(shift: float, k: float, h: float, states: int) -> float:
    """Brook-Evans ARL of the upper chart S = max(0, S + z - k) with z ~ N(shift, 1)."""
    width = 2.0 * h / (2 * states - 1)
    centres = np.arange(states) * width
    # Moving from centre i into the interval around centre j takes a z between these bounds.
    upper_edges = centres[np.newaxis, :] + width / 2 - centres[:, np.newaxis] + k
    reach = norm.cdf(upper_edges, loc=shift)
    # State 0 gathers every step that lands below w / 2, the reset to 0 included.
    transitions = np.diff(reach, axis=1, prepend=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinAlgWarning)
        try:
            run_lengths = solve(np.eye(states) - transitions, np.ones(states))
        except LinAlgWarning:
            return math.inf
    return float(run_lengths[0])


class DriftKind(str, Enum):
    """The test behind an input-drift check."""

    CHI_SQUARE = "chi-square"
    KS = "ks"


@dataclass(frozen=True)
class DriftTest:
    """One input-drift test of a run: the current period's inputs against the baseline.

    ``adjusted_p`` is the Benjamini-Hochberg adjusted p-value across the tests of the run and
    ``alarm`` whether it is below the level; both are set by ``correct``.
    """

    name: str
    kind: DriftKind
    statistic: float
    p_value: float
    adjusted_p: float
    alarm: bool


def ks_test(name: str, baseline: Sequence[float], current: Sequence[float]) -> DriftTest:
    """Two-sample Kolmogorov-Smirnov test of a numeric input (e.g. slice thickness)."""
    _require_values(name, baseline, current)
    result = ks_2samp(np.asarray(baseline, dtype=float), np.asarray(current, dtype=float))
    p_value = float(result.pvalue)
    return DriftTest(name=name, kind=DriftKind.KS, statistic=float(result.statistic),
                     p_value=p_value, adjusted_p=p_value, alarm=False)


def chi_square_test(name: str, baseline: Sequence[str], current: Sequence[str]) -> DriftTest:
    """Chi-square test of a categorical input (e.g. manufacturer) on a 2 x n table of counts.

    The categories are those seen in either period, so a category new in the current period
    counts against the baseline. With fewer than two categories there is nothing to compare:
    the statistic is 0 and the p-value 1.
    """
    _require_values(name, baseline, current)
    categories = sorted(set(baseline) | set(current))
    table = np.array([[sum(1 for value in sample if value == category) for category in categories]
                      for sample in (baseline, current)])
    if table.shape[1] < 2:
        statistic, p_value = 0.0, 1.0
    else:
        result = chi2_contingency(table)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return DriftTest(name=name, kind=DriftKind.CHI_SQUARE, statistic=statistic, p_value=p_value,
                     adjusted_p=p_value, alarm=False)


def _require_values(name: str, baseline: Sequence[object], current: Sequence[object]) -> None:
    # An empty period carries no evidence either way; saying "no drift" would be misleading.
    if not baseline or not current:
        raise ValueError(f"drift test {name!r} needs values in both periods, got "
                         f"{len(baseline)} baseline and {len(current)} current")


def correct(tests: Sequence[DriftTest], alpha: float = DEFAULT_ALPHA) -> list[DriftTest]:
    """The ``tests`` of one run with Benjamini-Hochberg adjusted p-values and alarms set.

    Controls the false discovery rate at ``alpha``; when no input has drifted this is also the
    chance that the run raises any alarm.
    """
    if not tests:
        return []
    rejected, adjusted, _, _ = multipletests([test.p_value for test in tests], alpha=alpha,
                                             method="fdr_bh")
    return [dataclasses.replace(test, adjusted_p=float(p), alarm=bool(alarm))
            for test, p, alarm in zip(tests, adjusted, rejected, strict=True)]


@dataclass(frozen=True)
class ShadowComparison:
    """Positive decisions of the active model against a shadow model on the same studies.

    ``kappa`` is Cohen's kappa, None when undefined (no studies, or both models gave the same
    single answer to every study). The McNemar test is the exact binomial test on the
    discordant pairs: ``mcnemar_statistic`` is the smaller of ``active_only`` and
    ``shadow_only``, and ``mcnemar_p`` the two-sided p-value that the models flag at the same
    rate.
    """

    both: int
    active_only: int
    shadow_only: int
    neither: int
    kappa: float | None
    mcnemar_statistic: float
    mcnemar_p: float
    agreement: Proportion


def compare_shadow(active: Sequence[bool], shadow: Sequence[bool]) -> ShadowComparison:
    """Agreement of the ``active`` and ``shadow`` model decisions, study by study.

    Cohen's kappa and the exact (binomial) McNemar test come from statsmodels.
    """
    if len(active) != len(shadow):
        raise ValueError(f"{len(active)} active decisions but {len(shadow)} shadow decisions")
    pairs = list(zip(active, shadow, strict=True))
    both = sum(a and s for a, s in pairs)
    active_only = sum(a and not s for a, s in pairs)
    shadow_only = sum(not a and s for a, s in pairs)
    neither = sum(not a and not s for a, s in pairs)
    table = np.array([[both, active_only], [shadow_only, neither]])
    test = mcnemar(table, exact=True)
    return ShadowComparison(both=both, active_only=active_only, shadow_only=shadow_only,
                            neither=neither, kappa=_kappa(table),
                            mcnemar_statistic=float(test.statistic),
                            mcnemar_p=float(test.pvalue),
                            agreement=proportion(both + neither, len(pairs)))


def _kappa(table: np.ndarray) -> float | None:
    if table.sum() == 0:
        return None
    # Kappa divides by 1 - expected agreement, which is 0 when both models always gave the
    # same single answer; statsmodels then warns and returns nan.
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = float(cohens_kappa(table).kappa)
    return kappa if math.isfinite(kappa) else None
