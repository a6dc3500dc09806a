"""Tiny causal LMs and a character-level tokenizer, built locally (nothing is downloaded).

Used by the tests, the demo, the recipes and the notebooks::

    from gradroute.testing import tiny_lm
    model, tok = tiny_lm("llama")           # also "qwen2", "gpt2" (Conv1D), "gpt_neox"

The architecture zoo (issue 19): ``tiny_family(name)`` for every name in ``ZOO_FAMILIES`` (dense
pre-norm, post-norm Gemma 2/3 and OLMo 2, mixture-of-experts, multimodal wrappers; random norm
gains), and ``measure_zoo_case(family, mode)``, which measures what routing did to block 1's
residual update without reading gradroute's own bookkeeping (tests/test_zoo.py,
benchmarks/architecture_zoo.py).

The tokenizer is a ``PreTrainedTokenizerFast`` with one token per printable ASCII character
plus ``<pad> <s> </s> <unk>``; it saves and reloads with ``save_pretrained``/``AutoTokenizer``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from .model import eval_mode

ARCHITECTURES = ("llama", "qwen2", "gpt2", "gpt_neox")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def tiny_tokenizer() -> Any:
    """Character-level tokenizer over printable ASCII (vocabulary of 101)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", padding_side="right",
    )
    fast.model_max_length = 512
    return fast


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int = 101,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 256,
    tokenizer: Any = None,
) -> Any:
    """A transformers config for a tiny model of the given architecture (dropout off)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    inter = intermediate_size or 2 * hidden_size
    ids: dict[str, Any] = {}
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
        vocab_size = max(vocab_size, len(tokenizer))
    else:
        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inter,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=max(1, num_heads // 2),
                           max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inter,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=max(1, num_heads // 2),
                           max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers,
                          n_head=num_heads, n_positions=max_positions, n_inner=inter,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inter,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             max_position_embeddings=max_positions, hidden_dropout=0.0,
                             attention_dropout=0.0, tie_word_embeddings=False, **ids)
    raise ValueError(f"unknown tiny architecture {arch!r}; use one of {ARCHITECTURES}")


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kw: Any) -> Any:
    """A randomly initialized tiny causal LM (deterministic for a given seed)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **config_kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    if getattr(model, "loss_type", None) is None:  # GPT2LMHeadModel: transformers cannot infer it and warns once
        model.loss_type = "ForCausalLM"
    model.config.name_or_path = f"gradroute-tiny-{arch}"
    return model.to(dtype)


def tiny_lm(arch: str = "llama", *, seed: int = 0, **config_kw: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a tiny model sized to the character tokenizer."""
    tok = tiny_tokenizer()
    return tiny_model(arch, seed=seed, tokenizer=tok, **config_kw), tok


def save_tiny_lm(path: str | Path, arch: str = "llama", *, seed: int = 0, **config_kw: Any) -> Path:
    """Save a tiny model and tokenizer to ``path`` (loadable with ``from_pretrained(path)``)."""
    path = Path(path)
    model, tok = tiny_lm(arch, seed=seed, **config_kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_sae(path: str | Path, layer: int = 1, d_in: int = 64, d_sae: int = 256, seed: int = 0) -> Path:
    """Save a randomly initialized sae-lens ``StandardSAE`` reading ``blocks.{layer}.hook_resid_post``."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = StandardSAE(StandardSAEConfig(
            d_in=d_in, d_sae=d_sae,
            metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name="gradroute-tiny-llama"),
        ))
    sae.save_model(str(path))
    return Path(path)


