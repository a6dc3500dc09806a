"""``DriftMonitor``: logs every step record, applies the halt policy, decides halts.

It is one subscriber of the router among others (a trainer callback is another): each routed
step's :class:`~gradroute.router.records.StepRecord` reaches :meth:`DriftMonitor.observe`, which
appends it to the run log (:mod:`~gradroute.monitor.runlog`), asks the
:class:`~gradroute.HaltPolicy` which rules fire, writes a crossing for each rule that starts
firing and, when one asks to stop, a halt record (then raises
:class:`~gradroute.errors.DriftHalt` unless ``raise_on_halt=False``, where :attr:`stopping` says so).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..distributed import is_main_process
from ..errors import DriftHalt, FileFormatError
from ..policy import HaltPolicy, Violation, ViolationKey
from .checkpoints import relative_path
from .metrics import step_metrics
from .runlog import LOG_NAME, RunLog, read_records, step_from_json, step_to_json

if TYPE_CHECKING:
    from ..router import GradientRouter
    from ..router.records import StepRecord


class DriftMonitor:
    """Turns router step records into log records, trainer metrics and halts.

    Plain loop: ``monitor = DriftMonitor(router, run_dir, policy)`` and every
    ``router.step(...)`` is observed; a stop raises :class:`~gradroute.errors.DriftHalt`
    (after the halt record is written) unless ``raise_on_halt=False``.
    ``checkpoint_for``: ``step -> path`` of the checkpoint written when the run halts at that step
    (a trainer callback sets it), named in the halt record.
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
        checkpoint_for: Callable[[int], str | Path | None] | None = None,
    ):
        self.router = router
        self.policy = policy
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.raise_on_halt = raise_on_halt
        self.config = config or {}
        self.checkpoint_for = checkpoint_for
        self.history: list[StepRecord] = []
        self.violations: list[Violation] = []
        self.halt: dict[str, Any] | None = None
        self.last: StepRecord | None = None
        self.stopping = False  # the last observed step asked to stop
        self._active: set[ViolationKey] = set()  # crossings above threshold at the last step
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

        from .._version import __version__

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
    def observe(self, rec: StepRecord, step: int | None = None, checkpoint: str | Path | None = None) -> bool:
        """Log the step and apply the policy. Returns True when the run must stop.

        ``step`` overrides the record's step number; ``checkpoint``, the checkpoint named in a
        halt record (default: ``checkpoint_for(step)``)."""
        rec = rec.replace(step=int(step if step is not None else rec.step), time=time.time())
        self._write(step_to_json(rec))
        self.stopping = False
        if self.policy is not None:
            fired = self.policy.fired(rec, self.history)
            for rule, v in fired:
                if v.key in self._active:
                    continue  # still above threshold since an earlier step: not a new crossing
                wants_stop = self.policy.decide(rule, v, rec)
                self.violations.append(v)
                self._write({"type": "crossing", **v.to_dict(), "action": "stop" if wants_stop else "continue"})
                if wants_stop and not self.stopping:
                    self.stopping = True
                    if checkpoint is None and self.checkpoint_for is not None:
                        checkpoint = self.checkpoint_for(rec.step)
                    ckpt = None if checkpoint is None else str(checkpoint)
                    self.halt = {"type": "halt", **v.to_dict(), "checkpoint": ckpt, "time": time.time()}
                    self._write({**self.halt, "checkpoint": self._stored(ckpt)})
            self._active = {v.key for _, v in fired}
        self.history.append(rec)
        self._trim_history()
        self.last = rec
        if self.stopping and self.raise_on_halt:
            raise DriftHalt(self.halt)  # type: ignore[arg-type]
        return self.stopping

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
        self.history = [step_from_json(r) for r in records if r.get("type") == "step" and r["step"] <= step]
        self.halt = None
        self.stopping = False
        self._active = set()

    def metrics(self, prefix: str = "gradroute/", window: list[StepRecord] | None = None) -> dict[str, float]:
        """Flat scalar metrics of the newest record (or of ``window``'s last one, with counts
        summed and rewards averaged over the window): :func:`~gradroute.monitor.metrics.step_metrics`."""
        return step_metrics(window if window is not None else [self.last], prefix)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
