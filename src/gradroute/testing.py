"""Tiny causal LMs and a character-level tokenizer, built locally (nothing is downloaded).

Used by the tests, the demo, the recipes and the notebooks::

    from gradroute.testing import tiny_lm
    model, tok = tiny_lm("llama")           # also "qwen2", "gpt2" (Conv1D), "gpt_neox"

The tokenizer is a ``PreTrainedTokenizerFast`` with one token per printable ASCII character
plus ``<pad> <s> </s> <unk>``; it saves and reloads with ``save_pretrained``/``AutoTokenizer``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

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
