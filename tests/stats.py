"""Pearson's chi-square for the frequency tests (span lengths, sampled tokens), one way everywhere."""

from __future__ import annotations

import numpy as np


def chi_square(observed, expected) -> tuple[float, int]:
    """``(statistic, degrees of freedom)`` of observed counts against expected counts (same shape).

    Cells expecting fewer than 5 are pooled into one, as the chi-square approximation needs; an
    observation in a cell of expected count 0 is an assertion error (an impossible outcome).
    """
    observed, expected = np.ravel(observed).astype(float), np.ravel(expected).astype(float)
    assert observed[expected == 0].sum() == 0, "observed an outcome of probability 0"
    small = expected < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return float(np.sum((observed[keep] - expected[keep]) ** 2 / expected[keep])), int(keep.sum()) - 1


def chi_square_bound(dof: int) -> float:
    """Mean + 6 standard deviations of a chi-square with ``dof`` degrees of freedom: with the tests' fixed
    seeds a pass is certain for the right law, and a wrong law of any size fails by far."""
    return dof + 6 * np.sqrt(2 * dof)
