"""Hooks that behave when the model is copied.

A model carries its forward hooks into ``copy.deepcopy`` and ``pickle``: a closure is copied by
reference (the copy would feed the *original* router's accumulators and read the original's
adapters), a bound method drags its whole object along (the router, its log's open file: a
``TypeError``). Reference models, EMA copies and evaluation code deepcopy models, so every hook
gradroute puts on a model is one of these:

- :class:`LiveOnly` — bookkeeping of the live router (attribution, activation capture): a copy
  gets :class:`NoOpHook` instead, so the copy's forwards are not recorded;
- a hook object whose ``__getstate__`` keeps only what the forward needs (the activation-mode
  write hook: the copy computes the routed model's function with its own copied adapters).
"""

from __future__ import annotations

from typing import Any, Callable


class NoOpHook:
    """A hook that does nothing (what a copy of the model gets for a :class:`LiveOnly` hook)."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class LiveOnly:
    """``fn`` as a hook on the live model; ``copy.deepcopy``/``pickle`` of the model give a no-op."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[type, tuple]:
        return (NoOpHook, ())
