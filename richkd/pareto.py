"""Pareto fronts of multi-objective sweeps: pure functions on numbers and trial rows (no Ray, no torch).

A point dominates another when it is at least as good in every objective (respecting each objective's
max/min mode) and strictly better in at least one. The front is the set of points no other point dominates;
points with identical objective values do not dominate each other, so ties are all kept on the front.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

MODES = ("max", "min")


def _oriented(values: Sequence[float], modes: Sequence[str]) -> list[float]:
    """Values flipped so that larger is better in every objective."""
    return [float(v) if m == "max" else -float(v) for v, m in zip(values, modes)]


def finite(value) -> bool:
    """A real number (bool is not one) that is neither nan nor inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """True when a is at least as good as b in every objective and strictly better in one."""
    oa, ob = _oriented(a, modes), _oriented(b, modes)
    return all(x >= y for x, y in zip(oa, ob)) and any(x > y for x, y in zip(oa, ob))


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices (ascending) of the non-dominated points. Points with a missing or non-finite value are never on
    the front (and do not dominate anything). O(n^2 k): sweeps have tens to thousands of trials."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"pareto_front: mode {bad[0]!r} is not max or min")
    valid = []
    for i, p in enumerate(points):
        if len(p) != len(modes):
            raise ValueError(f"pareto_front: point {i} has {len(p)} values for {len(modes)} objectives")
        if all(map(finite, p)):
            valid.append(i)
    return [i for i in valid if not any(dominates(points[j], points[i], modes) for j in valid if j != i)]


def objective_values(row, metrics: Sequence[str]) -> Optional[list[float]]:
    """A trial row's LAST reported value of each metric, or None when one is missing or non-finite."""
    values = [(row.metrics or {}).get(m) for m in metrics]
    return [float(v) for v in values] if all(map(finite, values)) else None


def front_rows(rows: Sequence, metrics: Sequence[str], modes: Sequence[str]) -> list:
    """The trials on the Pareto front of `metrics` among trials that reached max_t (outcome "completed").

    ASHA-stopped trials are excluded: their values come from fewer epochs (the same rule as best-config
    selection), and Optuna was told they were PRUNED. Returned in the rows' order (export's rank order).
    """
    candidates = [(r, objective_values(r, metrics)) for r in rows if r.outcome == "completed"]
    candidates = [(r, v) for r, v in candidates if v is not None]
    keep = set(pareto_front([v for _, v in candidates], modes))
    return [r for i, (r, _) in enumerate(candidates) if i in keep]
