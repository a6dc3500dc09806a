"""Moved: per-environment attribution lives in :mod:`gradroute.router.attribution` (capture,
replay, gather). This alias is kept for users who import ``gradroute.attribution``."""

from __future__ import annotations

from .router.attribution import UNATTRIBUTED, Attribution, AttributionStep

__all__ = ["UNATTRIBUTED", "Attribution", "AttributionStep"]
