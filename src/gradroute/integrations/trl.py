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
  for the per-environment mean reward. These are private TRL methods: the supported range
  is pinned in pyproject and tested.
- **SFTTrainer / Trainer**: the column is added to the trainer's signature columns (so it
  survives ``remove_unused_columns``), a collator wrapper turns it into the id tensor, and
  ``compute_loss`` pops it before the model sees the batch. Packing and padding-free
  batching mix rows, so they are refused while attribution is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, EnvColumnError, PackingError, SubspaceError
from ..monitor import DriftMonitor, last_clean_checkpoint, load_log
from ..policy import HaltPolicy
from ..router import GradientRouter
from ..subspace import Subspace

ENV_KEY = "gradroute_env_ids"
# columns TRL/transformers use themselves, and reward-function keyword arguments TRL reserves
RESERVED_COLUMNS = frozenset({
    "prompt", "completion", "completion_ids", "environment", "input_ids", "attention_mask", "labels",
    "messages", "images", "image", "position_ids", "seq_lengths", "completion_mask", "assistant_masks",
    "trainer_state", "log_extra", "log_metric", "environments", "prompts", "completions", ENV_KEY,
})


def _is_rl(trainer: Any) -> bool:
    return hasattr(trainer, "_generate_and_score_completions") and hasattr(trainer, "_calculate_rewards")


def _refuse_packing(trainer: Any, what: str, fix: str) -> None:
    """Per-row columns cannot survive packing / padding-free batching (rows share a sequence)."""
    args = trainer.args
    if getattr(args, "packing", False) or getattr(args, "padding_free", False) or getattr(trainer, "padding_free", False):
        raise PackingError(f"packing / padding-free batching puts several rows into one sequence, so {what}.", fix)


def _check_column(dataset: Any, column: str, error: type, fix: str) -> bool:
    """Refuse reserved names and columns the dataset lacks; False if the dataset lists no columns."""
    if column in RESERVED_COLUMNS:
        raise error(f"{column!r} is reserved by TRL/transformers.", "rename the column and pass its new name.")
    names = getattr(dataset, "column_names", None)
    if names is None:
        return False
    if column not in names:
        raise error(f"the training dataset has no column {column!r} (it has {list(names)}).", fix)
    return True


def _env_name(value: Any, where: str) -> str:
    """An environment name from a column value; None, NaN and empty values are refused."""
    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip()):
        raise EnvColumnError(f"{where} has no environment (its env value is {value!r}); it would be counted as an "
                             f"environment named {str(value)!r}.",
                             "fill in every row's environment (or drop those rows) before training.")
    if isinstance(value, list | dict | tuple | set):
        raise EnvColumnError(f"{where} has environment {value!r}, not a single name.",
                             "give each row one environment name (a string).")
    return str(value)


def _dataset_envs(dataset: Any, column: str) -> list[str] | None:
    if not _check_column(dataset, column, EnvColumnError,
                         "add a column naming each row's environment, or pass env_column=<its name>."):
        return None
    return sorted({_env_name(v, f"row {i} of the training dataset") for i, v in enumerate(dataset[column])})


def carry_column(trainer: Any, column: str, key: str, encode: Any) -> None:
    """Make a dataset column reach ``compute_loss`` as ``inputs[key]`` (SFTTrainer / Trainer).

    The column is kept through ``remove_unused_columns`` (added to the signature columns) and
    the collator is wrapped: ``encode(features) -> tensor`` builds the batch tensor from the
    rows, and the column is removed before the original collator sees them."""
    trainer._set_signature_columns_if_needed()
    if column not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, column]
    collate = trainer.data_collator

    def collator(features, *a, **kw):
        value = encode(features)
        batch = collate([{k: v for k, v in f.items() if k != column} for f in features], *a, **kw)
        batch[key] = value
        return batch

    _patch(trainer, "data_collator", collator)


