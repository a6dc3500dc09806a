"""Wrapping a trainer's ``compute_loss``: batch values read (and popped) before the model sees
the batch, and loss terms added after it."""

from __future__ import annotations

from typing import Any

from ._patches import patch


def wrap_compute_loss(trainer: Any, key: str, *, before: Any = None, after: Any = None, pop: bool = True) -> None:
    """Wrap ``trainer.compute_loss``: read ``inputs[key]`` (removed before the model sees the
    batch when ``pop``), call ``before(value, inputs)`` first, ``after(loss_or_tuple, value,
    inputs, kwargs)`` on the result; ``before`` may return a cleanup callable."""
    compute_loss = trainer.compute_loss

    def wrapped(model, inputs, *a, **kw):
        value = inputs.get(key) if isinstance(inputs, dict) else None
        seen = inputs
        if value is not None and pop:
            inputs = {k: v for k, v in inputs.items() if k != key}
        cleanup = before(value, seen) if before is not None else None
        try:
            out = compute_loss(model, inputs, *a, **kw)
        finally:
            if callable(cleanup):
                cleanup()
        return after(out, value, seen, kw) if after is not None else out

    patch(trainer, "compute_loss", wrapped)


def add_to_loss(out: Any, term: Any) -> Any:
    """``compute_loss``'s result (a loss, or ``(loss, outputs)``) with ``term`` added to the loss."""
    if isinstance(out, tuple):
        return (out[0] + term, *out[1:])
    return out + term
