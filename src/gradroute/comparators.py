"""Training-time comparators that reuse the same :class:`~gradroute.Subspace`.

Routing blocks nothing; these methods act on the persona directions *during training* and are
the baselines for the claim that routing gives the model no incentive to hide (seed 004).
Each edits or reads the residual stream at the subspace's layers with forward hooks that act
only in training forward passes (gradients enabled and ``model.training``; ``during="always"``
also in rollouts and evaluation), and is removed for inference:

- :class:`ConceptAblation` — CAFT (Casademunt et al., 2025, "Steering out-of-distribution
  generalization with concept ablation fine-tuning"): ``h ← h − U Uᵀ h``.
- :class:`ActivationPenalty` — one-sided penalty, BLOCK-EM style (arXiv 2602.00767): the loss
  gains ``w · mean_tokens Σ_j relu(u_jᵀ h − τ_j)²``, with τ the frozen base model's reference
  level per direction (:meth:`ActivationPenalty.calibrate`); nothing is edited.
- :class:`PreventativeSteering` — Persona Vectors (Chen et al., 2025): ``h ← h + α_L Σ_j u_j``
  (one α, or one per layer) while training, so the optimizer has no reason to move along the persona; removed at inference.

Plain loop::

    comp = gr.ConceptAblation(sub).attach(model)
    loss = model(**batch).loss + comp.loss()      # comp.loss() is 0 except for the penalty
    ...
    comp.remove()                                 # inference without it

TRL/transformers: :func:`gradroute.integrations.trl.attach_comparator`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import projection as P
from .errors import ConfigError
from .layers import LayerKey
from .subspace import Subspace

DURING = ("training", "always")


class TrainingComparator:
    """Residual-stream hooks at the subspace's layers, active while training (see the module)."""

    name = "comparator"

    def __init__(self, subspace: Subspace, layers: Iterable[LayerKey] | None = None, during: str = "training"):
        if not isinstance(subspace, Subspace):
            raise ConfigError(f"a comparator needs a gradroute Subspace, got {type(subspace).__name__}.",
                              "pass gr.Subspace.load(path) or a Subspace built with from_probe/from_sae.")
        if during not in DURING:
            raise ConfigError(f"during must be one of {DURING}, got {during!r}.",
                              "use 'training' (removed at inference) or 'always'.")
        self.subspace = subspace
        self.layers = [L for L in (layers if layers is not None else subspace.layers)]
        bad = [L for L in self.layers if L not in subspace or not isinstance(L, int)]
        if bad:
            raise ConfigError(f"layers {bad} are not residual layers of the subspace (it has {list(subspace.layers)}).",
                              "pass integer layers the subspace has.")
        self.during = during
        self.model: nn.Module | None = None
        self._handles: list[Any] = []
        self._U: dict[LayerKey, torch.Tensor] = {L: subspace.basis(L) for L in self.layers}

    def attach(self, model: nn.Module) -> TrainingComparator:
        from .model import add_residual_hook, unwrap_model

        if self._handles:
            raise ConfigError(f"this {self.name} is already attached.", "call remove() first.")
        self.model = unwrap_model(model)
        for L in self.layers:
            self._handles.append(add_residual_hook(self.model, L, self._hook))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def active(self) -> bool:
        if self.during == "always":
            return True
        return torch.is_grad_enabled() and self.model is not None and self.model.training

    def _basis(self, L: LayerKey, h: torch.Tensor) -> torch.Tensor:
        U = self._U[L]
        if U.device != h.device:
            U = self._U[L] = U.to(h.device)
        return U

    def _hook(self, L: int, h: torch.Tensor) -> torch.Tensor | None:
        return self.edit(L, h, self._basis(L, h)) if self.active() else None

    def edit(self, L: int, h: torch.Tensor, U: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def loss(self) -> torch.Tensor | float:
        """The comparator's loss term for the forward passes since the last call (0: none)."""
        return 0.0


class ConceptAblation(TrainingComparator):
    """CAFT: project the subspace out of the residual stream while training, ``h − U Uᵀ h``."""

    name = "concept ablation"

    def edit(self, L: int, h: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        Uh = U.to(h.dtype)
        return h - (h @ Uh) @ Uh.T


class PreventativeSteering(TrainingComparator):
    """Add ``α Σ_j u_j`` at each layer while training (the signed persona directions)."""

    name = "preventative steering"

    def __init__(self, subspace: Subspace, alpha: float | Mapping[LayerKey, float] = 1.0,
                 directions: Sequence[int | str] | None = None, layers: Iterable[LayerKey] | None = None,
                 during: str = "training"):
        super().__init__(subspace, layers, during)
        per_layer = alpha if isinstance(alpha, Mapping) else {L: alpha for L in self.layers}
        missing = [L for L in self.layers if L not in per_layer]
        extra = [L for L in per_layer if L not in self.layers]
        if missing or extra:
            raise ConfigError(f"alpha's layers {sorted(per_layer, key=str)} do not match the steered layers "
                              f"{self.layers}.", "give alpha for exactly the steered layers, or one number.")
        for v in per_layer.values():
            if isinstance(v, bool) or not isinstance(v, int | float) or not torch.isfinite(torch.tensor(float(v))):
                raise ConfigError(f"alpha must be a finite number (or one per layer), got {v!r}.",
                                  "pass e.g. alpha=4.0.")
        self.alpha = {L: float(per_layer[L]) for L in self.layers}
        self._U = {L: subspace.select(L, directions) for L in self.layers}

    def edit(self, L: int, h: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        return h + (self.alpha[L] * U.sum(dim=1)).to(h.dtype)


class ActivationPenalty(TrainingComparator):
    """One-sided penalty on persona coordinates above the base model's: ``w · relu(Uᵀh − τ)²``."""

    name = "activation penalty"

    def __init__(self, subspace: Subspace, weight: float = 1.0, reference: dict[LayerKey, Any] | None = None,
                 layers: Iterable[LayerKey] | None = None, during: str = "training"):
        super().__init__(subspace, layers, during)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise ConfigError(f"weight must be a number >= 0, got {weight!r}.", "pass e.g. weight=1.0.")
        self.weight = float(weight)
        self.reference: dict[LayerKey, torch.Tensor] = {}
        if reference is not None:
            for L in self.layers:
                if L not in reference:
                    raise ConfigError(f"reference lacks layer {L}.", "give a reference level for every layer, "
                                      "or call calibrate(model, tokenizer, texts).")
                self.reference[L] = torch.as_tensor(reference[L], dtype=torch.float32).reshape(-1)
        self._terms: list[torch.Tensor] = []

    @torch.no_grad()
    def calibrate(self, model: nn.Module, tokenizer: Any, texts: Sequence[str], quantile: float = 0.5,
                  aggregation: str = "all") -> dict[LayerKey, torch.Tensor]:
        """τ = the (frozen, pre-training) model's ``quantile`` of each direction's coordinate over
        the tokens of ``texts``. Call it before training starts."""
        from .model import collect_activations

        acts = collect_activations(model, tokenizer, list(texts), self.layers, aggregation=aggregation, progress=False)
        for L in self.layers:
            c = P.coords(acts.values[L].float(), self.subspace.basis(L))
            self.reference[L] = torch.quantile(c, quantile, dim=0)
        return dict(self.reference)

    def edit(self, L: int, h: torch.Tensor, U: torch.Tensor) -> None:
        if L not in self.reference:
            raise ConfigError("the activation penalty has no reference level.",
                              "call penalty.calibrate(model, tokenizer, texts) (or pass reference=) before training.")
        c = P.coords(h, U)
        tau = self.reference[L].to(c.device)
        self._terms.append(torch.relu(c - tau).pow(2).sum(-1).mean())
        return None

    def loss(self) -> torch.Tensor | float:
        if not self._terms:
            return 0.0
        out = self.weight * torch.stack(self._terms).sum()
        self._terms = []
        return out
