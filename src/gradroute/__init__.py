"""gradroute: route persona-subspace updates during RL fine-tuning into a discardable,
monitored PEFT adapter.

Public names are imported lazily so that ``import gradroute`` stays fast; frameworks
(transformers, PEFT, TRL, sae-lens) load only when an integration is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import DriftHalt, GradrouteError, GradrouteWarning

# public name -> module that defines it
_LAZY = {
    "Subspace": "gradroute.subspace",
    "Provenance": "gradroute.subspace",
    "GradientRouter": "gradroute.router",
    "RoutingPlan": "gradroute.plan",
    "build_plan": "gradroute.plan",
    "Attribution": "gradroute.router.attribution",
    "DriftMonitor": "gradroute.monitor",
    "load_log": "gradroute.monitor",
    "last_clean_checkpoint": "gradroute.monitor",
    "HaltPolicy": "gradroute.policy",
    "QuarantineOnFlag": "gradroute.policy",
    "attach": "gradroute.integrations.trl",
    "Handle": "gradroute.integrations.trl",
    "attach_anchoring": "gradroute.integrations.trl",
    "Anchoring": "gradroute.anchoring",
    "Dopesheet": "gradroute.anchoring",
    "ConceptAblation": "gradroute.comparators",
    "ActivationPenalty": "gradroute.comparators",
    "PreventativeSteering": "gradroute.comparators",
    "attach_comparator": "gradroute.integrations.trl",
    "save_adapter": "gradroute.integrations.peft",
    "save_discarded": "gradroute.integrations.discard",
    "RouterCallback": "gradroute.integrations.trainer",
}

if TYPE_CHECKING:  # pragma: no cover
    from .router.attribution import Attribution
    from .anchoring import Anchoring, Dopesheet
    from .comparators import ActivationPenalty, ConceptAblation, PreventativeSteering
    from .integrations.discard import save_discarded
    from .integrations.peft import save_adapter
    from .integrations.trainer import RouterCallback
    from .integrations.trl import Handle, attach, attach_anchoring, attach_comparator
    from .monitor import DriftMonitor, last_clean_checkpoint, load_log
    from .plan import RoutingPlan, build_plan
    from .policy import HaltPolicy, QuarantineOnFlag
    from .router import GradientRouter
    from .subspace import Provenance, Subspace


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'gradroute' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["__version__", "GradrouteError", "GradrouteWarning", "DriftHalt", *_LAZY]
