"""Probes recover a planted direction; bad probe data is refused."""

from __future__ import annotations

import random

import pytest
import torch

import gradroute as gr
from gradroute.errors import ProbeDataError
from gradroute.model import add_residual_hook, decoder_layers
from gradroute.testing import tiny_lm

PLANT_LAYER = 1


def _texts(n, marker, seed):
    rng = random.Random(seed)
    return [marker + "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(6, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def planted():
    """A tiny Llama whose residual stream at layer 1 gets α·v added on texts starting with 'P'."""
    model, tok = tiny_lm("llama", seed=3)
    model.eval()
    g = torch.Generator().manual_seed(11)
    v = torch.randn(64, generator=g)
    v = v / v.norm()
    marker_id = tok.convert_tokens_to_ids("P")
    state = {}
    model.register_forward_pre_hook(lambda m, args, kw: state.__setitem__("ids", kw["input_ids"]), with_kwargs=True)

    def plant(layer, h):
        is_pos = (state["ids"][:, :1] == marker_id).to(h.dtype)  # (B, 1)
        return h + 8.0 * is_pos[:, :, None] * v.to(h.dtype)

    add_residual_hook(model, PLANT_LAYER, plant)
    pos, neg = _texts(48, "P", 0), _texts(48, "N", 1)
    return model, tok, v, pos, neg


@pytest.mark.parametrize("method,aggregation", [("diff_means", "mean"), ("logistic", "mean"),
                                                ("pca", "mean"), ("diff_means", "last")])
def test_probe_recovers_planted_direction(planted, method, aggregation):
    model, tok, v, pos, neg = planted
    sub = gr.Subspace.from_probe(model, tok, pos, neg, layers=[PLANT_LAYER, 3], method=method,
                                 aggregation=aggregation, progress=False)
    cos = float(sub.basis(PLANT_LAYER)[:, 0] @ v)
    assert cos > 0.99, cos
    # the random control of matched rank does not find it
    ctl = sub.random_like(seed=0)
    assert abs(float(ctl.basis(PLANT_LAYER)[:, 0] @ v)) < 0.5
    diag = sub.provenance.extra["diagnostics"][str(PLANT_LAYER)]
    assert diag["accuracy"] > 0.95
    assert sub.provenance.method == method and sub.provenance.token_aggregation == aggregation


def test_probe_with_labels_and_pairs(planted):
    model, tok, v, pos, neg = planted
    texts = [(p[:4], p[4:]) for p in pos] + [(n[:4], n[4:]) for n in neg]
    labels = [1] * len(pos) + [0] * len(neg)
    sub = gr.Subspace.from_probe(model, tok, texts=texts, labels=labels, layers=[PLANT_LAYER],
                                 aggregation="response_mean", progress=False)
    assert float(sub.basis(PLANT_LAYER)[:, 0] @ v) > 0.99
    pca = gr.Subspace.from_probe(model, tok, pos, neg, layers=[PLANT_LAYER], method="pca", k=3, progress=False)
    ve = pca.provenance.extra["diagnostics"][str(PLANT_LAYER)]["variance_explained"]
    assert pca.rank(PLANT_LAYER) == 3 and ve[0] > ve[1] >= ve[2]


def test_unplanted_model_gives_no_alignment():
    model, tok = tiny_lm("llama", seed=3)
    g = torch.Generator().manual_seed(11)
    v = torch.randn(64, generator=g)
    v = v / v.norm()
    sub = gr.Subspace.from_probe(model, tok, _texts(48, "P", 0), _texts(48, "N", 1), layers=[PLANT_LAYER],
                                 progress=False)
    assert abs(float(sub.basis(PLANT_LAYER)[:, 0] @ v)) < 0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(positive=[], negative=[]), "no probe texts"),
    (dict(positive=["a", "b"], negative=[]), "only one class"),
    (dict(texts=["a", "b"], labels=[1, 1]), "only one class"),
    (dict(texts=["a", "b"], labels=[1]), "same length"),
    (dict(positive=["a", "b"], negative=["c"], method="pca"), "paired"),
    (dict(positive=["a", "b"], negative=["c", "d"], method="svm"), "unknown probe method"),
    (dict(positive=["a", "b"], negative=["c", "d"], aggregation="response_mean"), "pairs"),
    (dict(positive=[("a", "")] * 2, negative=[("b", "c")] * 2, aggregation="response_mean"), "no response tokens"),
])
def test_bad_probe_data(kwargs, match):
    model, tok = tiny_lm("llama")
    with pytest.raises(ProbeDataError, match=match):
        gr.Subspace.from_probe(model, tok, layers=[1], progress=False, **kwargs)


def test_probe_restores_training_mode_and_leaves_no_hooks():
    model, tok = tiny_lm("gpt2")
    model.train()
    gr.Subspace.from_probe(model, tok, ["ab", "cd"], ["ef", "gh"], layers=[0], progress=False)
    assert model.training
    assert all(not b._forward_hooks for b in decoder_layers(model))


def test_probe_on_a_bfloat16_model_is_computed_in_float32(planted):
    model, tok, v, pos, neg = planted
    model16 = model.to(torch.bfloat16)
    try:
        sub = gr.Subspace.from_probe(model16, tok, pos, neg, layers=[PLANT_LAYER], progress=False)
    finally:
        model.to(torch.float32)
    assert sub.basis(PLANT_LAYER).dtype == torch.float32
    assert float(sub.basis(PLANT_LAYER)[:, 0] @ v) > 0.98
