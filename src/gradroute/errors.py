"""Errors raised by gradroute.

Every user-facing error is a :class:`GradrouteError` subclass. Messages say what was wrong
and, after ``Fix:``, what to do about it. Catch :class:`GradrouteError` to catch them all.
"""

from __future__ import annotations


class GradrouteError(Exception):
    """Base class of every error gradroute raises on purpose.

    ``fix`` says what to do; without one, the class's ``default_fix`` is used, so every
    message has a "Fix:" part.
    """

    default_fix = "check the value named above against the documentation of the call that raised this."

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix if fix is not None else self.default_fix
        super().__init__(f"{problem} Fix: {self.fix}")

    def __reduce__(self):  # pickled (e.g. from a worker process), rebuilt from problem and fix
        return (type(self), (self.problem, self.fix))


class GradrouteWarning(UserWarning):
    """Something is suspicious but training can go on."""


# --- subspaces -----------------------------------------------------------------------------
class SubspaceError(GradrouteError):
    """A subspace could not be built or used."""

    default_fix = 'check the directions, layers and names passed to the Subspace constructor (see gradroute.Subspace).'


class DegenerateDirectionsError(SubspaceError):
    """NaN/Inf, zero, or (near-)linearly-dependent directions."""

    default_fix = "pass finite, non-zero, linearly independent directions (or on_degenerate='warn' to drop dependent ones)."


class HiddenSizeMismatchError(SubspaceError):
    """A direction's or basis' dimension differs from the model's hidden size."""

    default_fix = "build the directions from this model's activations (or its SAE), so their size is the model's hidden size."


class UnknownLayerError(SubspaceError):
    """A layer (or module name) that the subspace or the model does not have."""

    default_fix = 'use a layer the model and the subspace both have (gradroute convention: L = output of block L).'


class ModelMismatchError(SubspaceError):
    """A subspace built for another model is applied to this one."""

    default_fix = 'build or load a subspace for this model.'


class ProbeDataError(SubspaceError):
    """Probe texts are empty, single-class, or malformed."""

    default_fix = 'pass non-empty positive and negative texts (strings or (prompt, response) pairs) with labels 0/1.'


class SAEError(SubspaceError):
    """An SAE that cannot provide residual-stream directions."""

    default_fix = 'pass a residual-stream sae-lens SAE (object or folder with cfg.json and sae_weights.safetensors).'


class FileFormatError(GradrouteError):
    """A file that is missing, unreadable, of the wrong format, or tampered with."""

    default_fix = 'check the path, or re-create the file with the gradroute call that writes it.'


# --- routing -------------------------------------------------------------------------------
class RoutingError(GradrouteError):
    """The routing plan or the router cannot do what was asked."""

    default_fix = "check the routing options (mode, targets, side, spread) against GradientRouter's documentation."


class NoTargetError(RoutingError):
    """A layer has a basis but no module to route was found for it."""

    default_fix = 'pass targets={module: (layer, side)} naming the modules to route, or drop that layer from the subspace.'


class UnsupportedModuleError(RoutingError):
    """A target module is not a Linear, GPT-2 Conv1D or Embedding."""

    default_fix = 'route only nn.Linear, GPT-2 Conv1D or nn.Embedding modules (pass targets=...).'


class PrecisionError(RoutingError):
    """The requested tolerance cannot hold at the parameters' precision."""

    default_fix = 'train in float32 (or loosen the tolerance).'


class AdapterError(RoutingError):
    """An adapter directory that cannot be saved, loaded, merged or discarded as asked."""

    default_fix = "pass a directory written by gradroute (save_adapter / a checkpoint's gradroute/), for the model it was saved from."


# --- monitor, trainer integration ----------------------------------------------------------
class ConfigError(GradrouteError):
    """An option value out of range or inconsistent with others."""

    default_fix = 'pass a value in the documented range for the option named above.'


class VersionError(ConfigError):
    """An installed TRL / transformers / PEFT version outside the range gradroute was tested with
    (its private hooks may have moved), or one lacking a private name gradroute needs."""

    default_fix = "pin the tested versions, or set GRADROUTE_ALLOW_UNTESTED=1 to proceed at your own risk."


class EnvColumnError(ConfigError):
    """The environment (or label) column is missing, reserved, or malformed."""

    default_fix = 'give every row one of the declared environments in the env column (see gradroute.attach).'


class LabelError(ConfigError):
    """Concept labels that are missing, malformed, or name unknown concepts."""

    default_fix = "give each row's labels as {label: probability}, a list with one value per label, a label name, or None."


class PackingError(ConfigError):
    """Packing / padding-free batching mixes rows where rows must stay separate."""

    default_fix = 'set packing=False and padding_free=False.'


class ScheduleError(ConfigError):
    """A dopesheet schedule that cannot be parsed or evaluated."""

    default_fix = "check the schedule's syntax (see gradroute.anchoring.schedule)."


class CheckpointError(FileFormatError):
    """A checkpoint that is incomplete, damaged, or not safe to resume from (non-finite state)."""

    default_fix = "resume from the last complete checkpoint (gradroute.last_clean_checkpoint(run_dir))."


class DriftHalt(GradrouteError):
    """Raised in a plain training loop when a :class:`~gradroute.HaltPolicy` rule fires.

    ``record`` carries the halt record (rule, value, threshold, step, top environments),
    the same one written to the run log.
    """

    def __reduce__(self):
        return (type(self), (self.record,))

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
