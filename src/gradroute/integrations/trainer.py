"""transformers ``Trainer`` (and TRL trainers): the router and monitor as a ``TrainerCallback``.

Callback order in one optimizer step (transformers 5.x): ``on_step_begin`` → micro-steps →
clipping → ``on_pre_optimizer_step`` → ``optimizer.step()`` → ``on_optimizer_step`` →
scheduler → ``zero_grad`` → ``global_step += 1`` → ``on_step_end`` → log/save. The callback

- finds the routed parameters again in ``on_train_begin``, after accelerate's ``prepare``
  (FSDP2 replaces them by DTensors), and binds the prepared optimizer;
- re-syncs in ``on_step_begin`` (weights edited outside steps go to the base);
- accounts the step in ``on_optimizer_step`` (gradients still present; a step the optimizer
  skipped, e.g. an AMP overflow, is not counted): ``router.step(at_step=N)`` hands the record to
  every subscriber — the monitor logs it and applies the halt policy (a stop writes the halt
  record, naming the checkpoint about to be written), this callback keeps it for the trainer's
  logs — then, on a stop, asks the trainer to save a checkpoint and stop;
- writes the router state into every checkpoint (``checkpoint-N/gradroute/``), then, last, a
  checksum manifest over every file there (:func:`gradroute._io.write_manifest`); on resume it
  verifies the manifest (an incomplete or damaged checkpoint is refused, naming the last
  complete one), refuses non-finite weights or router state (pointing to
  :func:`gradroute.last_clean_checkpoint`), restores the state and continues the log;
- puts the monitor's scalars into the trainer's logs (so W&B/TensorBoard get them), as the
  values of the logged step (running totals are not averaged over ``logging_steps``; counts
  are summed over it; see :meth:`~gradroute.DriftMonitor.metrics`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ..distributed import world_size
from ..errors import CheckpointError, GradrouteWarning

if TYPE_CHECKING:
    from ..monitor import DriftMonitor
    from ..router import GradientRouter, StepRecord

STATE_DIR = "gradroute"


def checkpoint_dir(args: Any, global_step: int) -> Path:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{global_step}"


def _main_decides(flag: bool) -> bool:
    """Rank 0's decision on every rank (one backend-aware all-reduce; a no-op in one process)."""
    if world_size() == 1:
        return flag
    from ..distributed import all_reduce_sum, rank

    return bool(all_reduce_sum([torch.tensor([1.0 if (flag and rank() == 0) else 0.0])])[0].item() > 0)


def _nonfinite_params(model: Any, limit: int = 3) -> list[str]:
    bad = []
    if model is None:
        return bad
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.is_floating_point() or p.is_complex()) and not bool(torch.isfinite(p).all()):
                bad.append(name)
                if len(bad) >= limit:
                    break
    return bad


def _restart_hint(run_dir: Path, step: int) -> Path | None:
    """The checkpoint to restart from: the log's last clean one, else the newest complete one before ``step``."""
    from ..monitor import last_clean_checkpoint, last_complete_checkpoint

    try:
        clean = last_clean_checkpoint(run_dir)
    except Exception:  # no or unreadable log: fall back to the directories
        clean = None
    if clean is not None and _step_of(clean) is not None and _step_of(clean) < step:
        return clean
    return last_complete_checkpoint(run_dir, before=step)


