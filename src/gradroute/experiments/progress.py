"""The experiments' own output: progress (a tqdm bar on a terminal, else lines) and the libraries'
noise off."""

from __future__ import annotations

import contextlib
import functools
import sys
import time
import warnings
from collections.abc import Iterator

_PROGRESS = {"on": True}  # whether training loops report progress (set by showing_progress)


def progress_on() -> bool:
    """Whether training loops report progress now (see :func:`showing_progress`)."""
    return _PROGRESS["on"]


@contextlib.contextmanager
def showing_progress(on: bool) -> Iterator[None]:
    """Training loops started in the block report progress if ``on`` (restored after)."""
    before = _PROGRESS["on"]
    _PROGRESS["on"] = bool(on)
    try:
        yield
    finally:
        _PROGRESS["on"] = before


def _is_tty() -> bool:
    return sys.stderr.isatty()


class Ticker:
    """Progress for a loop of ``total`` steps: a tqdm bar on a terminal, else a line every tenth
    of the way and at least every ``every_s`` seconds (so that a log or CI shows the run is alive
    and how far it is)."""

    def __init__(self, label: str, total: int, enabled: bool = True, every_s: float = 30.0, start: int = 0):
        self.label, self.total, self.enabled, self.start = label, max(1, int(total)), enabled, int(start)
        self.t0 = self.last = time.time()
        self.every_s = every_s
        self.every = max(1, self.total // 10)
        self.bar = None
        if enabled and _is_tty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, desc=label, leave=False)

    def update(self, step: int, note: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(note, refresh=True)
        elif step % self.every == 0 or step == self.total or time.time() - self.last >= self.every_s:
            self.last = time.time()
            el = self.last - self.t0
            done = step - self.start
            eta = el / done * (self.total - step) if done > 0 else 0.0
            print(f"   {self.label}: step {step}/{self.total}{', ' + note if note else ''} "
                  f"({el:.0f} s, ~{eta:.0f} s left)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def trainer_ticker(label: str, total: int):
    """A TrainerCallback reporting optimizer steps through :class:`Ticker` (when
    :func:`progress_on` at the start of training)."""
    from transformers import TrainerCallback

    class _Cb(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t = Ticker(label, args.max_steps or total, _PROGRESS["on"], start=state.global_step)

        def on_step_end(self, args, state, control, **kw):
            self.t.update(state.global_step)

        def on_train_end(self, args, state, control, **kw):
            self.t.close()
            if _PROGRESS["on"] and state.global_step < self.t.total:
                print(f"   {label}: stopped at step {state.global_step}/{self.t.total}", flush=True)

    return _Cb()


@contextlib.contextmanager
def library_noise_off() -> Iterator[None]:
    """The experiments' own output only: no transformers/TRL FutureWarnings or deprecation notes, no
    "Writing model shards" bars, no datasets bars, no per-crossing drift warnings (the reports
    list the crossings). Restored on exit, so that importing code keeps its settings."""
    import transformers

    from ..errors import GradrouteWarning
    from ..integrations.transformers import library_bars_off

    with warnings.catch_warnings(), library_bars_off():
        for category in (FutureWarning, DeprecationWarning, UserWarning, GradrouteWarning):
            warnings.filterwarnings("ignore", category=category)
        transformers.utils.logging.set_verbosity_error()
        yield


def quietly(fn):
    """Decorator: ``fn`` runs with :func:`library_noise_off`, reporting progress as its
    ``progress`` argument (default True) says."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import inspect

        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        with showing_progress(bool(bound.arguments.get("progress", True))), library_noise_off():
            return fn(*args, **kwargs)

    return wrapper
