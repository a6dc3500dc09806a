"""Statistics over seeds, one implementation for every study: medians with a percentile-bootstrap
95 % interval, and the seeds whose base model never learned a task.

The interval is the percentile bootstrap of the median: resample the seeds with replacement
``n`` times (seeded, so the README's figures are reproducible), take each resample's median, and
report the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of those medians. With 8 seeds it is
coarse (it can only fall on values the seeds took, or midpoints of two), and it says how far the
median could move with other seeds of the same world, not the spread of single runs (that is the
per-seed table's job). An infinite value (a step count not reached within its budget) sorts last.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: a base model whose pre-RL solve rate on a task is below this did not learn the task
LEARNED_SOLVE = 0.5


def median(xs: Sequence[float]) -> float | None:
    """The median (None for no values)."""
    return statistics.median(xs) if xs else None


def bootstrap_ci(xs: Sequence[float], level: float = 0.95, n: int = 2000, seed: int = 0,
                 stat: Callable[[Sequence[float]], float] = statistics.median) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of ``stat`` (default the median) over ``xs``; None for fewer
    than two values."""
    xs = list(xs)
    if len(xs) < 2:
        return None
    rng = random.Random(seed)
    boots = sorted(stat([xs[rng.randrange(len(xs))] for _ in xs]) for _ in range(n))
    lo_i = int(math.floor((1 - level) / 2 * (n - 1)))
    hi_i = int(math.ceil((1 + level) / 2 * (n - 1)))
    return boots[lo_i], boots[hi_i]


def describe(xs: Sequence[float], fmt: Callable[[float], str] = "{:.2f}".format) -> str:
    """``median [lo–hi]`` with the bootstrap 95 % interval; one value alone; ``–`` for none."""
    xs = list(xs)
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt(xs[0])
    lo, hi = bootstrap_ci(xs)
    return f"{fmt(statistics.median(xs))} [{fmt(lo)}–{fmt(hi)}]"


def summary(per_seed: Mapping[str, float | None]) -> dict[str, Any]:
    """``{"per_seed": {seed: value}, "n", "median", "ci95": [lo, hi], "min", "max"}`` over the
    seeds with a value (a results file's table entry)."""
    vals = [float(v) for v in per_seed.values() if v is not None]
    ci = bootstrap_ci(vals)
    return {"per_seed": dict(per_seed), "n": len(vals), "median": median(vals),
            "ci95": list(ci) if ci is not None else None,
            "min": min(vals) if vals else None, "max": max(vals) if vals else None}


def count(per_seed: Mapping[str, float | None], ok: Callable[[float], bool]) -> tuple[int, int]:
    """(seeds where ``ok(value)``, seeds with a value)."""
    vals = [v for v in per_seed.values() if v is not None]
    return sum(1 for v in vals if ok(v)), len(vals)


def unlearned(before: Mapping[str, Mapping[str, float]], envs: Sequence[str],
              threshold: float = LEARNED_SOLVE) -> dict[str, float]:
    """The tasks among ``envs`` whose pre-RL solve rate (``before[env]["solve"]``) is below
    ``threshold``: env -> solve rate. A seed with any is flagged in the studies' tables, since
    RL on a task the base cannot do measures something else."""
    return {e: float(before[e]["solve"]) for e in envs if e in before and float(before[e]["solve"]) < threshold}
