"""Refuse DeepSpeed setups whose optimizer overwrites gradroute's edits of the weights.

gradroute acts on the model's weights in place after optimizer steps: update mode reads
``A_t = Uᵀ W_t − Uᵀ W_0`` off the new weights and writes ``W − U A`` when discarding; gradient
mode sets ``Uᵀ W ← Uᵀ W_0 + A_new`` after every step; activation mode re-pins the base's
persona coordinates, ``P ← P + U (Uᵀ P_0 − Uᵀ P)``, after every step. Such an edit lasts only
if the optimizer's next step starts from the model's weights. Under DeepSpeed it does not
(read in DeepSpeed 0.19.8's source):

- **ZeRO stage 1 and 2** (``deepspeed/runtime/zero/stage_1_and_2.py``): at initialization each
  rank clones its partition of the flattened weights into a detached master copy
  (``single_partition_of_fp32_groups``: ``parallel_partitioned_bit16_groups[i][partition_id]
  .detach().clone().to(master dtype)`` — a clone even when the weights are float32); the wrapped
  torch optimizer steps that copy, and ``step()`` then copies it back over the model's weights
  (``bit16_partitions[partition_id].data.copy_(fp32_partition.data)``) and all-gathers the
  partitions. The master copy never sees an in-place edit of the weights, so every edit is
  overwritten at the next step: the adapter/base split silently stops holding.
- **ZeRO stage 3** (``stage3.py``, ``partition_parameters.py``): the same detached master
  partitions (``fp32_partitioned_groups_flat``), and the parameters themselves are partitioned:
  outside a forward pass ``param.data`` is an empty placeholder (``ds_status`` NOT_AVAILABLE,
  the shard in ``ds_tensor``), so ``Uᵀ W`` cannot even be read without ``GatheredParameters``.
  Parameters carry ``ds_id``, ``ds_status`` and ``ds_numel``.
- **No ZeRO, bf16/fp16** (``bf16_optimizer.py``, ``fp16/fused_optimizer.py``): the optimizer
  again steps detached float32 copies (``fp32_groups_flat_partition`` / ``fp32_groups_flat``)
  and copies them back. Only DeepSpeed without ZeRO and without mixed precision steps the
  model's own parameters; it is not refused.

Hence :func:`check_sharding` raises :class:`~gradroute.errors.ConfigError` for ZeRO stage >= 1
and for stage 0 with bf16/fp16 (or where the stage or precision cannot be read), naming where it
found DeepSpeed. DDP and FSDP2 step the model's own (sharded) parameters and are not refused here.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..distributed import zero3_attrs
from ..errors import ConfigError


@dataclass(frozen=True)
class DeepSpeedSetup:
    """What :func:`deepspeed_setup` found: ZeRO ``stage`` (None: unknown), whether the optimizer
    keeps mixed-precision master weights (None: unknown), and where it was found."""

    stage: int | None
    mixed_precision: bool | None
    source: str

    @property
    def overwrites_weights(self) -> bool:
        """True unless DeepSpeed is known to step the model's own parameters (no ZeRO, no mixed precision)."""
        return not (self.stage == 0 and self.mixed_precision is False)


