"""One torch thread, and pools of one-thread worker processes (the demo's and the claims
harness's ``jobs``)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_WORKER = {"on": False}  # set in worker processes


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread while the block runs (restored after).

    The experiments' numbers then do not depend on the machine's core count (float reductions split
    over threads round differently, and RL trajectories follow the round-off), and a loaded
    2-core machine runs them far faster: two competing torch threads ran ~25x slower than one.
    Parallelism comes from running independent arms as separate processes (``jobs``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _worker_init() -> None:
    """A worker process: one torch thread (set before torch is imported; see :func:`one_thread`);
    Ctrl-C is the parent's to handle (it terminates the workers)."""
    import signal

    os.environ.update({v: "1" for v in THREAD_VARS})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["on"] = True
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def worker_pool(jobs: int) -> Iterator[Any]:
    """A ``multiprocessing`` pool of ``jobs`` spawned worker processes with one torch thread each;
    an error or Ctrl-C in the parent terminates them (no queued task runs on)."""
    import multiprocessing

    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    os.environ.update({v: "1" for v in THREAD_VARS})  # inherited: set before a worker imports anything
    try:
        pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init)
    finally:
        for v, x in saved.items():
            if x is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = x
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


class InProcessPool:
    """A worker pool's ``apply_async`` for ``jobs=1``: each task runs at once, in this process."""

    class _Done:
        def __init__(self, value: Any):
            self.value = value

        def ready(self) -> bool:
            return True

        def get(self) -> Any:
            return self.value

    def apply_async(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self._Done(fn(*args))


def drain(pending: dict[Any, Any], done: Callable[[Any, Any], None], poll_s: float = 0.2) -> None:
    """Wait for the async results in ``pending`` (key -> result), calling ``done(key, value)`` as each
    finishes (it may add more); a task's error is raised here."""
    while pending:
        ready = [k for k, r in pending.items() if r.ready()]
        for k in ready:
            done(k, pending.pop(k).get())
        if not ready:
            time.sleep(poll_s)


class _Prefixed:
    """A text stream writing every line to ``stream`` with ``prefix`` before it; not a terminal,
    so progress comes as lines, never as tqdm bars."""

    def __init__(self, stream: Any, prefix: str):
        self.stream, self.prefix, self.partial = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text.replace("\r", "\n")).split("\n")
        for line in lines:
            if line.strip():
                self.stream.write(f"{self.prefix}{line.strip()}\n")
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def worker_output(label: str) -> Iterator[None]:
    """In a worker process: output lines prefixed with ``[label]`` (parallel workers stay readable),
    and a GradrouteError raised inside reaches the parent as the same error. Elsewhere: nothing."""
    if not _WORKER["on"]:
        yield
        return
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_Prefixed(st, f"   [{label}] ") for st in streams)
    try:
        yield  # a GradrouteError pickles as itself (GradrouteError.__reduce__)
    finally:
        sys.stdout, sys.stderr = streams
