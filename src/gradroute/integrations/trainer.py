"""transformers ``Trainer`` (and TRL trainers): the router as a ``TrainerCallback``.

Callback order in one optimizer step (transformers 5.x): ``on_step_begin`` → micro-steps →
clipping → ``on_pre_optimizer_step`` → ``optimizer.step()`` → ``on_optimizer_step`` →
scheduler → ``zero_grad`` → ``on_step_end``. The callback re-syncs in ``on_step_begin``
(weights edited outside steps go to the base), accounts the step in ``on_optimizer_step``
(gradients still present; a step the optimizer skipped, e.g. an AMP overflow, is not
counted), writes the router state into every checkpoint (``checkpoint-N/gradroute/``) and
restores it when training resumes from one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ..errors import GradrouteWarning

if TYPE_CHECKING:
    from ..router import GradientRouter, StepRecord

STATE_DIR = "gradroute"


def checkpoint_dir(args: Any, global_step: int) -> Path:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{global_step}"


class RouterCallback(TrainerCallback):
    """Runs :meth:`GradientRouter.step` after every optimizer step of a ``Trainer``.

    ``env_weights`` (optional) is called with no arguments right before each routed step and
    returns the ``env_weights`` for it; ``on_record`` is called with each ``StepRecord`` and the
    trainer's ``state``/``control`` (the monitor plugs in here).
    """

    def __init__(
        self,
        router: GradientRouter,
        env_weights: Callable[[], Any] | None = None,
        on_record: Callable[[StepRecord, Any, Any], None] | None = None,
        on_save: Callable[[Path, Any], None] | None = None,
        on_resume: Callable[[Path, Any], None] | None = None,
    ):
        self.router = router
        self.env_weights = env_weights
        self.on_record = on_record
        self.save_hook = on_save
        self.resume_hook = on_resume
        self.last_record: StepRecord | None = None

    def _bind(self, optimizer: Any) -> None:
        if optimizer is not None:
            self.router.bind_optimizer(optimizer)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._bind(optimizer)
        if state.global_step > 0:
            ckpt = checkpoint_dir(args, state.global_step)
            if (ckpt / STATE_DIR).is_dir():
                self.router.load_state(ckpt / STATE_DIR)
                if self.resume_hook is not None:
                    self.resume_hook(ckpt, state)
            else:
                warnings.warn(
                    f"resuming at step {state.global_step} but {ckpt / STATE_DIR} does not exist: the "
                    "adapter starts empty here (earlier in-subspace updates stay in the base).",
                    GradrouteWarning, stacklevel=2)
        self.router.snapshot()
        return control

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._bind(optimizer)
        self.router.snapshot()
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        env_weights = self.env_weights() if self.env_weights is not None else None
        record = self.router.step(env_weights=env_weights, warn_if_skipped=False)
        self.last_record = record
        if record is not None and self.on_record is not None:
            self.on_record(record, state, control)
        return control

    def on_save(self, args, state, control, **kwargs):
        ckpt = checkpoint_dir(args, state.global_step)
        if state.is_world_process_zero and ckpt.is_dir():
            self.router.save_state(ckpt / STATE_DIR)
            if self.save_hook is not None:
                self.save_hook(ckpt, state)
        return control
