"""Statistics over seeds (gradroute.experiments.stats): the bootstrap interval of the median and
the seeds whose base never learned a task."""

from __future__ import annotations

import math
import statistics

from hypothesis import given, settings
from hypothesis import strategies as st

from gradroute.experiments import stats

values = st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(values)
def test_interval_holds_the_median_and_lies_within_the_values(xs):
    lo, hi = stats.bootstrap_ci(xs)
    med = statistics.median(xs)
    eps = 1e-9 * max(1.0, max(abs(x) for x in xs))  # a median of two is their mean: round-off
    assert min(xs) - eps <= lo <= med + eps and med - eps <= hi <= max(xs) + eps
    assert stats.bootstrap_ci(xs) == (lo, hi)  # seeded: the README's figures are reproducible


def test_interval_narrows_with_agreeing_seeds_and_handles_infinite_step_counts():
    spread = stats.bootstrap_ci([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6])
    tight = stats.bootstrap_ci([0.5, 0.51, 0.49, 0.5, 0.5, 0.52, 0.48, 0.5])
    assert spread[1] - spread[0] > 10 * (tight[1] - tight[0])
    assert stats.bootstrap_ci([0.5]) is None and stats.median([]) is None
    lo, hi = stats.bootstrap_ci([3, 5, math.inf, math.inf, math.inf])
    assert lo >= 3 and math.isinf(hi)  # not reached within the budget sorts last
    assert stats.describe([4.0, 6.0, math.inf], lambda v: ">60" if math.isinf(v) else f"{v:.0f}").startswith("6 [")
    assert stats.describe([]) == "–" and stats.describe([0.25]) == "0.25"


def test_summary_keeps_every_seed_and_counts_only_measured_ones():
    s = stats.summary({"14": 0.2, "15": None, "16": 0.6, "17": 0.4})
    assert s["per_seed"] == {"14": 0.2, "15": None, "16": 0.6, "17": 0.4}
    assert s["n"] == 3 and s["median"] == 0.4 and s["min"] == 0.2 and s["max"] == 0.6
    assert s["ci95"][0] <= 0.4 <= s["ci95"][1]
    assert stats.count({"a": 0.8, "b": 0.6, "c": None}, lambda v: v >= 0.7) == (1, 2)


def test_unlearned_names_the_tasks_a_base_cannot_do():
    before = {"arith": {"solve": 0.01}, "copy": {"solve": 0.9}, "reverse": {"solve": 0.15}}
    assert stats.unlearned(before, ["copy", "reverse"]) == {"reverse": 0.15}
    assert stats.unlearned(before, ["copy"]) == {}
