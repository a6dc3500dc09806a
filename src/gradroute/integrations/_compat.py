"""The compatibility seam: every private TRL / transformers / PEFT name gradroute reads or
patches, and the versions they were checked against.

gradroute reaches into trainers where no public API exists: it adds environment ids to the
output of TRL's ``_generate_and_score_completions``, reads the per-function rewards of
``_calculate_rewards`` (weighted by ``reward_weights``), keeps a dataset column through
transformers' ``_set_signature_columns_if_needed`` / ``_signature_columns``, appends scalars
to TRL's ``_metrics``, and mirrors ``Trainer``'s loss-scaling rules
(``model_accepts_loss_kwargs``, ``loss_is_scaled_for_ga``,
``current_gradient_accumulation_steps``), and wraps the stream of parameters TRL's vLLM
backend pushes at each weight sync (``trainer.vllm_generation._iter_named_params``;
:mod:`.vllm`). These names change between releases without notice, so they are all here, as
small functions, and nowhere else in :mod:`gradroute.integrations` (``tests/test_compat.py``
checks that). PEFT is used through its public API only
(``LoraConfig``, ``PeftModel``, ``LoraLayer.get_delta_weight``); it is version-checked
because the adapter format is.

:func:`check_versions` (called by :func:`gradroute.attach`) refuses versions outside
:data:`TESTED` with a :class:`~gradroute.errors.VersionError`, unless the environment variable
``GRADROUTE_ALLOW_UNTESTED=1`` is set (then a :class:`~gradroute.errors.GradrouteWarning`).
A private name missing on a trainer is the same typed error, naming the attribute and the
installed versions, at attach time rather than as an ``AttributeError`` inside training.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from ..errors import GradrouteWarning, VersionError

# package -> (lowest tested release, first untested release); releases compare by (major, minor, ...)
TESTED: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "trl": ((1, 16), (1, 17)),
    "transformers": ((5, 23), (5, 25)),
    "peft": ((0, 21), (0, 22)),
}
ALLOW_UNTESTED_ENV = "GRADROUTE_ALLOW_UNTESTED"


# ------------------------------------------------------------------------------ versions
def installed_version(package: str) -> str | None:
    """The installed distribution version of ``package`` (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _release(v: str) -> tuple[int, ...] | None:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(v).release  # "5.24.0.dev0" -> (5, 24, 0); "2.13.0+cpu" -> (2, 13, 0)
    except InvalidVersion:
        return None


def _dotted(t: tuple[int, ...]) -> str:
    return ".".join(map(str, t))


def tested_spec(package: str) -> str:
    """The pip requirement for the tested range, e.g. ``trl>=1.16,<1.17``."""
    lo, hi = TESTED[package]
    return f"{package}>={_dotted(lo)},<{_dotted(hi)}"


def is_tested(package: str, version: str | None) -> bool:
    """Whether ``version`` of ``package`` is in the tested range (not installed counts as tested)."""
    if version is None or package not in TESTED:
        return True
    lo, hi = TESTED[package]
    rel = _release(version)
    return rel is not None and lo <= rel < hi


def allow_untested() -> bool:
    return os.environ.get(ALLOW_UNTESTED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def versions_line() -> str:
    """``trl 1.16.0, transformers 5.24.0, peft 0.21.2`` (the installed ones)."""
    return ", ".join(f"{p} {installed_version(p) or 'not installed'}" for p in TESTED)


def _tested_line() -> str:
    return ", ".join(tested_spec(p) for p in TESTED)


def _pip(packages: Any = None) -> str:
    return "pip install " + " ".join(f"'{tested_spec(p)}'" for p in (packages or TESTED))


def check_versions(packages: tuple[str, ...] | None = None) -> None:
    """Refuse TRL / transformers / PEFT versions outside :data:`TESTED` (``VersionError``), or
    only warn when ``GRADROUTE_ALLOW_UNTESTED=1``."""
    found = {p: installed_version(p) for p in packages or tuple(TESTED)}
    bad = [p for p, v in found.items() if not is_tested(p, v)]
    if not bad:
        return
    problem = ("gradroute patches private methods of TRL/transformers, and these installed versions are "
               f"untested: {', '.join(f'{p} {found[p]} (tested: {tested_spec(p)})' for p in bad)}.")
    if allow_untested():
        warnings.warn(f"{problem} Proceeding because {ALLOW_UNTESTED_ENV} is set; check the run's "
                      "per-environment attribution before trusting it.", GradrouteWarning, stacklevel=3)
        return
    raise VersionError(problem, f"pin the tested versions ({_pip(bad)}), or set {ALLOW_UNTESTED_ENV}=1 to "
                               "proceed at your own risk.")


def _missing(trainer: Any, name: str, why: str) -> VersionError:
    return VersionError(
        f"{type(trainer).__name__} has no attribute {name!r}, which gradroute needs to {why} "
        f"(installed: {versions_line()}; tested with {_tested_line()}). This TRL/transformers "
        "version changed a private name gradroute relies on.",
        f"install the tested versions ({_pip()}), or report the versions above to gradroute.")


def require(trainer: Any, name: str, why: str) -> Any:
    """``trainer.<name>``, or a :class:`VersionError` naming it and the installed versions."""
    try:
        return getattr(trainer, name)
    except AttributeError:
        raise _missing(trainer, name, why) from None


def check_trainer(trainer: Any, rl: bool) -> None:
    """Every private name that carries a per-row column exists on ``trainer`` (the RL hooks for
    an RL trainer, the signature columns otherwise); a :class:`VersionError` naming the first
    one missing."""
    if rl:
        rl_hooks(trainer)
    else:
        why = "keep a dataset column through remove_unused_columns"
        for name in SIGNATURE_NAMES:
            require(trainer, name, why)


# ------------------------------------------------------------ TRL online RL (GRPO / RLOO)
GENERATE_AND_SCORE = "_generate_and_score_completions"  # rows in, tensor dict of the batch out
CALCULATE_REWARDS = "_calculate_rewards"  # rows in, rewards per function (rows x functions) out
RL_TRAINER_CLASSES = ("GRPOTrainer", "RLOOTrainer")


def generate_and_score_hook_name() -> str:
    return GENERATE_AND_SCORE


def calculate_rewards_hook_name() -> str:
    return CALCULATE_REWARDS


def is_rl_trainer(trainer: Any) -> bool:
    """A TRL online-RL trainer: a ``GRPOTrainer``/``RLOOTrainer`` (or subclass), or anything
    with both generation hooks. (A GRPOTrainer whose hooks were renamed is still RL, so that
    :func:`rl_hooks` refuses it instead of it being carried like an SFT trainer.)"""
    if any(c.__name__ in RL_TRAINER_CLASSES and c.__module__.split(".")[0] == "trl" for c in type(trainer).__mro__):
        return True
    return hasattr(trainer, GENERATE_AND_SCORE) and hasattr(trainer, CALCULATE_REWARDS)


def rl_hooks(trainer: Any) -> tuple[Any, Any]:
    """The bound ``(_generate_and_score_completions, _calculate_rewards)`` to wrap; checks
    ``reward_weights`` too, so that nothing is missing once training runs."""
    why = "add each completion's environment to the batch and read its reward"
    gen = require(trainer, GENERATE_AND_SCORE, why)
    calc = require(trainer, CALCULATE_REWARDS, why)
    require(trainer, "reward_weights", "weight the rewards per function like TRL does")
    return gen, calc


def reward_function_weights(trainer: Any) -> Any:
    """TRL's per-reward-function weights (a 1-D tensor)."""
    return require(trainer, "reward_weights", "weight the rewards per function like TRL does")


def batch_device(out: dict[str, Any]) -> Any:
    """The device of the batch ``_generate_and_score_completions`` returned."""
    ids = out.get("completion_ids") if isinstance(out, dict) else None
    if ids is None:
        raise VersionError(f"TRL's {GENERATE_AND_SCORE} returned no 'completion_ids' (installed: {versions_line()}; "
                          f"tested with {_tested_line()}).",
                          f"install the tested versions ({_pip()}).")
    return ids.device


# ------------------------------------------------------ transformers Trainer: columns
SIGNATURE_NAMES = ("_set_signature_columns_if_needed", "_signature_columns")


def signature_columns(trainer: Any) -> list[str]:
    """The columns ``remove_unused_columns`` keeps (filled in from the model's signature)."""
    why = "keep a dataset column through remove_unused_columns"
    require(trainer, SIGNATURE_NAMES[0], why)()
    return list(require(trainer, SIGNATURE_NAMES[1], why) or [])


def add_signature_column(trainer: Any, column: str) -> None:
    """Keep ``column`` through ``remove_unused_columns``."""
    cols = signature_columns(trainer)
    if column not in cols:
        trainer._signature_columns = [*cols, column]


def padding_free(trainer: Any) -> bool:
    """Whether an SFTTrainer set itself up padding-free (beyond ``args.padding_free``)."""
    return bool(getattr(trainer, "padding_free", False))


# ------------------------------------------------------ TRL metrics
def metrics_store(trainer: Any) -> Any:
    """TRL's train-metric lists (``trainer._metrics["train"]``: key -> list, averaged into each
    log), or None for trainers without one (plain ``Trainer``)."""
    m = getattr(trainer, "_metrics", None)
    return m["train"] if isinstance(m, dict) else None


# ------------------------------------------------------ transformers Trainer: loss scaling
def accepts_loss_kwargs(trainer: Any) -> bool:
    return bool(getattr(trainer, "model_accepts_loss_kwargs", False))


def grad_accum_steps(trainer: Any) -> int:
    """The accumulation steps of the current optimizer step (set by ``Trainer`` in training)."""
    return max(1, getattr(trainer, "current_gradient_accumulation_steps", 1))


def loss_process_factor(trainer: Any, num_items_in_batch: Any) -> int | None:
    """The factor ``Trainer.compute_loss`` multiplies the task loss by when tokens are averaged
    across devices (None when it does not)."""
    if getattr(trainer.args, "average_tokens_across_devices", False) and num_items_in_batch is not None \
            and (accepts_loss_kwargs(trainer) or getattr(trainer, "compute_loss_func", None)):
        tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
        return trainer.accelerator.num_processes // max(1, tp)
    return None


def loss_scaled_for_ga(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether ``Trainer.training_step`` leaves the loss undivided by the accumulation steps
    (the model normalized it over the whole window)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (accepts_loss_kwargs(trainer) and num_items_in_batch is not None) \
            or getattr(trainer, "compute_loss_func", None) is not None
    return bool(scaled)


# ------------------------------------------------------ TRL vLLM weight sync
VLLM_GENERATION = "vllm_generation"  # GRPOTrainer/RLOOTrainer (use_vllm=True): the VLLMGeneration backend
VLLM_NAMED_PARAMS = "_iter_named_params"  # VLLMGeneration: the (name, tensor) stream sync_weights pushes (both modes)
VLLM_DIST = "_dist"  # VLLMGeneration: its DistributedBackend (gather_params: ZeRO-3 gather, else a no-op)
# how VLLMGeneration renames the policy's parameters for vLLM (PEFT wrapper, FSDP/checkpoint wrappers)
VLLM_NAME_PREFIX = "base_model.model."
VLLM_NAME_DROPPED = (".base_layer", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "modules_to_save.default.")


def vllm_backend(trainer: Any) -> Any:
    """The trainer's vLLM generation backend (``trainer.vllm_generation``)."""
    return require(trainer, VLLM_GENERATION, "fold the routed policy into the weights pushed to vLLM")


def vllm_weight_stream(backend: Any) -> Any:
    """The backend's bound ``_iter_named_params``: every weight sync (colocate ``load_weights``,
    server ``update_named_params``) pushes what it yields."""
    return require(backend, VLLM_NAMED_PARAMS, "fold the routed policy into the weights pushed to vLLM")


def vllm_gather(backend: Any, params: list[Any]) -> Any:
    """A context in which ``params`` are whole (TRL's ZeRO-3 gather; a no-op otherwise)."""
    from contextlib import nullcontext

    dist = getattr(backend, VLLM_DIST, None)
    return dist.gather_params(params) if dist is not None else nullcontext()


def vllm_param_name(name: str) -> str:
    """The name vLLM receives for a parameter of the policy (``named_parameters()`` name)."""
    name = name.removeprefix(VLLM_NAME_PREFIX)
    for part in VLLM_NAME_DROPPED:
        name = name.replace(part, "")
    return name
