"""``gradroute.attach``: one line added to a TRL (or transformers) training script.

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=ds)
    handle = gradroute.attach(trainer, subspace, env_column="env", policy=gradroute.HaltPolicy(...))
    trainer.train()

How the environment of every row reaches the backward pass:

- **GRPOTrainer / RLOOTrainer** (TRL 1.16): ``_generate_and_score_completions(inputs)`` gets
  the dataset rows (one per completion); gradroute adds a tensor of environment indices to
  its output. TRL's buffering (``shuffle_sequence_dict``, ``split_tensor_dict``) permutes and
  chunks every tensor together, so the ids stay aligned with the rows of each micro-batch;
  ``compute_loss`` then runs one forward over the micro-batch with the ids set for the
  attribution hooks. Rewards are read from ``_calculate_rewards`` (weighted like TRL does)
  for the per-environment mean reward (:mod:`.rewards`). These are private TRL methods: every
  private name is reached through :mod:`._compat`, which refuses untested TRL/transformers/PEFT
  versions (``GRADROUTE_ALLOW_UNTESTED=1`` to proceed anyway).
- **SFTTrainer / Trainer**: the column is added to the trainer's signature columns (so it
  survives ``remove_unused_columns``), a collator wrapper turns it into the id tensor, and
  ``compute_loss`` pops it before the model sees the batch. Packing and padding-free
  batching mix rows, so they are refused while attribution is on (:mod:`.columns`).

This module keeps :func:`attach`, its argument checks and the :class:`Handle`; the patch
registry is :mod:`._patches`, the ``compute_loss`` wrapper :mod:`.loss`, the log wrapper
:mod:`.logs`, concept anchoring :mod:`.anchoring`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, EnvColumnError, SubspaceError
from ..monitor import DriftMonitor, last_clean_checkpoint, load_log
from ..policy import HaltPolicy
from ..router import GradientRouter
from ..subspace import Subspace
from . import _compat
from ._patches import patch, undo
from .anchoring import LABEL_KEY, attach_anchoring
from .columns import (
    ENV_KEY,
    FLAG_KEY,
    RESERVED_COLUMNS,
    carry_column,
    dataset_envs,
    env_ids_encoder,
    env_name,
    refuse_packing,
)
from .logs import insert_callback, remove_callbacks, wrap_log
from .loss import add_to_loss, wrap_compute_loss
from .rewards import route_rl_envs

__all__ = ["ENV_KEY", "LABEL_KEY", "RESERVED_COLUMNS", "Handle", "attach", "attach_anchoring", "attach_comparator",
           "carry_column", "wrap_compute_loss"]


@dataclass
class Handle:
    """What :func:`attach` returns: the router, the monitor, and the adapter lifecycle."""

    trainer: Any
    router: GradientRouter
    monitor: DriftMonitor
    run_dir: Path

    @property
    def attribution(self) -> Any:
        return self.router.attribution

    @property
    def halted(self) -> dict[str, Any] | None:
        """The halt record, if the policy stopped the run."""
        return self.monitor.halt

    def save_adapter(self, path: str | Path, env: str | None = None, base: str = "modules", *,
                     lora_bias: str = "keep", base_name: str | None = None) -> Path:
        """Write the persona adapter (or ``env``'s share) as a plain PEFT LoRA.

        ``base="model"`` also writes the discarded model (trained minus the adapter) with the
        trainer's tokenizer under ``path/base`` and points ``base_model_name_or_path`` at it, so
        that ``AutoPeftModelForCausalLM.from_pretrained(path)`` gives the trained model and
        ``vllm serve path/base --enable-lora --lora-modules persona=path`` serves both.
        ``lora_bias="fold"`` writes a bias-free adapter (what vLLM loads); see
        :func:`gradroute.integrations.peft.save_adapter`."""
        from .peft import save_adapter

        tok = getattr(self.trainer, "processing_class", None)
        tok = tok if base == "model" and hasattr(tok, "save_pretrained") else None
        return save_adapter(self.router, path, env=env, base=base, lora_bias=lora_bias, base_name=base_name,
                            tokenizer=tok)

    def save_discarded(self, path: str | Path, env: str | None = None,
                       base_model_name_or_path: str | None = None) -> Path:
        """Write the trained policy minus the persona adapter (or one environment's share):
        a plain PEFT LoRA on the unchanged base for a LoRA policy, a full model otherwise
        (see :mod:`gradroute.integrations.discard`)."""
        from .discard import save_discarded

        return save_discarded(self.router, path, env=env, base_model_name_or_path=base_model_name_or_path)

    def discard(self, env: str | None = None) -> float:
        return self.router.discard(env)

    def merge(self) -> float:
        return self.router.merge()

    def log(self):
        """The run log as a DataFrame (see :func:`gradroute.load_log`)."""
        return load_log(self.run_dir)

    def last_clean_checkpoint(self) -> Path | None:
        return last_clean_checkpoint(self.run_dir)

    def detach(self) -> None:
        """Remove gradroute's hooks, wrappers and callbacks (the trainer is as before ``attach``)."""
        from .vllm import uninstall_vllm_sync

        self.router.detach()
        uninstall_vllm_sync(self.trainer)
        remove_callbacks(self.trainer)
        undo(self.trainer)
        self.monitor.close()


def attach(
    trainer: Any,
    subspace: Subspace,
    env_column: str | None = "env",
    policy: HaltPolicy | None = None,
    mode: str = "update",
    *,
    envs: Sequence[str] | None = None,
    run_dir: str | Path | None = None,
    fsync: bool = False,
    allow_missing_state: bool = False,
    quarantine: Any = None,
    quarantine_advantages: str = "keep",
    **router_kwargs: Any,
) -> Handle:
    """Route, attribute and monitor a ``GRPOTrainer``/``RLOOTrainer``/``SFTTrainer``/``Trainer``.

    ``env_column`` names the dataset column with each row's environment (None: no
    per-environment attribution); ``envs`` fixes the environment list (default: the column's
    distinct values). The log goes to ``run_dir`` (default: the trainer's ``output_dir``),
    where the checkpoints are too. Resuming from a checkpoint without gradroute's state raises
    unless ``allow_missing_state``. Extra keyword arguments go to :class:`GradientRouter`
    (``side``, ``targets``, ``embeddings``, ``spread``, ``adapter_lr_multiplier``, ...).

    ``quarantine`` (``mode="quarantine"``, :mod:`gradroute.router.modes.quarantine`): which rows
    train only the discardable quarantine adapter — a detector ``f(completions, rows) -> bools``
    called on every batch of rollouts (GRPOTrainer / RLOOTrainer; e.g. the environment's own
    exploit check), or a set of environment names (any trainer, with ``env_column``; read at
    every micro-batch, so a set changed during training — e.g. by a monitor — takes effect at once).
    ``quarantine_advantages="exclude"`` (GRPOTrainer, one process) recomputes the unflagged rows'
    advantages over their unflagged group-mates, so the base trains as if the flagged rollouts had
    never been sampled; an environment set is then read when each batch is generated. ``"keep"``
    (default) trains the unflagged rows on TRL's advantages, flagged group-mates included.
    """
    from .trainer import RouterCallback

    if not (hasattr(trainer, "callback_handler") and hasattr(trainer, "args") and hasattr(trainer, "model")):
        raise ConfigError(f"attach needs a transformers Trainer or TRL trainer, got {type(trainer).__name__}.",
                          "build the trainer first (GRPOTrainer(...), SFTTrainer(...), Trainer(...)), then attach it; "
                          "for a plain PyTorch loop use gradroute.GradientRouter.")
    if any(getattr(c, "_gradroute", False) and isinstance(c, RouterCallback)
                                                    for c in trainer.callback_handler.callbacks):
        raise ConfigError("gradroute is already attached to this trainer (attaching twice would count every step "
                          "twice and log each step twice).",
                          "keep the first handle, or call handle.detach() before attaching again.")
    _compat.check_versions()
    if isinstance(subspace, str | Path):
        subspace = Subspace.load(subspace)  # a typed FileFormatError if it is not a subspace directory
    elif not isinstance(subspace, Subspace):
        raise SubspaceError(f"subspace must be a gradroute.Subspace or the path of a saved one, got "
                            f"{type(subspace).__name__}.",
                            "pass gradroute.Subspace.load(path), a Subspace.from_* result, or the directory path.")
    if policy is not None and not isinstance(policy, HaltPolicy):
        hint = (f"pass policy=gradroute.HaltPolicy(**{policy!r})" if isinstance(policy, dict)
                else "pass policy=gradroute.HaltPolicy(max_adapter_norm=..., ...)")
        raise ConfigError(f"policy must be a gradroute.HaltPolicy, got {type(policy).__name__}.", hint + ".")
    if envs is not None:
        if isinstance(envs, str | bytes) or not isinstance(envs, Sequence | set | frozenset):
            raise EnvColumnError(f"envs must be a list of environment names, got {envs!r}.", "pass envs=[\"a\", \"b\"].")
        envs = [env_name(e, "envs=[...]") for e in envs]
    rl = _compat.is_rl_trainer(trainer)
    if env_column is not None and not rl:
        refuse_packing(trainer, "per-row environment attribution would mix environments",
                        "set packing=False and padding_free=False in the SFTConfig (or attach with env_column=None).")
    if env_column is not None:
        if not isinstance(env_column, str) or not env_column:
            raise EnvColumnError(f"env_column must be a column name, got {env_column!r}.",
                                 "pass the name of the dataset column holding each row's environment.")
        found = dataset_envs(trainer.train_dataset, env_column)
        if envs is None:
            envs = found
        if envs is None:
            raise EnvColumnError(
                "the training dataset does not list its columns (an iterable dataset?), so the "
                "environments cannot be read from it.",
                "pass envs=[...] with every environment name.",
            )
        missing = sorted(set(found or []) - {str(e) for e in envs})
        if missing:
            raise EnvColumnError(f"environments {missing} are in the data but not in envs={list(envs)}.",
                                 "add them to envs=[...] (or leave envs unset to take them from the column).")
        _compat.check_trainer(trainer, rl)  # the private names carrying the column exist (before any hook goes in)
    _check_quarantine(quarantine, mode, env_column, envs, rl)
    _check_quarantine_advantages(trainer, quarantine_advantages, mode, rl)
    _check_quarantine_actions(policy, quarantine)
    from .sharding import check_sharding

    check_sharding(trainer)  # DeepSpeed's optimizers step detached master weights: refused before any hook
    router = GradientRouter(trainer.model, subspace, mode=mode, envs=list(envs) if env_column else None,
                            **router_kwargs)
    if getattr(trainer.args, "use_vllm", False):  # rollouts from vLLM: push the routed policy, or refuse now
        from .vllm import install_vllm_sync

        try:
            install_vllm_sync(trainer, router)
        except Exception:
            router.detach()
            raise
    run_dir = Path(run_dir if run_dir is not None else trainer.args.output_dir)
    config = {"trainer": type(trainer).__name__, "env_column": env_column, "mode": mode,
              **({"quarantine_advantages": quarantine_advantages} if mode == "quarantine" else {}),
              "router_kwargs": {k: v for k, v in router_kwargs.items() if isinstance(v, int | float | str | bool | type(None))}}
    monitor = DriftMonitor(router, run_dir, policy, config=config, raise_on_halt=False, fsync=fsync)
    attribution = router.attribution

    if env_column is not None:
        ids_of = env_ids_encoder(attribution.vocab, env_column)
        if rl:
            route_rl_envs(trainer, router, env_column, ids_of)
        else:
            carry_column(trainer, env_column, ENV_KEY, lambda rows: ids_of(rows, "cpu"))

        def set_envs(env, inputs):
            # kept until the step ends (not just around compute_loss): with reentrant gradient
            # checkpointing the forward is recomputed during backward, after compute_loss returns
            attribution.set_batch(env)

        wrap_compute_loss(trainer, ENV_KEY, before=set_envs, pop=not rl)
    if quarantine is not None:
        _route_quarantine(trainer, router, quarantine, rl, quarantine_advantages, env_column)

    callback = RouterCallback(router, monitor, allow_missing_state=allow_missing_state)
    insert_callback(trainer, callback)
    wrap_log(trainer, callback)
    train = trainer.train

    def train_with_resume_path(*a, resume_from_checkpoint=None, **kw):
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(trainer.args.output_dir)
        callback.resume_from = str(path) if isinstance(path, str | Path) else None
        return train(*a, resume_from_checkpoint=resume_from_checkpoint, **kw)

    patch(trainer, "train", train_with_resume_path)
    return Handle(trainer=trainer, router=router, monitor=monitor, run_dir=run_dir)


def _check_quarantine(quarantine: Any, mode: str, env_column: str | None, envs: Any, rl: bool) -> None:
    if mode != "quarantine":
        if quarantine is not None:
            raise ConfigError(f"quarantine= routes flagged rows in mode='quarantine', not mode={mode!r}.",
                              "pass mode='quarantine' (or drop quarantine=).")
        return
    fix = ("pass quarantine=<detector(completions, rows) -> one bool per completion> (GRPO/RLOO), or "
           "quarantine={'env', ...} with env_column")
    if quarantine is None:
        raise ConfigError("mode='quarantine' needs to know which rows to quarantine.", fix + ".")
    if callable(quarantine):
        if not rl:
            raise ConfigError("a quarantine detector reads rollouts, which only GRPOTrainer / RLOOTrainer have.",
                              "pass quarantine={'env', ...} (flag whole environments) with env_column.")
        return
    if isinstance(quarantine, str | bytes) or not isinstance(quarantine, set | frozenset | list | tuple):
        raise ConfigError(f"quarantine must be a detector or a set of environment names, got {quarantine!r}.", fix + ".")
    if env_column is None:
        raise EnvColumnError("quarantine={...} flags rows by environment, but env_column is None.",
                             "pass env_column=<the column with each row's environment>.")
    unknown = sorted({str(e) for e in quarantine} - {str(e) for e in envs or ()})
    if unknown:
        raise EnvColumnError(f"quarantine names environments {unknown} that are not in the data ({list(envs or [])}).",
                             "name environments of the env column.")


def _check_quarantine_advantages(trainer: Any, advantages: Any, mode: str, rl: bool) -> None:
    """Before anything is attached: ``quarantine_advantages`` is known, used only where it means
    something, and ``"exclude"`` only where GRPO's advantages can be recomputed."""
    from ..router.modes.quarantine import ADVANTAGES

    if advantages not in ADVANTAGES:
        raise ConfigError(f"quarantine_advantages must be one of {ADVANTAGES}, got {advantages!r}.",
                          "pass 'exclude' (unflagged rows' baselines leave flagged rows out) or 'keep' (TRL's).")
    if advantages != "keep" and (mode != "quarantine" or not rl):
        raise ConfigError(f"quarantine_advantages={advantages!r} recomputes the GRPO advantages of quarantine mode's "
                          f"unflagged rows; here mode={mode!r} with {type(trainer).__name__}.",
                          "leave quarantine_advantages='keep' (or use mode='quarantine' with a GRPOTrainer).")
    if advantages == "exclude":
        from .rewards import _check_exclude

        _check_exclude(trainer)


def _check_quarantine_actions(policy: HaltPolicy | None, quarantine: Any) -> None:
    """A :class:`~gradroute.policy.QuarantineOnFlag` action must add to the very set the rows are
    flagged from (``quarantine=``): otherwise its flags would change nothing, silently."""
    from ..policy import QuarantineOnFlag

    if policy is None:
        return
    for action in (policy.action, *(r.action for r in policy.rules)):
        if isinstance(action, QuarantineOnFlag):
            from ..distributed import world_size

            if world_size() > 1:
                raise ConfigError("QuarantineOnFlag changes each process's quarantine set from its own monitor; with "
                                  "several processes they could disagree (one rank routing a row to the quarantine "
                                  "adapter, another to the base).",
                                  "use action='stop' (decided on rank 0) in multi-process runs.")
        if isinstance(action, QuarantineOnFlag) and action.envs is not quarantine:
            raise ConfigError("the policy's QuarantineOnFlag action adds to a set that is not attach's quarantine=; "
                              "its flags would route nothing.",
                              "pass the same set to both: flagged = set(); attach(..., mode='quarantine', "
                              "quarantine=flagged, policy=HaltPolicy(..., action=QuarantineOnFlag(flagged))).")


def _route_quarantine(trainer: Any, router: GradientRouter, quarantine: Any, rl: bool, advantages: str = "keep",
                      env_column: str | None = None) -> None:
    """Set the rows' quarantine flags before every ``compute_loss`` (None outside training: a
    training forward without flags is refused by the mode)."""
    if advantages != "keep" and not rl:
        raise ConfigError(f"quarantine_advantages={advantages!r} recomputes GRPO advantages; "
                          f"{type(trainer).__name__} has none.", "leave quarantine_advantages='keep'.")
    if not callable(quarantine) and advantages != "keep":  # flags fixed when the batch is generated
        names = quarantine

        def in_set(completions: Any, rows: Any) -> list[bool]:
            return [str(r[env_column]) in {str(e) for e in names} for r in rows]

        quarantine = in_set
    if callable(quarantine):
        from .rewards import route_rl_flags

        route_rl_flags(trainer, quarantine, advantages)
        wrap_compute_loss(trainer, FLAG_KEY, before=lambda flags, inputs: router.set_flags(flags), pop=False)
        return
    vocab = list(router.attribution.vocab)

    def set_flags(env: Any, inputs: Any) -> None:
        if env is None:
            router.set_flags(None)
            return
        names = {str(e) for e in quarantine}  # read now: a set changed during training counts from here
        router.set_flags([vocab[int(i)] in names for i in env.reshape(-1).tolist()])

    wrap_compute_loss(trainer, ENV_KEY, before=set_flags, pop=False)


def attach_comparator(trainer: Any, comparator: Any) -> Any:
    """Put a training-time comparator (:mod:`gradroute.comparators`: CAFT ablation, one-sided
    activation penalty, preventative steering) into a TRL / transformers trainer: its hooks go
    on the trainer's model and its loss term (the penalty's) is added in ``compute_loss``.
    Returns the comparator; ``comparator.remove()`` takes it off for inference."""
    comparator.attach(trainer.model)

    def add_loss(out: Any, value: Any, inputs: Any, kwargs: Any) -> Any:
        term = comparator.loss()
        if isinstance(term, float) and term == 0.0:
            return out
        return add_to_loss(out, term)

    wrap_compute_loss(trainer, "_gradroute_comparator", after=add_loss, pop=False)
    return comparator

