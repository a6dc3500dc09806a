"""gradroute's scalars in the trainer's logs: its callbacks first in the callback list, the
monitor's metrics added inside ``trainer.log``, and TRL's metric store as a sink."""

from __future__ import annotations

from typing import Any

from . import _compat
from ._patches import patch


def insert_callback(trainer: Any, callback: Any) -> None:
    """Put ``callback`` first (so that its additions to ``logs`` reach the reporting callbacks),
    marked as gradroute's so that :func:`remove_callbacks` takes it out again."""
    callback._gradroute = True
    trainer.callback_handler.callbacks.insert(0, callback)


def remove_callbacks(trainer: Any) -> None:
    """Take every callback :func:`insert_callback` added off the trainer."""
    handler = trainer.callback_handler
    handler.callbacks = [c for c in handler.callbacks if not getattr(c, "_gradroute", False)]


def metrics_sink(trainer: Any) -> Any:
    """A function appending ``{key: value}`` to TRL's train metrics (averaged into every log),
    or None for trainers without them."""
    if _compat.metrics_store(trainer) is None:
        return None

    def sink(metrics: dict[str, float]) -> None:
        store = _compat.metrics_store(trainer)
        for k, v in metrics.items():
            store[k].append(v)

    return sink


def wrap_log(trainer: Any, callback: Any) -> None:
    """Add the monitor's scalars to every training log inside ``trainer.log``.

    ``Trainer.log`` hands the logs to the callbacks, reporters included, so values added
    here reach W&B/TensorBoard/JSON whatever the callback order. They are not routed through
    TRL's metric store, which averages everything over the ``logging_steps`` window: each
    logged value is that of the logged step, counts are summed over the window
    (:meth:`gradroute.DriftMonitor.metrics`)."""
    log = trainer.log

    def wrapped(logs, *a, **kw):
        if isinstance(logs, dict) and "loss" in logs:  # a training log (evaluation logs say eval_loss)
            logs.update(callback.log_metrics())
        return log(logs, *a, **kw)

    patch(trainer, "log", wrapped)
    callback.log_wrapped = True
