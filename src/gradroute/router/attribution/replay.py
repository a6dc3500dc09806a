"""Replay: turning each environment's captured gradient into its share of the step's update.

The step's in-subspace update ``ΔA`` of a module comes from the optimizer, not from the
gradient ``G = Σ_e G_e`` directly (momentum, Adam's preconditioning, clipping, weight decay).
The replay runs the optimizer's linear part again in the adapter's coordinate space (all
flattened, float64), per environment:

- each environment keeps its own first moment ``m_e`` (:func:`first_moment`), so ``Σ_e m_e``
  is the total first moment;
- the Adam family's second moment ``v`` is shared (:func:`second_moment`, of the total ``G``);
- environment e's predicted update direction ``p_e`` (:func:`direction`) is ``m̂_e / (√v̂ + ε)``
  (Adam family), ``m_e`` (SGD with momentum) or ``G_e`` (plain SGD);
- its **share** of the step (:func:`shares_along`) is the component of ``p_e`` along the
  actual update, ``s_e = ⟨p_e, ΔA⟩ / ⟨Σ_e' p_e', ΔA⟩``, so ``Σ_e s_e = 1`` exactly.

The optimizer's step is ``Δ_e = −lr·p_e`` per environment; ``−lr`` cancels in the ratio, so
``s_e = ⟨Δ_e, ΔA⟩ / ⟨Σ_e' Δ_e', ΔA⟩``. Approximations: Adam's element-wise denominator is taken
in coordinate space (the exact one lives in weight space), and what the optimizer adds that is
not gradient-driven (weight decay, Adam's ε) is spread in proportion to the shares.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

__all__ = ["OptimizerReplay", "direction", "first_moment", "flat_coords", "preconditioner",
           "second_moment", "shares_along"]

#: below this cosine between ``Σ_e p_e`` and ``ΔA`` the update counts as orthogonal to the prediction
ORTHOGONAL_COSINE = 1e-6


def flat_coords(main: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One module's coordinates as one float64 vector: ``[vec(main), bias]`` (weight block, then
    the writer bias block when the route has one)."""
    flat = main.double().reshape(-1)
    if bias is not None:
        flat = torch.cat([flat, bias.double()])
    return flat


def second_moment(v: torch.Tensor | None, g: torch.Tensor, b2: float) -> torch.Tensor:
    """Adam's shared second moment of the total gradient ``g = Σ_e G_e``:
    ``v ← β2·v + (1 − β2)·g²`` (element-wise; ``v = (1 − β2)·g²`` at the first step)."""
    return (1 - b2) * g.pow(2) if v is None else b2 * v + (1 - b2) * g.pow(2)


def preconditioner(v: torch.Tensor, b2: float, t: int, eps: float) -> torch.Tensor:
    """Adam's denominator at step t: ``√v̂ + ε`` with ``v̂ = v / (1 − β2ᵗ)``."""
    return (v / (1 - b2 ** t)).sqrt() + eps


def first_moment(m: torch.Tensor | None, g: torch.Tensor, b1: float, adam: bool) -> torch.Tensor:
    """One environment's first moment from its gradient ``g = G_e``.

    Adam family: ``m_e ← β1·m_e + (1 − β1)·G_e``; SGD with momentum (torch's, no dampening):
    ``m_e ← β1·m_e + G_e``. At the first step (``m`` None) the previous ``m_e`` counts as 0.
    """
    step_part = (1 - b1) * g if adam else g
    return step_part if m is None else b1 * m + step_part


def direction(m: torch.Tensor, b1: float, t: int, denom: torch.Tensor | None) -> torch.Tensor:
    """Predicted update direction ``p_e`` (the step is ``−lr·p_e``).

    Adam family (``denom`` = :func:`preconditioner`): ``p_e = m̂_e / (√v̂ + ε)`` with
    ``m̂_e = m_e / (1 − β1ᵗ)``; SGD (``denom`` None): ``p_e = m_e`` (``m_e = G_e`` without momentum).
    """
    return (m / (1 - b1 ** t)) / denom if denom is not None else m