def _step_of(path: Path) -> int | None:
    tail = Path(path).name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def check_resumable(ckpt: str | Path, run_dir: str | Path, model: Any = None) -> None:
    """Refuse to resume from ``ckpt`` when its gradroute state is incomplete or damaged (manifest),
    or its weights (``model`` as loaded from it, else its weight files) or router state are NaN/Inf.

    Raises :class:`~gradroute.errors.CheckpointError` naming the problem and the checkpoint to
    use instead (:func:`gradroute.last_clean_checkpoint`, else the last complete one)."""
    from .. import _io
    from ..router import STATE_FILE

    ckpt, run_dir = Path(ckpt), Path(run_dir)
    step = _step_of(ckpt) or 0
    hint = _restart_hint(run_dir, step)
    where = (f"resume from {hint} (gradroute.last_clean_checkpoint({str(run_dir)!r})): "
             f"trainer.train(resume_from_checkpoint={str(hint)!r})" if hint is not None else
             f"no earlier clean checkpoint exists in {run_dir}: start the run again")
    state = ckpt / STATE_DIR
    if state.is_dir():
        _io.verify_manifest(state, last_good=hint)
    bad: list[str] = []
    if model is not None:
        bad = [f"weight {n}" for n in _nonfinite_params(model)]
    else:
        for f in sorted(ckpt.glob("*.safetensors")):
            bad += [f"{f.name}: {n}" for n in _io.nonfinite_tensors(f)]
    if state.is_dir() and (state / STATE_FILE).is_file():
        bad += [f"router state: {n}" for n in _io.nonfinite_tensors(state / STATE_FILE)]
    if bad:
        raise CheckpointError(
            f"{ckpt} holds NaN/Inf values ({', '.join(bad[:4])}): training diverged before it was saved "
            "(it is typically the checkpoint written at a non-finite halt), so resuming from it would "
            "continue from NaN.", where + ".")


