"""Seed statistics every table uses: mean and sample std, and our rule for a win beyond seed
noise (the ladder, the demo, the sweeps)."""

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
