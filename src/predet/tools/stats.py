"""Seed statistics every table uses: mean and sample std, and two readings of a win.

``seed_gap`` (the ladder's rule): a mean above the other by more than twice the larger sample
std, i.e. one run of ``a`` would beat one run of ``b`` beyond their spread. It does not tighten
with more seeds. ``mean_gap`` (the demo's): the gap of the means beside its own standard error,
which does; a gap beyond two standard errors is the answer a few seeds can give."""

from __future__ import annotations

import math


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1); the std of a single value is None, not 0."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seed_gap(a: dict | None, b: dict | None) -> dict | None:
    """Whether ``a`` beats ``b`` beyond seed noise, our rule everywhere (the ladder, the demo):
    its mean is above by more than twice the larger sample std. ``a``/``b``: {"mean", "std"}."""
    if not a or not b or a.get("std") is None or b.get("std") is None:
        return None
    two_std = 2 * max(a["std"], b["std"])
    gap = a["mean"] - b["mean"]
    return {"gap": gap, "two_std": two_std, "wins_by_2std": gap > two_std}


def mean_gap(a: dict | None, b: dict | None) -> dict | None:
    """The gap of two means and its standard error, sqrt(s_a^2/n_a + s_b^2/n_b) (Welch), and
    whether the gap is beyond twice it. ``a``/``b``: {"mean", "std", "n"}."""
    if not a or not b or a.get("std") is None or b.get("std") is None:
        return None
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    gap = a["mean"] - b["mean"]
    return {"gap": gap, "se": se, "wins_by_2se": gap > 2 * se}
