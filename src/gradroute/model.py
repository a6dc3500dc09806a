"""Model introspection (torch only): decoder blocks, residual-stream hooks, module kinds,
residual writers and readers, activation collection.

Works on any ``nn.Module`` laid out like a Hugging Face causal LM; nothing here imports
transformers (loading by hub name lives in :mod:`gradroute.integrations.transformers`).

Layer L is the output of decoder block L (see :mod:`gradroute.layers`). Activations are read
with forward hooks on the blocks (a pre-hook on block 0 for layer −1), never from
``output_hidden_states``, whose last entry is post-final-norm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model (unwraps DDP/FSDP ``.module`` and PEFT wrappers)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel",
        ):
            model = model.module
        else:
            break
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


def add_residual_hook(model: nn.Module, layer: int, fn: ResidualFn) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(layer, h)`` on the residual stream at ``layer``; a returned tensor replaces ``h``.

    Layer L >= 0 hooks the output of block L; layer −1 hooks the input of block 0.
    """
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

        return blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        r = fn(layer, block_hidden(output))
        return None if r is None else replace_hidden(output, r)

    return blocks[layer].register_forward_hook(hook)


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


@torch.no_grad()
def sample_completions(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                       seed: int = 0) -> list[str]:
    """Sample one completion per prompt at temperature 1 (no top-k/top-p), in eval mode (restored
    after), left-padded, with ``torch.manual_seed(seed)``; returns the decoded completions."""
    was = model.training
    model.eval()
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
        torch.manual_seed(seed)
        ids = model.generate(**{k: v.to(model_device(model)) for k, v in enc.items()}, do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was)


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
# Fallback only: module-name suffixes of residual writers in common architectures. The primary
# lookup (block_io_modules) finds writers from the model's own dataflow.
KNOWN_WRITER_SUFFIXES = (
    "self_attn.o_proj", "mlp.down_proj",                     # Llama, Qwen2/3, Mistral, Gemma, OLMo
    "attn.c_proj", "mlp.c_proj",                             # GPT-2 (Conv1D)
    "attention.dense", "mlp.dense_4h_to_h",                  # GPT-NeoX / Pythia
    "self_attention.dense",                                  # Falcon, Bloom
    "self_attn.out_proj", "fc2", "attn.out_proj", "mlp.fc_out",  # OPT, GPT-J
    "self_attn.dense", "mlp.fc2",                            # Phi
    "block_sparse_moe.experts.*.w2", "feed_forward.w2",
)


