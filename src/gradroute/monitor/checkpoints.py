"""Checkpoints of a run: where they are (paths stored relative to the run directory), which are
complete (their gradroute state verifies against its manifest) and which are clean (saved before
the first threshold crossing of the current trajectory)."""

from __future__ import annotations

import math
from pathlib import Path

from .runlog import read_records


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
    from .. import _io
    from ..errors import CheckpointError

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
