"""``DriftMonitor``: one record per optimizer step, an append-only JSONL log, and halting.

The log (``<run_dir>/gradroute.jsonl``) holds, in order:

- ``{"type": "header", ...}``: subspace hash, routing plan, policy, config, library versions;
- ``{"type": "step", "step": N, ...}``: adapter norm (total, per layer), the step's in-subspace
  update norm, per-environment step share, share of the current adapter, adapter norm,
  in-subspace gradient norm, samples, activation projection, reward;
- ``{"type": "crossing", ...}``: a rule's threshold was crossed (also with ``action="warn"``;
  written when the rule starts firing, not again while it stays above threshold);
- ``{"type": "halt", ...}``: the run stops (rule, value, threshold, step, top environments,
  the checkpoint being written);
- ``{"type": "checkpoint", "step": N, "path": ...}`` and ``{"type": "resume", "from_step": N}``.

Paths in the log (checkpoints, the halt's checkpoint) are relative to the run directory, so a
run directory can be moved, copied or read from any working directory (:func:`resolve_path`).

Each record is one line, flushed as it is written, so a crash loses at most the line being
written; a torn last line is skipped on read. After a resume from step N, records of steps
> N written before the crash are superseded (:func:`load_log` drops them), so the log reads
without gaps or duplicates. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .distributed import is_main_process
from .errors import DriftHalt, FileFormatError
from .policy import HaltPolicy, Violation

if TYPE_CHECKING:
    import pandas as pd

    from .router import GradientRouter, StepRecord

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

        from .errors import GradrouteWarning

        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} damaged line(s) (line {shown}): not UTF-8, not a JSON "
                      "object, or missing the fields their record type needs.", GradrouteWarning, stacklevel=2)
    return out


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


def relative_path(run_dir: str | Path | None, path: str | Path) -> str:
    """``path`` as stored in a run's log: relative to the run directory when it lies inside it
    (so that the directory can be moved, copied or read from anywhere), else absolute."""
    p = Path(path)
    if run_dir is None:
        return str(p)
    base = Path(run_dir).resolve()
    full = p.resolve()
    return str(full.relative_to(base)) if full.is_relative_to(base) else str(full)


def resolve_path(run_dir: str | Path, stored: str | Path) -> Path:
    """A path read from a run's log, made usable from any working directory.

    Relative paths are relative to the run directory. Logs written before paths were stored that
    way hold paths relative to the training process's working directory (``runs/x/checkpoint-4``)
    or absolute ones into a directory that may since have been moved or copied: a checkpoint of
    that name inside ``run_dir`` wins over both, so a copied run points at its own checkpoints.
    """
    run_dir = Path(run_dir)
    p = Path(stored)
    if not p.is_absolute() and (run_dir / p).exists():
        return run_dir / p
    if (run_dir / p.name).exists():
        return run_dir / p.name
    if p.is_absolute():
        return p
    return run_dir / p


def last_clean_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint saved before the first threshold crossing (or the newest, if none).

    Checkpoint N holds the weights after step N; it is clean when N is before the step at
    which a rule first fired in the current trajectory (crossings superseded by a resume do
    not count). The log's checkpoint records are authoritative (a directory left by an
    abandoned attempt is not); without any, ``checkpoint-N`` directories are scanned.
    Returns None when there is no clean checkpoint.
    """
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    crossing = [r["step"] for r in records if r.get("type") in ("crossing", "halt") and not r.get("superseded")]
    first = min(crossing) if crossing else math.inf
    found: dict[int, Path] = {}
    for r in records:
        if r.get("type") == "checkpoint":
            found[int(r["step"])] = resolve_path(run_dir, r["path"])
    if not found:
        for d in run_dir.glob("checkpoint-*"):
            tail = d.name.rsplit("-", 1)[-1]
            if d.is_dir() and tail.isdigit():
                found[int(tail)] = d
    clean = [n for n, p in found.items() if n < first and p.is_dir() and checkpoint_problem(p) is None]
    return found[max(clean)] if clean else None


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why ``ckpt``'s gradroute state cannot be trusted (incomplete or damaged: its manifest is
    missing or does not match), or None when it verifies or holds no gradroute state."""
    from . import _io
    from .errors import CheckpointError

    state = Path(ckpt) / "gradroute"
    if not state.is_dir():
        return None
    try:
        _io.verify_manifest(state)
    except CheckpointError as e:
        return e.problem
    return None


def last_complete_checkpoint(run_dir: str | Path, before: int | None = None) -> Path | None:
    """The newest ``checkpoint-N`` of ``run_dir`` (with N < ``before`` when given) whose gradroute
    state verifies against its manifest; None if there is none."""
    found = []
    for d in Path(run_dir).glob("checkpoint-*"):
        tail = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and tail.isdigit() and (before is None or int(tail) < before):
            found.append((int(tail), d))
    for _, d in sorted(found, reverse=True):
        if (d / "gradroute").is_dir() and checkpoint_problem(d) is None:
            return d
    return None


class DriftMonitor:
    """Turns router step records into log records, trainer metrics and halts.

    Plain loop: ``monitor = DriftMonitor(router, run_dir, policy)`` and every
    ``router.step(...)`` is observed; a stop raises :class:`~gradroute.errors.DriftHalt`
    (after the halt record is written) unless ``raise_on_halt=False``.
    """

    def __init__(
        self,
        router: GradientRouter,
        run_dir: str | Path | None = None,
        policy: HaltPolicy | None = None,
        *,
        config: dict[str, Any] | None = None,
        raise_on_halt: bool = True,
        fsync: bool = False,
        attach: bool = True,
    ):
        self.router = router
        self.policy = policy
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.raise_on_halt = raise_on_halt
        self.config = config or {}
        self.history: list[dict[str, Any]] = []
        self.violations: list[Violation] = []
        self.halt: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None
        self._active: set[tuple[str, str]] = set()  # rules above threshold at the last step
        self._nf_rewards: dict[str, int] = {}  # NaN/None rewards per environment since the last record
        self._nf_rewards_total: dict[str, int] = {}
        self._log: RunLog | None = None
        if self.run_dir is not None and is_main_process():
            self._log = RunLog(self.run_dir / LOG_NAME, fsync=fsync)
            if not any(r.get("type") == "header" for r in self._existing()):
                self._log.write(self._header())
        if attach:
            router.subscribe(self)

    def _existing(self) -> list[dict[str, Any]]:
        try:
            return read_records(self.run_dir, warn=False) if self.run_dir is not None else []
        except FileFormatError:
            return []

    def _header(self) -> dict[str, Any]:
        import platform

        import torch

        from ._version import __version__

        versions = {"gradroute": __version__, "torch": torch.__version__, "python": platform.python_version()}
        for mod in ("transformers", "peft", "trl"):
            try:
                versions[mod] = __import__(mod).__version__
            except Exception:  # pragma: no cover - optional at this point
                pass
        return {
            "type": "header", "time": time.time(), "mode": self.router.mode,
            "subspace_hash": self.router.subspace.content_hash,
            "subspace_provenance": self.router.subspace.provenance.to_dict(),
            "plan": self.router.plan.to_list(), "plan_fingerprint": self.router.plan.fingerprint(),
            "envs": list(self.router.attribution.vocab) if self.router.attribution else [],
            "policy": self.policy.describe() if self.policy else None,
            "config": self.config, "versions": versions,
        }

    # ------------------------------------------------------------------ records
    def make_record(self, rec: StepRecord, step: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "step", "step": int(step if step is not None else rec.step), "time": time.time(),
            "adapter_norm": rec.adapter_norm,
            "adapter_norm_per_layer": {str(k): v for k, v in rec.adapter_norm_per_layer.items()},
            "update_norm": rec.update_norm,
            "update_norm_per_layer": {str(k): v for k, v in rec.update_norm_per_layer.items()},
            "nonfinite": rec.nonfinite,
        }
        if rec.env_adapter_share:
            out["env_adapter_share"] = rec.env_adapter_share
            out["env_adapter_norm"] = rec.env_adapter_norm
        if rec.env_share:
            out["env_share"] = rec.env_share
        a = rec.attribution
        if a is not None:
            out["grad_norm"] = a.grad_norm
            out["samples"] = a.samples
            out["activation"] = {e: {str(L): v for L, v in d.items()} for e, d in a.activation.items()}
            out["activation_norm"] = {e: {str(L): v for L, v in d.items()} for e, d in a.activation_norm.items()}
            if a.reward:
                out["reward"] = a.reward
        return out

    def count_nonfinite_rewards(self, counts: dict[str, int]) -> None:
        """Add NaN/None rewards per environment; they go into the next step record as
        ``nonfinite_rewards`` (since the previous record) and ``nonfinite_rewards_total``."""
        for env, n in counts.items():
            if n:
                self._nf_rewards[env] = self._nf_rewards.get(env, 0) + int(n)
                self._nf_rewards_total[env] = self._nf_rewards_total.get(env, 0) + int(n)

    def observe(self, rec: StepRecord, step: int | None = None, checkpoint: str | None = None) -> bool:
        """Log the step and apply the policy. Returns True when the run must stop."""
        record = self.make_record(rec, step)
        if self._nf_rewards_total:
            record["nonfinite_rewards"] = dict(self._nf_rewards)
            record["nonfinite_rewards_total"] = dict(self._nf_rewards_total)
            self._nf_rewards.clear()
        self._write(record)
        stop = False
        if self.policy is not None:
            for v, wants_stop in self.policy.evaluate(record, self.history, self._active):
                self.violations.append(v)
                self._write({"type": "crossing", **v.to_dict(), "action": "stop" if wants_stop else "continue"})
                if wants_stop and not stop:
                    stop = True
                    self.halt = {"type": "halt", **v.to_dict(), "checkpoint": checkpoint, "time": time.time()}
                    self._write({**self.halt, "checkpoint": self._stored(checkpoint)})
        self.history.append(record)
        self._trim_history()
        self.last = record
        if stop and self.raise_on_halt:
            raise DriftHalt(self.halt)  # type: ignore[arg-type]
        return stop

    def _trim_history(self) -> None:
        """Keep what the rules look at — the baseline at the start, a recent tail — not the whole run."""
        head, tail = 0, 2
        for r in (self.policy.rules if self.policy is not None else []):
            head = max(head, getattr(r, "baseline_steps", 0))
            tail = max(tail, getattr(r, "window", 1) + 2)
        limit = head + tail
        if len(self.history) > limit + 64:
            self.history = self.history[:head] + self.history[-tail:]

    def _write(self, record: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(record)

    def _stored(self, path: str | Path | None) -> str | None:
        return None if path is None else relative_path(self.run_dir, path)

    def on_checkpoint(self, step: int, path: str | Path) -> None:
        self._write({"type": "checkpoint", "step": int(step), "path": self._stored(path), "time": time.time()})

    def on_resume(self, step: int) -> None:
        """Continue after resuming from the checkpoint of ``step``: later records are superseded."""
        self._write({"type": "resume", "from_step": int(step), "time": time.time()})
        records = self._existing() if self.run_dir is not None else []
        self.history = [r for r in records if r.get("type") == "step" and r["step"] <= step]
        self._nf_rewards = {}
        self._nf_rewards_total = dict(self.history[-1].get("nonfinite_rewards_total") or {}) if self.history else {}
        self.halt = None
        self._active = set()

    def metrics(self, prefix: str = "gradroute/", window: list[dict[str, Any]] | None = None) -> dict[str, float]:
        """Flat scalar metrics for W&B / TensorBoard, true whatever the logging interval.

        ``window`` holds the step records since the previous log, oldest first (default: the
        newest record alone); the metrics describe its last step:

        - running totals and that step's own figures (``adapter_norm`` and its per-layer
          values, ``env_adapter_norm/<env>``, ``env_adapter_share/<env>``, ``update_norm``,
          ``env_share/<env>``, ``grad_norm/<env>``, ``activation_norm/<env>/<layer>`` and the
          signed activation projection ``activation/<env>/<layer>/<i>`` = coordinate i of the
          mean ``Uᵀh``, the quantity the activation z-rule watches) are the values of the JSONL
          record of that step, never averaged over the window;
        - counts (``samples/<env>``) are summed over the window;
        - ``reward/<env>`` is the mean of the window's per-step means (TRL averages its own
          ``reward`` the same way);
        - ``nonfinite`` is 1.0 when any step of the window had a non-finite update.
        """
        records = [r for r in (window if window is not None else [self.last]) if r is not None]
        if not records:
            return {}
        last = records[-1]
        flat: dict[str, Any] = _flatten({k: v for k, v in last.items()
                                         if k not in ("type", "step", "time", "activation", "samples", "reward",
                                                      "nonfinite")})
        for env, layers in (last.get("activation") or {}).items():
            for layer, coords in layers.items():
                for i, x in enumerate(coords if isinstance(coords, list | tuple) else [coords]):
                    flat[f"activation.{env}.{layer}.{i}"] = x
        samples: dict[str, float] = {}
        rewards: dict[str, list[float]] = {}
        for r in records:
            for env, n in (r.get("samples") or {}).items():
                samples[env] = samples.get(env, 0.0) + float(n)
            for env, v in (r.get("reward") or {}).items():
                if isinstance(v, int | float) and math.isfinite(v):
                    rewards.setdefault(env, []).append(float(v))
        flat.update({f"samples.{e}": n for e, n in samples.items()})
        flat.update({f"reward.{e}": sum(v) / len(v) for e, v in rewards.items()})
        flat["nonfinite"] = float(any(bool(r.get("nonfinite")) for r in records))
        out = {}
        for k, v in flat.items():
            if isinstance(v, bool):
                v = float(v)
            if isinstance(v, int | float) and math.isfinite(v):
                out[prefix + k.replace(".", "/")] = float(v)
        return out

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
