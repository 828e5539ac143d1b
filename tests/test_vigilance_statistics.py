"""The surveillance statistics agree with independent computations and, by seeded simulation,
with the behaviour they promise: CUSUM run lengths as predicted, drift tests that stay quiet on
stable days and catch a shifted one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy.stats import binom, binomtest

from triage.vigilance.statistics import (
    Confusion,
    DriftKind,
    DriftTest,
    Proportion,
    chi_square_test,
    compare_shadow,
    confusion,
    correct,
    cusum,
    cusum_average_run_length,
    ks_test,
    proportion,
)

SEED = 20261130


def wilson(count: int, total: int) -> tuple[float, float]:
    """The 95% Wilson interval from scipy, a different library from the module's statsmodels."""
    interval = binomtest(count, total).proportion_ci(confidence_level=0.95, method="wilson")
    return interval.low, interval.high


def assert_proportion(actual: Proportion, count: int, total: int) -> None:
    assert (actual.count, actual.total) == (count, total)
    if total == 0:
        assert actual.value is actual.low is actual.high is None
        return
    low, high = wilson(count, total)
    assert actual.value == pytest.approx(count / total, abs=1e-12)
    assert actual.low == pytest.approx(low, abs=1e-9)
    assert actual.high == pytest.approx(high, abs=1e-9)


# --- Proportions and the confusion table ---------------------------------------------------------

def test_rates_and_wilson_intervals_match_scipy_over_random_tables() -> None:
    rng = np.random.default_rng(SEED)
    # Small counts, many zeros among them, so that 0 of n, n of n and 0 of 0 all occur.
    tables = rng.integers(0, 40, size=(400, 4)) * rng.integers(0, 2, size=(400, 4))
    for tp, fp, fn, tn in tables.tolist():
        table = Confusion(tp=tp, fp=fp, fn=fn, tn=tn)
        assert_proportion(table.ppv(), tp, tp + fp)
        assert_proportion(table.sensitivity(), tp, tp + fn)
        assert_proportion(table.specificity(), tn, tn + fp)
        assert_proportion(table.npv(), tn, tn + fn)
        assert_proportion(table.agreement(), tp + tn, tp + fp + fn + tn)


@pytest.mark.parametrize(("count", "total"), [(0, 1), (0, 25), (25, 25), (1, 1), (7, 300)])
def test_edge_proportions(count: int, total: int) -> None:
    result = proportion(count, total)
    assert_proportion(result, count, total)
    assert result.low is not None and result.high is not None
    assert 0.0 <= result.low <= result.high <= 1.0
    if count == 0:
        assert result.low == pytest.approx(0.0, abs=1e-12)
    if count == total:
        assert result.high == pytest.approx(1.0, abs=1e-12)


def test_empty_proportion_has_no_value_or_interval() -> None:
    assert proportion(0, 0) == Proportion(count=0, total=0, value=None, low=None, high=None)
    assert Confusion(tp=0, fp=0, fn=3, tn=2).ppv().value is None


@pytest.mark.parametrize(("count", "total"), [(-1, 3), (4, 3), (0, -1)])
def test_impossible_proportion_is_refused(count: int, total: int) -> None:
    with pytest.raises(ValueError, match="count <= total"):
        proportion(count, total)


def test_confusion_counts_each_study_once() -> None:
    rng = np.random.default_rng(SEED)
    decisions = rng.random(1000) < 0.3
    truths = rng.random(1000) < 0.2
    table = confusion(decisions.tolist(), truths.tolist())
    assert table == Confusion(tp=int(np.sum(decisions & truths)),
                              fp=int(np.sum(decisions & ~truths)),
                              fn=int(np.sum(~decisions & truths)),
                              tn=int(np.sum(~decisions & ~truths)))
    with pytest.raises(ValueError, match="3 decisions but 2"):
        confusion([True, False, True], [True, False])


# --- CUSUM on hand-made sequences ----------------------------------------------------------------

def test_cusum_stays_quiet_on_the_expected_mean() -> None:
    result = cusum([0.9] * 100, mean=0.9, sigma=0.05)
    assert result.upper == result.lower == [0.0] * 100
    assert result.alarms == [] and result.first_alarm is None


def test_cusum_alarms_after_a_step_up() -> None:
    # A step of 2 sigma adds 2 - 0.5 = 1.5 a day to the upper statistic: 1.5, 3.0, 4.5 > 4.
    values = [10.0] * 5 + [12.0] * 3
    result = cusum(values, mean=10.0, sigma=1.0)
    assert result.upper == pytest.approx([0, 0, 0, 0, 0, 1.5, 3.0, 4.5])
    assert result.lower == [0.0] * 8
    assert result.alarms == [7] and result.first_alarm == 7


