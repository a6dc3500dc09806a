"""The run log: ``<run_dir>/gradroute.jsonl``, append-only, one JSON record per line.

It holds, in order:

- ``{"type": "header", ...}``: subspace hash, routing plan, policy, config, library versions;
- ``{"type": "step", "step": N, ...}``: one :class:`~gradroute.router.records.StepRecord`
  (:func:`step_to_json` / :func:`step_from_json`);
- ``{"type": "crossing", ...}``: a rule's threshold was crossed (a
  :class:`~gradroute.policy.Violation` and the action taken; written when the rule starts firing,
  not again while it stays above threshold);
- ``{"type": "halt", ...}``: the run stops (the violation, the checkpoint being written);
- ``{"type": "checkpoint", "step": N, "path": ...}`` and ``{"type": "resume", "from_step": N}``.

JSON exists only here: the writer turns typed records into lines, the readers turn lines back
into typed records (:func:`read_log`) or into a DataFrame for notebooks (:func:`load_log`).
Each record is one line, flushed as it is written, so a crash loses at most the line being
written; a torn last line is skipped on read. After a resume from step N, records of steps
> N written before the crash are superseded (dropped, or flagged for crossings and halts), so
the log reads without gaps or duplicates. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FileFormatError
from ..layers import LayerKey
from ..policy import Violation
from ..router.records import StepRecord

if TYPE_CHECKING:
    import pandas as pd

LOG_NAME = "gradroute.jsonl"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


class RunLog:
    """Append-only JSONL file; every write is flushed (and fsync'ed if asked)."""

    def __init__(self, path: str | Path, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        torn = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._f = open(self.path, "a", encoding="utf-8")
        if torn:  # a crash cut the last line: end it so the next record starts clean
            self._f.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(_jsonable(record), separators=(",", ":")) + "\n")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _valid_record(rec: Any) -> bool:
    """A record this module can use: an object with a known type and the fields that type needs."""
    if not isinstance(rec, dict):
        return False
    kind = rec.get("type")
    if kind == "step" or kind == "checkpoint":
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            return False
        return kind == "step" or isinstance(rec.get("path"), str)
    if kind in ("crossing", "halt"):
        step = rec.get("step")
        return not isinstance(step, bool) and isinstance(step, int)
    if kind == "resume":
        n = rec.get("from_step")
        return not isinstance(n, bool) and isinstance(n, int)
    return isinstance(kind, str)


def read_records(run_dir: str | Path, name: str = LOG_NAME, *, warn: bool = True) -> list[dict[str, Any]]:
    """All parseable records with resumes applied: after ``resume from step N``, the step and
    checkpoint records of steps > N written before it are dropped (those steps were re-run);
    crossing and halt records stay, flagged ``"superseded": true`` (they are why the run restarted).

    A damaged log is read as far as it can be: lines that are not UTF-8, not JSON objects, or
    lack the fields their type needs (a step without an integer ``step``, a resume without
    ``from_step``, ...) are skipped, with one :class:`~gradroute.errors.GradrouteWarning` counting
    them (a torn last line, the normal trace of a crash, is skipped silently)."""
    path = Path(run_dir)
    path = path / name if path.is_dir() else path
    if not path.is_file():
        raise FileFormatError(f"no gradroute log at {path}.", "pass the run directory (the trainer's output_dir).")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FileFormatError(f"cannot read {path} ({e}).", "check the file's permissions.") from None
    out: list[dict[str, Any]] = []
    skipped: list[int] = []
    lines = raw.split(b"\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, bline in enumerate(lines):
        if not bline.strip():
            continue
        try:
            text = bline.decode("utf-8")
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            # a line torn by a crash (cut short: the parser ran out of text) is expected, not damage
            torn = text.lstrip().startswith("{") and (e.pos >= len(text.rstrip()) - 1
                                                      or e.msg.startswith("Unterminated string"))
            if not torn and i != last:
                skipped.append(i + 1)
            continue
        except (UnicodeDecodeError, RecursionError):
            skipped.append(i + 1)
            continue
        if not _valid_record(rec):
            skipped.append(i + 1)
            continue
        if rec.get("type") == "resume":
            n = rec["from_step"]
            out = [r for r in out if not (r.get("type") in ("step", "checkpoint") and r["step"] > n)]
            for r in out:
                if r.get("type") in ("crossing", "halt") and r["step"] > n:
                    r["superseded"] = True
        out.append(rec)
    if skipped and warn:
        import warnings

        from ..errors import GradrouteWarning

        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} damaged line(s) (line {shown}): not UTF-8, not a JSON "
                      "object, or missing the fields their record type needs.", GradrouteWarning, stacklevel=2)
    return out