def shares_along(p: dict[int, torch.Tensor], update: torch.Tensor) -> dict[int, float] | None:
    """Each environment's share of the update ``ΔA`` (flat), from the directions ``p_e``.

    With ``P = Σ_e p_e``: ``s_e = ⟨p_e, ΔA⟩ / ⟨P, ΔA⟩``. When ``ΔA`` is nearly orthogonal to
    ``P`` (``|⟨P, ΔA⟩| ≤ 1e-6·‖P‖·‖ΔA‖``, or ``ΔA = 0``) it falls back to ``s_e = ⟨p_e, P⟩ / ‖P‖²``;
    None when ``P = 0``. Either way ``Σ_e s_e = 1``; shares can be negative (an environment
    pushing against the update).
    """
    Ptot = sum(p.values())
    dot = float(Ptot @ update)
    scale = float(Ptot.norm() * update.norm())
    if scale > 0 and abs(dot) > ORTHOGONAL_COSINE * scale:
        return {e: float(pe @ update) / dot for e, pe in p.items()}
    if float(Ptot.norm()) > 0:
        nn_ = float(Ptot @ Ptot)
        return {e: float(pe @ Ptot) / nn_ for e, pe in p.items()}
    return None


def _total(grads: dict[int, torch.Tensor]) -> torch.Tensor:
    """``G = Σ_e G_e``, summed in the environments' order."""
    total = None
    for g in grads.values():
        total = g if total is None else total + g
    assert total is not None
    return total


class OptimizerReplay:
    """The replay's state across steps: per-module, per-environment first moments ``m``, the
    per-module shared second moment ``v``, and the step count ``t`` (for bias correction).

    ``betas``: ``(β1, β2)`` of the optimizer that makes the adapter's update, or a callable
    returning them (β2 None: no preconditioner, i.e. SGD; β1 0: no momentum)."""

    def __init__(self, betas: Any, eps: float = 1e-8):
        self.betas = betas
        self.eps = eps
        self.m: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self.v: dict[str, torch.Tensor] = {}
        self.t = 0

    def optimizer_betas(self) -> tuple[float, float | None]:
        """(β1, β2) of the optimizer that makes the adapter's update; β2 None = no preconditioner."""
        return self.betas() if callable(self.betas) else (self.betas if self.betas is not None else (0.0, None))

    def begin_step(self) -> tuple[float, float | None]:
        """Start a step: the optimizer's current betas, and ``t ← t + 1``."""
        betas = self.optimizer_betas()
        self.t += 1
        return betas

    def envs(self, module: str) -> set[int]:
        """Environments with a first moment for ``module`` (they share in steps without gradient)."""
        return set(self.m[module])

    def module_shares(self, module: str, grads: dict[int, torch.Tensor], update: torch.Tensor,
                      b1: float, b2: float | None) -> dict[int, float] | None:
        """Shares of ``module``'s flat update ``ΔA`` from the environments' flat gradients
        ``grads`` (``G_e``, float64; zeros for an environment carried only by its moment):
        advance the moments and return :func:`shares_along` of the directions."""
        denom = None
        if b2 is not None:
            self.v[module] = v = second_moment(self.v.get(module), _total(grads), b2)
            denom = preconditioner(v, b2, self.t, self.eps)
        p: dict[int, torch.Tensor] = {}
        for e, g in grads.items():
            if b1 > 0:
                m = self.m[module][e] = first_moment(self.m[module].get(e), g, b1, adam=b2 is not None)
            else:
                m = g
            p[e] = direction(m, b1, self.t, denom)
        return shares_along(p, update)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``m.<env index>.<module>`` and ``v.<module>`` tensors."""
        tensors = {}
        for name, per_env in self.m.items():
            for e, m in per_env.items():
                tensors[f"m.{e}.{name}"] = m
        for name, v in self.v.items():
            tensors[f"v.{name}"] = v
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor], t: int, remap: dict[int, int],
                        devices: dict[str, torch.device]) -> None:
        """Restore from :meth:`state_dict`; ``remap``: saved environment index → current index;
        ``devices``: module → device of its weight."""
        self.m = defaultdict(dict)
        self.v = {}
        for key, x in tensors.items():
            if key.startswith("m."):
                _, e, name = key.split(".", 2)
                self.m[name][remap[int(e)]] = x.to(devices.get(name, x.device))
            elif key.startswith("v."):
                self.v[key[2:]] = x.to(devices.get(key[2:], x.device))
        self.t = t