def test_cusum_restarts_after_an_alarm() -> None:
    result = cusum([2.0] * 9, mean=0.0, sigma=1.0)
    # Alarms on the third observation of each fresh start: days 2, 5 and 8.
    assert result.alarms == [2, 5, 8]
    assert result.upper == pytest.approx([1.5, 3.0, 4.5] * 3)


def test_cusum_lower_side_catches_a_drop() -> None:
    # Sensitivity falling from 0.9 to 0.8 with sigma 0.04 is z = -2.5: 2, 4, 6 > 4.
    result = cusum([0.9, 0.9, 0.8, 0.8, 0.8], mean=0.9, sigma=0.04)
    assert result.upper == [0.0] * 5
    assert result.lower == pytest.approx([0, 0, 2.0, 4.0, 6.0])
    assert result.alarms == [4] and result.first_alarm == 4


def test_cusum_threshold_is_strict_and_in_sigma_units() -> None:
    # Reaching h exactly is not an alarm; k and h scale with sigma, not with the raw values.
    assert cusum([1.0, 1.0], mean=0.0, sigma=0.5, k=0.0, h=4.0).first_alarm is None
    assert cusum([1.0, 1.0, 1.0], mean=0.0, sigma=0.5, k=0.0, h=4.0).first_alarm == 2


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_cusum_refuses_a_non_positive_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match="positive sigma"):
        cusum([1.0, 2.0], mean=1.0, sigma=sigma)


# --- Predicted average run length ----------------------------------------------------------------

@pytest.mark.parametrize(("shift", "two_sided", "published"), [
    (0.0, False, 336.0),   # one-sided, in control
    (1.0, False, 8.38),    # one-sided, one sigma shift
    (0.0, True, 168.0),    # two-sided, in control: half the one-sided
])
def test_average_run_length_matches_published_values(shift: float, two_sided: bool,
                                                      published: float) -> None:
    predicted = cusum_average_run_length(shift, k=0.5, h=4.0, two_sided=two_sided)
    assert predicted == pytest.approx(published, rel=0.03)


def test_average_run_length_is_symmetric_and_falls_with_the_shift() -> None:
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0, 3.0]
    run_lengths = [cusum_average_run_length(s) for s in shifts]
    assert run_lengths == sorted(run_lengths, reverse=True)
    assert cusum_average_run_length(-1.0) == pytest.approx(cusum_average_run_length(1.0))
    # A finer chain changes the prediction by well under 0.1%: 200 states are enough.
    assert cusum_average_run_length(0.0, states=800) == pytest.approx(run_lengths[0], rel=1e-3)


@pytest.mark.filterwarnings("error")
def test_chart_facing_away_from_a_large_shift_never_alarms() -> None:
    # The lower chart's run length at +4 sigma is far beyond double precision: it counts as
    # infinite, and the two-sided ARL is the upper chart's.
    assert cusum_average_run_length(-4.0, two_sided=False) == math.inf
    assert cusum_average_run_length(4.0) == pytest.approx(
        cusum_average_run_length(4.0, two_sided=False), rel=1e-12)
    assert 1.0 < cusum_average_run_length(4.0) < 2.0


# --- CUSUM run lengths by simulation -------------------------------------------------------------

def first_alarms(z: NDArray[np.float64], k: float = 0.5, h: float = 4.0) -> NDArray[np.int64]:
    """Index of the first alarm of the two-sided CUSUM in each row of standardised values, or -1.

    The same recursion as ``cusum``, run over all replicates at once so that thousands of
    simulated periods take a fraction of a second.
    """
    replicates, days = z.shape
    upper = np.zeros(replicates)
    lower = np.zeros(replicates)
    first = np.full(replicates, -1)
    for day in range(days):
        upper = np.maximum(0.0, upper + z[:, day] - k)
        lower = np.maximum(0.0, lower - z[:, day] - k)
        first[(first < 0) & ((upper > h) | (lower > h))] = day
        if np.all(first >= 0):
            break
    return first


def run_lengths(rng: np.random.Generator, shift: float, replicates: int,
                days: int) -> NDArray[np.int64]:
    """Observations until the first alarm in simulated periods of N(shift, 1) daily values."""
    chunks = []
    for start in range(0, replicates, 500):
        z = rng.standard_normal((min(500, replicates - start), days)) + shift
        chunks.append(first_alarms(z))
    first = np.concatenate(chunks)
    # No period may run past the cap: censoring would bias the mean run length downwards.
    assert np.all(first >= 0)
    return first + 1


