"""Concept anchoring: pull labelled concepts into reserved directions of a Subspace during
SFT/pre-training, so that they can later be routed, monitored and removed.

- :mod:`.terms`: the regularizer terms (formulas in their docstrings);
- :mod:`.regularizer`: :class:`Anchoring` (terms × labels × masks × layers × schedule);
- :mod:`.schedule`: :class:`Dopesheet` keyframed schedules;
- :mod:`.capture`: activation capture at residual layers or named modules.
Interventions and selectivity metrics for evaluation are in :mod:`gradroute.interventions`.
"""

from .capture import Capture
from .regularizer import Anchoring, TermSpec, middle_weights
from .schedule import Dopesheet, Track, min_jerk
from .terms import (
    Anchor,
    AntiAnchor,
    AntiSubspace,
    EuclideanAnchor,
    EuclideanRepulsion,
    InSubspace,
    PooledAnchor,
    Separate,
    Term,
    Unitarity,
    mellowmax,
    weighted_mean,
)

__all__ = [
    "Anchor", "AntiAnchor", "AntiSubspace", "Anchoring", "Capture", "Dopesheet", "EuclideanAnchor",
    "EuclideanRepulsion", "InSubspace", "PooledAnchor", "Separate", "Term", "TermSpec", "Track", "Unitarity",
    "mellowmax", "middle_weights", "min_jerk", "weighted_mean",
]