def wrap_compute_loss(trainer: Any, key: str, *, before: Any = None, after: Any = None, pop: bool = True) -> None:
    """Wrap ``trainer.compute_loss``: read ``inputs[key]`` (removed before the model sees the
    batch when ``pop``), call ``before(value, inputs)`` first, ``after(loss_or_tuple, value,
    inputs, kwargs)`` on the result; ``before`` may return a cleanup callable."""
    compute_loss = trainer.compute_loss

    def wrapped(model, inputs, *a, **kw):
        value = inputs.get(key) if isinstance(inputs, dict) else None
        seen = inputs
        if value is not None and pop:
            inputs = {k: v for k, v in inputs.items() if k != key}
        cleanup = before(value, seen) if before is not None else None
        try:
            out = compute_loss(model, inputs, *a, **kw)
        finally:
            if callable(cleanup):
                cleanup()
        return after(out, value, seen, kw) if after is not None else out

    _patch(trainer, "compute_loss", wrapped)


def _insert_callback(trainer: Any, callback: Any) -> None:
    callback._gradroute = True
    # first, so that its additions to `logs` reach the reporting callbacks
    trainer.callback_handler.callbacks.insert(0, callback)


def _metrics_sink(trainer: Any) -> Any:
    if hasattr(trainer, "_metrics") and isinstance(getattr(trainer, "_metrics"), dict):
        def sink(metrics: dict[str, float]) -> None:
            for k, v in metrics.items():
                trainer._metrics["train"][k].append(v)
        return sink
    return None


def _wrap_log(trainer: Any, callback: Any) -> None:
    """Add the monitor's scalars to every training log inside ``trainer.log``.

    ``Trainer.log`` hands the logs to the callbacks, reporters included, so values added
    here reach W&B/TensorBoard/JSON whatever the callback order. They are not routed through
    TRL's ``_metrics``, which averages everything over the ``logging_steps`` window: each
    logged value is that of the logged step, counts are summed over the window
    (:meth:`gradroute.DriftMonitor.metrics`)."""
    log = trainer.log

    def wrapped(logs, *a, **kw):
        if isinstance(logs, dict) and "loss" in logs:  # a training log (evaluation logs say eval_loss)
            logs.update(callback.log_metrics())
        return log(logs, *a, **kw)

    _patch(trainer, "log", wrapped)
    callback.log_wrapped = True


def _patch(trainer: Any, name: str, new: Any) -> None:
    """Replace ``trainer.<name>``, remembering the original so :meth:`Handle.detach` can restore it."""
    undo = trainer.__dict__.setdefault("_gradroute_undo", [])
    undo.append((name, trainer.__dict__.get(name, _MISSING)))
    setattr(trainer, name, new)


