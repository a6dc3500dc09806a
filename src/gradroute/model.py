"""Model introspection (torch only): decoder blocks, residual-stream hooks, module kinds,
residual writers and readers, activation collection.

Works on any ``nn.Module`` laid out like a Hugging Face causal LM; nothing here imports
transformers (loading by hub name lives in :mod:`gradroute.integrations.transformers`).

Layer L is the output of decoder block L (see :mod:`gradroute.layers`). Activations are read
with forward hooks on the blocks (a pre-hook on block 0 for layer −1), never from
``output_hidden_states``, whose last entry is post-final-norm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ProbeDataError, UnknownLayerError, UnsupportedModuleError
from .layers import EMBEDDINGS, check_layer

# Where decoder blocks live, by attribute path (checked in order; the generic search below
# handles anything else).
_BLOCK_PATHS = (
    "model.layers",            # Llama, Qwen2/3, Mistral, Gemma, Phi-3, OLMo
    "model.language_model.layers",
    "transformer.h",           # GPT-2, GPT-J, Falcon, Bloom (transformer.h)
    "gpt_neox.layers",         # GPT-NeoX, Pythia
    "model.decoder.layers",    # OPT
    "transformer.blocks",      # MPT
    "layers",                  # bare decoders
    "h",
)


# wrappers that hold the model in an attribute: DDP, DataParallel, FSDP1 (``.module``),
# DeepSpeed's engine (``.module``), torch.compile (``._orig_mod``); accelerate wraps with these
_WRAPPERS = {
    "DistributedDataParallel": "module", "DataParallel": "module", "FullyShardedDataParallel": "module",
    "DeepSpeedEngine": "module", "PipelineEngine": "module", "OptimizedModule": "_orig_mod",
}


def _wrapped(model: nn.Module) -> nn.Module | None:
    """The module a training wrapper holds, or None when ``model`` is not such a wrapper."""
    for cls in type(model).__mro__:
        attr = _WRAPPERS.get(cls.__name__)
        if attr is not None:
            inner = getattr(model, attr, None)
            return inner if isinstance(inner, nn.Module) else None
    return None


def is_fsdp2(model: nn.Module) -> bool:
    """True when ``model`` or one of its submodules was sharded with FSDP2's ``fully_shard``
    (its parameters are then DTensors)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed, or before FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard_fsdp2(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state.

    A forward pass without gradients (e.g. the routing plan's dataflow trace) leaves the root
    module's parameters all-gathered: the module then holds plain unsharded parameters in
    place of its DTensors, and an optimizer built over ``model.parameters()`` at that moment
    would train throw-away copies. A no-op for a model without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model: unwraps DDP / DataParallel / FSDP1 / DeepSpeed
    (``.module``), ``torch.compile`` (``._orig_mod``) — what accelerate's ``prepare`` wraps with —
    and PEFT wrappers. FSDP2's ``fully_shard`` shards a model in place (same object, its class
    becomes ``FSDP<Name>``, a subclass of the original and of ``FSDPModule``, parameters become
    DTensors), so a fully sharded model is its own underlying model."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
            continue
        inner = _wrapped(model)
        if inner is None:
            break
        model = inner
    return model


def _get_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers_path(model: nn.Module) -> str:
    """Dotted path of the ``nn.ModuleList`` of decoder blocks, relative to the unwrapped model."""
    m = unwrap_model(model)
    for path in _BLOCK_PATHS:
        obj = _get_path(m, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return path
    # generic: the longest ModuleList of identically-typed modules
    best, best_len = None, 0
    for name, mod in m.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best_len:
            if len({type(c) for c in mod}) == 1:
                best, best_len = name, len(mod)
    if best is None:
        raise UnknownLayerError(
            f"could not find the decoder blocks of {type(m).__name__}.",
            "use string layer keys naming modules, or open an issue with the architecture.",
        )
    return best


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (block L's output is residual layer L)."""
    return _get_path(unwrap_model(model), decoder_layers_path(model))


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def model_hidden_size(model: nn.Module) -> int:
    cfg = getattr(unwrap_model(model), "config", None)
    for attr in ("hidden_size", "n_embd", "d_model", "dim"):
        v = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(v, int):
            return v
    text_cfg = getattr(cfg, "text_config", None)
    if text_cfg is not None and isinstance(getattr(text_cfg, "hidden_size", None), int):
        return text_cfg.hidden_size
    emb = unwrap_model(model).get_input_embeddings() if hasattr(unwrap_model(model), "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.shape[1]
    raise UnknownLayerError(f"cannot tell the hidden size of {type(model).__name__}.")


def model_name(model: nn.Module) -> str | None:
    cfg = getattr(unwrap_model(model), "config", None)
    name = getattr(cfg, "name_or_path", None)
    return name or (getattr(cfg, "model_type", None) if cfg is not None else None)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder block's output (a tensor in transformers 5, a tuple before)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, tuple | list) and output and torch.is_tensor(output[0]):
        return output[0]
    hs = getattr(output, "hidden_states", None) or getattr(output, "last_hidden_state", None)
    if torch.is_tensor(hs):
        return hs
    raise TypeError(f"cannot find the hidden state in a block output of type {type(output).__name__}")


def replace_hidden(output: Any, new: torch.Tensor) -> Any:
    if torch.is_tensor(output):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise TypeError(f"cannot replace the hidden state in a block output of type {type(output).__name__}")


ResidualFn = Callable[[int, torch.Tensor], torch.Tensor | None]


def add_residual_hook(model: nn.Module, layer: int, fn: ResidualFn,
                      live_only: bool = False) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(layer, h)`` on the residual stream at ``layer``; a returned tensor replaces ``h``.

    Layer L >= 0 hooks the output of block L; layer −1 hooks the input of block 0.
    ``live_only``: a copy of the model (deepcopy, pickle) gets a no-op instead
    (:class:`gradroute.hooks.LiveOnly`: for bookkeeping that belongs to the live model).
    """
    from .hooks import LiveOnly

    wrap = LiveOnly if live_only else (lambda f: f)
    blocks = decoder_layers(model)
    check_layer(layer, len(blocks))
    if layer == EMBEDDINGS:
        def pre_hook(module, args, kwargs):
            if args:
                r = fn(layer, args[0])
                return None if r is None else ((r, *args[1:]), kwargs)
            h = kwargs.get("hidden_states")
            r = fn(layer, h)
            if r is None:
                return None
            return args, {**kwargs, "hidden_states": r}

        return blocks[0].register_forward_pre_hook(wrap(pre_hook), with_kwargs=True)

    def hook(module, args, output):
        r = fn(layer, block_hidden(output))
        return None if r is None else replace_hidden(output, r)

    return blocks[layer].register_forward_hook(wrap(hook))


@contextmanager
def residual_hooks(model: nn.Module, layers: Iterable[int], fn: ResidualFn):
    """Context manager: :func:`add_residual_hook` at each layer, removed on exit (even on error)."""
    handles = []
    try:
        for L in layers:
            handles.append(add_residual_hook(model, L, fn))
        yield handles
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ activation collection
AGGREGATIONS = ("mean", "last", "last_prompt", "response_mean", "all")


@dataclass
class ActivationSet:
    """Activations per layer (rows x d, float32, CPU); ``text_index[r]`` is the text of row r."""

    values: dict[int, torch.Tensor]
    text_index: torch.Tensor


def _encode(tokenizer: Any, text: Any, max_length: int | None) -> tuple[list[int], int]:
    """Token ids and prompt length for a string or a ``(prompt, response)`` pair."""
    if isinstance(text, str):
        ids = list(tokenizer(text)["input_ids"])
        p_len = len(ids)
    elif isinstance(text, Sequence) and len(text) == 2 and all(isinstance(t, str) for t in text):
        p_ids = list(tokenizer(text[0])["input_ids"])
        r_ids = list(tokenizer(text[1], add_special_tokens=False)["input_ids"])
        ids, p_len = p_ids + r_ids, len(p_ids)
    else:
        raise ProbeDataError(
            f"a probe text must be a string or a (prompt, response) pair of strings, got {type(text).__name__}."
        )
    if max_length is not None:
        ids = ids[:max_length]
        p_len = min(p_len, len(ids))
    return ids, p_len


def _select(aggregation: str, length: int, p_len: int, i: int) -> slice | int:
    if aggregation == "mean" or aggregation == "all":
        return slice(0, length)
    if aggregation == "last":
        return length - 1
    if aggregation == "last_prompt":
        return p_len - 1
    if aggregation == "response_mean":
        if p_len >= length:
            raise ProbeDataError(
                f"text {i} has no response tokens, so aggregation='response_mean' has nothing to average.",
                "pass (prompt, response) pairs with a non-empty response, or another aggregation.",
            )
        return slice(p_len, length)
    raise ConfigError(f"unknown aggregation {aggregation!r}.", f"use one of {AGGREGATIONS}.")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block, its train/eval mode restored after (even on error)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@torch.no_grad()
def sample_completions(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                       seed: int = 0) -> list[str]:
    """Sample one completion per prompt at temperature 1 (no top-k/top-p), in eval mode (restored
    after), left-padded, with ``torch.manual_seed(seed)``; returns the decoded completions."""
    with eval_mode(model):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
        torch.manual_seed(seed)
        ids = model.generate(**{k: v.to(model_device(model)) for k, v in enc.items()}, do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[Any],
    layers: Sequence[int],
    *,
    aggregation: str = "mean",
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> ActivationSet:
    """Run ``model`` over ``texts`` and gather residual activations at ``layers``.

    Batched (right-padded, attention-masked), without gradients, in eval mode (restored
    after), on the model's device and dtype; results are float32 on the CPU.
    """
    from tqdm.auto import tqdm

    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"unknown aggregation {aggregation!r}.", f"use one of {AGGREGATIONS}.")
    if len(texts) == 0:
        raise ProbeDataError("no texts to run the model on.")
    if aggregation in ("response_mean", "last_prompt") and any(isinstance(t, str) for t in texts):
        raise ProbeDataError(
            f"aggregation={aggregation!r} needs (prompt, response) pairs, got plain strings.",
            "pass texts as (prompt, response) tuples, or use aggregation='mean' or 'last'.",
        )
    encoded = [_encode(tokenizer, t, max_length) for t in texts]
    for i, (ids, _) in enumerate(encoded):
        if not ids:
            raise ProbeDataError(f"text {i} encodes to no tokens.", "remove empty texts.")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    device = model_device(model)
    layers = list(layers)
    captured: dict[int, torch.Tensor] = {}

    def grab(layer: int, h: torch.Tensor) -> None:
        captured[layer] = h.detach()

    out: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    text_index: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with residual_hooks(model, layers, grab):
            starts = range(0, len(encoded), batch_size)
            for s in tqdm(starts, desc="collecting activations", disable=None if progress else True, leave=False):
                batch = encoded[s : s + batch_size]
                T = max(len(ids) for ids, _ in batch)
                input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), T), dtype=torch.long)
                for j, (ids, _) in enumerate(batch):
                    input_ids[j, : len(ids)] = torch.tensor(ids)
                    mask[j, : len(ids)] = 1
                captured.clear()
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
                for j, (ids, p_len) in enumerate(batch):
                    sel = _select(aggregation, len(ids), p_len, s + j)
                    n_rows = 1 if aggregation != "all" else len(ids)
                    text_index.extend([s + j] * n_rows)
                    for L in layers:
                        h = captured[L][j].float()
                        if isinstance(sel, int):
                            v = h[sel][None]
                        elif aggregation == "all":
                            v = h[sel]
                        else:
                            v = h[sel].mean(0, keepdim=True)
                        out[L].append(v.cpu())
    finally:
        model.train(was_training)
    return ActivationSet(
        values={L: torch.cat(v) for L, v in out.items()},
        text_index=torch.tensor(text_index, dtype=torch.long),
    )


# ------------------------------------------------------------------ module kinds
def module_kind(module: nn.Module) -> str | None:
    """"linear", "conv1d" (transformers' transposed Conv1D), "embedding", or None."""
    base = getattr(module, "base_layer", None)  # a PEFT-wrapped layer
    if isinstance(base, nn.Module):
        module = base
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


def weight_module(module: nn.Module) -> nn.Module:
    """The module holding the weight (PEFT's ``base_layer`` for a wrapped layer)."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def io_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D or Embedding (vocab, d)."""
    kind = module_kind(module)
    w = weight_module(module).weight
    if kind == "linear":
        return w.shape[1], w.shape[0]
    if kind == "conv1d":
        return w.shape[0], w.shape[1]
    if kind == "embedding":
        return w.shape[0], w.shape[1]
    raise UnsupportedModuleError(f"{type(module).__name__} is not a Linear, Conv1D or Embedding.",
                                 "route the Linear/Conv1D/Embedding layers inside it instead.")


# ------------------------------------------------------------------ the user's PEFT LoRA on a module
def user_lora_delta(module: nn.Module) -> Any:
    """For a module wrapped by a PEFT LoRA: a function returning the sum of its active adapters'
    weight deltas ``s·B·A`` (PEFT's own ``get_delta_weight``, in the base weight's layout); None
    for a plain module."""
    lora_A = getattr(module, "lora_A", None)
    get = getattr(module, "get_delta_weight", None)
    if not lora_A or get is None:
        return None

    def delta() -> torch.Tensor:
        active = [a for a in getattr(module, "active_adapters", list(lora_A)) if a in lora_A]
        if getattr(module, "merged", False) or not active:
            return torch.zeros((), dtype=module.base_layer.weight.dtype)
        return sum(get(a) for a in active)  # type: ignore[return-value]
    return delta


def trainable_lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of a PEFT LoRA wrapping ``module`` (empty for a plain module)."""
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


# ------------------------------------------------------------------ residual writers and readers
def _candidates(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """The block's Linear/Conv1D modules (not the user's LoRA parts)."""
    out = {}
    for name, mod in block.named_modules():
        if name and module_kind(mod) in ("linear", "conv1d") and not name.endswith("base_layer"):
            if ".lora_" in f".{name}" or "lora_" in name.split(".")[-1]:
                continue
            out[f"{prefix}{name}"] = mod
    return out


def _any_modules(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Every submodule of the block that could produce a write (not the user's LoRA parts)."""
    return {f"{prefix}{name}": mod for name, mod in block.named_modules()
            if name and not name.endswith("base_layer") and "lora_" not in name}


def _embedding_candidates(model: nn.Module, prefix: str, d: int) -> dict[str, nn.Module]:
    """Embedding modules outside the decoder blocks whose output has size d (token, position)."""
    return {n: m for n, m in model.named_modules()
            if n and not n.startswith(prefix) and module_kind(m) == "embedding" and io_dims(m)[1] == d}


def _trace(model: nn.Module, blocks: nn.ModuleList, prefix: str, d: int) -> dict[str, Any] | None:
    """One forward pass on a few tokens, recording each block's input and output, the d-wide
    tensor outputs of every module inside the blocks (Linear/Conv1D writers, but also norms, MoE
    blocks, ...), and the embeddings' outputs."""
    mods = [_any_modules(b, f"{prefix}{i}.") for i, b in enumerate(blocks)]
    embs = _embedding_candidates(model, prefix, d)
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    mod_out: dict[str, torch.Tensor] = {}
    mod_in: dict[str, torch.Tensor] = {}
    handles = []

    def record(name: str, a: tuple, o: Any) -> None:
        if isinstance(o, tuple | list) and o and torch.is_tensor(o[0]):
            o = o[0]  # (hidden, router logits / attention weights, ...): the hidden part is the candidate
        if torch.is_tensor(o) and o.ndim >= 2 and o.shape[-1] == d and o.is_floating_point():
            mod_out[name] = o.detach().float()
            if a and torch.is_tensor(a[0]) and a[0].is_floating_point():
                mod_in[name] = a[0].detach().float()

    try:
        for i, b in enumerate(blocks):
            def pre(m, args, kwargs, i=i):
                h = args[0] if args else kwargs.get("hidden_states")
                ins[i] = h.detach().float()

            def post(m, args, output, i=i):
                outs[i] = block_hidden(output).detach().float()

            handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(b.register_forward_hook(post))
        for n, m in [kv for c in mods for kv in c.items()] + list(embs.items()):
            handles.append(m.register_forward_hook(lambda mod, a, o, n=n: record(n, a, o)))
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 8
        ids = (torch.arange(1, 7) % vocab)[None].to(model_device(model))
        with eval_mode(model), torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {"mods": mods, "embs": embs, "ins": ins, "outs": outs, "mod_out": mod_out, "mod_in": mod_in,
            "eps": float(torch.finfo(dtype).eps)}


def _distinct(names: list[str], modules: dict[str, nn.Module], outputs: dict[str, torch.Tensor]) -> list[str]:
    """One name per distinct output: of modules computing the same tensor (an MLP and its down
    projection, a writer and the dropout after it), the Linear/Conv1D, else the deepest."""
    def rank(n: str) -> tuple[int, int]:
        return (0 if module_kind(modules[n]) in ("linear", "conv1d") else 1, -n.count("."))

    kept: list[str] = []
    for n in sorted(names, key=rank):
        o = outputs[n]
        if not any(outputs[k].shape == o.shape and torch.equal(outputs[k], o) for k in kept):
            kept.append(n)
    return kept


def _sum_match(target: torch.Tensor, names: list[str], outputs: dict[str, torch.Tensor],
               tol: float = 1e-4, scale: float = 0.0) -> list[str] | None:
    """The unique smallest subset of ``names`` whose outputs sum to ``target`` within ``tol``
    relative to ``‖target‖ + scale`` (None: none or ambiguous)."""
    import itertools

    names = [n for n in names if n in outputs and outputs[n].shape == target.shape]
    bound = tol * (float(target.norm()) + scale) + 1e-6
    for size in range(1, min(4, len(names)) + 1):
        hits = [list(c) for c in itertools.combinations(names, size)
                if float((target - sum(outputs[n] for n in c)).norm()) <= bound]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None  # ambiguous
    return None


def _block_writes(t: dict[str, Any], i: int) -> list[str] | None:
    """The modules whose outputs sum to block i's residual update (any kind), or None."""
    if i not in t["ins"] or i not in t["outs"]:
        return None
    mods = t["mods"][i]
    names = _distinct([n for n in mods if n in t["mod_out"]], mods, t["mod_out"])
    # the residual add rounds in the weights' dtype: allow a few ulps of the stream itself
    return _sum_match(t["outs"][i] - t["ins"][i], names, t["mod_out"], tol=max(1e-4, 8 * t["eps"]),
                      scale=float(t["ins"][i].norm()) if t["eps"] > 1e-6 else 0.0)


def _write_problem(i: int, name: str, module: nn.Module, mode_hint: str) -> str:
    """Why the write ``name`` of block i cannot be routed by splitting a Linear's weight."""
    kind = type(module).__name__
    params = ", ".join(f"{n} {tuple(p.shape)}" for n, p in module.named_parameters(recurse=False))
    if "norm" in kind.lower() or "norm" in name.split(".")[-1].lower():
        return (f"block {i}'s residual write {name!r} is the output of a {kind} (a post-norm branch: "
                f"g ⊙ y / rms(y) of the writer's output y), so the writer's weights do not live in the residual "
                f"basis{mode_hint}")
    sub = [f"{n} {tuple(p.shape)}" for n, p in module.named_parameters() if p.ndim == 3][:2]
    what = f"fused expert parameters {', '.join(sub)}" if sub else (f"parameters {params}" if params else "no Linear")
    return (f"block {i}'s residual write {name!r} is the output of a {kind} ({what}), not of a Linear/Conv1D "
            f"writer{mode_hint}")


def is_norm(module: nn.Module, name: str = "") -> bool:
    """A normalization layer (RMSNorm / LayerNorm) with a learned per-channel gain."""
    kind = type(module).__name__.lower()
    w = getattr(module, "weight", None)
    return ("norm" in kind or "norm" in name.split(".")[-1].lower()) and isinstance(w, torch.Tensor) and w.ndim == 1


def _post_norm_writer(t: dict[str, Any], i: int, norm: str) -> str | None:
    """The Linear/Conv1D of block i whose output is the input of the post-norm ``norm`` (None: none)."""
    x = t["mod_in"].get(norm)
    if x is None:
        return None
    hits = [n for n, m in t["mods"][i].items() if module_kind(m) in ("linear", "conv1d") and n in t["mod_out"]
            and t["mod_out"][n].shape == x.shape and torch.equal(t["mod_out"][n], x)]
    return hits[0] if len(hits) == 1 else None


def expert_writers(module: nn.Module, d: int) -> list[tuple[str, int]] | None:
    """The parameters inside a mixture-of-experts block that write the residual stream, with
    the axis of each that indexes it: fused expert down projections ``(E, d, ffn)`` (axis 1, as
    ``F.linear(h, down_proj[e])`` uses them) or ``(E, ffn, d)`` (axis 2, gpt-oss's ``h @ W_e``),
    their biases ``(E, d)`` (axis 1), and the down projections of shared experts (Linear
    ``(d, ffn)``, axis 0, and bias ``(d,)``). None when the block holds no such parameter, or one
    whose layout is ambiguous (``ffn == d``)."""
    out: list[tuple[str, int]] = []
    for name, p in module.named_parameters():
        leaf = name.split(".")[-1]
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        if "down" not in name:
            continue
        if p.ndim == 3:  # (E, d, ffn) used as F.linear(h, W_e), or (E, ffn, d) used as h @ W_e
            if (p.shape[1] == d) == (p.shape[2] == d):
                return None  # neither axis, or both, has the stream's size: the layout is not telling
            out.append((name, 1 if p.shape[1] == d else 2))
        elif p.ndim == 2 and "bias" in leaf and p.shape[1] == d:
            out.append((name, 1))
        elif isinstance(owner, nn.Linear) and leaf == "weight" and p.shape[0] == d:
            out.append((name, 0))
        elif isinstance(owner, nn.Linear) and leaf == "bias" and p.shape[0] == d:
            out.append((name, 0))
        else:
            return None
    return out if any(module.get_parameter(n).ndim == 3 for n, _ in out) else None  # fused experts: an MoE block


@dataclass
class Write:
    """One write into the residual stream, as the tracer found it.

    ``kind``: ``"linear"`` (a Linear/Conv1D output; ``name`` is that module), ``"post_norm"``
    (``name`` is the writer whose output the post-norm ``module`` normalizes), ``"experts"``
    (``name``/``module`` is a mixture-of-experts block, ``pins`` its expert writers, see
    :func:`expert_writers`) or ``"other"`` (nothing routable: ``module`` is what writes)."""

    kind: str
    name: str
    module: nn.Module
    pins: list[tuple[str, int]] | None = None
    norm: str | None = None


def _classify(t: dict[str, Any], i: int, d: int) -> list[Write] | None:
    """Block i's writes, each classified (None: the block's update is not a sum of module outputs)."""
    found = _block_writes(t, i)
    if found is None:
        return None
    out = []
    for n in found:
        mod = t["mods"][i][n]
        if module_kind(mod) in ("linear", "conv1d"):
            out.append(Write("linear", n, mod))
        elif is_norm(mod, n):
            src = _post_norm_writer(t, i, n)
            out.append(Write("post_norm", src, mod, norm=n) if src is not None else Write("other", n, mod))
        else:
            pins = expert_writers(mod, d)
            out.append(Write("experts", n, mod, pins=pins) if pins is not None else Write("other", n, mod))
    return out


def _traced(model: nn.Module) -> tuple[nn.Module, dict[str, Any] | None, int]:
    """(unwrapped model, the trace of one forward pass or None if it failed, hidden size)."""
    m = unwrap_model(model)
    blocks = decoder_layers(m)
    d = model_hidden_size(m)
    return m, _trace(m, blocks, decoder_layers_path(m) + ".", d), d


def post_norm_writers(model: nn.Module) -> dict[str, str]:
    """``{writer: norm}`` for every Linear/Conv1D whose output reaches the residual stream only
    through a post-norm (Gemma 2/3, OLMo 2), found from one traced forward pass; empty when the
    pass fails or there are none."""
    try:
        _, t, d = _traced(model)
    except UnknownLayerError:
        return {}
    if t is None:
        return {}
    return {w.name: w.norm for i in range(len(t["mods"])) for w in (_classify(t, i, d) or [])
            if w.kind == "post_norm"}  # type: ignore[misc]


def _unmatched(i: int, t: dict[str, Any]) -> str:
    mods = t["mods"][i]
    lin = sorted(n for n, m in mods.items() if module_kind(m) in ("linear", "conv1d") and n in t["mod_out"])
    return (f"block {i}'s residual update is not a sum of outputs of its modules "
            f"(its d-wide Linear/Conv1D modules: {lin})")


def _problem(i: int, w: Write, hint: str = "") -> str:
    return _write_problem(i, w.norm or w.name, w.module, hint)


def residual_writes(model: nn.Module, post_norm: dict[str, str] | None = None,
                    experts: dict[str, list[tuple[str, int]]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Every write into the residual stream, verified from the dataflow: (embedding modules whose
    outputs sum to block 0's input, writers per block whose outputs sum to the block's update).

    A write that is a post-norm's output (Gemma 2/3, OLMo 2: ``g ⊙ y / rms(y)`` of a writer's
    output y) is accepted when ``post_norm`` is given: the writer Linear is listed and
    ``post_norm[writer] = norm`` records where its write really is. A write that is a
    mixture-of-experts block's output is accepted when ``experts`` is given: the block is listed
    and ``experts[block] = [(parameter, axis), ...]`` names its expert writers
    (:func:`expert_writers`). Raises :class:`~gradroute.errors.RoutingError` naming what cannot
    be matched (a block whose update is not a sum of module outputs; a write of another kind;
    embeddings that are scaled or normalized before block 0)."""
    from .errors import RoutingError

    m, t, d = _traced(model)
    if t is None:
        raise RoutingError("a forward pass on a few tokens failed, so the residual writes cannot be traced.",
                           "check that model(input_ids=...) runs on this model.")
    problems = []
    # the embeddings' sum (GPT-2: wte + wpe) rounds in the weights' dtype like a block's residual add
    emb = (_sum_match(t["ins"][0], list(t["embs"]), t["mod_out"], tol=max(1e-4, 8 * t["eps"]))
           if 0 in t["ins"] else None)
    if emb is None:
        problems.append(f"the input of block 0 is not a sum of the embedding outputs {sorted(t['embs'])} "
                        "(is it scaled or normalized before block 0?)")
    accepted = {"post_norm": post_norm, "experts": experts}
    writers: list[list[str]] = []
    for i in range(len(t["mods"])):
        writes = _classify(t, i, d)
        if writes is None:
            problems.append(_unmatched(i, t))
        names = []
        for w in writes or []:
            sink = accepted.get(w.kind)
            if w.kind == "linear" or sink is not None:
                names.append(w.name)
                if sink is not None:
                    sink[w.name] = w.norm if w.kind == "post_norm" else w.pins  # type: ignore[assignment]
            else:
                hint = (" (pass post_norm='exact' to route it exactly, or 'first_order' for plain weights "
                        "isolated to first order; README: model families)") if w.kind == "post_norm" else ""
                problems.append(_problem(i, w, hint))
        writers.append(names)
    if problems:
        raise RoutingError("activation routing needs every write into the residual stream to be a Linear/Conv1D "
                           "output" + (" or a post-norm of one" if post_norm is not None else "")
                           + (" or a mixture-of-experts block's" if experts is not None else "") + ", but: "
                           + "; ".join(problems) + ".",
                           "route a dense pre-norm or post-norm family (Llama, Qwen2/3, Mistral, Phi-3, GPT-2, GPT-NeoX, "
                           "Gemma 2/3, OLMo 2 with post_norm='exact', mixture-of-experts blocks whose fused "
                           "experts say which axis is the stream's) (README: model families).")
    return emb or [], writers


def block_io_modules(model: nn.Module) -> list[dict[str, list[str]]]:
    """Residual writers and readers of each decoder block (module names in the unwrapped model).

    Writers are found from the dataflow: one forward pass on a few tokens, keeping the smallest
    set of modules whose outputs add up to the block's residual update (attention output and
    MLP down projections in pre-norm blocks, parallel or sequential). A block where that fails,
    or whose writes are not Linear/Conv1D outputs (post-norm branches: Gemma 2/3, OLMo 2;
    mixture-of-experts blocks with fused expert weights), raises
    :class:`~gradroute.errors.RoutingError` naming the module: splitting a Linear's weight by the
    residual basis would route the wrong space there, silently. Readers are the block's other
    Linear/Conv1D modules with input size d (q/k/v, gate/up, ``c_attn``/``c_fc``,
    ``query_key_value``/``dense_h_to_4h``).
    """
    from .errors import RoutingError

    m, t, d = _traced(model)
    if t is None:
        raise RoutingError(f"a forward pass of {type(m).__name__} on a few tokens failed, so its residual writers "
                           "cannot be found from the dataflow.",
                           "check that model(input_ids=...) runs on this model, or pass "
                           "targets={module: (layer, side)} naming the modules and layers yourself.")
    problems: list[str] = []
    writers: list[list[str]] = []
    for i in range(len(t["mods"])):
        writes = _classify(t, i, d)
        if writes is None:
            problems.append(_unmatched(i, t))
        problems += [_problem(i, w) for w in writes or [] if w.kind != "linear"]
        writers.append([w.name for w in writes or [] if w.kind == "linear"])
    if problems:
        raise RoutingError(
            "the residual writers of " + type(m).__name__ + " cannot be routed by splitting Linear weights: "
            + "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else "") + ".",
            "use mode='activation', which routes mixture-of-experts blocks exactly and post-norm branches (Gemma 2/3, "
            "OLMo 2) exactly with post_norm='exact'; update and gradient modes route dense pre-norm "
            "families only (Llama, Qwen2/3, Mistral, Phi-3, GPT-2, GPT-NeoX; README: model families).")
    blocks = decoder_layers(m)
    prefix = decoder_layers_path(m) + "."
    out = []
    for i, b in enumerate(blocks):
        cands = _candidates(b, f"{prefix}{i}.")
        readers = [n for n, mod in cands.items() if io_dims(mod)[0] == d and n not in writers[i]]
        out.append({"writers": writers[i], "readers": readers})
    return out
