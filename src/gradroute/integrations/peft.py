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


def lora_config(router: GradientRouter, base_model_name: str | None = None) -> Any:
    """The ``LoraConfig`` for the router's plan."""
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
        lora_bias=any(t.bias for t in plan),
        base_model_name_or_path=base_model_name,
    )


def adapter_tensors(router: GradientRouter, env: str | None = None) -> dict[str, torch.Tensor]:
    """PEFT state-dict tensors (``base_model.model.<module>.lora_*``) for the adapter or one env's share."""
    out: dict[str, torch.Tensor] = {}
    for t in router.plan:
        C = router.adapter_coords(t.module, env).float().cpu()
        U = router.basis(t.module).float().cpu()
        key = f"base_model.model.{t.module}"
        for suffix, tensor in t.orientation.lora_tensors(C, U).items():
            out[f"{key}.{suffix}"] = tensor
        if t.bias:
            cb = router.adapter_bias_coords(t.module, env)
            out[f"{key}.lora_B.bias"] = (U @ cb.float().cpu()).contiguous()
    return out


def _model_name(router: GradientRouter) -> str | None:
    from ..model import model_name, unwrap_model

    return model_name(unwrap_model(router.model))


def save_adapter(router: GradientRouter, path: str | Path, env: str | None = None, base: str = "modules") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (plain PEFT), the subspace,
    a ``gradroute_adapter.json`` sidecar and, per ``base``, the matching base weights.

    The base is the model minus exactly what the adapter holds (``W − U A``, or ``W − U A_env``
    for one environment), so ``PeftModel.from_pretrained(base, path)`` reproduces the routed
    model and the base alone is the "discarded" model.
    """
    if base not in ("modules", "model", "none"):
        raise AdapterError(f"base must be 'modules', 'model' or 'none', got {base!r}.", "pass one of those.")
    from ..distributed import is_main_process, world_size

    path = Path(path)
    if not is_main_process():  # every rank holds the same adapter: rank 0 writes it
        torch.distributed.barrier()
        return path
    try:
        _write_adapter(router, path, env, base)
    finally:
        if world_size() > 1:
            torch.distributed.barrier()
    return path


def _write_adapter(router: GradientRouter, path: Path, env: str | None, base: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    name = _model_name(router)
    cfg = lora_config(router, name)
    cfg.save_pretrained(str(path))
    _io.save_tensors(path / "adapter_model.safetensors", adapter_tensors(router, env))
    router.subspace.save(path / "subspace")
    if base != "none":
        weights = _base_tensors(router, env)
        if base == "modules":
            _io.save_tensors(path / ROUTED_BASE, weights)
        else:
            from ..model import unwrap_model

            model = unwrap_model(router.model)
            sd = {k: v for k, v in model.state_dict().items()}
            for k, v in weights.items():
                sd[k] = v
            model.save_pretrained(str(path / "base"), state_dict=sd)
    _io.write_json(path / ADAPTER_META, {
        "format": "gradroute.adapter",
        "mode": router.mode,
        "steps": router.steps,
        "env": env,
        "envs": router.envs,
        "base": base,
        "model": name,
        "subspace_hash": router.subspace.content_hash,
        "plan": router.plan.to_list(),
        "adapter_norm": router.adapter_norm(env).total,
    })


def _base_tensors(router: GradientRouter, env: str | None) -> dict[str, torch.Tensor]:
    """Routed modules' weights minus the (env's) adapter delta, in the weights' dtypes."""
    out = {}
    for t in router.plan:
        r = router._route(t.module)
        out[f"{t.module}.weight"] = router.base_weight(t.module, env).to(r.weight.dtype).cpu()
        if t.bias and r.bias is not None:
            out[f"{t.module}.bias"] = router.base_bias(t.module, env).to(r.bias.dtype).cpu()
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
