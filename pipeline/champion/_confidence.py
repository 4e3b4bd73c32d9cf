"""Honest test figures: accuracy with a binomial confidence interval, and the val -> test gap.

The sealed test split is read once, for the champion only; its accuracy on n images is a binomial
proportion, so a 77-image test half carries about +-6 points of uncertainty at 95%. The interval
is SciPy's (`scipy.stats.binomtest(...).proportion_ci`): Wilson's score interval by default (good
coverage at small n, never outside [0, 1]), or Clopper-Pearson's exact interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("wilson", "exact")


@dataclass(frozen=True)
class TestFigures:
    """Test accuracy of one model with its interval; fractions in [0, 1].

    `gap` is val minus test accuracy (positive: val overstated what unseen data gives); None when
    no val figure was given.
    """

    __test__ = False  # not a pytest test class, whatever its name

    correct: int
    total: int
    accuracy: float
    low: float
    high: float
    confidence: float  # e.g. 0.95
    method: str  # "wilson" | "exact"
    val: float | None = None
    gap: float | None = None

    def to_record(self) -> dict[str, float | int | str | None]:
        """Plain values for metrics, tags, JSON and the registered model's metadata."""
        return asdict(self)

    def describe(self) -> str:
        """One line, e.g. 'test accuracy 0.909 (70/77; 95% CI 0.824-0.955, wilson); val 0.974, gap +0.065'."""
        text = (
            f"test accuracy {self.accuracy:.3f} ({self.correct}/{self.total}; "
            f"{self.confidence:.0%} CI {self.low:.3f}-{self.high:.3f}, {self.method})"
        )
        if self.val is not None and self.gap is not None:
            text += f"; val {self.val:.3f}, gap {self.gap:+.3f}"
        return text


def accuracy_interval(
    correct: int, total: int, confidence: float = 0.95, method: str = "wilson"
) -> tuple[float, float]:
    """(low, high) bounds of the accuracy `correct / total` at `confidence`, fractions in [0, 1].

    Raises:
        ValueError: `total < 1`, `correct` outside 0..total, `confidence` outside (0, 1), or an
            unknown method (allowed: wilson, exact).
    """
    from scipy.stats import binomtest

    if total < 1:
        raise ValueError(f"test accuracy needs at least one test image, got total={total}")
    if not 0 <= correct <= total:
        raise ValueError(f"correct must be between 0 and total={total}, got {correct}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    if method not in METHODS:
        raise ValueError(f"unknown interval method {method!r} (allowed: {', '.join(METHODS)})")
    ci = binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence, method=method)
    return float(ci.low), float(ci.high)


def val_test_gap(val: float, test: float) -> float:
    """Val minus test accuracy (fractions): how much the selected val figure overstated test."""
    return float(val) - float(test)


def sealed_test_figures(
    correct: int, total: int, val: float | None = None, confidence: float = 0.95, method: str = "wilson"
) -> TestFigures:
    """Test accuracy `correct / total` with its interval and, given the champion's val accuracy,
    the val -> test gap.

    Raises:
        ValueError: as `accuracy_interval`.
    """
    low, high = accuracy_interval(correct, total, confidence, method)
    accuracy = correct / total
    gap = None if val is None else val_test_gap(val, accuracy)
    return TestFigures(
        int(correct), int(total), accuracy, low, high, confidence, method, None if val is None else float(val), gap
    )
