"""Routing modes, one strategy class per file; ``MODES`` maps a mode name to its class.

To add a mode: subclass :class:`~gradroute.router.modes.base.RoutingMode` in a new file and
register it here."""

from __future__ import annotations

from .activation import ActivationMode
from .base import RoutingMode
from .gradient import GradientMode
from .quarantine import QuarantineMode
from .update import UpdateMode

MODES: dict[str, type[RoutingMode]] = {m.name: m for m in (UpdateMode, GradientMode, ActivationMode, QuarantineMode)}

__all__ = ["MODES", "ActivationMode", "GradientMode", "QuarantineMode", "RoutingMode", "UpdateMode"]