def _layer(key: str) -> LayerKey:
    """A layer key read back from JSON (where keys are strings): ``"3"`` → 3, ``"-1"`` → −1."""
    return int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else key


def _per_layer(d: dict[LayerKey, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in d.items()}


def step_to_json(rec: StepRecord) -> dict[str, Any]:
    """The log line of a step record (fields present only when the run produces them)."""
    out: dict[str, Any] = {
        "type": "step", "step": int(rec.step), "time": rec.time,
        "adapter_norm": rec.adapter_norm,
        "adapter_norm_per_layer": _per_layer(rec.adapter_norm_per_layer),
        "update_norm": rec.update_norm,
        "update_norm_per_layer": _per_layer(rec.update_norm_per_layer),
        "nonfinite": rec.nonfinite,
    }
    if rec.env_adapter_share:
        out["env_adapter_share"] = rec.env_adapter_share
        out["env_adapter_norm"] = rec.env_adapter_norm
    if rec.env_share:
        out["env_share"] = rec.env_share
    if rec.attribution is not None or rec.samples or rec.grad_norm:
        out["grad_norm"] = rec.grad_norm
        out["samples"] = rec.samples
        out["activation"] = {e: _per_layer(d) for e, d in rec.activation.items()}
        out["activation_norm"] = {e: _per_layer(d) for e, d in rec.activation_norm.items()}
        if rec.reward:
            out["reward"] = rec.reward
        if rec.push:
            out["push"] = {e: _per_layer(d) for e, d in rec.push.items()}
            out["push_null"] = {e: _per_layer(d) for e, d in rec.push_null.items()}
    if rec.nonfinite_rewards_total:
        out["nonfinite_rewards"] = rec.nonfinite_rewards
        out["nonfinite_rewards_total"] = rec.nonfinite_rewards_total
    return out


def _floats(d: Any) -> dict[str, float]:
    return {str(k): (float("nan") if v is None else float(v)) for k, v in (d or {}).items()
            if v is None or isinstance(v, int | float | str)}


def _num(v: Any, default: float = 0.0) -> float:
    if v is None:
        return float("nan")
    try:
        return float(v)  # "inf" / "-inf" as written by the log
    except (TypeError, ValueError):
        return default


def _nums(v: Any) -> list[float]:
    """A logged vector (or scalar) back as floats: ``null`` is NaN, ``"inf"``/``"-inf"`` infinite."""
    return [_num(x) for x in (v if isinstance(v, list | tuple) else [v])]


def step_from_json(d: dict[str, Any]) -> StepRecord:
    """A step record read back from its log line (layer keys typed again)."""
    return StepRecord(
        step=int(d["step"]),
        update_norm=_num(d.get("update_norm", 0.0)),
        update_norm_per_layer={_layer(k): _num(v) for k, v in (d.get("update_norm_per_layer") or {}).items()},
        adapter_norm=_num(d.get("adapter_norm", 0.0)),
        adapter_norm_per_layer={_layer(k): _num(v) for k, v in (d.get("adapter_norm_per_layer") or {}).items()},
        env_share=_floats(d.get("env_share")),
        env_adapter_share=_floats(d.get("env_adapter_share")),
        env_adapter_norm=_floats(d.get("env_adapter_norm")),
        mode=str(d.get("mode", "update")),
        nonfinite=bool(d.get("nonfinite", False)),
        grad_norm=_floats(d.get("grad_norm")),
        samples=_floats(d.get("samples")),
        activation={str(e): {_layer(k): _nums(v) for k, v in layers.items()}
                    for e, layers in (d.get("activation") or {}).items()},
        activation_norm={str(e): {_layer(k): _num(v) for k, v in layers.items()}
                         for e, layers in (d.get("activation_norm") or {}).items()},
        reward=_floats(d.get("reward")),
        nonfinite_rewards={str(e): int(n) for e, n in (d.get("nonfinite_rewards") or {}).items()},
        nonfinite_rewards_total={str(e): int(n) for e, n in (d.get("nonfinite_rewards_total") or {}).items()},
        push={str(e): {_layer(k): _nums(v) for k, v in layers.items()} for e, layers in (d.get("push") or {}).items()},
        push_null={str(e): {_layer(k): _nums(v) for k, v in layers.items()}
                   for e, layers in (d.get("push_null") or {}).items()},
        time=d.get("time"),
    )


# logs written before violations carried their layer named it only in the detail text
_LEGACY_LAYER = re.compile(r"environment '([^']+)', layer (-?\d+)")
_LEGACY_ENV = re.compile(r"environment '([^']+)'")


def violation_from_json(d: dict[str, Any]) -> Violation:
    """A crossing's or halt's violation read back from its log line."""
    env, layer = d.get("env"), d.get("layer")
    detail = str(d.get("detail") or "")
    if env is None and layer is None:  # an old log: the detail text is all there is
        m = _LEGACY_LAYER.search(detail)
        if m:
            env, layer = m.group(1), int(m.group(2))
        else:
            m = _LEGACY_ENV.search(detail)
            env = m.group(1) if m else None
    return Violation(rule=str(d.get("rule", "?")), value=_num(d.get("value")), threshold=_num(d.get("threshold")),
                     step=int(d.get("step", -1)), top_envs=[(str(e), float(s)) for e, s in (d.get("top_envs") or [])],
                     detail=detail, env=None if env is None else str(env), layer=_layer(layer) if layer is not None else None)


@dataclass
class Crossing:
    """A threshold crossing read from the log: the violation, what the policy did, and whether a
    later resume superseded it (the run was restarted from before it)."""

    violation: Violation
    stopped: bool
    superseded: bool = False
    checkpoint: str | None = None  # halts: the checkpoint written at the halt (as stored)


def crossing_from_json(d: dict[str, Any]) -> Crossing:
    """A crossing or halt record read back (a halt always stopped, and names its checkpoint)."""
    halt = d.get("type") == "halt"
    return Crossing(violation_from_json(d), stopped=halt or d.get("action") == "stop",
                    superseded=bool(d.get("superseded")), checkpoint=d.get("checkpoint") if halt else None)


@dataclass
class RunLogView:
    """A run log read back into typed records (resumes applied, see :func:`read_records`)."""

    header: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)
    crossings: list[Crossing] = field(default_factory=list)
    halts: list[Crossing] = field(default_factory=list)
    checkpoints: dict[int, str] = field(default_factory=dict)  # step -> path as stored
    resumes: list[int] = field(default_factory=list)            # from_step of each resume, in order


