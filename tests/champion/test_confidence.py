"""Test accuracy with a binomial confidence interval, and the val -> test gap: exact known values."""

from __future__ import annotations

import math

import pytest
from scipy.stats import beta, norm

from pipeline.champion import _confidence as C


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval written out from its formula."""
    p, z = k / n, norm.ppf(0.5 + level / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(centre - half, 0.0), min(centre + half, 1.0)


def test_wilson_70_of_77():
    low, high = C.accuracy_interval(70, 77)
    assert (round(low, 4), round(high, 4)) == (0.8240, 0.9553)
    assert (low, high) == pytest.approx(wilson(70, 77), abs=1e-12)


def test_exact_interval_is_clopper_pearson():
    low, high = C.accuracy_interval(70, 77, method="exact")
    assert (round(low, 4), round(high, 4)) == (0.8216, 0.9627)
    assert low == pytest.approx(beta.ppf(0.025, 70, 8), abs=1e-9)
    assert high == pytest.approx(beta.ppf(0.975, 71, 7), abs=1e-9)


@pytest.mark.parametrize("k,n,expected", [(0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)), (74, 77, (0.8916, 0.9867))])
def test_wilson_edges_stay_inside_0_1(k, n, expected):
    low, high = C.accuracy_interval(k, n)
    assert (round(low, 4), round(high, 4)) == expected
    assert (low, high) == pytest.approx(wilson(k, n), abs=1e-12)


def test_a_wider_level_gives_a_wider_interval():
    low90, high90 = C.accuracy_interval(70, 77, 0.90)
    low99, high99 = C.accuracy_interval(70, 77, 0.99)
    assert (low90, high90) == pytest.approx(wilson(70, 77, 0.90), abs=1e-12)
    assert low99 < 0.8240 < low90 and high90 < 0.9553 < high99


def test_figures_with_the_val_to_test_gap():
    figures = C.sealed_test_figures(70, 77, val=0.974)
    assert figures.accuracy == 70 / 77 and (figures.correct, figures.total) == (70, 77)
    assert figures.gap == pytest.approx(0.974 - 70 / 77) and round(figures.gap, 4) == 0.0649
    assert (figures.confidence, figures.method) == (0.95, "wilson")
    assert figures.describe() == ("test accuracy 0.909 (70/77; 95% CI 0.824-0.955, wilson); val 0.974, gap +0.065")
    record = figures.to_record()
    assert list(record) == ["correct", "total", "accuracy", "low", "high", "confidence", "method", "val", "gap"]
    assert record["low"] == figures.low and record["val"] == 0.974
    no_val = C.sealed_test_figures(74, 77)
    assert no_val.gap is None and no_val.val is None
    assert no_val.describe() == "test accuracy 0.961 (74/77; 95% CI 0.892-0.987, wilson)"
    assert C.val_test_gap(0.9, 0.95) == pytest.approx(-0.05)


@pytest.mark.parametrize(
    "args,message",
    [
        ((0, 0), "test accuracy needs at least one test image, got total=0"),
        ((78, 77), "correct must be between 0 and total=77, got 78"),
        ((-1, 77), "correct must be between 0 and total=77, got -1"),
        ((70, 77, 95), "confidence must be between 0 and 1 \\(e.g. 0.95\\), got 95"),
        ((70, 77, 0.95, "wald"), "unknown interval method 'wald' \\(allowed: wilson, exact\\)"),
    ],
)
def test_bad_counts_are_named(args, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        C.accuracy_interval(*args)
