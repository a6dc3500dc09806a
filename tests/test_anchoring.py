"""Anchoring terms, label weighting, capture, interventions and selectivity metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradroute as gr
from gradroute.anchoring import (
    Anchor,
    Anchoring,
    AntiAnchor,
    AntiSubspace,
    Capture,
    Dopesheet,
    EuclideanAnchor,
    EuclideanRepulsion,
    InSubspace,
    PooledAnchor,
    Separate,
    TermSpec,
    Unitarity,
    mellowmax,
    middle_weights,
    weighted_mean,
)
from gradroute.errors import ConfigError, HiddenSizeMismatchError, LabelError, UnknownLayerError
from gradroute.interventions import ablate, cap, collateral, leak, selectivity_r2, suppress
from gradroute.testing import tiny_lm

AX = gr.Subspace.from_axes({"z": [0, 1]}, dim=3, names=["red", "vib"])


def test_term_formulas_on_known_points():
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert torch.allclose(Unitarity().per_row(z), torch.tensor([1.0, 0.0, 0.0, (math.sqrt(2) - 1) ** 2]))
    assert torch.allclose(Anchor(AX, "z", "red").per_row(z), torch.tensor([0.0, 1.0, 2.0, 1 - 1 / math.sqrt(2)]))
    assert torch.allclose(AntiAnchor(AX, "z", "red").per_row(z), torch.tensor([1.0, 0.0, 0.0, 1 / math.sqrt(2)]))
    assert torch.allclose(EuclideanAnchor(torch.tensor([1.0, 0, 0])).per_row(z), torch.tensor([1.0, 2.0, 4.0, 1.0]))
    only_red = gr.Subspace.from_axes({"z": [0]}, dim=3)
    assert torch.allclose(AntiSubspace(only_red, "z").per_row(z), torch.tensor([1.0, 0.0, 1.0, 0.5]))  # cos²
    assert torch.allclose(InSubspace(AX, "z").per_row(z), torch.zeros(4), atol=1e-6)  # all in span(e0, e1)
    w = torch.tensor([[0.0, 0.0, 1.0]])
    assert torch.allclose(InSubspace(AX, "z").per_row(w), torch.ones(1))


def test_separate_sums_over_others_and_skips_duplicates():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # rows 0 and 1 are duplicates
    per = Separate(power=2).per_row(z)
    # row 0: duplicate excluded; with (0,1): ((0+1)/2)^2 = .25; with (-1,0): 0
    assert torch.allclose(per, torch.tensor([0.25, 0.25, 0.25 + 0.25 + 0.25, 0.25]))
    rep = EuclideanRepulsion().per_row(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(rep, torch.tensor([0.5, 0.5]), atol=1e-6)


def test_weighting_and_zero_without_gradient():
    z = torch.randn(5, 3, requires_grad=True)
    t = Anchor(AX, "z", "red")
    none = t(z, torch.zeros(5))
    assert float(none) == 0.0 and not none.requires_grad
    w = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0])
    expect = (t.per_row(z) * w).sum() / (w.sum() + 1e-8)
    assert torch.allclose(t(z, w), expect)
    t(z, w).backward()
    assert z.grad[1].abs().sum() == 0 and z.grad[0].abs().sum() > 0
    assert torch.allclose(weighted_mean(torch.tensor([1.0, 3.0]), None), torch.tensor(2.0))


def test_pooled_anchor_soft_min_over_the_span():
    x = torch.tensor([1.0, 5.0, 9.0])
    assert mellowmax(x, -100.0) == pytest.approx(1.0, abs=0.02)
    assert mellowmax(x, 1e-4) == pytest.approx(5.0, abs=0.01)  # ω → 0: the mean
    sub = gr.Subspace.from_axes({5: [0]}, dim=4)
    h = torch.zeros(2, 3, 4)
    h[0, 0, 0] = 1.0   # sample 0: one span token aligned with u, others orthogonal
    h[0, 1:, 1] = 1.0
    h[1, :, 1] = 1.0   # sample 1: none aligned
    span = torch.tensor([[1, 1, 1], [1, 1, 0]])
    per = PooledAnchor(sub, 5, omega=-50.0).per_sample(h, span)
    assert per[0] < 0.05 and per[1] == pytest.approx(1.0, abs=1e-5)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.tup = nn.Identity()
        self.dec = nn.Linear(3, 3)

    def forward(self, x):
        z = self.enc(x)
        z = self.tup((z, "extra"))[0]
        return self.dec(z)


def test_regularizer_labels_affinities_masks_and_schedule():
    model = Tiny()
    sheet = Dopesheet.from_rows([{"STEP": 0, "anchor": 0.0}, {"STEP": 10, "anchor": 2.0}], interps={"anchor": "linear"})
    sub = gr.Subspace.from_axes({"enc": [0]}, dim=3, names=["red"])
    reg = Anchoring(model, [TermSpec(Anchor(sub, "enc"), weight="anchor", labels={"red": 1.0, "vibrant": 0.5}),
                            TermSpec(Unitarity(), weight=0.1)],
                    layers="enc", label_names=["red", "vibrant"], schedule=sheet)
    x = torch.randn(4, 3)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])  # affinities 1, .5, 0, 1 (clamped)
    model(x)
    z = reg.capture["enc"]
    a = torch.tensor([1.0, 0.5, 0.0, 1.0])
    expect = 1.0 * ((Anchor(sub, "enc").per_row(z) * a).sum() / (a.sum() + 1e-8)) + 0.1 * Unitarity().per_row(z).mean()
    got = reg.loss(labels, step=5)
    assert torch.allclose(got, expect, atol=1e-6)
    assert "enc" not in reg.capture  # cleared after the loss
    model(x)
    at_zero = reg.loss(torch.zeros(4, 2), step=0)  # the anchor's scheduled weight is 0 at step 0
    assert "anchor/enc" not in reg.last and float(at_zero) == pytest.approx(0.1 * reg.last["unitarity/enc"])
    reg.remove()


def test_last_holds_unweighted_values_and_zero_for_a_batch_without_labels():
    model = Tiny()
    sheet = Dopesheet.from_csv("STEP,PHASE,ACTION,anchor,separate\n0,,,0,0.01\n100,,,0.1,0\n")
    sub = gr.Subspace.from_axes({"enc": [0]}, dim=3, names=["red"])
    reg = Anchoring(model, [TermSpec(Anchor(sub, "enc", "red"), weight="anchor", labels={"red": 1.0}),
                            TermSpec(Separate(power=10), weight="separate")],
                    layers="enc", label_names=["red"], schedule=sheet)
    x = torch.randn(8, 3)
    model(x)
    z = reg.capture["enc"]
    loss = reg.loss(torch.zeros(8, 1), step=119)  # the README example's last step: no red row in the batch
    assert reg.last == {"anchor/enc": 0.0}  # separate's weight is 0 after step 100: left out
    assert not loss.requires_grad  # the zero carries no gradient: nothing was anchored
    model(x)
    labels = torch.zeros(8, 1)
    labels[2] = 1.0
    loss = reg.loss(labels, step=119)
    cos = float(z[2, 0] / z[2].norm())
    assert reg.last["anchor/enc"] == pytest.approx(1 - cos, abs=1e-5)  # unweighted: 1 − cos of the red row
    assert float(loss) == pytest.approx(0.1 * (1 - cos), abs=1e-5) and loss.requires_grad
    reg.remove()


def test_token_masks_on_a_transformer():
    model, tok = tiny_lm("llama")
    sub = gr.Subspace.from_directions({1: torch.randn(1, 64)})
    reg = Anchoring(model, [TermSpec(Anchor(sub, 1), labels={"c": 1.0}), TermSpec(Separate(power=4))],
                    layers=middle_weights([1, 2], 4), label_names=["c"])
    assert reg.layer_weights[1] == pytest.approx(math.sin(2 * math.pi / 5))
    x = torch.randint(3, 100, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    model(input_ids=x, attention_mask=mask)
    h1 = reg.capture[1]
    loss = reg.loss(torch.tensor([[1.0], [0.0]]), mask=mask)
    # the attractive term sees only the labelled sample's live tokens
    anchor = Anchor(sub, 1).per_row(h1[0, :3]).mean()
    assert reg.last["anchor/1"] == pytest.approx(float(anchor), rel=1e-5)
    assert loss.requires_grad
    reg.remove()


def test_regularizer_bad_input():
    model = Tiny()
    sub = gr.Subspace.from_axes({"enc": [0]}, dim=3)
    with pytest.raises(LabelError, match="affinity for label 'blue'"):
        Anchoring(model, [TermSpec(Anchor(sub, "enc"), labels={"blue": 1.0})], layers="enc", label_names=["red"])
    with pytest.raises(ConfigError, match="schedule is missing"):
        Anchoring(model, [TermSpec(Anchor(sub, "enc"), weight="anchor")], layers="enc")
    with pytest.raises(UnknownLayerError, match="no module 'nope'"):
        Anchoring(model, [Unitarity()], layers="nope")
    reg = Anchoring(model, [TermSpec(Anchor(sub, "enc"), labels={"red": 1.0})], layers="enc", label_names=["red"])
    model(torch.randn(4, 3))
    with pytest.raises(LabelError, match=r"expected \(4, 1\)"):
        reg.loss(torch.zeros(3, 1))
    with pytest.raises(LabelError, match="needs labels"):
        reg.loss(None)
    reg.remove()
    wrong = gr.Subspace.from_axes({"enc": [0]}, dim=5)
    reg = Anchoring(model, [Anchor(wrong, "enc")], layers="enc")
    model(torch.randn(2, 3))
    with pytest.raises(HiddenSizeMismatchError, match="dimension 5"):
        reg.loss()
    reg.remove()
    with pytest.raises(UnknownLayerError, match="nothing was captured"):
        Anchoring(model, [Unitarity()], layers="enc").loss()


def test_capture_through_peft_wrapper_and_removal():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_lm("llama")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    cap_ = Capture(peft_model, [1, "model.layers.2.mlp"])
    x = torch.randint(3, 100, (1, 4))
    with torch.no_grad():
        peft_model(input_ids=x)
    assert not cap_.values  # no-grad passes are not kept
    peft_model(input_ids=x)
    assert cap_[1].shape == (1, 4, 64) and cap_[1].requires_grad and cap_["model.layers.2.mlp"].shape == (1, 4, 64)
    cap_.remove()
    peft_model(input_ids=x)
    assert not cap_.values


def test_interventions_on_a_transformer():
    model, tok = tiny_lm("gpt2")
    model.eval()
    g = torch.Generator().manual_seed(0)
    sub = gr.Subspace.from_directions({1: torch.randn(1, 64, generator=g)})
    u = sub.basis(1)[:, 0]
    x = torch.randint(3, 100, (2, 6), generator=g)
    seen = {}
    from gradroute.model import residual_hooks

    def grab(L, h):
        seen[L] = h.detach().clone()

    with torch.no_grad():
        base = model(input_ids=x).logits
        with suppress(model, sub, 1), residual_hooks(model, [1], grab):
            sup = model(input_ids=x).logits
        assert (seen[1] @ u).max() <= 1e-5  # no positive component left
        with cap(model, sub, 1, tau=0.0), residual_hooks(model, [1], grab):
            model(input_ids=x)
        assert (seen[1] @ u).max() <= 1e-5
        W = model.transformer.h[1].attn.c_proj.weight.clone()
        with ablate(model, sub, 1):
            abl = model(input_ids=x).logits
            assert (model.transformer.h[1].attn.c_proj.weight @ u).abs().max() < 1e-5  # Conv1D writer: W U = 0
            assert (u @ model.transformer.h[2].attn.c_attn.weight).abs().max() < 1e-5  # reader: Uᵀ W = 0
        assert torch.equal(model.transformer.h[1].attn.c_proj.weight, W)  # restored
        assert torch.equal(model(input_ids=x).logits, base)
    assert not torch.allclose(sup, base) and not torch.allclose(abl, base)


def test_selectivity_metrics():
    sim = torch.linspace(0, 1, 50)
    damage = 0.3 * sim ** 2
    assert selectivity_r2(damage, sim, 2) == pytest.approx(1.0)
    assert selectivity_r2(torch.rand(50, generator=torch.Generator().manual_seed(0)), sim, 2) < 0.2
    assert collateral(damage, sim, 0.1) == pytest.approx(float(damage[sim < 0.1].mean()))
    assert leak(torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.1, 0.0, 3.0]), [1, 1, 0]) == pytest.approx(0.1 / 3)
