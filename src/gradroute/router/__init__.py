"""The gradient router (see :mod:`gradroute.router.core`)."""

from __future__ import annotations

from .core import GradientRouter
from .envs import UNATTRIBUTED, Environments, EnvSplit
from .modes import MODES
from .records import AdapterNorm, StepRecord
from .route import CoordBlock, Route
from .state import STATE_FILE, STATE_FORMAT, STATE_META

__all__ = ["MODES", "STATE_FILE", "STATE_FORMAT", "STATE_META", "UNATTRIBUTED", "AdapterNorm", "CoordBlock",
           "EnvSplit", "Environments", "GradientRouter", "Route", "StepRecord"]
