"""Monitoring a routed run: the run log, its checkpoints, trainer metrics and the drift monitor.

- :mod:`~gradroute.monitor.runlog` — the append-only JSONL log: writer, tolerant readers, typed
  records back (:func:`read_log`), a DataFrame for notebooks (:func:`load_log`);
- :mod:`~gradroute.monitor.checkpoints` — stored paths, complete and clean checkpoints;
- :mod:`~gradroute.monitor.metrics` — scalars for W&B / TensorBoard from step records;
- :mod:`~gradroute.monitor.drift` — :class:`DriftMonitor`: log, policy, halt.
"""

from __future__ import annotations

from .checkpoints import (
    checkpoint_problem,
    last_clean_checkpoint,
    last_complete_checkpoint,
    relative_path,
    resolve_path,
)
from .drift import DriftMonitor
from .metrics import step_metrics
from .runlog import (
    LOG_NAME,
    Crossing,
    RunLog,
    RunLogView,
    crossing_from_json,
    load_log,
    read_log,
    read_records,
    step_from_json,
    step_to_json,
    violation_from_json,
)

__all__ = [
    "LOG_NAME", "Crossing", "DriftMonitor", "RunLog", "RunLogView", "checkpoint_problem", "crossing_from_json", "last_clean_checkpoint",
    "last_complete_checkpoint", "load_log", "read_log", "read_records", "relative_path", "resolve_path",
    "step_from_json", "step_metrics", "step_to_json", "violation_from_json",
]
