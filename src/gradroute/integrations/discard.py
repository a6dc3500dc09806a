"""The trained policy minus the persona adapter, written as something plain tools load.

- **Full fine-tune**: a full ``save_pretrained`` model whose routed weights are the effective
  weights minus the adapter (``W − U A``, or ``W − U A_env`` for one environment's share).
- **LoRA policy** (``GRPOTrainer(peft_config=...)`` or a ``PeftModel``): one plain PEFT LoRA on
  the *unchanged* base model. At a routed module whose user LoRA is ``s·B·A`` and whose
  persona adapter is ``U C`` (in PEFT's layout ``B_p A_p``, see :mod:`gradroute.orientation`),
  the discarded module is the rank-(r + k) concatenation

      B' = [s·B, −B_p],  A' = [A; A_p],  scaling 1   ⇒   B'A' = s·B·A − U C

  (in activation mode the persona adapter is a separate path, so the user's LoRA *is* the
  discarded policy; dropping one environment's share keeps ``U (C − C_env)`` beside it).
  Other modules keep the user's LoRA unchanged (``rank_pattern``/``alpha_pattern``).

``PeftModel.from_pretrained(base, path)`` then reproduces "trained minus persona" to float
round-off, and loading the persona adapter (``save_adapter(..., base="none")``) beside it gives
the trained policy back.

**What ``model.save_pretrained`` writes** with gradroute attached (``gr.attach`` or
``GradientRouter``): the model's own weights, never a ``gradroute_*`` tensor, loadable by plain
``AutoModelForCausalLM.from_pretrained`` without missing or unexpected keys
(tests/test_save_pretrained.py).

- ``mode="activation"``: the weights *are* the base; the adapters are separate parameters
  (``<model>.gradroute_adapters``) that activation mode lists in the model's
  ``_keys_to_ignore_on_save``. So ``save_pretrained`` writes the **base without the adapters —
  the discarded model**, tensor for tensor what ``save_discarded`` writes. The trained policy is
  that base plus the adapter: ``save_adapter(router, path, base="model")``.
  ``_keys_to_ignore_on_save`` rather than a state-dict hook: transformers 5 applies it in
  ``save_pretrained`` whether or not a ``state_dict`` is passed (``Trainer.save_model`` passes
  one), ``Trainer._load_from_checkpoint`` does not warn when the missing keys are exactly those,
  and ``model.state_dict()`` keeps the adapters, so optimizers, ``load_state_dict``, deep copies
  and distributed checkpointing still see them (the router state in each checkpoint's
  ``gradroute/`` carries them for resuming).
  Exceptions: post-norm writes routed with ``post_norm="exact"`` take their in-span part from
  frozen copies that are not saved, so their plain weights are not the discarded model
  (``save_discarded`` refuses them); with ``"first_order"`` they are, to first order.
- ``mode="update"`` / ``"gradient"``: the weights hold base + U A — training is untouched — so
  ``save_pretrained`` writes the **trained policy** (what a Trainer checkpoint must hold to
  resume); ``save_discarded`` writes the discarded model.

**Residue** (full fine-tunes): the written base is rounded to the weights' dtype, so its persona
coordinates are ``Uᵀ P_0 + A − A_e`` only up to that rounding (and, in activation mode, up to
the rounding of the post-step pinning the weights carry). ``gradroute_discarded.json`` records
the :class:`~gradroute.monitor.metrics.DiscardResidue` (``‖Uᵀ(W_written − W_0)‖``, and that over
the removed adapter's norm), and a :class:`~gradroute.errors.GradrouteWarning` names the dtype
and the fix when it exceeds ``residue_threshold`` (default
:data:`~gradroute.monitor.metrics.DISCARD_RESIDUE_THRESHOLD`, 1% of the removed adapter): with
bfloat16 weights it does after a few RL-sized steps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import _io
from ..errors import AdapterError
from ..model import unwrap_model
from ..router.modes.activation import ADAPTERS_ATTR

if TYPE_CHECKING:
    from ..router import GradientRouter


def _peft_model(model: Any) -> Any:
    """The ``PeftModel`` around the policy, or None for a full fine-tune."""
    m = model
    for _ in range(4):
        if hasattr(m, "peft_config") and hasattr(m, "get_base_model"):
            return m
        inner = getattr(m, "module", None)
        if inner is None:
            return None
        m = inner
    return None


@torch.no_grad()
def save_discarded(router: GradientRouter, path: str | Path, env: str | None = None,
                   base_model_name_or_path: str | None = None, *, residue_threshold: float | None = None) -> Path:
    """Write the trained policy minus the persona adapter (or minus one environment's share).

    Full fine-tunes: the rounding residue is measured, recorded in ``gradroute_discarded.json``
    and warned about above ``residue_threshold`` (see the module docstring)."""
    from ..distributed import is_main_process
    from ..monitor.metrics import check_residue_threshold

    path = Path(path)
    threshold = check_residue_threshold(residue_threshold)
    if router.sharded:
        raise AdapterError("the routed weights are FSDP2 shards (DTensors): gradroute does not gather a full model "
                           "to write it.",
                           "router.discard() on every rank, then save the model with your trainer's full-state-dict "
                           "path (accelerator.get_state_dict(model) / trainer.save_model).")
    # every rank raises alike (a refusal on rank 0 alone would leave the others at the next collective)
    if env is not None and env not in router.envs:
        raise AdapterError(f"no adapter share for environment {env!r}; environments: {router.envs}.",
                           "pass one of router.envs, or env=None for the whole adapter.")
    frozen = sorted(getattr(router.mode_strategy, "frozen", None) or ())
    if frozen:  # activation mode, post_norm="exact": the routed base is plain weights + frozen copies
        raise AdapterError(
            f"post_norm='exact' takes the in-span part of {len(frozen)} post-norm writes (e.g. {frozen[0]!r}) from "
            "frozen copies of their writers, so no plain weights are the discarded model.",
            "keep the discarded model as the routed model with its state (router.discard(); router.save_state(path)), "
            "or route with post_norm='first_order' (plain weights, isolated to first order).")
    if not is_main_process():
        return path
    pm = _peft_model(router.model)
    if pm is None:
        return _save_full(router, path, env, threshold)
    return _save_lora(router, pm, path, env, base_model_name_or_path)


def _save_full(router: GradientRouter, path: Path, env: str | None, threshold: float) -> Path:
    from ..monitor.metrics import discard_residue, discard_targets, measured_removed, warn_discard_residue

    model = unwrap_model(router.model)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{ADAPTERS_ATTR}.")}
    targets = discard_targets(router, env)
    written: dict[str, torch.Tensor] = {}
    # what the policy computes minus the adapter's (env) share: effective − U A_env
    for t in router.plan:
        w = f"{t.module}.weight"
        sd[w] = written[w] = router.base_weight(t.module, env).to(sd[w].dtype)
        bias = router.base_bias(t.module, env)  # None unless the bias is routed
        if bias is not None and f"{t.module}.bias" in sd:
            sd[f"{t.module}.bias"] = written[f"{t.module}.bias"] = bias.to(sd[f"{t.module}.bias"].dtype)
    residue = discard_residue(router, targets, measured_removed(router, env), written, threshold=threshold)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), state_dict=sd)
    _io.write_json(path / "gradroute_discarded.json", {"format": "gradroute.discarded", "kind": "full",
                                                      "env": env, "mode": router.mode, "steps": router.steps,
                                                      "residue": residue.to_dict()})
    warn_discard_residue(residue, f"save_discarded({str(path)!r})", router.weights_hold_adapter, stacklevel=5)
    return path


def _save_lora(router: GradientRouter, pm: Any, path: Path, env: str | None, base_name: str | None) -> Path:
    from peft import get_peft_model_state_dict

    name = getattr(pm, "active_adapter", "default")
    name = name[0] if isinstance(name, list | tuple) else name
    cfg = pm.peft_config[name]
    user = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm, adapter_name=name).items()}
    modules = dict(unwrap_model(router.model).named_modules())
    # update mode: the user's LoRA holds the persona part, so subtract it (−U C_env); activation
    # mode: the persona path is separate, so the user's LoRA is the discarded policy and only the
    # other environments' shares stay beside it (+U (C − C_env))
    keep_persona = not router.weights_hold_adapter
    if keep_persona and env is None:
        return _write_lora(path, cfg, user, {}, base_name, router, env)
    problem = router.mode_strategy.export_problem()
    if problem is not None:
        raise AdapterError(f"{problem}, so the other environments' shares cannot be kept in a PEFT LoRA.",
                           "discard the whole adapter (env=None), or router.discard(env=...) and save the model "
                           "with its adapters in the router state (router.save_state).")
    if not keep_persona and any(router.adapter_bias_coords(t.module) is not None for t in router.plan):
        raise AdapterError("the persona adapter has a bias part, which a bias-free LoRA cannot subtract.",
                           "route with route_bias=False for LoRA policies.")
    extra: dict[str, int] = {}
    for t in router.plan:
        if keep_persona:
            C, sign = router.adapter_coords(t.module) - router.adapter_coords(t.module, env), 1.0
        else:
            C, sign = router.adapter_coords(t.module, env), -1.0
        parts = t.orientation.lora_tensors(C.float().cpu(), router.basis(t.module).float().cpu())
        key = f"base_model.model.{t.module}"
        mod = modules[t.module]
        scaling = float(getattr(mod, "scaling", {}).get(name, 1.0)) if hasattr(mod, "scaling") else 1.0
        k = t.rank
        if t.side == "embed":
            a_key, b_key = f"{key}.lora_embedding_A", f"{key}.lora_embedding_B"
            pa, pb = parts["lora_embedding_A"], parts["lora_embedding_B"]
        else:
            a_key, b_key = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
            pa, pb = parts["lora_A.weight"], parts["lora_B.weight"]
        if a_key in user:
            A_u, B_u = user[a_key].float().cpu(), user[b_key].float().cpu()
            user[a_key] = torch.cat([A_u, pa], dim=0)
            user[b_key] = torch.cat([scaling * B_u, sign * pb], dim=1)
            extra[t.module] = A_u.shape[0] + k
        else:  # a routed module without the user's LoRA (full weights trained there)
            user[a_key], user[b_key] = pa, sign * pb
            extra[t.module] = k
    return _write_lora(path, cfg, user, extra, base_name, router, env)


def _write_lora(path: Path, cfg: Any, user: dict[str, torch.Tensor], extra: dict[str, int], base_name: str | None,
                router: GradientRouter, env: str | None) -> Path:
    """Write the (possibly concatenated) LoRA: ``extra`` gives the new rank of each changed module."""
    path.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    targets = set(d.get("target_modules") or [])
    if isinstance(d.get("target_modules"), str):
        targets = {d["target_modules"]}
    ranks = dict(d.get("rank_pattern") or {})
    alphas = dict(d.get("alpha_pattern") or {})
    for m, r_new in extra.items():
        pat = re.escape(m)  # PEFT matches "(.*\\.)?(pattern)$" against the module name
        ranks[pat], alphas[pat] = r_new, r_new  # scaling 1 on the concatenated modules
        targets.add(m)
    d.update(target_modules=sorted(targets), rank_pattern=ranks, alpha_pattern=alphas,
             task_type=d.get("task_type") or "CAUSAL_LM", use_rslora=False,
             base_model_name_or_path=base_name or d.get("base_model_name_or_path"))
    d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}
    (path / "adapter_config.json").write_text(json.dumps(d, indent=2, default=str))
    _io.save_tensors(path / "adapter_model.safetensors", {k: v.contiguous() for k, v in user.items()})
    _io.write_json(path / "gradroute_discarded.json", {"format": "gradroute.discarded", "kind": "lora",
                                                      "env": env, "mode": router.mode, "steps": router.steps,
                                                      "concatenated_modules": sorted(extra)})
    return path