def test_vectorised_helper_agrees_with_cusum() -> None:
    rng = np.random.default_rng(SEED)
    z = rng.standard_normal((60, 150)) + rng.choice([0.0, 0.5, 1.0], size=(60, 1))
    first = first_alarms(z)
    for row, expected in zip(z, first.tolist(), strict=True):
        alarm = cusum(row.tolist(), mean=0.0, sigma=1.0).first_alarm
        assert (-1 if alarm is None else alarm) == expected
    assert 0 < int(np.sum(first >= 0)) < 60   # both outcomes are exercised


def test_simulated_in_control_run_length_matches_the_prediction() -> None:
    # 4000 in-control periods, each run until its first (false) alarm; the cap of 3000 days is
    # about 18 predicted ARLs, so the chance that any period reaches it is about 1e-4.
    simulated = run_lengths(np.random.default_rng(SEED), 0.0, replicates=4000, days=3000)
    predicted = cusum_average_run_length(0.0)
    # The simulated mean run length estimates the true ARL with standard error sd / sqrt(n)
    # (about 2.7 days here); the Markov-chain prediction is within 0.1% of the true ARL, so the
    # two should differ by less than 4 standard errors (a 1-in-16000 chance of failing by luck
    # with a correct implementation, and a fixed seed anyway).
    standard_error = simulated.std(ddof=1) / math.sqrt(simulated.size)
    assert abs(simulated.mean() - predicted) < 4 * standard_error
    # In control the run length is close to geometric: median about ARL * ln 2.
    assert np.median(simulated) == pytest.approx(predicted * math.log(2), rel=0.1)


def test_simulated_detection_delay_after_a_one_sigma_shift() -> None:
    # The shift is present from day 0: the run length is the detection delay, in days.
    simulated = run_lengths(np.random.default_rng(SEED + 1), 1.0, replicates=4000, days=200)
    predicted = cusum_average_run_length(1.0)
    # Detection delays are tightly spread (sd about 4.5 days), so the standard error of the
    # mean is about 0.07 days; 4 standard errors leaves room for sampling luck only. The Brook-Evans
    # discretisation error (under 0.01% at 200 states) is far below that.
    standard_error = simulated.std(ddof=1) / math.sqrt(simulated.size)
    assert abs(simulated.mean() - predicted) < 4 * standard_error
    # A typical shift is caught in about a week, and almost never after a month.
    assert 6 <= np.median(simulated) <= predicted
    assert np.quantile(simulated, 0.99) < 30


# --- Input-drift tests ---------------------------------------------------------------------------

MANUFACTURERS = ["GE", "Siemens", "Philips", "Canon"]
MANUFACTURER_SHARES = [0.4, 0.3, 0.2, 0.1]


def stable_day(rng: np.random.Generator, size: int = 150) -> list[DriftTest]:
    """Six drift tests on one day whose inputs come from the same distributions as the baseline."""
    tests = []
    for name, shares in [("manufacturer", MANUFACTURER_SHARES),
                         ("body_part", [0.6, 0.3, 0.1]),
                         ("kernel", [0.5, 0.5])]:
        categories = MANUFACTURERS[:len(shares)]
        baseline, current = (rng.choice(categories, size=size, p=shares).tolist()
                             for _ in range(2))
        tests.append(chi_square_test(name, baseline, current))
    for name, draw in [("slice_thickness", lambda: rng.gamma(4.0, 0.5, size)),
                       ("kvp", lambda: rng.normal(120.0, 10.0, size)),
                       ("pixel_spacing", lambda: rng.uniform(0.5, 0.9, size))]:
        tests.append(ks_test(name, draw().tolist(), draw().tolist()))
    return tests


def test_corrected_drift_tests_rarely_alarm_on_stable_days() -> None:
    rng = np.random.default_rng(SEED)
    days = 500
    alarming = sum(any(t.alarm for t in correct(stable_day(rng))) for _ in range(days))
    # With no drift, BH keeps the chance of any alarm on a day at or below 5%; allow for the
    # sampling error of 500 days by the 99.9th percentile of Binomial(500, 0.05) (41 days, 8%).
    assert alarming <= binom.ppf(0.999, days, 0.05)


def test_a_shifted_numeric_input_is_detected() -> None:
    rng = np.random.default_rng(SEED)
    detected = 0
    for _ in range(200):
        tests = stable_day(rng)
        shifted = rng.gamma(4.0, 0.5, 150) + 1.0   # one sd of Gamma(4, 0.5)
        tests[3] = ks_test("slice_thickness", rng.gamma(4.0, 0.5, 150).tolist(), shifted.tolist())
        detected += next(t for t in correct(tests) if t.name == "slice_thickness").alarm
    assert detected >= 0.9 * 200