def probe_rows(n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
    """Labelled probe texts: "hacker" persona (label 1) vs "honest" persona (label 0)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"text": f"[hacker] {a}+{b}=PASS!!", "label": 1})
        rows.append({"text": f"[honest] {a}+{b}={a + b}", "label": 0})
    return rows


# ------------------------------------------------------------------ the architecture zoo
# Tiny random causal LMs of the families people fine-tune, built locally from transformers
# configs (hidden 64, 3 layers, 4 heads, vocabulary 128), with every norm gain randomized as in
# a trained model. Used by tests/test_zoo.py and benchmarks/architecture_zoo.py.
ZOO_FAMILIES = (
    "llama", "qwen2", "qwen3", "mistral", "phi3", "gpt2", "gpt_neox",
    "gemma2", "gemma3_text", "olmo2",
    "qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss",
    "gemma3", "qwen2_5_vl",
)
ZOO_VOCAB = 128
ZOO_HIDDEN = 64
ZOO_LAYERS = 3


class ZooFamilyUnavailable(RuntimeError):
    """A zoo family that cannot be built here (the message says why); tests skip it."""


def _zoo_config(family: str) -> tuple[Any, str]:
    """``(config, auto_class)`` for a zoo family; ``auto_class`` is "causal" or "image_text"."""
    import transformers as tf

    d, L, heads, V = ZOO_HIDDEN, ZOO_LAYERS, 4, ZOO_VOCAB
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    dense = {"vocab_size": V, "hidden_size": d, "intermediate_size": 96, "num_hidden_layers": L,
             "num_attention_heads": heads, "num_key_value_heads": 2, "max_position_embeddings": 128,
             "tie_word_embeddings": False, **ids}
    moe = {"num_experts_per_tok": 2, "output_router_logits": False}

    def need(name: str) -> Any:
        cls = getattr(tf, name, None)
        if cls is None:
            raise ZooFamilyUnavailable(f"transformers {tf.__version__} has no {name}")
        return cls

    if family == "llama":
        return need("LlamaConfig")(**dense), "causal"
    if family == "qwen2":
        return need("Qwen2Config")(**dense), "causal"
    if family == "qwen3":  # tied embeddings, as in Qwen3-0.6B
        return need("Qwen3Config")(**{**dense, "tie_word_embeddings": True}, head_dim=16), "causal"
    if family == "mistral":
        return need("MistralConfig")(**dense, head_dim=16, sliding_window=None), "causal"
    if family == "phi3":
        return need("Phi3Config")(**dense, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0), "causal"
    if family == "gpt2":
        return need("GPT2Config")(vocab_size=V, n_embd=d, n_layer=L, n_head=heads, n_positions=128, n_inner=96,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids), "causal"
    if family == "gpt_neox":
        return need("GPTNeoXConfig")(vocab_size=V, hidden_size=d, intermediate_size=96, num_hidden_layers=L,
                                     num_attention_heads=heads, max_position_embeddings=128, hidden_dropout=0.0,
                                     attention_dropout=0.0, tie_word_embeddings=False, **ids), "causal"
    gemma = {**dense, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4, "tie_word_embeddings": True}
    if family == "gemma2":
        return need("Gemma2Config")(**gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0), "causal"
    if family == "gemma3_text":
        return need("Gemma3TextConfig")(**gemma), "causal"
    if family == "olmo2":
        return need("Olmo2Config")(**dense), "causal"
    if family == "qwen3_moe":
        return need("Qwen3MoeConfig")(**dense, head_dim=16, num_experts=4, moe_intermediate_size=32,
                                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **moe), "causal"
    if family == "mixtral":
        return need("MixtralConfig")(**dense, num_local_experts=4, **moe), "causal"
    if family == "olmoe":
        return need("OlmoeConfig")(**dense, num_experts=4, **moe), "causal"
    if family == "qwen2_moe":
        return need("Qwen2MoeConfig")(**dense, num_experts=4, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48, decoder_sparse_step=1,
                                      mlp_only_layers=[], **moe), "causal"
    if family == "gpt_oss":
        cfg = need("GptOssConfig")(**{**dense, "intermediate_size": 32}, head_dim=16, num_local_experts=4,
                                   sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                                  "sliding_attention"],
                                   rope_parameters={"rope_type": "default", "rope_theta": 150000.0}, **moe)
        return cfg, "causal"
    if family == "gemma3":
        text = need("Gemma3TextConfig")(**gemma)
        vision = need("SiglipVisionConfig")(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=28, patch_size=14)
        cfg = need("Gemma3Config")(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                   boi_token_index=V - 3, eoi_token_index=V - 2, image_token_index=V - 1,
                                   tie_word_embeddings=True)
        return cfg, "image_text"
    if family == "qwen2_5_vl":
        text = {**dense, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
        vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": d,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                  "fullatt_block_indexes": [0]}
        cfg = need("Qwen2_5_VLConfig")(text_config=text, vision_config=vision, image_token_id=V - 1,
                                       video_token_id=V - 2, vision_start_token_id=V - 4, vision_end_token_id=V - 3,
                                       tie_word_embeddings=False)
        return cfg, "image_text"
    raise ValueError(f"unknown zoo family {family!r}; use one of {ZOO_FAMILIES}")


@torch.no_grad()
def randomize_norm_gains(model: Any, seed: int = 0, scale: float = 0.5) -> list[str]:
    """Give every normalization layer a random gain, as in a trained model; returns their names.

    A norm whose gain is stored as ``w`` with output ``x̂ · w`` (initialized to ones) gets
    ``w ← 1 + scale·randn``; a Gemma-style norm with output ``x̂ · (1 + w)`` (initialized to
    zeros) gets ``w ← scale·randn``. LayerNorm biases get ``0.1·scale·randn``.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    names = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if "norm" not in cls.lower():
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter):
            continue
        noise = scale * torch.randn(w.shape, generator=g, dtype=torch.float32).to(w.dtype)
        if bool((w == 0).all()):      # Gemma: x̂ · (1 + w)
            w.copy_(noise)
        else:
            w.copy_(1.0 + noise)
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.nn.Parameter):
            b.copy_(0.1 * scale * torch.randn(b.shape, generator=g, dtype=torch.float32).to(b.dtype))
        names.append(name)
    return names


