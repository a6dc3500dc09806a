"""Hugging Face transformers: loading a model and tokenizer by hub name or local path.

Model introspection (blocks, residual hooks, writers and readers, activation collection) is
torch-only and lives in :mod:`gradroute.model`; its names are re-exported here for scripts
written against earlier versions.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model import (  # noqa: F401  (re-exported)
    ActivationSet,
    add_residual_hook,
    block_hidden,
    block_io_modules,
    collect_activations,
    decoder_layers,
    decoder_layers_path,
    model_device,
    model_hidden_size,
    model_name,
    num_layers,
    replace_hidden,
    residual_hooks,
    unwrap_model,
)


def load_model_and_tokenizer(name_or_path: str, dtype: torch.dtype | str | None = None, device: str | None = None):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a hub name or a local path.

    ``tiny:<arch>`` (``tiny:llama``, ``tiny:gpt2``, ...) builds gradroute's deterministic tiny
    test model and character tokenizer locally (see :mod:`gradroute.testing`). The tokenizer
    gets a pad token (its EOS) if it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path.startswith("tiny:"):
        from ..testing import tiny_lm

        model, tok = tiny_lm(name_or_path.split(":", 1)[1])
        if dtype is not None:
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return (model.to(device) if device else model), tok

    kw: dict[str, Any] = {}
    if dtype is not None:
        kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kw)
    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if device is not None:
        model.to(device)
    return model, tok
