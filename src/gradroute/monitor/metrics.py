"""Trainer metrics (W&B / TensorBoard scalars) from step records, true whatever the logging interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..router.records import StepRecord


def _put(out: dict[str, float], key: str, value: object) -> None:
    if isinstance(value, bool):
        value = float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        out[key] = float(value)


def step_metrics(window: Sequence[StepRecord | None], prefix: str = "gradroute/") -> dict[str, float]:
    """Flat scalar metrics of the last record of ``window`` (the step records since the previous
    log, oldest first):

    - running totals and that step's own figures (``adapter_norm`` and its per-layer values,
      ``env_adapter_norm/<env>``, ``env_adapter_share/<env>``, ``update_norm``,
      ``env_share/<env>``, ``grad_norm/<env>``, ``activation_norm/<env>/<layer>``, the signed
      activation projection ``activation/<env>/<layer>/<i>`` = coordinate i of the mean ``Uᵀh``
      (what the activation z-rule watches), ``nonfinite_rewards[_total]/<env>``) are the values of
      that step's record, never averaged over the window;
    - counts (``samples/<env>``) are summed over the window;
    - ``reward/<env>`` is the mean of the window's per-step means (TRL averages its own
      ``reward`` the same way);
    - ``nonfinite`` is 1.0 when any step of the window had a non-finite update.

    Non-finite values are left out (a reporter cannot plot them).
    """
    records = [r for r in window if r is not None]
    if not records:
        return {}
    last = records[-1]
    out: dict[str, float] = {}
    p = prefix
    _put(out, f"{p}adapter_norm", last.adapter_norm)
    for L, v in last.adapter_norm_per_layer.items():
        _put(out, f"{p}adapter_norm_per_layer/{L}", v)
    _put(out, f"{p}update_norm", last.update_norm)
    for L, v in last.update_norm_per_layer.items():
        _put(out, f"{p}update_norm_per_layer/{L}", v)
    for name in ("env_adapter_share", "env_adapter_norm", "env_share", "grad_norm"):
        for e, v in getattr(last, name).items():
            _put(out, f"{p}{name}/{e}", v)
    for e, layers in last.activation_norm.items():
        for L, v in layers.items():
            _put(out, f"{p}activation_norm/{e}/{L}", v)
    if last.nonfinite_rewards_total:
        for name in ("nonfinite_rewards", "nonfinite_rewards_total"):
            for e, v in getattr(last, name).items():
                _put(out, f"{p}{name}/{e}", v)
    for e, layers in last.activation.items():
        for L, coords in layers.items():
            for i, x in enumerate(coords):
                _put(out, f"{p}activation/{e}/{L}/{i}", x)
    samples: dict[str, float] = {}
    rewards: dict[str, list[float]] = {}
    for r in records:
        for e, n in r.samples.items():
            samples[e] = samples.get(e, 0.0) + float(n)
        for e, v in r.reward.items():
            if math.isfinite(v):
                rewards.setdefault(e, []).append(float(v))
    for e, n in samples.items():
        _put(out, f"{p}samples/{e}", n)
    for e, v in rewards.items():
        _put(out, f"{p}reward/{e}", sum(v) / len(v))
    _put(out, f"{p}nonfinite", float(any(r.nonfinite for r in records)))
    return out