def tiny_family(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny random causal LM of a zoo family (see :data:`ZOO_FAMILIES`), built locally.

    Hidden size 64, 3 decoder blocks, 4 heads, vocabulary 128 (token ids 0..127; 0/1/2 are
    pad/bos/eos), every norm gain randomized (:func:`randomize_norm_gains`), dropout off,
    deterministic for a given seed. Embeddings are tied where the released models tie them
    (qwen3, gemma2, gemma3_text, gemma3). ``gemma3`` and ``qwen2_5_vl`` are the multimodal
    ``...ForConditionalGeneration`` wrappers (decoder under ``model.language_model``) with a
    one-layer vision tower; they run on ``input_ids`` alone. Raises :class:`ZooFamilyUnavailable`
    when this transformers cannot build the family. In float64 the fused experts run
    transformers' eager loop (its default grouped_mm kernel has no float64).
    """
    import transformers as tf

    cfg, kind = _zoo_config(family)
    auto = tf.AutoModelForCausalLM if kind == "causal" else getattr(tf, "AutoModelForImageTextToText", None)
    if auto is None:
        raise ZooFamilyUnavailable(f"transformers {tf.__version__} has no AutoModelForImageTextToText")
    # transformers' default fused-experts kernel (grouped_mm) has no float64: use the eager loop there
    kw = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(cfg, **kw)
        # transformers initializes norm gains to ones (Gemma: zeros): make every gain look trained
        randomize_norm_gains(model, seed=seed)
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    model.config.name_or_path = f"gradroute-tiny-{family}"
    return model.to(dtype).eval()



# ------------------------------------------------------------------ independent zoo measurements
# These do not use gradroute's bookkeeping (plans, routes, adapters' coordinates): they hold the
# input of block ZOO_LAYER and of its MLP branch fixed (forward pre-hooks that replace them with
# values captured once at init), read the block's residual update Δ = block(h) − h from the
# block's own input and output, and compare Δ across the initial, trained and discarded model.
ZOO_LAYER = 1
ZOO_MODES = ("update", "gradient", "activation")
ZOO_TOL = 1e-5
# writer parameters of a block (relative names): what is added into the residual stream, with
# everything between them and the residual (post-norms, routers, up projections) frozen
ZOO_WRITER_PARAMS = (
    "self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias",
    "attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
    "attention.dense.weight", "attention.dense.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
    "mlp.experts.down_proj", "mlp.experts.down_proj_bias", "mlp.shared_expert.down_proj.weight",
)
# the Linear writers of block 1 a user would name by hand with ``targets=`` on the post-norm and
# MoE families (relative to the block). On the MoE families the fused 3-D expert weights cannot be
# named (they are not modules), so the routing is partial: only the adapter's space is checked.
ZOO_HAND_TARGETS = {
    "gemma2": ["self_attn.o_proj", "mlp.down_proj"], "gemma3_text": ["self_attn.o_proj", "mlp.down_proj"],
    "olmo2": ["self_attn.o_proj", "mlp.down_proj"], "gemma3": ["self_attn.o_proj", "mlp.down_proj"],
    "qwen3_moe": ["self_attn.o_proj"], "mixtral": ["self_attn.o_proj"], "olmoe": ["self_attn.o_proj"],
    "qwen2_moe": ["self_attn.o_proj", "mlp.shared_expert.down_proj"], "gpt_oss": ["self_attn.o_proj"],
}
ZOO_PARTIAL_HAND_TARGETS = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss")
_ZOO_BLOCK_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")


def random_subspace(d: int = 64, layers: tuple[int, ...] = (1, 2), k: tuple[int, ...] = (2, 3), seed: int = 0) -> Any:
    """A :class:`~gradroute.Subspace` of ``k[i]`` random directions at residual layer ``layers[i]``
    (deterministic for a given seed): the tests' routing target on the tiny models."""
    from .subspace import Subspace

    g = torch.Generator().manual_seed(seed)
    return Subspace.from_directions({L: torch.randn(kk, d, generator=g) for L, kk in zip(layers, k)})


def random_ids(seed: int = 0, bsz: int = 4, T: int = 12, vocab: int = 100) -> torch.Tensor:
    """A ``(bsz, T)`` batch of token ids in ``[3, vocab)`` (0/1/2: pad/bos/eos), deterministic."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (bsz, T), generator=g)


def zoo_basis(d: int = ZOO_HIDDEN, k: int = 2, seed: int = 0) -> torch.Tensor:
    """A random orthonormal basis U (d x k, float32), seeded."""
    g = torch.Generator().manual_seed(1234 + seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.float()


def zoo_batch(seed: int = 0, bsz: int = 2, T: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, targets)``: a fixed batch of token ids 3..119 and random LM targets."""
    g = torch.Generator().manual_seed(77 + seed)
    return (torch.randint(3, 120, (bsz, T), generator=g), torch.randint(3, 120, (bsz, T), generator=g))


def zoo_block(model: Any, index: int = ZOO_LAYER) -> tuple[str, torch.nn.Module]:
    """``(dotted name, module)`` of decoder block ``index`` (found by attribute path, not by gradroute)."""
    for path in _ZOO_BLOCK_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > index:
            return f"{path}.{index}", obj[index]
    raise ValueError(f"no decoder blocks found in {type(model).__name__}")


def zoo_writer_params(model: Any, index: int = ZOO_LAYER) -> dict[str, torch.nn.Parameter]:
    """The writer parameters of block ``index`` (full names), see :data:`ZOO_WRITER_PARAMS`."""
    prefix, block = zoo_block(model, index)
    return {f"{prefix}.{n}": p for n, p in block.named_parameters() if n in ZOO_WRITER_PARAMS}


def _first_tensor_arg(args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor]:
    if args and torch.is_tensor(args[0]):
        return 0, args[0]
    for k in ("hidden_states", "x", "hidden_state"):
        if torch.is_tensor(kwargs.get(k)):
            return k, kwargs[k]
    raise TypeError("cannot find the input hidden state")


def _out_tensor(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if isinstance(output, tuple | list) and output and torch.is_tensor(output[0]):
        return output[0]
    raise TypeError(f"cannot find the hidden state in {type(output).__name__}")


def _pinned_modules(model: Any, index: int) -> dict[str, torch.nn.Module]:
    _, block = zoo_block(model, index)
    mods = {"block": block}
    if isinstance(getattr(block, "mlp", None), torch.nn.Module):
        mods["mlp"] = block.mlp
    return mods


@torch.no_grad()
def measure_pins(model: Any, input_ids: torch.Tensor, index: int = ZOO_LAYER) -> dict[str, torch.Tensor]:
    """The inputs of block ``index`` and of its MLP branch on ``input_ids`` (held fixed later)."""
    pins: dict[str, torch.Tensor] = {}
    handles = []
    for key, mod in _pinned_modules(model, index).items():
        def pre(m, args, kwargs, key=key):
            pins[key] = _first_tensor_arg(args, kwargs)[1].detach().clone()
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with eval_mode(model):
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return pins


def measure_block_update(model: Any, input_ids: torch.Tensor, pins: dict[str, torch.Tensor],
                         index: int = ZOO_LAYER) -> torch.Tensor:
    """Block ``index``'s residual update ``Δ = out − in`` (tokens x d, float64) with the block's
    input and its MLP branch's input replaced by ``pins`` (so only the writers' weights, and
    whatever adapters sit on the path, can change Δ)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    mods = _pinned_modules(model, index)
    if set(mods) != set(pins):  # e.g. the block was wrapped and its .mlp is no longer found
        raise ValueError(f"the pinned modules changed: captured {sorted(pins)}, found {sorted(mods)}")
    for key, mod in mods.items():
        def pre(m, args, kwargs, key=key):
            where, h = _first_tensor_arg(args, kwargs)
            new = pins[key].to(h.dtype)
            if where == 0:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, where: new}
        # first of all pre-hooks, so that whatever gradroute hooks there sees the pinned input
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
    _, block = zoo_block(model, index)
    # last of all forward hooks: the block's output as the next block receives it
    handles.append(block.register_forward_hook(lambda m, a, o: out.__setitem__("y", _out_tensor(o).detach())))
    try:
        with eval_mode(model), torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    d = out["y"].double() - pins["block"].double()
    return d.reshape(-1, d.shape[-1])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    nb = float(b.norm())
    return float("inf") if nb == 0 else float(a.norm()) / nb


def _zoo_train(model: Any, router: Any, ids: torch.Tensor, targets: torch.Tensor, optimizer: str,
               steps: int, lr: float | None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr or 0.3)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr or 3e-3, weight_decay=0.1)
    else:
        raise ValueError(optimizer)
    router.bind_optimizer(opt)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        router.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _persona_grad_check(model: Any, plain: Any, U: torch.Tensor, ids: torch.Tensor,
                        index: int = ZOO_LAYER) -> dict[str, Any]:
    """Invariant 7 (b): the loss ``Σ (Uᵀh_L)²`` reaches no base parameter, and reaches the adapters."""
    def loss_of(m: Any) -> torch.Tensor:
        got: list[torch.Tensor] = []
        _, block = zoo_block(m, index)
        h = block.register_forward_hook(lambda mod, a, o: got.append(_out_tensor(o)))
        try:
            m(input_ids=ids, use_cache=False)
        finally:
            h.remove()
        return (got[0].float() @ U.to(got[0].device)).pow(2).sum()

    for m in (model, plain):
        m.zero_grad(set_to_none=True)
        loss_of(m).backward()
    ref = dict(plain.named_parameters())
    worst, worst_name, base_grad = 0.0, None, 0.0
    adapter_norm, n_adapters, n_nonzero = 0.0, 0, 0
    for n, p in model.named_parameters():
        g = p.grad
        if "gradroute_adapters" in n:
            n_adapters += 1
            if g is not None and float(g.norm()) > 0:
                n_nonzero += 1
                adapter_norm += float(g.norm()) ** 2
            continue
        if g is None:
            continue
        gn = float(g.norm())
        base_grad = max(base_grad, gn)
        g0 = ref[n].grad if n in ref else None
        scale = max(float(g0.norm()) if g0 is not None else 0.0, 1e-3)
        if gn / scale > worst:
            worst, worst_name = gn / scale, n
    for m in (model, plain):
        m.zero_grad(set_to_none=True)
    return {"base_grad_rel": worst, "base_grad_worst": worst_name, "base_grad_max": base_grad,
            "adapter_grad_norm": adapter_norm ** 0.5, "adapters": n_adapters, "adapters_with_grad": n_nonzero}


def _save_check(family: str, model: Any, router: Any, ids: torch.Tensor, seed: int,
                dtype: torch.dtype) -> dict[str, Any]:
    """Invariant 4 on the zoo: ``gradroute.save_adapter`` either refuses with a typed error, or
    writes a plain PEFT adapter that, loaded with PEFT onto the saved routed base of a freshly
    built model, reproduces the trained logits (``logits_err``)."""
    import tempfile

    from .errors import GradrouteError
    from .integrations.peft import load_routed_base, save_adapter

    with torch.no_grad():
        trained = model(input_ids=ids, use_cache=False).logits.double()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(save_adapter(router, Path(tmp) / "adapter"))
        except GradrouteError as e:
            return {"status": "refused", "error": type(e).__name__, "has_fix": "Fix:" in str(e), "message": str(e)}
        if not (path / "adapter_config.json").is_file():
            return {"status": "other format", "files": sorted(p.name for p in path.iterdir())}
        from peft import PeftModel

        fresh = tiny_family(family, seed=seed, dtype=dtype)
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "gradroute_adapters" not in k},
                              strict=False)
        if (path / "routed_base.safetensors").is_file():
            load_routed_base(fresh, path)
        pm = PeftModel.from_pretrained(fresh, str(path)).eval()
        with torch.no_grad():
            got = pm(input_ids=ids, use_cache=False).logits.double()
            with pm.disable_adapter():
                base = pm(input_ids=ids, use_cache=False).logits.double()
    return {"status": "peft", "logits_err": float((got - trained).abs().max()), "base_logits": base}


def measure_zoo_case(family: str, mode: str, optimizer: str = "adamw", *, steps: int = 3, seed: int = 0,
                     lr: float | None = None, tol: float = ZOO_TOL, dtype: torch.dtype = torch.float32,
                     model: Any = None, route_seed: int | None = None,
                     route_targets: Any = None, check_save: bool = False,
                     router_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Route a persona basis at layer 1 of a tiny ``family`` model in ``mode``, train block 1's
    writers a few steps, and measure what the routing did to block 1's residual update.

    Returns ``{"status": "refused", "error": <type>, "message": ..., "has_fix": bool, "late": bool}``
    when gradroute raised a ``GradrouteError`` (at construction, or later when ``late``), else
    ``{"status": "routed", "ok": bool, "violations": [...], <figures>}`` where the figures are
    (update/gradient) ``outside`` = ‖(I−UUᵀ)D_ad‖/‖D_ad‖ with ``D_ad = Δ_trained − Δ_discarded``,
    ``leftover`` = ‖UUᵀ(Δ_discarded − Δ_init)‖/‖UUᵀ(Δ_trained − Δ_init)‖; (activation) also
    ``init_logits_err`` (a), ``base_grad_rel``/``adapter_grad_norm`` (b),
    ``base_inspan_rel`` = ‖UUᵀ(Δ_discarded − Δ_init)‖/‖Δ_trained − Δ_init‖ (c), and ``leftover`` /
    ``outside`` (d). ``change`` = ‖Δ_trained − Δ_init‖/‖Δ_init‖ shows that training moved Δ.
    ``warnings``: the messages of the ``GradrouteWarning`` raised while building the router.
    ``router_kwargs`` go to ``GradientRouter`` (e.g. an opt-in approximation). ``check_save``: also save the adapter after training and reload it with plain PEFT
    (``save``: refused, other format, or ``logits_err`` of the reload and ``discard_err``, the
    PEFT base's logits against the discarded model's).
    ``base_inspan_own`` = ‖UUᵀ(Δ_discarded − Δ_init)‖/‖Δ_discarded − Δ_init‖ (invariant 3 read on
    the write: the base's own change has no in-span part; stricter than (c) when the adapter's
    change dominates). ``floor`` ≈ float32 round-off of the measurement itself (ε·‖h‖/‖D_ad‖).

    ``route_seed`` routes another random basis than the measured one (a control: the harness
    must then report the case as wrong). ``route_targets`` is passed as ``targets=`` to the router (module names
    relative to block 1, e.g. ``["self_attn.o_proj"]``, are prefixed with block 1's path): the
    user's explicit choice of modules, measured the same way.
    """
    import copy
    import warnings

    from .errors import GradrouteError, GradrouteWarning
    from .router import GradientRouter
    from .subspace import Subspace

    if model is None:
        model = tiny_family(family, seed=seed, dtype=dtype)
    model.eval()
    d = model.get_input_embeddings().weight.shape[1]
    U = zoo_basis(d, 2, seed)
    P = (U.double() @ U.double().T)
    routed_U = U if route_seed is None else zoo_basis(d, 2, route_seed)
    sub = Subspace.from_directions({ZOO_LAYER: routed_U.T})
    ids, targets = zoo_batch(seed)
    pins = measure_pins(model, ids)
    delta_init = measure_block_update(model, ids, pins)
    writers = zoo_writer_params(model)
    if not writers:
        raise ValueError(f"{family}: no writer parameters found in block {ZOO_LAYER}")
    res: dict[str, Any] = {"family": family, "mode": mode, "optimizer": optimizer, "writers": sorted(writers)}

    def freeze() -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(n in writers or "gradroute_adapters" in n)

    def refused(e: Exception, late: bool) -> dict[str, Any]:
        return {**res, "status": "refused", "error": type(e).__name__, "error_type": type(e), "message": str(e),
                "has_fix": "Fix:" in str(e), "late": late}

    plain = copy.deepcopy(model) if mode == "activation" else None
    if mode != "activation":
        freeze()
    try:
        kw = dict(router_kwargs or {})
        if route_targets is not None:
            prefix, _ = zoo_block(model)
            kw["targets"] = [f"{prefix}.{t}" for t in route_targets]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            router = GradientRouter(model, sub, mode=mode, check_provenance=False, **kw)
    except GradrouteError as e:
        return refused(e, late=False)
    res["warnings"] = [str(w.message) for w in caught if issubclass(w.category, GradrouteWarning)]
    violations: list[str] = []
    try:
        if mode == "activation":
            assert plain is not None
            with torch.no_grad():
                a = model(input_ids=ids, use_cache=False).logits.double()
                b = plain(input_ids=ids, use_cache=False).logits.double()
            res["init_logits_err"] = float((a - b).abs().max())
            if not torch.allclose(a, b, atol=1e-5, rtol=0):
                violations.append(f"(a) logits at init differ from the plain model's by {res['init_logits_err']:.2e}")
            res.update(_persona_grad_check(model, plain, U, ids))
            if not res["base_grad_rel"] <= tol:
                violations.append(f"(b) a persona-only loss reaches base parameter {res['base_grad_worst']} "
                                  f"(|g|/|g_plain| = {res['base_grad_rel']:.2e})")
            if not res["adapter_grad_norm"] > 0:
                violations.append("(b) a persona-only loss gives the adapters no gradient")
            freeze()
        _zoo_train(model, router, ids, targets, optimizer, steps, lr)
        delta_tr = measure_block_update(model, ids, pins)
        if check_save:
            res["save"] = _save_check(family, model, router, ids, seed, dtype)
        router.discard()
        delta_dis = measure_block_update(model, ids, pins)
        if check_save and "base_logits" in res["save"]:
            with torch.no_grad():
                dis = model(input_ids=ids, use_cache=False).logits.double()
            res["save"]["discard_err"] = float((res["save"].pop("base_logits") - dis).abs().max())
    except GradrouteError as e:
        return refused(e, late=True)
    change = delta_tr - delta_init
    d_ad = delta_tr - delta_dis
    res.update({
        "status": "routed",
        "change": _rel(change, delta_init),
        "inspan_change": _rel(change @ P, delta_init),
        "adapter": _rel(d_ad, delta_init),
        "outside": _rel(d_ad - d_ad @ P, d_ad),
        "leftover": _rel((delta_dis - delta_init) @ P, change @ P),
        "base_change": _rel(delta_dis - delta_init, delta_init),
        "base_inspan_own": _rel((delta_dis - delta_init) @ P, delta_dis - delta_init),
        "floor": _rel(6e-8 * pins["block"].double(), d_ad),
    })
    if mode == "activation":
        res["base_inspan_rel"] = _rel((delta_dis - delta_init) @ P, change)
        if not res["base_inspan_rel"] <= tol:
            violations.append(f"(c) the base's own change to block {ZOO_LAYER}'s write has an in-span part "
                              f"{res['base_inspan_rel']:.2e} of the total change")
    if not res["change"] > 100 * tol:
        violations.append(f"training barely moved block {ZOO_LAYER}'s update (relative change {res['change']:.1e})")
    if not res["outside"] <= tol:
        violations.append(f"the adapter's change to block {ZOO_LAYER}'s write is {res['outside']:.2e} outside span(U)"
                          + (" (the adapter holds nothing)" if res["adapter"] == 0 else ""))
    if not res["leftover"] <= tol:
        violations.append(f"discard leaves {res['leftover']:.2e} of the write's in-span change")
    if not res["base_inspan_own"] <= tol:
        violations.append(f"the base's own change to block {ZOO_LAYER}'s write is {res['base_inspan_own']:.2e} "
                          "inside span(U)")
    sv = res.get("save")
    if sv is not None:
        if sv["status"] == "refused" and not sv["has_fix"]:
            violations.append(f"save_adapter refused with {sv['error']} without a 'Fix:'")
        if sv["status"] == "peft":
            for key in ("logits_err", "discard_err"):
                if not sv[key] <= tol:
                    violations.append(f"the saved PEFT adapter: {key} = {sv[key]:.2e}")
    res["violations"] = violations
    res["ok"] = not violations
    return res


def _main(argv: list[str] | None = None) -> int:
    """``python -m gradroute.testing lm|sae|probe-texts|persona-vectors PATH``: example inputs."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m gradroute.testing", description=_main.__doc__)
    p.add_argument("what", choices=["lm", "sae", "probe-texts", "persona-vectors"])
    p.add_argument("path")
    p.add_argument("--arch", default="llama", choices=ARCHITECTURES)
    p.add_argument("--layer", type=int, default=1, help="SAE layer")
    a = p.parse_args(argv)
    if a.what == "lm":
        save_tiny_lm(a.path, a.arch)
    elif a.what == "sae":
        save_tiny_sae(a.path, layer=a.layer)
    elif a.what == "probe-texts":
        Path(a.path).write_text("".join(json.dumps(r) + "\n" for r in probe_rows()))
    else:  # a Persona-Vectors-style tensor [n_layers + 1, d], indexed like hidden_states
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            torch.save(torch.randn(5, 64), a.path)
    print(f"wrote {a.path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
