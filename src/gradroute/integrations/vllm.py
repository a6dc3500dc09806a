"""vLLM rollouts on the routed policy: what TRL pushes to vLLM is the effective policy.

TRL's ``GRPOTrainer`` / ``RLOOTrainer`` with ``use_vllm=True`` push the policy's weights to
vLLM before generating after each optimizer step: ``VLLMGeneration.sync_weights`` walks
``VLLMGeneration._iter_named_params`` — the policy's ``named_parameters()`` (a PEFT policy
with its LoRA merged first, ``base_model.model.`` and ``.base_layer`` stripped, LoRA tensors
skipped) — and hands every ``(name, tensor)`` to the engine's ``model.load_weights`` (colocate
mode) or to ``VLLMClient.update_named_params`` (server mode; its metadata is read from the same
stream). Both modes go through that one stream, so :func:`install_vllm_sync` wraps it.

- ``mode="update"`` / ``"gradient"``: the routed weights hold base + adapter (a PEFT policy's
  adapter is in its LoRA, which TRL merges), so the stream already is the policy: it passes
  through unchanged.
- ``mode="activation"``: the weights are the base and the adapter is a separate path — a
  forward hook adds ``Ũ (C x)`` to each routed write (adapter scale s = 1, as
  ``lora_alpha = r``), with x the writer's input and C the adapter's coordinates (the
  parameter ``<model>.gradroute_adapters.coords.*``). vLLM computes with plain weights, so the
  adapter is folded into the writer's weight as it streams past (``lift(C, Ũ, axis)`` of
  :mod:`gradroute.orientation`, exactly the weight delta whose output the hook adds)::

      Linear writer   W (d, d_in)   W ← W + Ũ C        C (k, d_in)   (y = x Wᵀ + x Cᵀ Ũᵀ)
      Conv1D writer   W (d_in, d)   W ← W + C Ũᵀ       C (d_in, k)   (GPT-2: y = x W + x C Ũᵀ)
      Embedding       W (vocab, d)  W ← W + C Ũᵀ / σ   C (vocab, k)  (y = σ W[ids] + C[ids] Ũᵀ;
                                                                      σ = embed_scale, else 1)

  and the ``gradroute_*`` parameters are not pushed (vLLM has no such modules). A write whose
  adapter is not a weight delta of one plain module cannot be folded, and is refused when the
  sync is installed (:class:`~gradroute.errors.RoutingError`): a mixture-of-experts block's
  (the adapter adds to the gated sum of the experts), a post-norm branch's (it adds after the
  norm; with ``post_norm="exact"`` the write also reads frozen copies of the writer), the input embedding when it is tied to the output head (vLLM would move the head too),
  and a module whose forward is not a plain Linear/Conv1D/Embedding (quantized, custom).

The fold is computed per weight as it streams (one ``d x d_in`` temporary at a time) in the
weight's device, in float32 (float64 for float64 weights), and cast to the weight's dtype. The
adapter is read from the router at each sync (FSDP2 and accelerate replace the parameter objects
after the sync is installed), gathered whole when it is an FSDP2 DTensor. (DeepSpeed is refused
at ``attach``; the ``gather`` hook TRL's backend offers is kept for its ZeRO-3 path.) After
``router.detach()`` the model is plain again and the stream passes through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import projection as P
from ..errors import ConfigError, RoutingError
from ..model import unwrap_model, weight_module
from . import _compat
from ._patches import patch, undo

__all__ = ["fold_stream", "foldable", "install_vllm_sync", "policy_weights", "uninstall_vllm_sync"]

GRADROUTE_PREFIX = "gradroute_"  # gradroute's own modules and parameters (adapters, stand-ins)
MARK = "gradroute_router"  # attribute of the installed stream wrapper: the router it folds

_FIX_MODE = ("route with mode='update' or mode='gradient' (the adapter lives in the weights TRL pushes), "
             "or generate with transformers (use_vllm=False)")


@dataclass(frozen=True)
class Fold:
    """One weight the activation adapter folds into: ``W ← W + scale · lift(C, Ũ, axis)``."""

    module: str            # the routed module (name in the unwrapped model); its adapter C is read at each sync
    basis: torch.Tensor    # Ũ (d x k)
    axis: int              # the weight's residual axis (0: Linear writer; 1: Conv1D writer, Embedding)
    shape: tuple[int, ...]  # the weight's shape
    scale: float           # 1, or 1 / embed_scale for a scaled embedding


def _is_gradroute(name: str) -> bool:
    return any(part.startswith(GRADROUTE_PREFIX) for part in name.split("."))


def _fold_scale(name: str, wm: nn.Module) -> float:
    """1 for a module computing ``x Wᵀ``, ``x W`` or ``W[ids]``; ``1/σ`` for ``σ W[ids]``; else refused."""
    from transformers.pytorch_utils import Conv1D

    fwd = type(wm).forward
    if isinstance(wm, nn.Linear) and fwd is nn.Linear.forward:
        return 1.0
    if isinstance(wm, Conv1D) and fwd is Conv1D.forward:
        return 1.0
    if isinstance(wm, nn.Embedding) and wm.max_norm is None:
        if fwd is nn.Embedding.forward:
            return 1.0
        sigma = getattr(wm, "embed_scale", None)  # Gemma's ScaledWordEmbedding: W[ids] · embed_scale
        if sigma is not None and type(wm).__name__.endswith("ScaledWordEmbedding"):
            s = float(torch.as_tensor(sigma).to(wm.weight.dtype))
            if s != 0.0:
                return 1.0 / s
    raise RoutingError(
        f"{name!r} is a {type(wm).__name__}, whose forward is not a plain Linear (x Wᵀ), GPT-2 Conv1D (x W) "
        "or Embedding (W[ids]): its activation adapter cannot be folded into the weight vLLM loads, so vLLM "
        "would sample from a policy without it (off-policy rollouts).",
        f"{_FIX_MODE}, or train unquantized standard modules.")


def _tied_to_head(base: nn.Module, wm: nn.Module) -> bool:
    """Whether ``wm`` is the input embedding and vLLM ties it to the output head."""
    get_in = getattr(base, "get_input_embeddings", None)
    inp = get_in() if callable(get_in) else None
    if inp is None or weight_module(inp).weight is not wm.weight:
        return False  # a position embedding, never tied
    get_out = getattr(base, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None and getattr(weight_module(out), "weight", None) is wm.weight:
        return True
    cfg = getattr(base, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(cfg, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def foldable(router: Any) -> dict[str, Fold]:
    """The weights to fold, by the name vLLM receives (empty when the weights are the policy).

    Raises :class:`~gradroute.errors.RoutingError` naming the module when the routed policy is
    not plain weights (see the module docstring)."""
    if router.weights_hold_adapter:
        return {}
    if router.mode != "activation":
        raise RoutingError(f"mode={router.mode!r} keeps its adapter outside the weights, and gradroute does not know "
                           "how to fold it into the weights pushed to vLLM.", _FIX_MODE + ".")
    strategy = router.mode_strategy
    problem = strategy.export_problem()
    if not problem and (getattr(strategy, "moe", None) or getattr(strategy, "post_norm", None)):
        some = sorted({**getattr(strategy, "moe", {}), **getattr(strategy, "post_norm", {})})[:2]
        problem = f"the persona adapter of {', '.join(some)} adds after the writer's weight (an MoE or post-norm write)"
    if problem:
        raise RoutingError(
            f"vLLM computes with plain weights, and {problem}: it cannot be folded into a weight, so vLLM would "
            "sample from the policy without it (off-policy rollouts).",
            f"{_FIX_MODE}, or route a dense pre-norm family (Llama, Qwen2/3, Mistral, Phi-3, GPT-2, GPT-NeoX).")
    base = unwrap_model(router.model)
    folds: dict[str, Fold] = {}
    for r in router.routes_state:
        wm = weight_module(r.module)
        scale = _fold_scale(r.name, wm)
        if r.target.side == "embed" and _tied_to_head(base, wm):
            raise RoutingError(
                f"the input embedding {r.name!r} is tied to the output head, which vLLM keeps tied: folding its "
                "activation adapter into the shared weight would move the head too (the routed policy's head does "
                "not move), so vLLM would sample from another policy.",
                "untie the checkpoint vLLM and the trainer load (model.config.tie_word_embeddings = False; "
                "model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone()); "
                f"model.save_pretrained(dir)) and train from it, or {_FIX_MODE}.")
        key = _compat.vllm_param_name(f"{r.name}.weight")
        folds[key] = Fold(module=r.name, basis=r.basis(), axis=r.target.axis, shape=tuple(wm.weight.shape),
                          scale=scale)
    return folds


def _live(router: Any) -> bool:
    """Whether the activation adapters are still on the model (``router.detach()`` takes them off)."""
    from ..router.modes.activation import ADAPTERS_ATTR

    container = getattr(router.mode_strategy, "container", None)
    return container is not None and getattr(unwrap_model(router.model), ADAPTERS_ATTR, None) is container


def _snapshot(router: Any, folds: dict[str, Fold],
              gather: Callable[[list[Any]], Any] | None) -> dict[str, torch.Tensor]:
    """The adapters' current coordinates (non-zero ones only), read whole — from the parameters
    the model holds now (FSDP2 / accelerate replace them after the sync is installed)."""
    from contextlib import nullcontext

    live = router.mode_strategy.params
    out = {}
    with (gather([live[f.module] for f in folds.values()]) if gather is not None else nullcontext()):
        for key, f in folds.items():
            c = live[f.module].detach()
            c = c.full_tensor() if hasattr(c, "full_tensor") else c  # an FSDP2 DTensor
            expect = list(f.shape)
            expect[f.axis] = f.basis.shape[1]
            if list(c.shape) != expect:
                raise RoutingError(
                    f"the activation adapter of {f.module!r} reads as shape {tuple(c.shape)}, not {tuple(expect)} "
                    "(sharded in a way gradroute cannot gather), so it cannot be folded into the weights pushed to vLLM.",
                    "train with DDP or FSDP2, or " + _FIX_MODE + ".")
            if bool(c.any()):
                out[key] = c.clone()
    return out


@torch.no_grad()
def _folded(weight: torch.Tensor, f: Fold, C: torch.Tensor) -> torch.Tensor:
    """``W + scale · lift(C, Ũ, axis)`` in the weight's dtype and device."""
    if tuple(weight.shape) != f.shape:
        raise RoutingError(f"the weight of {f.module!r} streams to vLLM with shape {tuple(weight.shape)}, not {f.shape} "
                           "(sharded?), so the activation adapter cannot be folded into it.",
                           "train with DDP or FSDP2, or " + _FIX_MODE + ".")
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = P.lift(C.to(device=weight.device, dtype=dt), f.basis.to(device=weight.device, dtype=dt), f.axis)
    if f.scale != 1.0:
        delta = delta * f.scale
    return (weight.to(dt) + delta).to(weight.dtype)


