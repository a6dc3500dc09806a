"""Subspaces from sae-lens SAEs (objects and saved folders)."""

from __future__ import annotations

import pytest
import torch

import gradroute as gr
from gradroute import projection as P
from gradroute.errors import FileFormatError, HiddenSizeMismatchError, SAEError
from gradroute.testing import tiny_lm


def _tiny_sae(hook="blocks.3.hook_resid_post", d_in=64, d_sae=256, cls="standard"):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    if cls == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(d_sae, 1) * 5 + 0.1)  # rows not unit norm, as in the wild
    return sae


@pytest.mark.parametrize("cls", ["standard", "jumprelu"])
def test_from_sae_roundtrips_a_saved_folder(tmp_path, cls):
    sae = _tiny_sae(cls=cls)
    sae.save_model(str(tmp_path / "sae"))
    latents = [7, 99, 3]
    sub = gr.Subspace.from_sae(tmp_path / "sae", latents, names=["toxic", "sarcastic", "evil"])
    from_obj = gr.Subspace.from_sae(sae, latents, names=["toxic", "sarcastic", "evil"])
    assert sub == from_obj
    assert sub.layers == (3,)
    U = sub.basis(3)
    assert P.orthonormality_error(U) <= 1e-6
    rows = sae.W_dec.detach()[latents]
    rows = rows / rows.norm(dim=1, keepdim=True)
    # decoder rows are normalized and lie in the span; the first column is the first row
    assert torch.allclose(U[:, 0], rows[0], atol=1e-6)
    assert (rows - P.project(rows, U)).abs().max() < 1e-5
    assert sub.provenance.source == "sae"
    assert sub.provenance.sae["latents"] == latents
    assert sub.provenance.sae["hook_name"] == "blocks.3.hook_resid_post"
    assert sub.provenance.sae["d_sae"] == 256


def test_resid_pre_hook_maps_to_previous_layer():
    sub = gr.Subspace.from_sae(_tiny_sae(hook="blocks.3.hook_resid_pre"), [1])
    assert sub.layers == (2,)


def test_non_residual_hook_is_refused_unless_layer_given():
    sae = _tiny_sae(hook="blocks.2.hook_mlp_out")
    with pytest.raises(SAEError, match="not a residual-stream") as e:
        gr.Subspace.from_sae(sae, [1])
    assert "layer=L" in str(e.value)
    assert gr.Subspace.from_sae(sae, [1], layer=2).layers == (2,)


def test_latent_out_of_range_and_duplicates():
    sae = _tiny_sae(d_sae=32)
    with pytest.raises(SAEError, match=r"\[32, -1\] are out of range.*0..31"):
        gr.Subspace.from_sae(sae, [0, 32, -1])
    from gradroute.errors import DegenerateDirectionsError

    with pytest.raises(DegenerateDirectionsError, match="dependent"):
        gr.Subspace.from_sae(sae, [5, 5])


def test_sae_width_must_match_model(tmp_path):
    model, _ = tiny_lm("llama")  # d = 64
    with pytest.raises(HiddenSizeMismatchError, match="d_in=32"):
        gr.Subspace.from_sae(_tiny_sae(d_in=32), [0], model=model)
    ok = gr.Subspace.from_sae(_tiny_sae(d_in=64), [0, 1], model=model)
    assert ok.hidden_size == 64


def test_not_an_sae_folder(tmp_path):
    with pytest.raises(FileFormatError, match="cfg.json"):
        gr.Subspace.from_sae(tmp_path, [0])
    with pytest.raises(SAEError, match="no W_dec"):
        gr.Subspace.from_sae(object(), [0])
