"""Dopesheet schedules: hyperparameters as keyframed curves over training steps.

CSV form (one row per keyframe; empty cells are "no key here")::

    STEP,PHASE,ACTION,lr:log,separate,anchor:linear,anti-subspace:lin:step
    0,warm-up,,1e-8,,0,0.25
    +10,,ramp,0.01,,,
    248,shape,,,0.01,0.1,
    750,anchor,,0.1,0.001,0.1,0.003
    1425,settle,,0.1,0,0,0
    1500,,,0.05,,,

- ``STEP`` is absolute (``750``), an offset from the previous row (``+10``), or a fraction of
  the way from the previous to the next absolute row, rounded to a whole step (``+0.33``:
  any relative value below 1 with a decimal point).
- Column headers are ``name[:space[:interp]]``: ``space`` is ``lin``/``linear`` (default) or
  ``log``; ``interp`` is ``minjerk`` (default), ``linear`` or ``step``.
- Between keys (s0, y0) → (s1, y1) with τ = (s − s0)/(s1 − s0):
  minimum jerk ``y0 + (y1 − y0)(10τ³ − 15τ⁴ + 6τ⁵)``; linear ``y0 + (y1 − y0)τ``; step ``y0``
  until s1. In log space the same is applied to ``log y``.
- Before a property's first key it holds that key's value; after its last key, the last value.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ScheduleError

INTERPOLATIONS = ("minjerk", "linear", "step")
SPACES = {"lin": "linear", "linear": "linear", "log": "log"}
FIXED = ("STEP", "PHASE", "ACTION")


def min_jerk(t: float) -> float:
    """Minimum-jerk easing from rest to rest: 10t³ − 15t⁴ + 6t⁵ on [0, 1]."""
    t = min(1.0, max(0.0, t))
    return t * t * t * (10 - 15 * t + 6 * t * t)


@dataclass
class Track:
    """One property: keyframes (step, value), its value space and interpolation."""

    name: str
    keys: list[tuple[float, float]] = field(default_factory=list)
    space: str = "linear"
    interp: str = "minjerk"

    def __post_init__(self):
        if self.interp not in INTERPOLATIONS:
            raise ScheduleError(f"property {self.name!r}: unknown interpolation {self.interp!r}.",
                                f"use one of {INTERPOLATIONS}.")
        if self.space not in ("linear", "log"):
            raise ScheduleError(f"property {self.name!r}: unknown space {self.space!r}.", "use lin or log.")

    def validate(self) -> None:
        if not self.keys:
            raise ScheduleError(f"property {self.name!r} has no keyframes.")
        steps = [s for s, _ in self.keys]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ScheduleError(f"property {self.name!r}: keyframe steps {steps} are not strictly increasing.")
        for s, v in self.keys:
            if not math.isfinite(v):
                raise ScheduleError(f"property {self.name!r}: value {v} at step {s} is not finite.")
            if self.space == "log" and v <= 0:
                raise ScheduleError(f"property {self.name!r}: log space needs positive values, got {v} at step {s}.",
                                    "use a small positive value (e.g. 1e-8) instead of 0, or lin space.")

    def __call__(self, step: float) -> float:
        keys = self.keys
        if step <= keys[0][0]:
            return keys[0][1]
        if step >= keys[-1][0]:
            return keys[-1][1]
        for (s0, y0), (s1, y1) in zip(keys, keys[1:]):
            if s0 <= step < s1:
                t = (step - s0) / (s1 - s0)
                w = 0.0 if self.interp == "step" else (t if self.interp == "linear" else min_jerk(t))
                if self.space == "log":
                    return math.exp(math.log(y0) + (math.log(y1) - math.log(y0)) * w)
                return y0 + (y1 - y0) * w
        return keys[-1][1]  # pragma: no cover


class Dopesheet:
    """A set of property tracks plus phase labels. ``sheet(step)`` → ``{property: value}``."""

    def __init__(self, tracks: Iterable[Track], phases: Sequence[tuple[float, str]] = ()):
        self.tracks: dict[str, Track] = {}
        for t in tracks:
            if t.name in self.tracks:
                raise ScheduleError(f"property {t.name!r} is defined twice.")
            t.validate()
            self.tracks[t.name] = t
        self.phases = sorted((float(s), str(p)) for s, p in phases if p)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_csv(cls, source: str | Path) -> Dopesheet:
        """Parse a dopesheet from a CSV file path or CSV text."""
        text = Path(source).read_text() if isinstance(source, Path) or (
            isinstance(source, str) and "\n" not in source and Path(source).is_file()) else str(source)
        rows = list(csv.reader(io.StringIO(text.strip())))
        if not rows:
            raise ScheduleError("the dopesheet is empty.")
        header = [h.strip() for h in rows[0]]
        if [h.upper() for h in header[:3]] != list(FIXED):
            raise ScheduleError(f"a dopesheet header starts with STEP,PHASE,ACTION; got {header[:3]}.")
        specs = []
        for h in header[3:]:
            parts = h.split(":")
            name = parts[0].strip()
            if not name:
                raise ScheduleError(f"empty property name in column {h!r}.")
            space = SPACES.get(parts[1].strip().lower()) if len(parts) > 1 and parts[1].strip() else "linear"
            if space is None:
                raise ScheduleError(f"column {h!r}: unknown space {parts[1]!r}.", "use lin or log.")
            interp = parts[2].strip().lower() if len(parts) > 2 and parts[2].strip() else "minjerk"
            specs.append((name, space, interp))
        table = []
        for n, row in enumerate(rows[1:], 2):
            if not any(c.strip() for c in row):
                continue
            row = row + [""] * (len(header) - len(row))
            table.append({"STEP": row[0].strip(), "PHASE": row[1].strip(), "ACTION": row[2].strip(),
                          **{spec[0]: row[3 + i].strip() for i, spec in enumerate(specs)}, "_line": n})
        return cls.from_rows(table, spaces={s[0]: s[1] for s in specs}, interps={s[0]: s[2] for s in specs},
                             order=[s[0] for s in specs])

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Mapping[str, Any]],
        spaces: Mapping[str, str] | None = None,
        interps: Mapping[str, str] | None = None,
        order: Sequence[str] | None = None,
    ) -> Dopesheet:
        """The Python form: rows like ``{"STEP": "+10", "PHASE": "warm", "lr": 0.01}``."""
        steps = _resolve_steps([r.get("STEP", r.get("step")) for r in rows])
        names = list(order) if order else []
        for r in rows:
            for k in r:
                if k not in (*FIXED, "step", "phase", "action", "_line") and k not in names:
                    names.append(k)
        tracks = {n: Track(n, space=(spaces or {}).get(n, "linear"), interp=(interps or {}).get(n, "minjerk"))
                  for n in names}
        phases = []
        for step, r in zip(steps, rows):
            where = f"line {r['_line']}" if "_line" in r else f"step {step:g}"
            for n in names:
                v = r.get(n)
                if v is None or (isinstance(v, str) and not v.strip()):
                    continue
                try:
                    val = float(v)
                except (TypeError, ValueError):
                    raise ScheduleError(f"{where}: value {v!r} for {n!r} is not a number.") from None
                tracks[n].keys.append((step, val))
            phase = r.get("PHASE", r.get("phase"))
            if phase:
                phases.append((step, phase))
        return cls(tracks.values(), phases)

    # ------------------------------------------------------------------ evaluation
    @property
    def properties(self) -> list[str]:
        return list(self.tracks)

    @property
    def last_step(self) -> float:
        return max(t.keys[-1][0] for t in self.tracks.values())

    def value(self, prop: str, step: float) -> float:
        try:
            return self.tracks[prop](step)
        except KeyError:
            raise ScheduleError(f"the dopesheet has no property {prop!r}; it has {self.properties}.") from None

    def __call__(self, step: float) -> dict[str, float]:
        return {n: t(step) for n, t in self.tracks.items()}

    def phase_at(self, step: float) -> str | None:
        current = None
        for s, p in self.phases:
            if s <= step:
                current = p
        return current

    def lr_lambda(self, prop: str = "lr", base_lr: float = 1.0):
        """A ``LambdaLR`` factor function: the optimizer's LR follows ``prop`` (set its base LR to ``base_lr``)."""
        track = self.tracks.get(prop)
        if track is None:
            raise ScheduleError(f"the dopesheet has no property {prop!r} to drive the learning rate.")
        return lambda step: track(step) / base_lr

    def scheduler(self, optimizer: Any, prop: str = "lr") -> Any:
        """A ``torch.optim.lr_scheduler.LambdaLR`` that sets the LR of every group to ``prop``."""
        import torch

        bases = [g["lr"] for g in optimizer.param_groups]
        if any(b <= 0 for b in bases):
            raise ScheduleError("the optimizer's base learning rate must be positive to be rescaled.")
        track = self.tracks.get(prop)
        if track is None:
            raise ScheduleError(f"the dopesheet has no property {prop!r} to drive the learning rate.")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s, b=b: track(s) / b for b in bases])

    def plot(self, steps: int | None = None, ax: Any = None, props: Sequence[str] | None = None):
        """Timeline of the properties, each divided by its largest absolute value.

        A property whose scaled curve equals an earlier one's is drawn dashed with markers over
        it, and its legend label names the property it coincides with."""
        import matplotlib.pyplot as plt

        n = int(steps if steps is not None else self.last_step) + 1
        xs = list(range(n))
        if ax is None:
            _, ax = plt.subplots(figsize=(9, 3))
        drawn: dict[str, tuple[list[float], Any]] = {}
        for name in props or self.properties:
            t = self.tracks[name]
            ys = [t(x) for x in xs]
            top = max(abs(y) for y in ys) or 1.0
            scaled = [y / top for y in ys]
            same = next((other for other, (prev, _) in drawn.items()
                         if all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(prev, scaled))), None)
            label = f"{name} (max {top:.3g})"
            if same is None:
                (line,) = ax.plot(xs, scaled, label=label)
            else:
                under = drawn[same][1]
                under.set_linewidth(max(under.get_linewidth(), 3.0))  # shows on both sides of the dashes
                (line,) = ax.plot(xs, scaled, ls="--", lw=1.2, marker="o", ms=3.5, markevery=max(1, n // 12),
                                  label=f"{label}, same curve as {same}", zorder=under.get_zorder() + 0.1)
            drawn[name] = (scaled, line)
        for s, p in self.phases:
            ax.axvline(s, color="0.8", lw=0.8)
            ax.text(s, 1.02, p, fontsize=7, rotation=0, va="bottom")
        ax.set_xlabel("step")
        ax.set_ylabel("value / max")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the curves, not on them
        return ax


def _resolve_steps(raw: Sequence[Any]) -> list[float]:
    """Absolute steps for a list of absolute/relative STEP cells (see the module docstring)."""
    kinds: list[tuple[str, float]] = []
    for i, v in enumerate(raw):
        s = str(v).strip() if v is not None else ""
        if not s:
            raise ScheduleError(f"row {i + 1} has no STEP.")
        try:
            num = float(s.lstrip("+"))
        except ValueError:
            raise ScheduleError(f"row {i + 1}: STEP {s!r} is not a number (or +offset).") from None
        if s.startswith("+"):
            frac = "." in s and num < 1
            kinds.append(("frac" if frac else "offset", num))
        else:
            kinds.append(("abs", num))
    out: list[float | None] = [None] * len(kinds)
    for i, (kind, num) in enumerate(kinds):
        if kind == "abs":
            out[i] = num
        elif kind == "offset":
            if i == 0 or out[i - 1] is None:
                raise ScheduleError(f"row {i + 1}: a relative STEP needs a row before it.")
            out[i] = out[i - 1] + num  # type: ignore[operator]
    for i, (kind, num) in enumerate(kinds):
        if kind == "frac":
            prev = next((out[j] for j in range(i - 1, -1, -1) if kinds[j][0] == "abs"), None)
            nxt = next((out[j] for j in range(i + 1, len(kinds)) if kinds[j][0] == "abs"), None)
            if prev is None or nxt is None:
                raise ScheduleError(f"row {i + 1}: a fractional STEP (+{num}) needs absolute rows on both sides.")
            out[i] = math.floor(prev + num * (nxt - prev) + 0.5)  # rounded to a whole step
    steps = [float(x) for x in out]  # type: ignore[arg-type]
    for i in range(1, len(steps)):
        if steps[i] <= steps[i - 1]:
            kind = "duplicate" if steps[i] == steps[i - 1] else "unsorted"
            raise ScheduleError(f"{kind} steps: row {i + 1} is at step {steps[i]:g}, after step {steps[i - 1]:g}.",
                                "keyframe rows must have strictly increasing steps.")
    return steps