def fold_stream(router: Any, named: Iterable[tuple[str, torch.Tensor]], folds: dict[str, Fold] | None = None,
                gather: Callable[[list[Any]], Any] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Fold the router's activation adapters into a stream of the policy's ``(name, tensor)``
    (names as TRL yields them; the names are kept) and leave out gradroute's own parameters.

    ``folds``: from :func:`foldable` (computed here when None); ``gather``: a context factory
    that makes parameters whole (ZeRO-3). Raises :class:`~gradroute.errors.RoutingError` if a
    non-zero adapter's weight never came by (the stream named it otherwise)."""
    folds = foldable(router) if folds is None else folds
    coords = _snapshot(router, folds, gather) if folds and _live(router) else {}
    for name, tensor in named:
        key = _compat.vllm_param_name(name)
        if _is_gradroute(key):
            continue
        C = coords.pop(key, None)
        yield name, (tensor if C is None else _folded(tensor, folds[key], C))
    if coords:
        raise RoutingError(
            f"the weights pushed to vLLM did not include {sorted(coords)[:3]}, which the persona adapter must be "
            "folded into: vLLM was given the policy without it.",
            "report this with your TRL version (the weight names TRL pushes changed), or " + _FIX_MODE + ".")


def _named_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's parameters under vLLM's names, as TRL streams them (a PEFT LoRA merged)."""
    peft = callable(getattr(model, "merge_adapter", None)) and isinstance(getattr(model, "prefix", None), str)
    if not peft:
        for name, p in model.named_parameters():
            yield _compat.vllm_param_name(name), p.detach()
        return
    model.merge_adapter()  # type: ignore[operator]
    try:
        for name, p in model.named_parameters():
            if model.prefix in name or "original_module" in name:  # type: ignore[operator]
                continue
            yield _compat.vllm_param_name(name), p.detach()
    finally:
        model.unmerge_adapter()  # type: ignore[operator]


def policy_weights(router: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The routed policy's weights as ``(name, tensor)`` under the names vLLM loads: the model's
    parameters (a PEFT policy's LoRA merged, as TRL does), activation adapters folded in, no
    gradroute names. ``vllm_llm.llm_engine....model.load_weights(policy_weights(router))``
    loads the policy the trainer computes with; a plain model given these weights too."""
    yield from fold_stream(router, _named_parameters(router.model))


def _check_same_model(backend: Any, router: Any, folds: dict[str, Fold]) -> None:
    """TRL's stream names every weight to fold, and they are the routed parameters."""
    model = getattr(backend, "model", None)
    if model is None or not folds:
        return
    params = {_compat.vllm_param_name(n): p for n, p in model.named_parameters()}
    routes = {_compat.vllm_param_name(f"{r.name}.weight"): r for r in router.routes_state}
    for key, f in folds.items():
        if params.get(key) is not weight_module(routes[key].module).weight:
            raise RoutingError(
                f"TRL's vLLM sync pushes {type(model).__name__}'s parameters, whose {key!r} is not the weight of the "
                f"routed module {f.module!r}: the router was built on another model than the trainer's.",
                "build the router on trainer.model (gradroute.attach(trainer, ...) does).")


def install_vllm_sync(trainer: Any, router: Any) -> None:
    """Make TRL push the routed policy to vLLM at every weight sync (colocate and server mode).

    Wraps the stream of TRL's vLLM backend (``trainer.vllm_generation``) with
    :func:`fold_stream`. Refuses, before changing anything, a routing that cannot be folded
    (:class:`~gradroute.errors.RoutingError` naming the module) and a trainer without vLLM
    (:class:`~gradroute.errors.ConfigError`). Installing again for the same router does nothing;
    :func:`uninstall_vllm_sync` takes it off."""
    if not getattr(getattr(trainer, "args", None), "use_vllm", False):
        raise ConfigError(f"{type(trainer).__name__} does not generate with vLLM (args.use_vllm is not set), so "
                          "there is no weight sync to fold the persona adapter into.",
                          "call install_vllm_sync only for a trainer built with use_vllm=True.")
    backend = _compat.vllm_backend(trainer)
    stream = _compat.vllm_weight_stream(backend)
    installed = getattr(stream, MARK, None)
    if installed is router:
        return
    if installed is not None:
        raise ConfigError("the vLLM weight sync of this trainer already folds another router's adapters.",
                          "call gradroute.integrations.vllm.uninstall_vllm_sync(trainer) (or detach the old "
                          "handle) first.")
    folds = foldable(router)
    _check_same_model(backend, router, folds)

    def folded_stream() -> Iterator[tuple[str, torch.Tensor]]:
        return fold_stream(router, stream(), folds, gather=lambda params: _compat.vllm_gather(backend, params))

    setattr(folded_stream, MARK, router)
    patch(backend, _compat.VLLM_NAMED_PARAMS, folded_stream)
    router.vllm_sync_installed = True  # RouterCallback refuses an activation router generating with vLLM without it


def uninstall_vllm_sync(trainer: Any) -> None:
    """Give TRL's vLLM weight sync back its own stream (a no-op when nothing is installed)."""
    backend = getattr(trainer, _compat.VLLM_GENERATION, None)
    if backend is not None:
        undo(backend)
