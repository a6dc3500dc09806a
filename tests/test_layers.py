"""The layer convention against HF hidden_states and forward hooks, on every tiny architecture."""

from __future__ import annotations

import pytest
import torch

from gradroute import layers as LY
from gradroute.errors import SAEError, UnknownLayerError
from gradroute.model import (
    collect_activations,
    decoder_layers,
    decoder_layers_path,
    num_layers,
    residual_hooks,
)
from gradroute.testing import tiny_lm

ALL_ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")
EXPECTED_BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h",
                   "gpt_neox": "gpt_neox.layers"}


def _final_norm(model):
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise AssertionError("no final norm")


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_hooks_match_hidden_states_except_last_block(arch):
    model, tok = tiny_lm(arch)
    model.eval()
    n = num_layers(model)
    assert decoder_layers_path(model) == EXPECTED_BLOCKS[arch]
    ids = tok(["the quick brown fox", "jumps"], padding=True, return_tensors="pt")
    seen = {}
    with residual_hooks(model, range(-1, n), lambda L, h: seen.__setitem__(L, h.detach().clone())):
        out = model(**ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == n + 1
    # layer -1 is the embeddings = hidden_states[0]
    assert torch.allclose(seen[-1], hs[0], atol=1e-6)
    for L in range(n - 1):
        i = LY.hidden_states_index(L, n)
        assert i == L + 1
        assert torch.allclose(seen[L], hs[i], atol=1e-6), (arch, L)
        assert LY.layer_from_hidden_states_index(i, n) == L
    # the last block: HF's hidden_states[-1] is after the final norm, our layer n-1 is not
    last = seen[n - 1]
    assert not torch.allclose(last, hs[-1], atol=1e-3)
    assert torch.allclose(_final_norm(model)(last), hs[-1], atol=1e-5)
    with pytest.raises(UnknownLayerError, match="final norm"):
        LY.hidden_states_index(n - 1, n)


@pytest.mark.parametrize("arch", ("llama", "gpt2", "gpt_neox"))
def test_collected_activations_follow_the_convention(arch):
    model, tok = tiny_lm(arch)
    model.eval()
    n = num_layers(model)
    texts = ["abc", "hello there"]
    acts = collect_activations(model, tok, texts, [-1, 0, n - 1], aggregation="all", progress=False)
    ids = tok(texts[1], return_tensors="pt")
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states
    rows = acts.text_index == 1
    assert torch.allclose(acts.values[-1][rows], hs[0][0], atol=1e-5)
    assert torch.allclose(acts.values[0][rows], hs[1][0], atol=1e-5)
    assert torch.allclose(_final_norm(model)(acts.values[n - 1][rows]), hs[-1][0], atol=1e-4)
    # padding does not leak: the short text's mean equals its unpadded forward pass
    mean = collect_activations(model, tok, texts, [1], aggregation="mean", progress=False).values[1]
    with torch.no_grad():
        hs0 = model(**tok(texts[0], return_tensors="pt"), output_hidden_states=True).hidden_states
    assert torch.allclose(mean[0], hs0[2][0].mean(0), atol=1e-5)
    last = collect_activations(model, tok, texts, [1], aggregation="last", progress=False).values[1]
    assert torch.allclose(last[0], hs0[2][0, -1], atol=1e-5)


def test_residual_hook_can_edit_the_stream_and_is_removed():
    model, tok = tiny_lm("gpt2")
    model.eval()
    ids = tok(["abc"], return_tensors="pt")
    with torch.no_grad():
        base = model(**ids).logits
        with residual_hooks(model, [1], lambda L, h: h + 1.0):
            edited = model(**ids).logits
        after = model(**ids).logits
    assert not torch.allclose(base, edited)
    assert torch.equal(base, after)
    assert all(not b._forward_hooks for b in decoder_layers(model))


def test_peer_index_converters():
    # Persona Vectors index hidden_states: i -> i - 1; Assistant Axis index blocks: i -> i
    assert LY.from_persona_vectors_index(0) == -1
    assert LY.from_persona_vectors_index(13) == 12
    assert LY.from_assistant_axis_index(12) == 12


@pytest.mark.parametrize("name,layer", [
    ("blocks.3.hook_resid_post", 3),
    ("blocks.3.hook_resid_pre", 2),
    ("blocks.0.hook_resid_pre", -1),
])
def test_transformerlens_hook_names(name, layer):
    assert LY.layer_from_hook_name(name) == layer
    assert LY.layer_from_hook_name(LY.hook_name_for_layer(layer)) == layer


@pytest.mark.parametrize("name", ["blocks.3.hook_resid_mid", "blocks.3.hook_attn_out",
                                  "blocks.3.hook_mlp_out", "blocks.3.attn.hook_z", "hook_embed"])
def test_non_residual_hooks_are_refused(name):
    with pytest.raises(SAEError, match="layer=L"):
        LY.layer_from_hook_name(name)


def test_unknown_layers():
    with pytest.raises(UnknownLayerError, match="0..3"):
        LY.check_layer(4, 4)
    with pytest.raises(UnknownLayerError):
        LY.check_layer(-2, 4)
    LY.check_layer(-1, 4)
    LY.check_layer(3, 4)
