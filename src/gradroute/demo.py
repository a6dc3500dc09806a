"""Moved to :mod:`gradroute.experiments.demo` (the GRPO runner to :mod:`gradroute.experiments.grpo`,
the worker pool to :mod:`gradroute.experiments.workers`); this alias will be removed."""

from .experiments.config import QUICK, DemoConfig
from .experiments.demo import DEFAULT_MODE, DEFAULT_MULTIPLIER, ENVS, EXPLOITABLE, run_demo
from .experiments.grpo import grpo_run, pretrain
from .experiments.workers import THREAD_VARS, cores, drain, one_thread, worker_output, worker_pool

__all__ = ["DEFAULT_MODE", "DEFAULT_MULTIPLIER", "ENVS", "EXPLOITABLE", "QUICK", "THREAD_VARS", "DemoConfig", "cores",
           "drain", "grpo_run", "one_thread", "pretrain", "run_demo", "worker_output", "worker_pool"]
