"""Moved to :mod:`gradroute.experiments.claims` (the arms to :mod:`gradroute.experiments.arms`,
:class:`World`, :class:`ToyWorld` and :func:`load_world` to :mod:`gradroute.experiments.world`);
this alias will be removed."""

from .experiments.arms import ARMS, REGISTRY, Comparator
from .experiments.claims import (
    COLUMNS,
    ClaimsConfig,
    RolloutHackRate,
    arms_of,
    figure,
    measures,
    relearn,
    run_arm,
    run_claims,
    subspace_auroc,
    summarize,
    targets,
)
from .experiments.world import ToyWorld, World, load_world

ROUTED = {name: a.mode for name, a in REGISTRY.items() if a.is_routed and name in ARMS}
COMPARATORS = tuple(name for name, a in REGISTRY.items() if isinstance(a, Comparator) and name in ARMS)

__all__ = ["ARMS", "COLUMNS", "COMPARATORS", "ROUTED", "ClaimsConfig", "RolloutHackRate", "ToyWorld", "World",
           "arms_of", "figure", "load_world", "measures", "relearn", "run_arm", "run_claims", "subspace_auroc",
           "summarize", "targets"]
