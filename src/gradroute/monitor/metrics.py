"""Trainer metrics (W&B / TensorBoard scalars) from step records, true whatever the logging
interval, and the discard residue: what rounding to the weights' dtype leaves of a discarded
adapter in the base's persona coordinates (:func:`discard_residue`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, GradrouteWarning
from ..router.records import StepRecord

if TYPE_CHECKING:
    from ..router import GradientRouter
    from ..router.route import Route


def _put(out: dict[str, float], key: str, value: object) -> None:
    if isinstance(value, bool):
        value = float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        out[key] = float(value)


def step_metrics(window: Sequence[StepRecord | None], prefix: str = "gradroute/") -> dict[str, float]:
    """Flat scalar metrics of the last record of ``window`` (the step records since the previous
    log, oldest first):

    - running totals and that step's own figures (``adapter_norm`` and its per-layer values,
      ``env_adapter_norm/<env>``, ``env_adapter_share/<env>``, ``update_norm``,
      ``env_share/<env>``, ``grad_norm/<env>``, ``activation_norm/<env>/<layer>``, the signed
      activation projection ``activation/<env>/<layer>/<i>`` = coordinate i of the mean ``Uᵀh``
      (what the activation z-rule watches), ``nonfinite_rewards[_total]/<env>``) are the values of
      that step's record, never averaged over the window;
    - counts (``samples/<env>``) are summed over the window;
    - ``reward/<env>`` is the mean of the window's per-step means (TRL averages its own
      ``reward`` the same way);
    - ``nonfinite`` is 1.0 when any step of the window had a non-finite update;
    - ``push/<env>/<layer>/<i>`` is the step's persona push and ``push_null/<env>/<layer>`` the RMS
      of its random directions' pushes (:class:`~gradroute.router.records.StepRecord`);
      ``push_z/<env>`` is the locating score over the window (the persona push over its random
      null, :func:`gradroute.monitor.locate.locate_scores`; the run's cumulative score is in the
      report, read from the log).

    Non-finite values are left out (a reporter cannot plot them).
    """
    records = [r for r in window if r is not None]
    if not records:
        return {}
    last = records[-1]
    out: dict[str, float] = {}
    p = prefix
    _put(out, f"{p}adapter_norm", last.adapter_norm)
    for L, v in last.adapter_norm_per_layer.items():
        _put(out, f"{p}adapter_norm_per_layer/{L}", v)
    _put(out, f"{p}update_norm", last.update_norm)
    for L, v in last.update_norm_per_layer.items():
        _put(out, f"{p}update_norm_per_layer/{L}", v)
    for name in ("env_adapter_share", "env_adapter_norm", "env_share", "grad_norm"):
        for e, v in getattr(last, name).items():
            _put(out, f"{p}{name}/{e}", v)
    for e, layers in last.activation_norm.items():
        for L, v in layers.items():
            _put(out, f"{p}activation_norm/{e}/{L}", v)
    if last.nonfinite_rewards_total:
        for name in ("nonfinite_rewards", "nonfinite_rewards_total"):
            for e, v in getattr(last, name).items():
                _put(out, f"{p}{name}/{e}", v)
    for e, layers in last.activation.items():
        for L, coords in layers.items():
            for i, x in enumerate(coords):
                _put(out, f"{p}activation/{e}/{L}/{i}", x)
    for e, layers in last.push.items():
        for L, coords in layers.items():
            for i, x in enumerate(coords):
                _put(out, f"{p}push/{e}/{L}/{i}", x)
    for e, layers in last.push_null.items():
        for L, v in layers.items():  # the spread of the random directions' pushes
            _put(out, f"{p}push_null/{e}/{L}", math.sqrt(sum(x * x for x in v) / len(v)) if v else float("nan"))
    from .locate import locate_scores

    for e, z in locate_scores(records).items():
        _put(out, f"{p}push_z/{e}", z)
    for e, z in locate_scores(records, watch=True).items():  # directions watched, not routed
        _put(out, f"{p}watch_push_z/{e}", z)
    samples: dict[str, float] = {}
    rewards: dict[str, list[float]] = {}
    for r in records:
        for e, n in r.samples.items():
            samples[e] = samples.get(e, 0.0) + float(n)
        for e, v in r.reward.items():
            if math.isfinite(v):
                rewards.setdefault(e, []).append(float(v))
    for e, n in samples.items():
        _put(out, f"{p}samples/{e}", n)
    for e, v in rewards.items():
        _put(out, f"{p}reward/{e}", sum(v) / len(v))
    _put(out, f"{p}nonfinite", float(any(r.nonfinite for r in records)))
    return out


# ------------------------------------------------------------------ discard residue
#: the fraction of a discarded adapter that may stay in the base's persona coordinates before
#: :func:`warn_discard_residue` warns. Measured on the tiny Llama and GPT-2 models (AdamW, 3-20
#: steps, tests/test_precision.py's setup): float32 weights leave at most 1.4e-4 of the adapter
#: (update mode's in-place discard at lr 1e-5; 1e-8-3e-5 otherwise); bfloat16 weights leave
#: 0.3-1.9% at lr 1e-3 and 48-90% at lr 1e-5 in update mode (the base's rounding is a fixed
#: ~4e-4-8e-4, the adapter small), 0.006-0.06% at lr 1e-3 and 0.5-1.4% at lr 1e-5 in activation
#: mode (whose adapter, at 30x the learning rate, is larger).
DISCARD_RESIDUE_THRESHOLD = 0.01


@dataclass(frozen=True)
class DiscardResidue:
    """What discarding left of the removed adapter in the base's persona coordinates.

    For a routed parameter P with basis U, the base that discarding should give has the in-span
    coordinates ``c* = Uᵀ P_0 + A − A_e`` (``Uᵀ P_0``: the base's own coordinates the router keeps,
    A: the adapter, ``A_e``: the discarded share; ``A_e = A`` for the whole adapter). The base
    realized — the model after :meth:`GradientRouter.discard`, or the tensors
    :func:`gradroute.save_discarded` / :func:`gradroute.save_adapter` write, rounded to their dtype
    — has ``Uᵀ P̂``. Over every measured parameter (Frobenius norms):

        absolute = ‖Uᵀ P̂ − c*‖,   removed = ‖A_e‖,   relative = absolute / removed

    (``relative`` is 0 when nothing was removed). With float32 (or float64) weights ``absolute``
    is round-off; with bfloat16/float16 weights the rounding of the base to its dtype (update and
    gradient modes) and of the post-step pinning of its coordinates (activation mode) is a
    sizeable part of a small adapter. Post-norm and mixture-of-experts routes of activation mode
    are not measured (their base is pinned along other directions, or not a plain weight).
    """

    absolute: float
    removed: float
    relative: float
    per_module: dict[str, float] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ()
    threshold: float = DISCARD_RESIDUE_THRESHOLD

    @property
    def exceeded(self) -> bool:
        """True when an adapter was removed and more than ``threshold`` of it stays in the base."""
        return self.removed > 0 and self.relative > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (sidecar files)."""
        return {"absolute": self.absolute, "removed": self.removed, "relative": self.relative,
                "threshold": self.threshold, "exceeded": self.exceeded, "dtypes": list(self.dtypes),
                "per_module": dict(self.per_module)}

    def metrics(self, prefix: str = "gradroute/") -> dict[str, float]:
        """Flat scalars for W&B / TensorBoard: ``discard_residue`` and ``discard_residue_relative``."""
        out: dict[str, float] = {}
        _put(out, f"{prefix}discard_residue", self.absolute)
        _put(out, f"{prefix}discard_residue_relative", self.relative)
        return out


