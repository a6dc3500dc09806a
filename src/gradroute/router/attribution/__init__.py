"""Per-environment attribution of each step's in-subspace update.

Split by concern:

- :mod:`.capture` — hooks that record, per environment, the in-subspace part of each step's
  gradient in the adapter's coordinates (``G_e = Σ_{t ∈ e} (Uᵀ δ_t) x_tᵀ`` for a writer, so
  ``Σ_e G_e = Uᵀ ∇_W L`` exactly), plus rows, the mean projection ``Uᵀh`` of the routed layers'
  residual activations over live tokens (the Persona-Vectors monitoring signal) and mean
  reward when an RL trainer reports rewards;
- :mod:`.gather` — under ``torch.distributed`` those sums are all-reduced before use;
- :mod:`.replay` — the optimizer's linear part replayed in coordinate space turns each
  environment's gradient into a predicted update direction ``p_e`` and a **share**
  ``s_e = ⟨p_e, ΔA⟩ / ⟨Σ_e' p_e', ΔA⟩`` of the step's actual update ``ΔA`` (per module;
  ``Σ_e s_e = 1`` exactly).

``s_e · ΔA`` is credited to environment e (:meth:`GradientRouter.step`), so the
per-environment adapters sum exactly to the adapter (DESIGN invariant 5).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...layers import LayerKey
from ..envs import UNATTRIBUTED, Environments
from .capture import Capture
from .gather import all_reduce_step
from .replay import OptimizerReplay, flat_coords

if TYPE_CHECKING:
    from ..route import Route

__all__ = ["UNATTRIBUTED", "Attribution", "AttributionStep"]


@dataclass
class AttributionStep:
    """Per-environment figures for one optimizer step."""

    env_weights: dict[str, dict[str, float]]            # {env: {module: share}}: router.step's env_weights
    grad_norm: dict[str, float]                         # ‖G_e‖ (in-subspace gradient)
    samples: dict[str, float]
    activation: dict[str, dict[LayerKey, list[float]]]  # mean Uᵀh per env and layer
    activation_norm: dict[str, dict[LayerKey, float]]
    reward: dict[str, float] = field(default_factory=dict)
    push: dict[str, dict[LayerKey, list[float]]] = field(default_factory=dict)   # Σ_t −Uᵀg_t per env and layer
    push_null: dict[str, dict[LayerKey, list[float]]] = field(default_factory=dict)  # Σ_t −Rᵀg_t, random R (m)


class Attribution(Capture):
    """Hooks and bookkeeping for per-environment attribution (see the package docstring).

    Give the rows' environments before the forward pass (``with attribution.batch(env_ids):``
    or :meth:`set_batch`), or afterwards to ``router.step(env_ids=...)``. ``envs`` fixes the
    environment vocabulary (required under torch.distributed, so every rank indexes alike).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        routes: Sequence[Route],
        environments: Environments,
        probes: dict[LayerKey, torch.Tensor],
        betas: Any,
        *,
        capture: bool = True,
        activations: bool = True,
        eps: float = 1e-8,
    ):
        """``routes``: the router's routes; ``environments``: the router's environment list;
        ``probes``: the bases whose activation projections are recorded per layer; ``betas``:
        ``(β1, β2)`` of the optimizer that makes the adapter's update, or a callable returning
        them (β2 None: no preconditioner); ``capture=False``: the routing mode calls
        :meth:`capture` itself."""
        self.replay = OptimizerReplay(betas, eps)
        super().__init__(model, routes, environments, probes, capture=capture, activations=activations)

    @torch.no_grad()
    def shares(self, deltas: dict[str, list[torch.Tensor]], env_ids: Any | None = None) -> AttributionStep:
        """Per-module environment shares of the step's update ``deltas`` (ΔA per module and
        coordinate block), from what was captured since the last step; clears it."""
        self._resolve_pending(env_ids)
        all_reduce_step(self)
        b1, b2 = self.replay.begin_step()
        env_weights: dict[str, dict[str, float]] = defaultdict(dict)
        grad_sq: dict[str, float] = defaultdict(float)
        for r in self.routes:
            name = r.target.module
            update = flat_coords(*deltas[name][:2])
            flat = self._flat_gradients(r, update.device, grad_sq)
            if flat is None:
                continue
            envs, grads = flat
            raw = self.replay.module_shares_rows(name, envs, grads, update, b1, b2)
            if raw is None:
                continue
            for e, s in zip(envs, raw):
                if s != 0.0:
                    env_weights[self.vocab[e]][name] = s
        # modules no environment touched: their update is unattributed
        for r in self.routes:
            name = r.target.module
            if not any(name in w for w in env_weights.values()):
                env_weights[UNATTRIBUTED][name] = 1.0
        step = self._step_record(dict(env_weights), grad_sq)
        self._clear_step()
        self._rewards.clear()
        return step

    def _flat_gradients(self, route: Route, device: torch.device,
                        grad_sq: dict[str, float]) -> tuple[list[int], torch.Tensor] | None:
        """The environments with a gradient this step or a first moment, in index order, and
        their ``G_e`` flat (:func:`flat_coords` layout), stacked (n x P, float64, on ``device``;
        zeros for those without a gradient); None when there are none. Adds ``‖G_e‖²`` to
        ``grad_sq`` by environment name."""
        name = route.target.module
        G, Gb = self._G[name], self._Gb[name]
        envs = sorted(set(G) | self.replay.envs(name))
        if not envs:
            return None
        W = route.target.adapter_params - (route.target.rank if route.target.bias else 0)
        full = all(e in G for e in envs)
        new = torch.empty if full else torch.zeros
        grads = new(len(envs), route.target.adapter_params, dtype=torch.float64, device=device)
        for i, e in enumerate(envs):
            if e in G:  # float32 sums, read once into float64 (the bias block follows the weight block)
                grads[i, :W].copy_(G[e].reshape(-1))
                if route.target.bias:
                    b = Gb.get(e)
                    if b is None:
                        grads[i, W:].zero_()
                    else:
                        grads[i, W:].copy_(b)
        sq = torch.linalg.vector_norm(grads, dim=1).pow(2).tolist()
        for e, v in zip(envs, sq):
            if e in G:
                grad_sq[self.vocab[e]] += v
        return envs, grads

    def _step_record(self, env_weights: dict[str, dict[str, float]], grad_sq: dict[str, float]) -> AttributionStep:
        """The step's figures: shares, ``‖G_e‖``, samples, mean rewards, mean activation projections."""
        step = AttributionStep(
            env_weights=env_weights,
            grad_norm={e: math.sqrt(v) for e, v in grad_sq.items()},
            samples={self.vocab[e]: c for e, c in self._rows.items() if c > 0},
            activation={}, activation_norm={},
            reward={self.vocab[e]: v[0] / v[1] for e, v in self._rewards.items() if v[1] > 0},
        )
        for L, acc in self._act.items():
            for e, s in acc.items():
                n = self._act_tokens[L].get(e, 0.0)
                if n > 0:
                    mean = (s / n).tolist()
                    step.activation.setdefault(self.vocab[e], {})[L] = mean
                    step.activation_norm.setdefault(self.vocab[e], {})[L] = math.sqrt(sum(x * x for x in mean))
        for L, acc in self._push.items():
            k = self.probes[L].shape[1]
            for e, s in acc.items():
                s = s.double().cpu()
                if s.numel() > k:
                    step.push.setdefault(self.vocab[e], {})[L] = s[:k].tolist()
                    step.push_null.setdefault(self.vocab[e], {})[L] = s[k:].tolist()
        return step

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.replay.state_dict(), {"vocab": list(self.vocab), "t": self.replay.t}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        saved = list(meta.get("vocab", []))
        for e in saved:
            if e not in self.vocab:
                self.env_index(e)
        remap = {i: self.vocab.index(e) for i, e in enumerate(saved)}
        devices = {r.target.module: r.weight.device for r in self.routes}
        self.replay.load_state_dict(tensors, int(meta.get("t", 0)), remap, devices)
