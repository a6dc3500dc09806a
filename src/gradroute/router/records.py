"""What the router reports: one :class:`StepRecord` per routed optimizer step.

A record carries everything the monitor needs (norms, per-environment shares of the step and
of the adapter, per-environment adapter norms, attribution figures), so data flows one way:
router → record → monitor/log/metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..layers import LayerKey


@dataclass
class AdapterNorm:
    """Frobenius norm of the adapter's weight delta ``‖U A‖ = ‖A‖`` (U orthonormal)."""

    total: float
    per_layer: dict[LayerKey, float] = field(default_factory=dict)
    per_module: dict[str, float] = field(default_factory=dict)


@dataclass
class StepRecord:
    """What one routed optimizer step did.

    ``env_share``: each environment's share of this step's in-subspace update ‖ΔA_t‖² (sums to
    1); ``env_adapter_share``: who built the adapter so far, ``⟨A_e, A⟩ / ‖A‖²`` (sums to 1);
    ``env_adapter_norm``: ‖A_e‖."""

    step: int
    update_norm: float                          # ‖ΔA_t‖ over all modules
    update_norm_per_layer: dict[LayerKey, float]
    adapter_norm: float                         # ‖A_t‖ after the step
    adapter_norm_per_layer: dict[LayerKey, float]
    env_share: dict[str, float] = field(default_factory=dict)
    env_adapter_share: dict[str, float] = field(default_factory=dict)
    env_adapter_norm: dict[str, float] = field(default_factory=dict)
    mode: str = "update"
    nonfinite: bool = False
    deltas: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # ΔA_t per module (weight block)
    attribution: Any = None  # AttributionStep when the router attributes by environment
