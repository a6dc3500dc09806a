"""The layer convention, written down once.

**Layer L is the residual stream after decoder block L.** Equivalently:

==============================  ===========================================================
TransformerLens                 ``blocks.L.hook_resid_post`` (= ``blocks.{L+1}.hook_resid_pre``)
HF forward hook                 output of ``model.model.layers[L]`` (``transformer.h[L]``, ...)
HF ``output_hidden_states``     ``hidden_states[L + 1]`` for L < n_layers − 1. The last block is
                                different: HF's ``hidden_states[-1]`` is taken *after the final
                                norm*, so layer ``n_layers − 1`` is only reachable with a hook.
layer −1                        the stream before block 0 (embeddings; ``hidden_states[0]``,
                                ``blocks.0.hook_resid_pre``)
==============================  ===========================================================

Writers of block L (attention output projection, MLP down projection, GPT-2 ``c_proj``
``Conv1D``s, GPT-NeoX ``dense``/``dense_4h_to_h``) write into layer L and use its basis;
readers of block L (q/k/v, gate/up, ``c_attn``/``c_fc``, ``query_key_value``/``dense_h_to_4h``)
read ``resid_pre L`` = layer L − 1.

Peers' files: Persona Vectors tensors are indexed like ``hidden_states`` (index i → layer
i − 1); Assistant Axis files are indexed by block output (index i → layer i).
"""

from __future__ import annotations

import re

from .errors import SAEError, UnknownLayerError

LAYER_CONVENTION = "resid_post"
EMBEDDINGS = -1

LayerKey = int | str


def writer_layer(block: int) -> int:
    """The layer a writer of ``block`` writes into (its resid_post)."""
    return block


def reader_layer(block: int) -> int:
    """The layer a reader of ``block`` reads (its resid_pre, i.e. the previous block's output)."""
    return block - 1


def hidden_states_index(layer: int, n_layers: int) -> int:
    """Index into HF ``output_hidden_states`` holding ``layer`` (pre-final-norm).

    Raises for the last block, whose HF hidden state is post-norm: use a hook there.
    """
    check_layer(layer, n_layers)
    if layer == n_layers - 1:
        raise UnknownLayerError(
            f"layer {layer} is the last block; HF hidden_states[-1] is taken after the final "
            "norm, so it is not that block's output.",
            "read the last block's output with a forward hook (gradroute does this for you).",
        )
    return layer + 1


def layer_from_hidden_states_index(i: int, n_layers: int) -> int:
    """Our layer for HF ``hidden_states[i]`` (i = 0 is the embeddings, layer −1).

    ``i = n_layers`` is post-final-norm and has no layer in our convention.
    """
    if not (0 <= i < n_layers):
        raise UnknownLayerError(
            f"hidden_states index {i} has no residual layer (valid: 0..{n_layers - 1}; "
            f"index {n_layers} is after the final norm)."
        )
    return i - 1


def from_persona_vectors_index(i: int) -> int:
    """Persona Vectors files index ``hidden_states``: their index i is our layer i − 1."""
    return i - 1


def from_assistant_axis_index(i: int) -> int:
    """Assistant Axis files index block outputs: their index i is our layer i."""
    return i


_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|"
                   r"hook_attn_out|hook_mlp_out|[\w.]+)$")


def layer_from_hook_name(hook_name: str) -> int:
    """Our layer for a TransformerLens hook name.

    ``blocks.L.hook_resid_post`` → L, ``blocks.L.hook_resid_pre`` → L − 1. Any other hook
    (``hook_resid_mid``, ``hook_attn_out``, ``hook_mlp_out``, ...) is not the residual stream
    between blocks and raises :class:`~gradroute.errors.SAEError`.
    """
    m = _HOOK.match(hook_name or "")
    if not m:
        raise SAEError(
            f"hook name {hook_name!r} is not a TransformerLens block hook "
            "('blocks.L.hook_resid_post' or 'blocks.L.hook_resid_pre').",
            "pass layer=L explicitly if you know which residual layer it reads.",
        )
    block, kind = int(m.group(1)), m.group(2)
    if kind == "hook_resid_post":
        return block
    if kind == "hook_resid_pre":
        return block - 1
    raise SAEError(
        f"hook {hook_name!r} ({kind}) is not a residual-stream position between blocks, so its "
        "decoder directions do not live in the stream that routed writers write to.",
        "use an SAE trained on hook_resid_post/hook_resid_pre, or pass layer=L explicitly to "
        "use these directions at residual layer L anyway.",
    )


def hook_name_for_layer(layer: int) -> str:
    """TransformerLens hook name for our layer (``blocks.L.hook_resid_post``; −1 → resid_pre 0)."""
    if layer == EMBEDDINGS:
        return "blocks.0.hook_resid_pre"
    return f"blocks.{layer}.hook_resid_post"


def check_layer(layer: int, n_layers: int) -> None:
    """Raise :class:`UnknownLayerError` unless −1 <= layer < n_layers."""
    if not isinstance(layer, int) or not (EMBEDDINGS <= layer < n_layers):
        raise UnknownLayerError(
            f"layer {layer!r} does not exist in a model with {n_layers} blocks "
            f"(valid: -1 for the embeddings, 0..{n_layers - 1} for block outputs).",
            "layers count block outputs from 0 (see gradroute.layers); convert peers' indices "
            "with from_persona_vectors_index / from_assistant_axis_index.",
        )


def sort_keys(keys) -> list[LayerKey]:
    """Integer layers ascending, then string keys alphabetically."""
    ints = sorted(k for k in keys if isinstance(k, int))
    strs = sorted(k for k in keys if isinstance(k, str))
    return [*ints, *strs]