class RouterCallback(TrainerCallback):
    """Runs :meth:`GradientRouter.step` after every optimizer step of a ``Trainer``.

    ``monitor``: the :class:`~gradroute.DriftMonitor` that logs steps and applies its policy
    (default: the one subscribed to the router, if any); it is subscribed to the router if it
    is not yet. The callback subscribes itself too: both receive each step record from the router.

    Trainer metrics: the step records since the previous log are kept, and
    :meth:`log_metrics` turns them into the scalars of the logged step (what the JSONL log
    holds for that step; counts summed over the logging window). :func:`gradroute.attach`
    wraps ``trainer.log`` to add them to every training log before any reporter
    (W&B/TensorBoard/...) sees it; a callback used on its own adds them in ``on_log``
    instead, which reaches the reporters only if it comes before them in the callback list.
    ``metrics_sink`` (optional) is called with the scalars of every step.
    """

    def __init__(
        self,
        router: GradientRouter,
        monitor: DriftMonitor | None = None,
        metrics_sink: Callable[[dict[str, float]], None] | None = None,
        allow_missing_state: bool = False,
    ):
        self.router = router
        self.allow_missing_state = allow_missing_state
        self.resume_from: str | None = None  # the checkpoint trainer.train() resumes from (set by attach)
        if monitor is None:
            from ..monitor import DriftMonitor

            monitor = router.subscriber(DriftMonitor)
        self.monitor = monitor
        self.metrics_sink = metrics_sink
        self.last_record: StepRecord | None = None
        self.halted = False
        self.window: list[StepRecord] = []  # the step records since the last trainer log
        self.log_records = True  # False when the trainer does not log (logging_strategy="no")
        self.log_wrapped = False  # set by attach: trainer.log adds the metrics itself
        if monitor is not None:
            router.subscribe(monitor)
        router.subscribe(self)

    def observe(self, record: StepRecord) -> None:
        """A step record from the router (this callback is one of its subscribers)."""
        self.last_record = record
        if self.log_records and self.monitor is not None:
            self.window.append(record)
        if self.metrics_sink is not None:
            from ..monitor import step_metrics

            self.metrics_sink(step_metrics([record]))

    def log_metrics(self) -> dict[str, float]:
        """The scalars of the newest step for the trainer's logs; starts a new logging window."""
        if self.monitor is None or not self.window:
            return {}
        from ..monitor import step_metrics

        out = step_metrics(self.window)
        self.window = []
        return out

    def _bind(self, optimizer: Any) -> None:
        if optimizer is not None:
            self.router.bind_optimizer(optimizer)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from types import SimpleNamespace

        from ..errors import ConfigError
        from .sharding import check_sharding

        # DeepSpeed's optimizers overwrite gradroute's edits (gradroute.attach checks this too; a
        # RouterCallback added by hand must not bypass it)
        check_sharding(SimpleNamespace(args=args, model=model if model is not None else self.router.model))
        if getattr(args, "use_vllm", False) and not self.router.weights_hold_adapter \
                and not getattr(self.router, "vllm_sync_installed", False):
            raise ConfigError(
                "this trainer generates with vLLM, and the router's adapter is a separate path of the model "
                f"(mode={self.router.mode!r}) that TRL's weight sync does not push: rollouts would be off-policy.",
                "attach with gradroute.attach(trainer, ...) (it installs the folded sync), or call "
                "gradroute.integrations.vllm.install_vllm_sync(trainer, router) before training.")
        # accelerate's prepare (inside train()) may have replaced the parameters (FSDP2: DTensors):
        # route the ones the trainer's model holds and its optimizer steps
        if model is not None:
            self.router.rebind(model)
        self._bind(optimizer)
        self.log_records = getattr(args, "logging_strategy", "steps") != "no"
        if self.monitor is not None and self.monitor.checkpoint_for is None:
            self.monitor.checkpoint_for = lambda step: str(checkpoint_dir(args, step))
        if state.global_step > 0:
            ckpt = Path(self.resume_from) if self.resume_from else checkpoint_dir(args, state.global_step)
            run_dir = self.monitor.run_dir if self.monitor is not None and self.monitor.run_dir is not None \
                else Path(args.output_dir)
            check_resumable(ckpt, run_dir, model if model is not None else self.router.model)
            if (ckpt / STATE_DIR).is_dir():
                self.router.load_state(ckpt / STATE_DIR)
            elif self.allow_missing_state:
                warnings.warn(
                    f"resuming at step {state.global_step} but {ckpt / STATE_DIR} does not exist: the "
                    "adapter starts empty here (earlier in-subspace updates stay in the base).",
                    GradrouteWarning, stacklevel=2)
            else:
                from ..errors import AdapterError

                hint = _restart_hint(run_dir, state.global_step)
                raise AdapterError(
                    f"resuming at step {state.global_step} but {ckpt / STATE_DIR} does not exist, so the adapter "
                    "and the environments' shares up to that step would be lost.",
                    "resume from a checkpoint saved with gradroute attached"
                    + (f" (the last complete one is {hint})" if hint is not None else "")
                    + ", or pass allow_missing_state=True to start the adapter empty there.",
                )
            if self.monitor is not None:
                self.monitor.on_resume(state.global_step)
        self.router.snapshot()
        return control

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._bind(optimizer)
        self.router.snapshot()
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        # the step being completed (global_step is bumped after this); subscribers get the record
        record = self.router.step(warn_if_skipped=False, at_step=state.global_step + 1)
        if record is None:
            self.last_record = None
            return control
        stop = self.monitor is not None and self.monitor.stopping and self.monitor.last is not None \
            and self.monitor.last.step == record.step
        if _main_decides(stop):  # rank 0's log and history are authoritative
            self.halted = True
            control.should_save = True
            control.should_log = True  # the halting step reaches W&B/TensorBoard too
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_wrapped and logs is not None and "loss" in logs:
            logs.update(self.log_metrics())
        return control

    def on_save(self, args, state, control, **kwargs):
        ckpt = checkpoint_dir(args, state.global_step)
        if state.is_world_process_zero and ckpt.is_dir():
            from .. import _io

            (ckpt / STATE_DIR / _io.MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until rewritten
            self.router.save_state(ckpt / STATE_DIR)
            _io.write_manifest(ckpt / STATE_DIR)  # last: it vouches for every file written before it
            if self.monitor is not None:
                self.monitor.on_checkpoint(state.global_step, ckpt)
        return control
