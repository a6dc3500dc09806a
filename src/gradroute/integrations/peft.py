"""PEFT: the router's adapter as a standard LoRA that plain PEFT loads, merges and drops.

PEFT's LoRA computes ``base(x) + B(A(x)) · lora_alpha / r``; gradroute writes ``r = k`` and
``lora_alpha = r`` per module (``rank_pattern``/``alpha_pattern`` where ranks differ), so the
scaling is 1 and, with the router's coordinates C (see :mod:`gradroute.plan` for the axes):

==================  =========================  =========================
routed module       lora_A (r x in)            lora_B (out x r)
==================  =========================  =========================
Linear writer       C            (k x d_in)    U (frozen basis)
Conv1D writer       Cᵀ           (k x d_in)    U   (``fan_in_fan_out``)
Linear reader       Vᵀ (frozen)                C            (d_out x k)
Conv1D reader       Vᵀ (frozen)                Cᵀ           (d_out x k)
Embedding           lora_embedding_A = Cᵀ      lora_embedding_B = U
writer bias         —                          lora_B.bias = U c_b  (``lora_bias=True``)
==================  =========================  =========================

so ``get_delta_weight()`` equals the router's ``U C`` exactly.

Serving (``adapter_config.json``): ``task_type`` is ``"CAUSAL_LM"`` (``AutoPeftModelForCausalLM``
works), ``lora_alpha / r = 1`` for every module (vLLM applies one scaling ``lora_alpha / r``
to all modules and pads ranks itself, so ``rank_pattern`` does not change what it computes),
and ``base_model_name_or_path`` names the model the adapter fits: the trained model minus the
adapter, i.e. the discarded model. With ``base="model"`` that model is written to
``<adapter>/base`` and the field is its absolute path (``base_name=`` overrides it, e.g. with
the hub name the base is uploaded under); with ``base="modules"``/``"none"`` no complete base
is written and the field is left empty unless ``base_name`` is given (the original model's
name would load weights the adapter does not fit).

Writer biases (GPT-2, GPT-NeoX, Qwen2's ... when ``route_bias``): the adapter's bias delta
``U c_b`` is a constant added to the output; a bias-free LoRA ``B A x`` is linear in x, so it
cannot express it. PEFT loads it as ``lora_B.bias`` (``lora_bias=True``); vLLM's LoRA loader
does not. ``lora_bias=`` chooses:

- ``"keep"`` (default): ``lora_B.bias`` is written; plain PEFT reproduces everything.
- ``"fold"``: no ``lora_B.bias``; the bias delta stays in the base instead. The written pair
  is then base ``(W − U C, b)`` + adapter ``U C``: together they compute the trained model
  exactly, and the base alone is the discarded model except that the routed writers' biases
  keep their in-subspace change ``U c_b`` (its norm is ``folded_bias_norm`` in
  ``gradroute_adapter.json``). The exactly discarded model is the ``base/`` written with
  ``lora_bias="keep"`` (a plain model: serve it without any LoRA).
- ``"refuse"``: raise :class:`~gradroute.errors.AdapterError` when the adapter has a non-zero
  bias delta (a plan without biases, or biases never changed, writes a bias-free adapter).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import _io
from ..errors import AdapterError, FileFormatError

if TYPE_CHECKING:
    from ..router import GradientRouter

ADAPTER_META = "gradroute_adapter.json"
ROUTED_BASE = "routed_base.safetensors"


LORA_BIAS_MODES = ("keep", "fold", "refuse")


def lora_config(router: GradientRouter, base_model_name: str | None = None, *, lora_bias: bool | None = None) -> Any:
    """The ``LoraConfig`` for the router's plan (``lora_bias``: default, whether any route has a bias)."""
    from peft import LoraConfig

    plan = router.plan
    ranks = {t.module: t.rank for t in plan}
    r = max(ranks.values())
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=list(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=any(t.kind == "conv1d" for t in plan),
        lora_bias=any(t.bias for t in plan) if lora_bias is None else bool(lora_bias),
        base_model_name_or_path=base_model_name,
        task_type="CAUSAL_LM",
    )


def adapter_tensors(router: GradientRouter, env: str | None = None, *, bias: bool = True) -> dict[str, torch.Tensor]:
    """PEFT state-dict tensors (``base_model.model.<module>.lora_*``) for the adapter or one env's
    share (``bias=False``: without the ``lora_B.bias`` tensors)."""
    out: dict[str, torch.Tensor] = {}
    for t in router.plan:
        C = router.adapter_coords(t.module, env).float().cpu()
        U = router.basis(t.module).float().cpu()
        key = f"base_model.model.{t.module}"
        for suffix, tensor in t.orientation.lora_tensors(C, U).items():
            out[f"{key}.{suffix}"] = tensor
        if t.bias and bias:
            cb = router.adapter_bias_coords(t.module, env)
            out[f"{key}.lora_B.bias"] = (U @ cb.float().cpu()).contiguous()
    return out