_MISSING = object()


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
        self.router.detach()
        t = self.trainer
        t.callback_handler.callbacks = [c for c in t.callback_handler.callbacks if not getattr(c, "_gradroute", False)]
        for name, original in reversed(t.__dict__.pop("_gradroute_undo", [])):
            if original is _MISSING:
                t.__dict__.pop(name, None)
            else:
                setattr(t, name, original)
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
    **router_kwargs: Any,
) -> Handle:
    """Route, attribute and monitor a ``GRPOTrainer``/``RLOOTrainer``/``SFTTrainer``/``Trainer``.

    ``env_column`` names the dataset column with each row's environment (None: no
    per-environment attribution); ``envs`` fixes the environment list (default: the column's
    distinct values). The log goes to ``run_dir`` (default: the trainer's ``output_dir``),
    where the checkpoints are too. Resuming from a checkpoint without gradroute's state raises
    unless ``allow_missing_state``. Extra keyword arguments go to :class:`GradientRouter`
    (``side``, ``targets``, ``embeddings``, ``spread``, ``adapter_lr_multiplier``, ...).
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
        envs = [_env_name(e, "envs=[...]") for e in envs]
    rl = _is_rl(trainer)
    if env_column is not None and not rl:
        _refuse_packing(trainer, "per-row environment attribution would mix environments",
                        "set packing=False and padding_free=False in the SFTConfig (or attach with env_column=None).")
    if env_column is not None:
        if not isinstance(env_column, str) or not env_column:
            raise EnvColumnError(f"env_column must be a column name, got {env_column!r}.",
                                 "pass the name of the dataset column holding each row's environment.")
        found = _dataset_envs(trainer.train_dataset, env_column)
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
    router = GradientRouter(trainer.model, subspace, mode=mode, envs=list(envs) if env_column else None,
                            **router_kwargs)
    run_dir = Path(run_dir if run_dir is not None else trainer.args.output_dir)
    config = {"trainer": type(trainer).__name__, "env_column": env_column, "mode": mode,
              "router_kwargs": {k: v for k, v in router_kwargs.items() if isinstance(v, int | float | str | bool | type(None))}}
    monitor = DriftMonitor(router, run_dir, policy, config=config, raise_on_halt=False, fsync=fsync)
    attribution = router.attribution

    if env_column is not None:
        index = {e: i for i, e in enumerate(attribution.vocab)}

        def ids_of(rows: Sequence[dict[str, Any]], device: Any) -> torch.Tensor:
            try:
                return torch.tensor([index[_env_name(r[env_column], "a training row")] for r in rows],
                                    dtype=torch.long, device=device)
            except KeyError as e:
                raise EnvColumnError(f"a row has environment {e} or lacks the column {env_column!r}.",
                                     "give every row one of the declared environments.") from None

        if rl:
            warned_nonfinite: set[str] = set()
            gen = trainer._generate_and_score_completions
            calc = trainer._calculate_rewards

            def generate_and_score(inputs, *a, **kw):
                out = gen(inputs, *a, **kw)
                if trainer.model.training:
                    out[ENV_KEY] = ids_of(inputs, out["completion_ids"].device)
                return out

            def calculate_rewards(inputs, *a, **kw):
                rpf = calc(inputs, *a, **kw)
                if trainer.model.training:
                    w = trainer.reward_weights.to(rpf.device)
                    weighted = rpf * w.unsqueeze(0)
                    total = weighted.nansum(dim=1)
                    # a reward function returns None (NaN here) for rows it does not apply to; a row
                    # is non-finite when no function scored it, or when one gave Inf/NaN arithmetic
                    bad = torch.isnan(weighted).all(dim=1) | torch.isinf(weighted).any(dim=1)
                    # TRL gathers the rewards of every process; this rank's rows are its slice
                    from ..distributed import rank

                    if total.shape[0] != len(inputs):
                        start = rank() * len(inputs)
                        total = total[start : start + len(inputs)]
                        bad = bad[start : start + len(inputs)]
                    names = [_env_name(r[env_column], "a training row") for r in inputs]
                    values = [float("nan") if b else t for t, b in zip(total.tolist(), bad.tolist())]
                    attribution.record_rewards(names, values)  # NaN rewards are left out of the means
                    if bool(bad.any()):
                        counts: dict[str, int] = {}
                        for name, b in zip(names, bad.tolist()):
                            if b:
                                counts[name] = counts.get(name, 0) + 1
                        monitor.count_nonfinite_rewards(counts)
                        new = sorted(set(counts) - warned_nonfinite)
                        if new:
                            import warnings

                            from ..errors import GradrouteWarning

                            warned_nonfinite.update(new)
                            warnings.warn(
                                f"NaN/None rewards in environment(s) {new} ({counts}): they are left out of the "
                                "mean reward (TRL counts them as 0) and counted in the log as nonfinite_rewards; "
                                "HaltPolicy(max_nonfinite_rewards=N) halts on them.", GradrouteWarning, stacklevel=2)
                return rpf

            _patch(trainer, "_generate_and_score_completions", generate_and_score)
            _patch(trainer, "_calculate_rewards", calculate_rewards)
        else:
            carry_column(trainer, env_column, ENV_KEY, lambda rows: ids_of(rows, "cpu"))

        def set_envs(env, inputs):
            # kept until the step ends (not just around compute_loss): with reentrant gradient
            # checkpointing the forward is recomputed during backward, after compute_loss returns
            attribution.set_batch(env)

        wrap_compute_loss(trainer, ENV_KEY, before=set_envs, pop=not rl)

    callback = RouterCallback(router, monitor, allow_missing_state=allow_missing_state)
    _insert_callback(trainer, callback)
    _wrap_log(trainer, callback)
    train = trainer.train

    def train_with_resume_path(*a, resume_from_checkpoint=None, **kw):
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(trainer.args.output_dir)
        callback.resume_from = str(path) if isinstance(path, str | Path) else None
        return train(*a, resume_from_checkpoint=resume_from_checkpoint, **kw)

    _patch(trainer, "train", train_with_resume_path)
    return Handle(trainer=trainer, router=router, monitor=monitor, run_dir=run_dir)


LABEL_KEY = "gradroute_concept_labels"


def attach_anchoring(trainer: Any, anchoring: Any, label_column: str = "concepts") -> Any:
    """Add a concept-anchoring regularizer to a ``Trainer``/``SFTTrainer``'s loss.

    Each row's ``label_column`` holds its concept labels: ``{label: probability}``, a list with
    one value per ``anchoring.label_names``, a label name, or None (unlabelled). The labels
    travel with the batch (the same column mechanism as :func:`attach`), and the loss becomes
    ``task_loss + anchoring.loss(labels, mask=attention_mask, step=global_step)``; the terms'
    values go to the trainer's logs as ``anchoring/<term>/<layer>``. Packing and
    padding-free batching are refused (they mix rows).
    """
    from transformers import TrainerCallback

    from ..errors import LabelError

    if _is_rl(trainer):
        raise LabelError("attach_anchoring is for SFT/pre-training trainers (Trainer, SFTTrainer).",
                         "use gradroute.attach for RL trainers.")
    _refuse_packing(trainer, "per-row concept labels would leak across samples",
                    "set packing=False and padding_free=False.")
    _check_column(trainer.train_dataset, label_column, LabelError,
                  "add a column with each row's concept labels, or pass label_column=<its name>.")
    names = list(anchoring.label_names)

    def encode(rows):
        out = torch.zeros(len(rows), len(names))
        for i, r in enumerate(rows):
            v = r.get(label_column)
            if v is None:
                continue
            if isinstance(v, str):
                v = {v: 1.0}
            if isinstance(v, dict):
                for k_, p in v.items():
                    if k_ not in names:
                        raise LabelError(f"row label {k_!r} is not among {names}.")
                    out[i, names.index(k_)] = float(p)
            else:
                vals = list(v)
                if len(vals) != len(names):
                    raise LabelError(f"a row has {len(vals)} label values; expected {len(names)} ({names}).")
                out[i] = torch.tensor([float(x) for x in vals])
        return out

    carry_column(trainer, label_column, LABEL_KEY, encode)

    def add_loss(out, labels, inputs, kw):
        if not torch.is_grad_enabled() or not trainer.model.training:
            anchoring.capture.clear()  # evaluation / prediction: no regularizer
            return out
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        reg = anchoring.loss(labels, mask=mask, step=trainer.state.global_step)
        # Trainer.compute_loss scales the task loss by the number of processes when tokens are
        # averaged across devices; the regularizer must be scaled alike to keep its weight
        if getattr(trainer.args, "average_tokens_across_devices", False) and kw.get("num_items_in_batch") is not None \
                and (getattr(trainer, "model_accepts_loss_kwargs", False) or getattr(trainer, "compute_loss_func", None)):
            tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
            reg = reg * (trainer.accelerator.num_processes // max(1, tp))
        # Trainer divides the loss by the accumulation steps only when the model did not
        # normalize it over the whole accumulation window (num_items_in_batch); match it
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and kw.get("num_items_in_batch") is not None) \
                or getattr(trainer, "compute_loss_func", None) is not None
        if scaled:
            reg = reg / max(1, getattr(trainer, "current_gradient_accumulation_steps", 1))
        if isinstance(out, tuple):
            return (out[0] + reg.to(out[0].device), *out[1:])
        return out + reg.to(out.device)

    wrap_compute_loss(trainer, LABEL_KEY, after=add_loss)
    sink = _metrics_sink(trainer)

    class AnchoringLogs(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kw):
            if sink is not None:
                sink({f"anchoring/{k}": v for k, v in anchoring.last.items()})
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if sink is None and logs is not None and "loss" in logs:
                logs.update({f"anchoring/{k}": v for k, v in anchoring.last.items()})
            return control

    _insert_callback(trainer, AnchoringLogs())
    return anchoring


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
        if isinstance(out, tuple):
            return (out[0] + term, *out[1:])
        return out + term

    wrap_compute_loss(trainer, "_gradroute_comparator", after=add_loss, pop=False)
    return comparator

