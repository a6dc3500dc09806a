"""Errors raised by gradroute.

Every user-facing error is a :class:`GradrouteError` subclass. Messages say what was wrong
and, after ``Fix:``, what to do about it. Catch :class:`GradrouteError` to catch them all.
"""

from __future__ import annotations


class GradrouteError(Exception):
    """Base class of every error gradroute raises on purpose."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} Fix: {fix}")


class GradrouteWarning(UserWarning):
    """Something is suspicious but training can go on."""


# --- subspaces -----------------------------------------------------------------------------
class SubspaceError(GradrouteError):
    """A subspace could not be built or used."""


class DegenerateDirectionsError(SubspaceError):
    """NaN/Inf, zero, or (near-)linearly-dependent directions."""


class HiddenSizeMismatchError(SubspaceError):
    """A direction's or basis' dimension differs from the model's hidden size."""


class UnknownLayerError(SubspaceError):
    """A layer (or module name) that the subspace or the model does not have."""


class ModelMismatchError(SubspaceError):
    """A subspace built for another model is applied to this one."""


class ProbeDataError(SubspaceError):
    """Probe texts are empty, single-class, or malformed."""


class SAEError(SubspaceError):
    """An SAE that cannot provide residual-stream directions."""


class FileFormatError(GradrouteError):
    """A file that is missing, unreadable, of the wrong format, or tampered with."""


# --- routing -------------------------------------------------------------------------------
class RoutingError(GradrouteError):
    """The routing plan or the router cannot do what was asked."""


class NoTargetError(RoutingError):
    """A layer has a basis but no module to route was found for it."""


class UnsupportedModuleError(RoutingError):
    """A target module is not a Linear, GPT-2 Conv1D or Embedding."""


class PrecisionError(RoutingError):
    """The requested tolerance cannot hold at the parameters' precision."""


class AdapterError(RoutingError):
    """An adapter directory that cannot be saved, loaded, merged or discarded as asked."""


# --- monitor, trainer integration ----------------------------------------------------------
class ConfigError(GradrouteError):
    """An option value out of range or inconsistent with others."""


class EnvColumnError(ConfigError):
    """The environment (or label) column is missing, reserved, or malformed."""


class LabelError(ConfigError):
    """Concept labels that are missing, malformed, or name unknown concepts."""


class PackingError(ConfigError):
    """Packing / padding-free batching mixes rows where rows must stay separate."""


class ScheduleError(ConfigError):
    """A dopesheet schedule that cannot be parsed or evaluated."""


class DriftHalt(GradrouteError):
    """Raised in a plain training loop when a :class:`~gradroute.HaltPolicy` rule fires.

    ``record`` carries the halt record (rule, value, threshold, step, top environments),
    the same one written to the run log.
    """

    def __init__(self, record: dict):
        self.record = record
        rule = record.get("rule", "?")
        super().__init__(
            f"Drift halt at step {record.get('step')}: rule {rule!r} value "
            f"{record.get('value')} crossed threshold {record.get('threshold')} "
            f"(top environments: {record.get('top_envs')}).",
            "fix the environments named above and restart from "
            "gradroute.last_clean_checkpoint(run_dir).",
        )


__all__ = [name for name in dir() if name[0].isupper()]
