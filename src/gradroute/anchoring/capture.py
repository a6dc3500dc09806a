"""Capture activations (with their graph) at residual layers or named modules.

Integer keys are residual layers in gradroute's convention (the output of decoder block L;
see :mod:`gradroute.layers`); string keys name modules, whose output (a tensor, or the first
element of a tuple) is kept. PEFT- and DDP-wrapped models are unwrapped. Captures are kept
only in passes with gradients enabled, cleared with :meth:`clear` (each step), and the hooks
are removed by :meth:`remove` or on leaving a ``with`` block.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import UnknownLayerError
from ..layers import LayerKey


class Capture:
    def __init__(self, model: nn.Module, keys: Iterable[LayerKey], *, grad_only: bool = True):
        from ..model import add_residual_hook, block_hidden, unwrap_model

        self.model = model
        self.keys = list(dict.fromkeys(keys))
        self.grad_only = grad_only
        self.values: dict[LayerKey, torch.Tensor] = {}
        self._handles: list[Any] = []
        base = unwrap_model(model)
        modules = dict(base.named_modules())
        try:
            for key in self.keys:
                if isinstance(key, int):
                    self._handles.append(add_residual_hook(base, key, self._store))
                elif key in modules:
                    self._handles.append(modules[key].register_forward_hook(
                        lambda m, a, out, key=key: self._store(key, block_hidden(out))))
                else:
                    raise UnknownLayerError(
                        f"the model has no module {key!r} to capture.",
                        "use a residual layer number or one of the names in model.named_modules().",
                    )
        except Exception:
            self.remove()
            raise

    def _store(self, key: LayerKey, h: torch.Tensor) -> None:
        if self.grad_only and not torch.is_grad_enabled():
            return None
        self.values[key] = h
        return None

    def __getitem__(self, key: LayerKey) -> torch.Tensor:
        try:
            return self.values[key]
        except KeyError:
            raise UnknownLayerError(
                f"nothing was captured at {key!r} (captured: {list(self.values)}).",
                "run the model's forward pass (with gradients enabled) before computing the loss.",
            ) from None

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def clear(self) -> None:
        self.values.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.values.clear()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
