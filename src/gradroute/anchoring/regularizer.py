"""``Anchoring``: concept-anchoring terms applied to captured activations, weighted by labels.

    anchoring = Anchoring(model, [
        TermSpec(Anchor(sub, 6, "red"), weight="anchor", labels={"red": 1.0}),   # labelled rows
        TermSpec(Separate(power=100), weight="separate"),                          # every live row
    ], layers={5: 0.5, 6: 1.0, 7: 0.5}, label_names=["red", "vibrant"], schedule=sheet)
    loss = task_loss + anchoring.loss(labels, mask=attention_mask, step=step)

Row weights: a row's affinity to a term is ``a = clamp(Σ_k label_k · affinity_k, 0, 1)`` (labels
soft or hard, shape ``(batch, n_labels)``); attractive terms weigh each token of a sample by
``a × mask`` (labelled samples' live tokens), repulsive terms without affinities by ``mask``
(all live tokens). Term weights are numbers or dopesheet properties; each layer's
contribution is scaled by its layer weight (:func:`middle_weights` emphasizes middle layers).

``center=True`` applies the terms to ``h − mean(h)`` (the mean over the batch's live tokens,
with its gradient): a residual stream carries a large component shared by every token, and
anchoring raw states lets the model satisfy an anchor by shifting *all* tokens along u; on
centred states only concept-specific movement counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, LabelError
from ..layers import LayerKey
from .capture import Capture
from .schedule import Dopesheet
from .terms import PooledAnchor, Term


def middle_weights(layers: Sequence[int], n_layers: int) -> dict[int, float]:
    """Layer weights ``sin(π (L + 1) / (n_layers + 1))``: highest mid-stack, lower at the ends."""
    return {L: math.sin(math.pi * (L + 1) / (n_layers + 1)) for L in layers}


@dataclass
class TermSpec:
    """A term, its weight (number or dopesheet property), label affinities and layers.

    ``unlabelled=True`` weighs rows by ``1 − a`` instead of ``a`` (e.g. repel what is not labelled)."""

    term: Term
    weight: float | str = 1.0
    labels: Mapping[str, float] | None = None
    layers: Sequence[LayerKey] | None = None
    unlabelled: bool = False


class Anchoring:
    """Terms × labels × masks × layers × schedule (see the module docstring); :meth:`loss` is the sum.

    After each :meth:`loss`, ``last`` maps ``"<term>/<layer>"`` to the term's *unweighted* value
    at that step (what ``attach_anchoring`` logs as ``anchoring/<term>/<layer>``). A term whose
    scheduled weight is 0 at the step is left out; an attractive term on a batch without a
    labelled row is ``0.0`` with no gradient — there was nothing to anchor, not a perfect anchor.
    With labelled rows, ``anchor`` (1 − cos) lies in [0, 2]: 0 = on u, 1 = orthogonal.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        terms: Sequence[TermSpec | Term],
        layers: LayerKey | Sequence[LayerKey] | Mapping[LayerKey, float],
        *,
        label_names: Sequence[str] = (),
        schedule: Dopesheet | None = None,
        center: bool = False,
    ):
        self.center = center
        if isinstance(layers, Mapping):
            self.layer_weights = {k: float(v) for k, v in layers.items()}
        elif isinstance(layers, int | str):
            self.layer_weights = {layers: 1.0}
        else:
            self.layer_weights = {k: 1.0 for k in layers}
        if not self.layer_weights:
            raise ConfigError("Anchoring needs at least one layer.")
        self.label_names = list(label_names)
        self.schedule = schedule
        self.specs = [t if isinstance(t, TermSpec) else TermSpec(t) for t in terms]
        for spec in self.specs:
            if isinstance(spec.weight, str):
                if schedule is None or spec.weight not in schedule.properties:
                    raise ConfigError(
                        f"term {spec.term.name!r} takes its weight from property {spec.weight!r}, which the "
                        f"schedule {'lacks' if schedule else 'is missing'}.",
                        "add that column to the dopesheet, or give a number.",
                    )
            for label in (spec.labels or {}):
                if label not in self.label_names:
                    raise LabelError(
                        f"term {spec.term.name!r} has an affinity for label {label!r}, which is not among "
                        f"label_names={self.label_names}.",
                        "declare every label in label_names (in the order of the label tensor's columns).",
                    )
            for L in spec.layers or ():
                if L not in self.layer_weights:
                    raise ConfigError(f"term {spec.term.name!r} uses layer {L!r}, not among {list(self.layer_weights)}.")
        self.capture = Capture(model, self.layer_weights)
        self.last: dict[str, float] = {}

    def _affinity(self, spec: TermSpec, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        if spec.labels is None:
            return None
        if labels is None:
            raise LabelError(f"term {spec.term.name!r} needs labels, but none were given.",
                             "pass labels=(batch x n_labels) to loss().")
        vec = torch.tensor([spec.labels.get(n, 0.0) for n in self.label_names], device=device)
        a = (labels.to(device, torch.float32) @ vec).clamp(0.0, 1.0)
        return 1.0 - a if spec.unlabelled else a

    def _check_labels(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if labels is None:
            return None
        labels = torch.as_tensor(labels, dtype=torch.float32)
        if labels.ndim == 1 and len(self.label_names) == 1:
            labels = labels[:, None]
        if labels.ndim != 2 or labels.shape != (batch, len(self.label_names)):
            raise LabelError(
                f"labels have shape {tuple(labels.shape)}; expected ({batch}, {len(self.label_names)}) for a batch "
                f"of {batch} and labels {self.label_names}.",
                "give one row per sample and one column per label name.",
            )
        if not torch.isfinite(labels).all():
            raise LabelError("labels contain NaN or Inf.")
        return labels

    def weight_of(self, spec: TermSpec, step: float) -> float:
        return float(self.schedule.value(spec.weight, step)) if isinstance(spec.weight, str) else float(spec.weight)

    def loss(self, labels: Any = None, mask: torch.Tensor | None = None, step: float = 0,
             span: torch.Tensor | None = None, clear: bool = True) -> torch.Tensor:
        """Σ over layers and terms of layer weight × term weight × term value (see module docstring)."""
        total: torch.Tensor | None = None
        logs: dict[str, float] = {}
        for L, lw in self.layer_weights.items():
            h = self.capture[L]
            B = h.shape[0]
            lab = self._check_labels(labels, B)
            live = None
            if h.ndim == 3:
                live = (torch.ones(h.shape[:2], device=h.device) if mask is None
                        else torch.as_tensor(mask, device=h.device).float())
                if live.shape != h.shape[:2]:
                    raise LabelError(f"mask has shape {tuple(live.shape)}, activations {tuple(h.shape[:2])}.")
            if self.center:
                hf = h.float()
                if live is not None:
                    mean = (hf * live[..., None]).sum((0, 1)) / live.sum().clamp_min(1)
                else:
                    mean = hf.reshape(-1, hf.shape[-1]).mean(0)
                h = hf - mean
            for spec in self.specs:
                if spec.layers is not None and L not in spec.layers:
                    continue
                w_term = self.weight_of(spec, step)
                if w_term == 0.0:
                    continue
                a = self._affinity(spec, lab, B, h.device)
                if isinstance(spec.term, PooledAnchor):
                    value = spec.term(h, a, span=span if span is not None else live)
                else:
                    if live is not None:
                        rows = live if a is None else a[:, None] * live
                    else:
                        rows = a
                    value = spec.term(h, rows)
                logs[f"{spec.term.name}/{L}"] = float(value.detach())
                part = lw * w_term * value
                total = part if total is None else total + part
        if clear:
            self.capture.clear()
        self.last = logs
        if total is None:
            return torch.zeros(())
        return total

    def remove(self) -> None:
        self.capture.remove()
