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

__all__ = ["OptimizerReplay", "direction", "direction_scale", "first_moment", "flat_coords", "preconditioner",
           "second_moment", "shares_along", "shares_of_rows"]

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


def first_moment(m: torch.Tensor | None, g: torch.Tensor, b1: float, adam: bool, *,
                 in_place: bool = False) -> torch.Tensor:
    """One environment's first moment from its gradient ``g = G_e`` (or rows of them, stacked).

    Adam family: ``m_e ← β1·m_e + (1 − β1)·G_e``; SGD with momentum (torch's, no dampening):
    ``m_e ← β1·m_e + G_e``. At the first step (``m`` None) the previous ``m_e`` counts as 0.
    ``in_place``: written into ``m`` (which is returned).
    """
    c = (1 - b1) if adam else 1.0
    if m is None:
        return c * g if adam else g
    if in_place:
        return m.mul_(b1).add_(g, alpha=c)
    return b1 * m + c * g


def direction_scale(b1: float, t: int, denom: torch.Tensor | None) -> torch.Tensor | None:
    """The element-wise factor ``f`` with ``p_e = f ⊙ m_e`` (:func:`direction`): Adam family
    ``f = 1 / ((1 − β1ᵗ)(√v̂ + ε))``; SGD (``denom`` None): None (``p_e = m_e``)."""
    return None if denom is None else 1.0 / ((1 - b1 ** t) * denom)


def direction(m: torch.Tensor, b1: float, t: int, denom: torch.Tensor | None) -> torch.Tensor:
    """Predicted update direction ``p_e`` (the step is ``−lr·p_e``).

    Adam family (``denom`` = :func:`preconditioner`): ``p_e = m̂_e / (√v̂ + ε)`` with
    ``m̂_e = m_e / (1 − β1ᵗ)``; SGD (``denom`` None): ``p_e = m_e`` (``m_e = G_e`` without momentum).
    """
    f = direction_scale(b1, t, denom)
    return m if f is None else m * f


def shares_of_rows(m: torch.Tensor, update: torch.Tensor, scale: torch.Tensor | None = None) -> list[float] | None:
    """Each environment's share of the update ``ΔA`` (flat), from its direction
    ``p_e = scale ⊙ m_e`` (``m``: n x P, one row per environment; ``scale``: :func:`direction_scale`,
    None for ``p_e = m_e``).

    With ``P = Σ_e p_e``: ``s_e = ⟨p_e, ΔA⟩ / ⟨P, ΔA⟩``. When ``ΔA`` is nearly orthogonal to
    ``P`` (``|⟨P, ΔA⟩| ≤ 1e-6·‖P‖·‖ΔA‖``, or ``ΔA = 0``) it falls back to ``s_e = ⟨p_e, P⟩ / ‖P‖²``;
    None when ``P = 0``. Either way ``Σ_e s_e = 1``; shares can be negative (an environment
    pushing against the update). The directions are not formed: ``⟨p_e, x⟩ = ⟨m_e, scale ⊙ x⟩``,
    one matrix-vector product over the rows, and one host read.
    """
    w = update if scale is None else update * scale
    along = m @ w                                         # ⟨p_e, ΔA⟩
    P = m.sum(0) if scale is None else m.sum(0) * scale
    values = torch.cat([along, torch.stack([P.norm(), update.norm()])]).tolist()
    per_env, pnorm, unorm = values[:-2], values[-2], values[-1]
    dot = sum(per_env)                                    # ⟨P, ΔA⟩
    if pnorm * unorm > 0 and abs(dot) > ORTHOGONAL_COSINE * pnorm * unorm:
        return [v / dot for v in per_env]
    if pnorm > 0:
        return (m @ (P if scale is None else P * scale) / (P @ P)).tolist()
    return None


def shares_along(p: dict[int, torch.Tensor], update: torch.Tensor) -> dict[int, float] | None:
    """:func:`shares_of_rows` for directions given per environment (``{e: p_e}``)."""
    s = shares_of_rows(torch.stack(list(p.values())), update)
    return None if s is None else dict(zip(p, s))


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
        # per module: (envs, their stacked first moments, its rows as stored in self.m)
        self._stacked: dict[str, tuple[list[int], torch.Tensor, tuple[torch.Tensor, ...]]] = {}

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
        :meth:`module_shares_rows` with the gradients stacked in ``grads``' order."""
        s = self.module_shares_rows(module, list(grads), torch.stack(list(grads.values())), update, b1, b2)
        return None if s is None else dict(zip(grads, s))

    def module_shares_rows(self, module: str, envs: list[int], grads: torch.Tensor, update: torch.Tensor,
                           b1: float, b2: float | None) -> list[float] | None:
        """Shares (in ``envs`` order) of ``module``'s flat update ``ΔA`` from the gradients
        ``grads`` (n x P, float64, row i = ``G_e`` of ``envs[i]``): advance the moments and
        return :func:`shares_of_rows` of the directions, all environments in one tensor op each."""
        denom = None
        if b2 is not None:
            self.v[module] = v = second_moment(self.v.get(module), grads.sum(0), b2)
            denom = preconditioner(v, b2, self.t, self.eps)
        m = self._advance(module, envs, grads, b1, adam=b2 is not None) if b1 > 0 else grads
        return shares_of_rows(m, update, direction_scale(b1, self.t, denom))

    def _advance(self, module: str, envs: list[int], grads: torch.Tensor, b1: float, adam: bool) -> torch.Tensor:
        """The environments' first moments after this step's gradients (:func:`first_moment`),
        stacked in ``envs`` order; ``self.m[module][e]`` are rows of that stack. Updated in place
        when the environments are those of the module's previous step."""
        kept = self.m[module]
        last = self._stacked.get(module)
        if last is not None and last[0] == envs and all(kept.get(e) is row for e, row in zip(envs, last[2])):
            M = first_moment(last[1], grads, b1, adam, in_place=True)
        else:
            prev = None
            if any(e in kept for e in envs):  # an environment without a moment yet starts from 0
                zero = grads.new_zeros(grads.shape[1])
                prev = torch.stack([kept.get(e, zero) for e in envs])
            M = first_moment(prev, grads, b1, adam)
            if M is grads:
                M = M.clone()  # the stack is kept across steps: it must not be the caller's tensor
            rows = M.unbind(0)
            for e, row in zip(envs, rows):
                kept[e] = row
            self._stacked[module] = (list(envs), M, rows)
        return M

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``m.<env index>.<module>`` and ``v.<module>`` tensors."""
        tensors = {}
        for name, per_env in self.m.items():
            for e, m in per_env.items():
                tensors[f"m.{e}.{name}"] = m.clone()  # rows of one step's stacked moments: no shared storage
        for name, v in self.v.items():
            tensors[f"v.{name}"] = v
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor], t: int, remap: dict[int, int],
                        devices: dict[str, torch.device]) -> None:
        """Restore from :meth:`state_dict`; ``remap``: saved environment index → current index;
        ``devices``: module → device of its weight."""
        self.m = defaultdict(dict)
        self.v = {}
        self._stacked = {}
        for key, x in tensors.items():
            if key.startswith("m."):
                _, e, name = key.split(".", 2)
                self.m[name][remap[int(e)]] = x.to(devices.get(name, x.device))
            elif key.startswith("v."):
                self.v[key[2:]] = x.to(devices.get(key[2:], x.device))
        self.t = t
