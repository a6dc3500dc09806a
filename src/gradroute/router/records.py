"""What the router reports: one :class:`StepRecord` per routed optimizer step.

A record carries everything a step produces — norms, per-environment shares of the step and of
the adapter, per-environment adapter norms, the attribution figures (in-subspace gradient norms,
samples, activation projections, mean rewards) and the non-finite reward counts — as typed
fields. Data flows one way: router → record → subscribers (monitor, trainer callback). Rules read
the fields; JSON exists only inside the run log's writer and reader (:mod:`gradroute.monitor.runlog`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..layers import LayerKey

if TYPE_CHECKING:
    from .attribution import AttributionStep


@dataclass
class AdapterNorm:
    """Frobenius norm of the adapter's weight delta ``‖U A‖ = ‖A‖`` (U orthonormal)."""

    total: float
    per_layer: dict[LayerKey, float] = field(default_factory=dict)
    per_module: dict[str, float] = field(default_factory=dict)


@dataclass
class StepRecord:
    """What one routed optimizer step did.

    ``step``: the number the step is logged under (the trainer's global step when the router was
    told it, else the router's own count); ``update_norm``: ‖ΔA_t‖ over all modules;
    ``adapter_norm``: ‖A_t‖ after the step; ``env_share``: each environment's share of this step's
    in-subspace update ‖ΔA_t‖² (sums to 1); ``env_adapter_share``: who built the adapter so far,
    ``⟨A_e, A⟩ / ‖A‖²`` (sums to 1); ``env_adapter_norm``: ‖A_e‖.

    With attribution on: ``grad_norm`` ‖G_e‖ (in-subspace gradient per environment),
    ``samples`` rows per environment, ``activation`` the mean projection ``Uᵀh`` per environment
    and layer (a k-vector), ``activation_norm`` its norm, ``reward`` the mean reward per
    environment (RL). ``nonfinite_rewards``: NaN/None rewards per environment in this step,
    ``nonfinite_rewards_total`` since the run started. ``push``: the persona push per environment
    and layer, ``Σ_t −Uᵀ ∂loss/∂h_t`` over the environment's tokens (a k-vector, signed along the
    subspace's directions: what the environment's loss asks of the persona coordinates, before
    routing), and ``push_null`` the same along m random directions orthogonal to U (what
    directions with no special role get); see :mod:`gradroute.monitor.locate`.
    ``attribution``: the in-memory
    :class:`~gradroute.attribution.AttributionStep` (per-module shares; not logged).
    """

    step: int
    update_norm: float
    update_norm_per_layer: dict[LayerKey, float]
    adapter_norm: float
    adapter_norm_per_layer: dict[LayerKey, float]
    env_share: dict[str, float] = field(default_factory=dict)
    env_adapter_share: dict[str, float] = field(default_factory=dict)
    env_adapter_norm: dict[str, float] = field(default_factory=dict)
    mode: str = "update"
    nonfinite: bool = False
    grad_norm: dict[str, float] = field(default_factory=dict)
    samples: dict[str, float] = field(default_factory=dict)
    activation: dict[str, dict[LayerKey, list[float]]] = field(default_factory=dict)
    activation_norm: dict[str, dict[LayerKey, float]] = field(default_factory=dict)
    reward: dict[str, float] = field(default_factory=dict)
    nonfinite_rewards: dict[str, int] = field(default_factory=dict)
    nonfinite_rewards_total: dict[str, int] = field(default_factory=dict)
    push: dict[str, dict[LayerKey, list[float]]] = field(default_factory=dict)
    push_null: dict[str, dict[LayerKey, list[float]]] = field(default_factory=dict)
    time: float | None = None  # wall-clock time the record was logged (set by the monitor)
    attribution: AttributionStep | None = field(default=None, repr=False, compare=False)

    def replace(self, **changes: object) -> StepRecord:
        """A copy with ``changes`` (records handed to subscribers are never edited in place)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