def _measured(router: GradientRouter) -> list[Route]:
    """Routes whose base keeps ``Uᵀ P_0`` along the route's own basis (see :class:`DiscardResidue`)."""
    ms = router.mode_strategy
    skip = set(getattr(ms, "post_norm", None) or ()) | set(getattr(ms, "moe", None) or ())
    return [r for r in router.routes_state if r.name not in skip]


def measured_removed(router: GradientRouter, env: str | None = None) -> float:
    """``‖A_e‖`` over the measured routes only (taken before discarding), so that ``relative``
    compares like with like when post-norm / mixture-of-experts routes are left out."""
    per = router.adapter_norm(env).per_module
    return math.sqrt(sum(per.get(r.name, 0.0) ** 2 for r in _measured(router)))


@torch.no_grad()
def discard_targets(router: GradientRouter, env: str | None = None) -> dict[str, list[torch.Tensor]]:
    """``c* = Uᵀ P_0 + A − A_e`` per measured module and block (weight, routed bias), taken
    before discarding (bookkeeping dtype)."""
    out: dict[str, list[torch.Tensor]] = {}
    for r in _measured(router):
        parts = []
        for b in r.blocks:
            share = b.share(env)
            parts.append(b.ref0 + b.adapter - (share if share is not None else torch.zeros_like(b.adapter)))
        out[r.name] = parts
    return out