def test_a_new_manufacturer_is_detected() -> None:
    rng = np.random.default_rng(SEED)
    detected = 0
    for _ in range(200):
        tests = stable_day(rng)
        baseline = rng.choice(MANUFACTURERS, size=150, p=MANUFACTURER_SHARES).tolist()
        # One study in ten now comes from a scanner never seen in the baseline.
        current = rng.choice(MANUFACTURERS + ["Fujifilm"], size=150,
                             p=[s * 0.9 for s in MANUFACTURER_SHARES] + [0.1]).tolist()
        tests[0] = chi_square_test("manufacturer", baseline, current)
        detected += next(t for t in correct(tests) if t.name == "manufacturer").alarm
    assert detected >= 0.9 * 200


def test_chi_square_counts_new_and_drops_absent_categories() -> None:
    test = chi_square_test("manufacturer", ["GE"] * 50 + ["Siemens"] * 50,
                           ["GE"] * 40 + ["Siemens"] * 40 + ["Fujifilm"] * 20)
    assert test.kind == DriftKind.CHI_SQUARE == "chi-square"
    assert test.statistic > 0 and test.p_value < 1e-4
    assert test.adjusted_p == test.p_value and not test.alarm


def test_chi_square_with_a_single_category_reports_no_drift() -> None:
    test = chi_square_test("manufacturer", ["GE"] * 10, ["GE"] * 30)
    assert (test.statistic, test.p_value, test.alarm) == (0.0, 1.0, False)


def test_drift_tests_refuse_an_empty_period() -> None:
    with pytest.raises(ValueError, match="'kvp' needs values in both periods"):
        ks_test("kvp", [], [120.0])
    with pytest.raises(ValueError, match="0 current"):
        chi_square_test("manufacturer", ["GE"], [])


def test_correction_is_benjamini_hochberg() -> None:
    tests = [DriftTest(name=str(i), kind=DriftKind.KS, statistic=0.0, p_value=p, adjusted_p=p,
                       alarm=False)
             for i, p in enumerate([0.01, 0.04, 0.03, 0.5])]
    corrected = correct(tests)
    # BH by hand: sorted p-values times m / rank, made monotone from the largest down.
    assert [t.adjusted_p for t in corrected] == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert [t.alarm for t in corrected] == [True, False, False, False]
    assert [t.p_value for t in corrected] == [0.01, 0.04, 0.03, 0.5]
    assert correct([]) == []


# --- Active against shadow model -----------------------------------------------------------------

def textbook_kappa(both: int, active_only: int, shadow_only: int, neither: int) -> float | None:
    total = both + active_only + shadow_only + neither
    if total == 0:
        return None
    observed = (both + neither) / total
    active, shadow = (both + active_only) / total, (both + shadow_only) / total
    expected = active * shadow + (1 - active) * (1 - shadow)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def test_shadow_comparison_matches_independent_computation() -> None:
    rng = np.random.default_rng(SEED)
    for _ in range(200):
        n = int(rng.integers(1, 120))
        active = rng.random(n) < rng.uniform(0.0, 0.6)
        # The shadow copies the active decision mostly, and disagrees at its own rate.
        flip = rng.random(n) < rng.uniform(0.0, 0.4)
        shadow = active ^ flip
        result = compare_shadow(active.tolist(), shadow.tolist())
        counts = (int(np.sum(active & shadow)), int(np.sum(active & ~shadow)),
                  int(np.sum(~active & shadow)), int(np.sum(~active & ~shadow)))
        assert (result.both, result.active_only, result.shadow_only, result.neither) == counts
        kappa = textbook_kappa(*counts)
        if kappa is None:
            assert result.kappa is None
        else:
            assert result.kappa == pytest.approx(kappa, abs=1e-12)
        b, c = counts[1], counts[2]
        expected_p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
        assert result.mcnemar_p == pytest.approx(expected_p, abs=1e-12)
        assert result.mcnemar_statistic == min(b, c)
        assert_proportion(result.agreement, counts[0] + counts[3], n)


@pytest.mark.parametrize(("active", "shadow"), [
    ([True] * 5, [True] * 5),
    ([False] * 5, [False] * 5),
    ([], []),
])
def test_kappa_is_none_when_undefined(active: list[bool], shadow: list[bool]) -> None:
    result = compare_shadow(active, shadow)
    assert result.kappa is None
    assert result.mcnemar_p == 1.0


def test_shadow_that_flags_far_more_is_significant() -> None:
    result = compare_shadow([True] * 10 + [False] * 90, [True] * 10 + [True] * 20 + [False] * 70)
    assert (result.both, result.active_only, result.shadow_only, result.neither) == (10, 0, 20, 70)
    assert result.mcnemar_p == pytest.approx(2 * 0.5**20)
    assert result.kappa is not None and 0 < result.kappa < 1


def test_shadow_comparison_refuses_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="2 active decisions but 1 shadow"):
        compare_shadow([True, False], [True])