def _stage(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _from_config(cfg: Any, source: str) -> DeepSpeedSetup:
    """Read a DeepSpeed config (dict, or a JSON file's path): ``zero_optimization.stage`` and
    ``bf16.enabled`` / ``fp16.enabled`` ("auto" counts as unknown)."""
    if isinstance(cfg, str | Path) and Path(cfg).is_file():
        try:
            cfg = json.loads(Path(cfg).read_text())
        except (OSError, ValueError):
            cfg = None
    if not isinstance(cfg, dict):
        return DeepSpeedSetup(None, None, source)
    stage = _stage((cfg.get("zero_optimization") or {}).get("stage", 0))
    flags = [(cfg.get(k) or {}).get("enabled", False) for k in ("bf16", "fp16")]
    mixed = True if any(f is True for f in flags) else (False if all(f is False for f in flags) else None)
    return DeepSpeedSetup(stage, mixed, source)


def _from_plugin(plugin: Any, source: str) -> DeepSpeedSetup:
    """accelerate's ``DeepSpeedPlugin``: ``zero_stage`` and its (possibly resolved) config."""
    found = _from_config(getattr(plugin, "deepspeed_config", None), source)
    stage = _stage(getattr(plugin, "zero_stage", None))
    return DeepSpeedSetup(stage if stage is not None else found.stage, found.mixed_precision, source)


def _is_deepspeed(distributed_type: Any) -> bool:
    """accelerate's ``DistributedType.DEEPSPEED`` (an enum whose value is ``"DEEPSPEED"``) or that string."""
    return str(getattr(distributed_type, "value", distributed_type)).upper() == "DEEPSPEED"


def _from_state(state: Any, source: str) -> DeepSpeedSetup | None:
    """An accelerate ``AcceleratorState``-like object."""
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None:
        return _from_plugin(plugin, source)
    if _is_deepspeed(getattr(state, "distributed_type", None)):
        return DeepSpeedSetup(None, None, source)
    return None


def _from_model(model: Any) -> DeepSpeedSetup | None:
    """A ``DeepSpeedEngine`` among the model's wrappers, or ZeRO-3 attributes on its parameters."""
    m = model
    for _ in range(8):
        if m is None:
            break
        stage_fn = getattr(m, "zero_optimization_stage", None)
        if type(m).__name__ == "DeepSpeedEngine" or callable(stage_fn):
            stage = _stage(stage_fn()) if callable(stage_fn) else None
            flags = [bool(f()) for f in (getattr(m, n, None) for n in ("bfloat16_enabled", "fp16_enabled"))
                     if callable(f)]
            mixed = True if any(flags) else (False if len(flags) == 2 else None)
            return DeepSpeedSetup(stage, mixed, f"the model is wrapped in a {type(m).__name__}")
        m = getattr(m, "module", None) or (m.get_base_model() if callable(getattr(m, "get_base_model", None)) else None)
    if isinstance(model, torch.nn.Module):
        for name, p in model.named_parameters():
            attrs = zero3_attrs(p)
            if attrs:
                return DeepSpeedSetup(3, None, f"parameter {name!r} carries ZeRO-3 attributes ({', '.join(attrs)})")
    return None


def _from_environment() -> DeepSpeedSetup | None:
    """``accelerate launch --use_deepspeed`` (environment) or an initialized global accelerate state."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1", "yes"):
        cfg = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        found = _from_config(cfg, "ACCELERATE_USE_DEEPSPEED=true") if cfg != "none" else None
        stage = _stage(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")) if found is None or found.stage is None else found.stage
        return DeepSpeedSetup(stage if stage is not None else 2, found.mixed_precision if found else None,
                              "ACCELERATE_USE_DEEPSPEED=true")
    if "accelerate" in sys.modules:  # only an accelerate already in use can hold a DeepSpeed state
        try:
            from accelerate.state import AcceleratorState, is_initialized
        except ImportError:
            return None
        if is_initialized():
            return _from_state(AcceleratorState(), "the accelerate state (distributed_type DEEPSPEED)")
    return None


def deepspeed_setup(trainer_or_model: Any) -> DeepSpeedSetup | None:
    """The DeepSpeed setup ``trainer_or_model`` trains under, or None.

    Looks, in order, at a trainer's ``accelerator.state`` (``distributed_type``,
    ``deepspeed_plugin``), ``is_deepspeed_enabled`` and ``args.deepspeed`` /
    ``args.deepspeed_plugin``; at the model (a trainer's ``model``): a ``DeepSpeedEngine`` wrapper
    (``zero_optimization_stage()``) or ZeRO-3 parameter attributes (``ds_id``, ``ds_status``,
    ``ds_numel``); then at ``accelerate launch``'s environment and the global accelerate state."""
    obj = trainer_or_model
    accelerator = getattr(obj, "accelerator", None)
    state = getattr(accelerator, "state", None)
    if state is not None:
        found = _from_state(state, "the trainer's accelerator (distributed_type DEEPSPEED)")
        if found is not None:
            return found
    args = getattr(obj, "args", None)
    if getattr(args, "deepspeed_plugin", None) is not None:
        return _from_plugin(args.deepspeed_plugin, "the trainer's args.deepspeed_plugin")
    if getattr(args, "deepspeed", None):
        return _from_config(args.deepspeed, "the trainer's args.deepspeed")
    if getattr(obj, "is_deepspeed_enabled", False) is True:
        return DeepSpeedSetup(None, None, "trainer.is_deepspeed_enabled")
    model = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "model", None)
    found = _from_model(model)
    return found if found is not None else _from_environment()


def check_sharding(trainer_or_model: Any) -> None:
    """Raise :class:`~gradroute.errors.ConfigError` when ``trainer_or_model`` trains under a
    DeepSpeed setup whose optimizer steps detached master weights (ZeRO stage 1, 2, 3; stage 0
    with bf16/fp16; or a stage that cannot be read): gradroute's in-place edits of the weights
    after each step would be overwritten (see the module docstring). DDP, FSDP2 and plain
    single-process training pass."""
    found = deepspeed_setup(trainer_or_model)
    if found is None or not found.overwrites_weights:
        return
    if found.stage is None:
        what = "DeepSpeed (ZeRO stage unknown)"
    elif found.stage == 0 and found.mixed_precision:
        what = "DeepSpeed without ZeRO but with bf16/fp16 master weights"
    elif found.stage == 0:
        what = "DeepSpeed without ZeRO whose bf16/fp16 setting cannot be read (e.g. 'auto')"
    else:
        what = f"DeepSpeed ZeRO stage {found.stage}"
    why = ("its parameters are partitioned (empty outside forward) and its optimizer steps detached float32 master "
           "partitions" if found.stage == 3 else
           "its optimizer steps detached master copies of the weights and copies them back over the model after "
           "every step")
    raise ConfigError(
        f"gradroute cannot route a model trained under {what} ({found.source}): {why}, so the edits gradroute makes "
        "to the model's weights in place (re-pinning the base's persona coordinates Uᵀ W after each step, writing "
        "W − U A on discard) would be overwritten at the next step and the adapter/base split would silently stop "
        "holding.",
        "train with DDP or FSDP2 (accelerate's FSDP plugin with fsdp_version=2), which step the model's own "
        "parameters; or DeepSpeed without ZeRO in float32 (zero_optimization.stage 0, bf16/fp16 disabled).")