def read_log(run_dir: str | Path, name: str = LOG_NAME, *, warn: bool = True) -> RunLogView:
    """The run log as typed records: the header, step records, crossings, halts, checkpoints
    and resumes (damaged lines skipped as :func:`read_records` does)."""
    records = read_records(run_dir, name, warn=warn)
    view = RunLogView(header=next((r for r in records if r.get("type") == "header"), {}))
    for r in records:
        kind = r.get("type")
        if kind == "step":
            view.steps.append(step_from_json(r))
        elif kind == "crossing":
            view.crossings.append(crossing_from_json(r))
        elif kind == "halt":
            view.halts.append(crossing_from_json(r))
        elif kind == "checkpoint":
            view.checkpoints[int(r["step"])] = r["path"]
        elif kind == "resume":
            view.resumes.append(int(r["from_step"]))
    return view


def _flatten(rec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def load_log(run_dir: str | Path) -> pd.DataFrame:
    """Step records as a DataFrame (one row per step, nested fields flattened with dots).

    ``df.attrs["header"]`` holds the header, ``df.attrs["events"]`` the crossing, halt,
    checkpoint and resume records.
    """
    import pandas as pd

    records = read_records(run_dir)
    steps = [_flatten({k: v for k, v in r.items() if k != "type"}) for r in records if r.get("type") == "step"]
    df = pd.DataFrame(steps)
    if not df.empty:
        df = df.sort_values("step").reset_index(drop=True)
    df.attrs["header"] = next((r for r in records if r.get("type") == "header"), {})
    df.attrs["events"] = [r for r in records if r.get("type") in ("crossing", "halt", "checkpoint", "resume")]
    return df