def bias_delta_norm(router: GradientRouter, env: str | None = None) -> float:
    """‖U c_b‖ over the routed biases: the part of the adapter a bias-free LoRA cannot hold."""
    total = 0.0
    for t in router.plan:
        cb = router.adapter_bias_coords(t.module, env) if t.bias else None
        if cb is not None:
            total += float((router.basis(t.module).double() @ cb.double()).pow(2).sum())
    return total ** 0.5


def _model_name(router: GradientRouter) -> str | None:
    from ..model import model_name, unwrap_model

    return model_name(unwrap_model(router.model))


def save_adapter(router: GradientRouter, path: str | Path, env: str | None = None, base: str = "modules", *,
                 lora_bias: str = "keep", base_name: str | None = None, tokenizer: Any = None,
                 residue_threshold: float | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (plain PEFT), the subspace,
    a ``gradroute_adapter.json`` sidecar and, per ``base``, the matching base weights.

    The base is the model minus exactly what the adapter holds (``W − U A``, or ``W − U A_env``
    for one environment), so ``PeftModel.from_pretrained(base, path)`` reproduces the routed
    model and the base alone is the "discarded" model. ``base="model"`` writes it as a full
    model under ``path/base`` (with ``tokenizer``, if given, so that it can be served) and
    points ``base_model_name_or_path`` at it (``base_name`` overrides the name written).
    ``lora_bias``: ``"keep"``, ``"fold"`` or ``"refuse"`` (vLLM loads only bias-free
    adapters; see the module docstring for what the folded pair computes).

    The written base is rounded to the weights' dtype: what that leaves of the adapter in its
    persona coordinates is recorded as ``base_residue`` in ``gradroute_adapter.json`` (a
    :class:`~gradroute.monitor.metrics.DiscardResidue`; the folded bias delta is not counted) and
    warned about above ``residue_threshold`` (default 1% of the adapter's norm).
    """
    from ..monitor.metrics import check_residue_threshold

    threshold = check_residue_threshold(residue_threshold)
    if base not in ("modules", "model", "none"):
        raise AdapterError(f"base must be 'modules', 'model' or 'none', got {base!r}.", "pass one of those.")
    problem = router.mode_strategy.export_problem()
    if problem is not None:
        raise AdapterError(f"{problem}: a PEFT file would load as a different model.",
                           "keep the adapter in the router's state (router.save_state(path), or the checkpoints "
                           "gradroute writes), or discard it (router.discard(), gr.save_discarded(router, path)); "
                           "it cannot be merged into the weights either.")
    if base != "none" and router.sharded:
        raise AdapterError(f"base={base!r} writes full base weights, but the routed weights are FSDP2 shards "
                           "(DTensors) and gradroute does not gather them.",
                           "save the adapter alone (base='none', from any rank: its coordinates are whole on every "
                           "rank) and the model with your trainer's full-state-dict path "
                           "(accelerator.get_state_dict(model)).")
    if lora_bias not in LORA_BIAS_MODES:
        raise AdapterError(f"lora_bias must be one of {LORA_BIAS_MODES}, got {lora_bias!r}.",
                           "pass 'keep' (PEFT only), 'fold' (bias-free adapter, bias delta kept in the base) or "
                           "'refuse'.")
    if lora_bias == "refuse":
        norm = bias_delta_norm(router, env)
        if norm > 0:
            mods = [t.module for t in router.plan if t.bias]
            raise AdapterError(
                f"the adapter changes the routed writers' biases ({len(mods)} modules, e.g. {mods[0]!r}) by "
                f"{norm:.3g} inside the subspace, which a bias-free LoRA (what vLLM loads) cannot express.",
                "pass lora_bias='fold' (bias-free adapter; the bias change stays in the written base), "
                "lora_bias='keep' (PEFT's lora_bias, not loadable by vLLM), or attach with route_bias=False.")
    from ..distributed import is_main_process, world_size

    path = Path(path)
    if not is_main_process():  # every rank holds the same adapter: rank 0 writes it
        torch.distributed.barrier()
        return path
    try:
        _write_adapter(router, path, env, base, lora_bias=lora_bias, base_name=base_name, tokenizer=tokenizer,
                       residue_threshold=threshold)
    finally:
        if world_size() > 1:
            torch.distributed.barrier()
    return path


def _write_adapter(router: GradientRouter, path: Path, env: str | None, base: str, *, lora_bias: str = "keep",
                   base_name: str | None = None, tokenizer: Any = None, residue_threshold: float | None = None) -> None:
    from ..monitor.metrics import discard_residue, discard_targets, measured_removed, warn_discard_residue

    path.mkdir(parents=True, exist_ok=True)
    name = _model_name(router)
    keep_bias = lora_bias == "keep" and any(t.bias for t in router.plan)
    if base_name is None and base == "model":
        base_name = str((path / "base").resolve())
    cfg = lora_config(router, base_name, lora_bias=keep_bias)
    cfg.save_pretrained(str(path))
    _io.save_tensors(path / "adapter_model.safetensors", adapter_tensors(router, env, bias=keep_bias))
    router.subspace.save(path / "subspace")
    folded = bias_delta_norm(router, env) if lora_bias == "fold" else 0.0
    residue = None
    if base != "none":
        targets = discard_targets(router, env)
        weights = _base_tensors(router, env, fold_bias=lora_bias == "fold")
        residue = discard_residue(router, targets, measured_removed(router, env), weights,
                                  threshold=residue_threshold)
        if base == "modules":
            _io.save_tensors(path / ROUTED_BASE, weights)
        else:
            from ..model import unwrap_model

            model = unwrap_model(router.model)
            sd = {k: v for k, v in model.state_dict().items()}
            for k, v in weights.items():
                sd[k] = v
            model.save_pretrained(str(path / "base"), state_dict=sd)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(path / "base"))
    _io.write_json(path / ADAPTER_META, {
        "format": "gradroute.adapter",
        "mode": router.mode,
        "steps": router.steps,
        "env": env,
        "envs": router.envs,
        "base": base,
        "model": name,
        "base_model": base_name,
        "lora_bias": lora_bias,
        "folded_bias_norm": folded,
        "subspace_hash": router.subspace.content_hash,
        "plan": router.plan.to_list(),
        "adapter_norm": router.adapter_norm(env).total,
        "base_residue": residue.to_dict() if residue is not None else None,
    })
    if residue is not None:
        warn_discard_residue(residue, f"save_adapter({str(path)!r}): the base written beside the adapter",
                             router.weights_hold_adapter, stacklevel=4)


def _base_tensors(router: GradientRouter, env: str | None, fold_bias: bool = False) -> dict[str, torch.Tensor]:
    """Routed modules' weights minus the (env's) adapter delta, in the weights' dtypes
    (``fold_bias``: the biases keep the adapter's bias delta, i.e. stay as trained)."""
    from ..model import unwrap_model

    params = dict(unwrap_model(router.model).named_parameters())
    out = {}
    for t in router.plan:
        w = f"{t.module}.weight"
        weight = router.base_weight(t.module, env)
        out[w] = weight.to(params[w].dtype if w in params else weight.dtype).cpu()
        if t.bias and not fold_bias:
            b = f"{t.module}.bias"
            bias = router.base_bias(t.module, env)
            out[b] = bias.to(params[b].dtype if b in params else bias.dtype).cpu()
    return out


@torch.no_grad()
def load_routed_base(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Copy ``routed_base.safetensors`` from an adapter directory into ``model`` (in place)."""
    from ..model import unwrap_model

    path = Path(path)
    file = path / ROUTED_BASE if path.is_dir() else path
    tensors = _io.load_tensors(file)
    params = dict(unwrap_model(model).named_parameters())
    for k, v in tensors.items():
        if k not in params:
            raise AdapterError(f"{file} has weights for {k!r}, which the model lacks.",
                               "load it into the model the adapter was trained on.")
        if params[k].shape != v.shape:
            raise AdapterError(f"{k}: shape {tuple(v.shape)} in {file}, {tuple(params[k].shape)} in the model.")
        params[k].copy_(v.to(params[k].dtype))
    return model


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileFormatError(f"{path} is not a PEFT adapter directory (no adapter_config.json).")
    meta = path / ADAPTER_META
    return _io.read_json(meta) if meta.is_file() else {}


@torch.no_grad()
def subtract_adapter(model: torch.nn.Module, adapter_path: str | Path, scale: float = 1.0) -> torch.nn.Module:
    """``W ← W − scale · ΔW`` for every LoRA module of a PEFT adapter (PEFT's own
    ``get_delta_weight``; lora biases too). Returns the plain model (no PEFT wrappers)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = PeftModel.from_pretrained(model, str(adapter_path), adapter_name="gr")
    for mod in peft_model.modules():
        if isinstance(mod, LoraLayer) and "gr" in getattr(mod, "scaling", {}):
            base = mod.get_base_layer()
            base.weight.sub_((scale * mod.get_delta_weight("gr")).to(base.weight.dtype))
            lora_b = mod.lora_B["gr"] if "gr" in getattr(mod, "lora_B", {}) else None
            if lora_b is not None and getattr(lora_b, "bias", None) is not None:
                base.bias.sub_((scale * mod.scaling["gr"] * lora_b.bias).to(base.bias.dtype))
    return peft_model.unload()