@torch.no_grad()
def discard_residue(router: GradientRouter, targets: Mapping[str, Sequence[torch.Tensor]], removed: float,
                    weights: Mapping[str, torch.Tensor] | None = None, *,
                    threshold: float | None = None) -> DiscardResidue:
    """Measure :class:`DiscardResidue` against ``targets`` (:func:`discard_targets`, taken before).

    ``weights``: the materialized base as written (``{"<module>.weight": tensor, "<module>.bias":
    ...}``, in the dtype written; a block without an entry is not measured); None reads the
    model's effective parameters (after an in-place discard). ``removed``: ‖A_e‖."""
    thr = check_residue_threshold(threshold)
    sq: dict[str, float] = {}
    dtypes: set[str] = set()
    for r in _measured(router):
        if r.name not in targets:
            continue
        total = 0.0
        for i, (b, c) in enumerate(zip(r.blocks, targets[r.name])):
            if weights is None:
                x = router.mode_strategy.effective(b)
                dtypes.add(str(b.param.dtype).replace("torch.", ""))
            else:
                key = f"{r.name}.{'weight' if i == 0 else 'bias'}"
                if key not in weights:
                    continue
                x = weights[key]
                dtypes.add(str(x.dtype).replace("torch.", ""))
            d = b.coords_of(x.to(b.param.device)).double() - c.double().to(b.param.device)
            total += float(d.pow(2).sum())
        sq[r.name] = total
    absolute = math.sqrt(sum(sq.values()))
    removed = float(removed)
    relative = absolute / removed if removed > 0 else 0.0
    return DiscardResidue(absolute=absolute, removed=removed, relative=relative,
                          per_module={k: math.sqrt(v) for k, v in sq.items()}, dtypes=tuple(sorted(dtypes)),
                          threshold=thr)


def check_residue_threshold(threshold: float | None) -> float:
    """``threshold`` validated (None: :data:`DISCARD_RESIDUE_THRESHOLD`)."""
    if threshold is None:
        return DISCARD_RESIDUE_THRESHOLD
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not (0 < threshold < math.inf):
        raise ConfigError(f"residue_threshold must be a positive finite number, got {threshold!r}.",
                          f"pass e.g. residue_threshold={DISCARD_RESIDUE_THRESHOLD}.")
    return float(threshold)


_LOW = ("bfloat16", "float16")


def residue_fix(residue: DiscardResidue, weights_hold_adapter: bool) -> str:
    """What to do about a residue over the threshold, for these dtypes and this mode."""
    if any(d in _LOW for d in residue.dtypes):
        fix = ("keep float32 master weights while training: load the model in float32 and train with bf16 "
               "autocast (TrainingArguments(bf16=True) on a float32 model keeps float32 parameters)")
        if weights_hold_adapter:
            fix += ("; or materialize the discarded base in float32: call model.float() before router.discard() / "
                    "gradroute.save_discarded / gradroute.save_adapter (the router's float64 bookkeeping then gives a "
                    "base exact to float32 round-off)")
        return fix + "."
    return ("the removed adapter is tiny next to the weights' own round-off: materialize the base in float64 "
            "(model.double()) if that matters, or pass a larger residue_threshold.")


def warn_discard_residue(residue: DiscardResidue, where: str, weights_hold_adapter: bool = True,
                         stacklevel: int = 3) -> bool:
    """Warn (:class:`~gradroute.errors.GradrouteWarning`) when ``residue.exceeded``; returns whether it did."""
    if not residue.exceeded:
        return False
    worst = max(residue.per_module, key=residue.per_module.get) if residue.per_module else "?"
    warnings.warn(
        f"{where}: the discarded base keeps {residue.relative:.2%} of the removed persona adapter in its persona "
        f"coordinates (‖Uᵀ(W_discarded − W_0)‖ = {residue.absolute:.3g} for an adapter of norm {residue.removed:.3g}, "
        f"threshold {residue.threshold:.2%}; most in {worst!r}): the weights are {', '.join(residue.dtypes)}, and "
        f"rounding to that dtype cannot remove the adapter exactly. Fix: "
        f"{residue_fix(residue, weights_hold_adapter)}", GradrouteWarning, stacklevel=stacklevel)
    return True
