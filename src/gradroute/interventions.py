"""Interventions on a trained model, and the selectivity metrics that score them.

Context managers (the model is restored on exit):

- :func:`suppress` — at a layer, remove each direction's positive component:
  ``h ← h − Σ_j relu(u_jᵀh) u_j`` (:func:`suppress_all`: at every layer of the subspace).
- :func:`cap` — Assistant-Axis-style capping: ``h ← h − Σ_j relu(u_jᵀh − τ) u_j``.
- :func:`ablate` — remove the directions from the weights: writers of the layer
  ``W ← W − U Uᵀ W`` (zeroes the writer rows of an axis-aligned direction; biases too) and
  readers ``W ← W − W U Uᵀ`` (zeroes reader columns). For a residual layer L of a transformer the
  writers are block L's and the readers block L + 1's (found as the router finds them).

Metrics over a set of inputs (e.g. the colour grid): ``damage`` = error increase per input,
``similarity`` = how much of the concept each input has.

- :func:`selectivity_r2` — squared Pearson correlation of damage with similarity^p;
- :func:`collateral` — mean damage over inputs with similarity below a threshold;
- :func:`leak` — fraction of the labelled inputs' positive projection that survives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import projection as P
from .errors import ConfigError
from .layers import LayerKey
from .subspace import Subspace


@contextmanager
def _on_activation(model: nn.Module, layer: LayerKey, fn) -> Iterator[None]:
    from .model import add_residual_hook, block_hidden, replace_hidden, unwrap_model

    base = unwrap_model(model)
    if isinstance(layer, int):
        handle = add_residual_hook(base, layer, lambda L, h: fn(h))
    else:
        module = dict(base.named_modules()).get(layer)
        if module is None:
            from .errors import UnknownLayerError

            raise UnknownLayerError(f"the model has no module {layer!r}.")
        handle = module.register_forward_hook(lambda m, a, out: replace_hidden(out, fn(block_hidden(out))))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def suppress(model: nn.Module, subspace: Subspace, layer: LayerKey,
             directions: Sequence[int | str] | None = None) -> Iterator[None]:
    """Remove the positive component along each direction at ``layer`` (see module docstring)."""
    U = subspace.select(layer, directions)

    def fn(h: torch.Tensor) -> torch.Tensor:
        c = P.coords(h, U.to(h.device))
        return (h.float() - P.lift(torch.relu(c), U.to(h.device))).to(h.dtype)

    with _on_activation(model, layer, fn):
        yield


@contextmanager
def suppress_all(model: nn.Module, subspace: Subspace) -> Iterator[None]:
    """:func:`suppress` at every layer of the subspace at once."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        for L in subspace.layers:
            stack.enter_context(suppress(model, subspace, L))
        yield


@contextmanager
def cap(model: nn.Module, subspace: Subspace, layer: LayerKey, tau: float,
        directions: Sequence[int | str] | None = None) -> Iterator[None]:
    """Cap the projection on each direction at ``tau``: ``h −= relu(uᵀh − τ) u``."""
    U = subspace.select(layer, directions)

    def fn(h: torch.Tensor) -> torch.Tensor:
        c = P.coords(h, U.to(h.device))
        return (h.float() - P.lift(torch.relu(c - tau), U.to(h.device))).to(h.dtype)

    with _on_activation(model, layer, fn):
        yield


@contextmanager
def ablate(model: nn.Module, subspace: Subspace, layer: LayerKey, directions: Sequence[int | str] | None = None,
           writers: Sequence[str] | None = None, readers: Sequence[str] | None = None) -> Iterator[None]:
    """Remove the directions from writer outputs and reader inputs in the weights (restored on exit).

    ``writers``/``readers`` name modules; for an integer ``layer`` they default to the residual
    writers of block ``layer`` and the readers of block ``layer + 1``."""
    from .model import block_io_modules, module_kind, unwrap_model, weight_module
    from .orientation import orientation

    base = unwrap_model(model)
    U = subspace.select(layer, directions)
    if writers is None and readers is None:
        if not isinstance(layer, int):
            raise ConfigError(f"ablate at {layer!r} needs writers=[...] and/or readers=[...] module names.")
        io = block_io_modules(base)
        writers = io[layer]["writers"] if 0 <= layer < len(io) else []
        readers = io[layer + 1]["readers"] if layer + 1 < len(io) else []
    modules = dict(base.named_modules())
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for side, names in (("write", writers or []), ("read", readers or [])):
                for name in names:
                    mod = modules.get(name)
                    kind = module_kind(mod) if mod is not None else None
                    if kind is None:
                        raise ConfigError(f"{name!r} is not a Linear/Conv1D/Embedding module of the model.")
                    wm = weight_module(mod)
                    axis = orientation(kind, side).axis
                    params = [(wm.weight, axis)]
                    if side == "write" and getattr(wm, "bias", None) is not None:
                        params.append((wm.bias, 0))
                    for p, ax in params:
                        saved.append((p, p.detach().clone()))
                        p.copy_(P.remove(p.detach(), U.to(p.device), ax))
        yield
    finally:
        with torch.no_grad():
            for p, orig in reversed(saved):  # reverse: a module edited twice gets its first original back
                p.copy_(orig)


# ---------------------------------------------------------------------- metrics
def _flat(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1)


def selectivity_r2(damage: Any, similarity: Any, power: float = 2.0) -> float:
    """Squared Pearson correlation between damage and similarity**power (1 = perfectly selective)."""
    d, s = _flat(damage), _flat(similarity).clamp_min(0).pow(power)
    d, s = d - d.mean(), s - s.mean()
    den = (d.norm() * s.norm()).item()
    return float(((d @ s) / den) ** 2) if den > 0 else 0.0


def collateral(damage: Any, similarity: Any, threshold: float = 0.1) -> float:
    """Mean damage over the inputs whose similarity to the concept is below ``threshold``."""
    d, s = _flat(damage), _flat(similarity)
    far = s < threshold
    return float(d[far].mean()) if far.any() else 0.0


def leak(before: Any, after: Any, labelled: Any | None = None) -> float:
    """Fraction of the (labelled) inputs' positive projection on the concept left after an
    intervention: ``Σ relu(after) / Σ relu(before)`` (0 = fully removed)."""
    b, a = _flat(before), _flat(after)
    if labelled is not None:
        m = torch.as_tensor(labelled).reshape(-1).bool()
        b, a = b[m], a[m]
    den = torch.relu(b).sum().item()
    return float(torch.relu(a).sum() / den) if den > 0 else 0.0