def _candidates(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    out = {}
    for name, mod in block.named_modules():
        if name and module_kind(mod) in ("linear", "conv1d") and not name.endswith("base_layer"):
            if ".lora_" in f".{name}" or "lora_" in name.split(".")[-1]:
                continue
            out[f"{prefix}{name}"] = mod
    return out


def _embedding_candidates(model: nn.Module, prefix: str, d: int) -> dict[str, nn.Module]:
    """Embedding modules outside the decoder blocks whose output has size d (token, position)."""
    return {n: m for n, m in model.named_modules()
            if n and not n.startswith(prefix) and module_kind(m) == "embedding" and io_dims(m)[1] == d}


def _trace(model: nn.Module, blocks: nn.ModuleList, prefix: str, d: int) -> dict[str, Any] | None:
    """One forward pass on a few tokens, recording each block's input and output, the outputs
    of every d-output Linear/Conv1D inside the blocks, and of the embeddings."""
    cands = [{n: m for n, m in _candidates(b, f"{prefix}{i}.").items() if io_dims(m)[1] == d}
             for i, b in enumerate(blocks)]
    embs = _embedding_candidates(model, prefix, d)
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    mod_out: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for i, b in enumerate(blocks):
            def pre(m, args, kwargs, i=i):
                h = args[0] if args else kwargs.get("hidden_states")
                ins[i] = h.detach().float()

            def post(m, args, output, i=i):
                outs[i] = block_hidden(output).detach().float()

            handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(b.register_forward_hook(post))
        for n, m in [kv for c in cands for kv in c.items()] + list(embs.items()):
            handles.append(m.register_forward_hook(
                lambda mod, a, o, n=n: mod_out.__setitem__(n, o.detach().float())))
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 8
        ids = (torch.arange(1, 7) % vocab)[None].to(model_device(model))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            model.train(was)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    return {"cands": cands, "embs": embs, "ins": ins, "outs": outs, "mod_out": mod_out}


def _sum_match(target: torch.Tensor, names: list[str], outputs: dict[str, torch.Tensor]) -> list[str] | None:
    """The unique smallest subset of ``names`` whose outputs sum to ``target`` (None: none or ambiguous)."""
    import itertools

    names = [n for n in names if n in outputs and outputs[n].shape == target.shape]
    for size in range(1, min(4, len(names)) + 1):
        hits = [list(c) for c in itertools.combinations(names, size)
                if (target - sum(outputs[n] for n in c)).norm() <= 1e-4 * target.norm() + 1e-6]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None  # ambiguous
    return None


def _trace_writers(model: nn.Module, blocks: nn.ModuleList, prefix: str, d: int) -> list[list[str] | None] | None:
    """Writers per block from one forward pass: the smallest set of d-output modules whose
    outputs sum to the block's residual update (output − input); None for a block where that
    fails, None overall if the pass fails."""
    t = _trace(model, blocks, prefix, d)
    if t is None:
        return None
    result: list[list[str] | None] = []
    for i in range(len(blocks)):
        if i not in t["ins"] or i not in t["outs"]:
            result.append(None)
            continue
        result.append(_sum_match(t["outs"][i] - t["ins"][i], list(t["cands"][i]), t["mod_out"]))
    return result


def residual_writes(model: nn.Module) -> tuple[list[str], list[list[str]]]:
    """Every write into the residual stream, verified from the dataflow: (embedding modules whose
    outputs sum to block 0's input, writers per block whose outputs sum to the block's update).

    Raises :class:`~gradroute.errors.RoutingError` naming what cannot be matched (a block whose
    update is not a sum of module outputs, e.g. post-norm branches; embeddings that are scaled
    or normalized before block 0)."""
    from .errors import RoutingError

    m = unwrap_model(model)
    blocks = decoder_layers(m)
    prefix = decoder_layers_path(m) + "."
    d = model_hidden_size(m)
    t = _trace(m, blocks, prefix, d)
    if t is None:
        raise RoutingError("a forward pass on a few tokens failed, so the residual writes cannot be traced.",
                           "check that model(input_ids=...) runs on this model.")
    problems = []
    emb = _sum_match(t["ins"].get(0, torch.zeros(0)), list(t["embs"]), t["mod_out"]) if 0 in t["ins"] else None
    if emb is None:
        problems.append(f"the input of block 0 is not a sum of the embedding outputs {sorted(t['embs'])} "
                        "(is it scaled or normalized before block 0?)")
    writers: list[list[str]] = []
    for i in range(len(blocks)):
        found = None
        if i in t["ins"] and i in t["outs"]:
            found = _sum_match(t["outs"][i] - t["ins"][i], list(t["cands"][i]), t["mod_out"])
        if found is None:
            problems.append(f"block {i}'s residual update is not a sum of outputs of its Linear/Conv1D modules "
                            f"(candidates: {sorted(t['cands'][i])})")
            found = []
        writers.append(found)
    if problems:
        raise RoutingError("activation routing needs every write into the residual stream, but: "
                           + "; ".join(problems) + ".",
                           "use mode='update' for this architecture, or open an issue with the model's class name.")
    return emb or [], writers


def block_io_modules(model: nn.Module) -> list[dict[str, list[str]]]:
    """Residual writers and readers of each decoder block (module names in the unwrapped model).

    Writers are found from the dataflow: one forward pass on a few tokens, keeping the smallest
    set of Linear/Conv1D modules with output size d whose outputs add up to the block's residual
    update (attention output and MLP down projections in pre-norm blocks, parallel or
    sequential). If that fails (e.g. post-norm on the branches), module names are matched
    against :data:`KNOWN_WRITER_SUFFIXES`. Readers are the block's other Linear/Conv1D modules
    with input size d (q/k/v, gate/up, ``c_attn``/``c_fc``, ``query_key_value``/``dense_h_to_4h``).
    """
    import fnmatch

    m = unwrap_model(model)
    blocks = decoder_layers(m)
    prefix = decoder_layers_path(m) + "."
    d = model_hidden_size(m)
    traced = _trace_writers(m, blocks, prefix, d)
    if traced is None or any(w is None for w in traced):  # the name table, for the whole model
        traced = []
        for i, b in enumerate(blocks):
            cands = _candidates(b, f"{prefix}{i}.")
            traced.append([n for n in cands if any(fnmatch.fnmatchcase(n, f"*{s}") for s in KNOWN_WRITER_SUFFIXES)])
    writers: list[list[str]] = traced  # type: ignore[assignment]
    out = []
    for i, b in enumerate(blocks):
        cands = _candidates(b, f"{prefix}{i}.")
        readers = [n for n, mod in cands.items() if io_dims(mod)[0] == d and n not in writers[i]]
        out.append({"writers": writers[i], "readers": readers})
    return out
