"""A subspace built on one model and routed on another of the same width is named, not accepted
silently: ``Subspace.provenance_mismatch`` and the router's ``GradrouteWarning``."""

from __future__ import annotations

import warnings

import pytest
import torch

import gradroute as gr
from gradroute.errors import GradrouteWarning
from gradroute.subspace import Provenance
from gradroute.testing import save_tiny_lm, tiny_lm


def _router(model, sub, **kw):
    return gr.GradientRouter(model, sub, mode="update", **kw)


def _quiet(model, sub, **kw) -> None:
    """Build a router and fail on any GradrouteWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradrouteWarning)
        _router(model, sub, **kw)


@pytest.fixture(scope="module")
def llama_sub():
    model, _ = tiny_lm("llama")  # d = 64, provenance "gradroute-tiny-llama"
    return gr.Subspace.from_directions({1: torch.randn(1, 64, generator=torch.Generator().manual_seed(0))}, model=model)


def test_a_subspace_from_another_model_of_the_same_width_warns(llama_sub):
    gpt2, _ = tiny_lm("gpt2")  # also d = 64: validate_for cannot tell them apart
    assert llama_sub.provenance.model == "gradroute-tiny-llama"
    with pytest.warns(GradrouteWarning) as rec:
        _router(gpt2, llama_sub)
    msg = " ".join(str(w.message) for w in rec if issubclass(w.category, GradrouteWarning))
    assert "'gradroute-tiny-llama'" in msg and "gradroute-tiny-gpt2" in msg  # both models named
    assert "build the subspace on this model" in msg and "check_provenance=False" in msg  # and the fix
    assert rec[0].filename == __file__  # points at the caller, not at gradroute
    _quiet(gpt2, llama_sub, check_provenance=False)  # intended: the flag silences it
    # the random control keeps its parent's model, so it warns the same way
    with pytest.warns(GradrouteWarning, match="gradroute-tiny-llama"):
        _router(gpt2, llama_sub.random_like(seed=1))


def test_no_warning_for_the_same_model_or_without_provenance(llama_sub):
    llama, _ = tiny_lm("llama", seed=3)  # same model name, other weights
    _quiet(llama, llama_sub)
    gpt2, _ = tiny_lm("gpt2")
    plain = gr.Subspace.from_directions({1: torch.randn(1, 64)})  # no model in its provenance
    assert plain.provenance.model is None
    _quiet(gpt2, plain)
    _quiet(gpt2, plain.random_like(seed=0))
    assert plain.union(llama_sub).provenance.model is None
    _quiet(gpt2, plain.union(llama_sub))
    # an unnamed model (built from a config) names only its type, not which model it is
    gpt2.config._name_or_path = ""
    assert llama_sub.provenance_mismatch(gpt2) is None


def test_model_types_and_local_directories(tmp_path, llama_sub):
    from transformers import AutoModelForCausalLM

    # a local copy of the model (name = its path): same type, no warning
    path = save_tiny_lm(tmp_path / "llama")
    local = AutoModelForCausalLM.from_pretrained(path)
    assert local.config._name_or_path == str(path)
    _quiet(local, llama_sub)
    # a subspace built on that directory: its config.json says llama, a gpt2 clearly differs
    on_dir = gr.Subspace.from_directions({1: torch.randn(1, 64)}, model=local)
    assert on_dir.provenance.model == str(path)
    gpt2, _ = tiny_lm("gpt2")
    assert on_dir.provenance_mismatch(gpt2) == "gradroute-tiny-gpt2 (gpt2)"
    assert on_dir.provenance_mismatch(tiny_lm("llama")[0]) is None  # another llama: can't tell, no warning
    # an unnamed model's provenance is its model type: compared as a type
    unnamed, _ = tiny_lm("llama")
    unnamed.config._name_or_path = ""
    by_type = gr.Subspace.from_directions({1: torch.randn(1, 64)}, model=unnamed)
    assert by_type.provenance.model == "llama"
    assert by_type.provenance_mismatch(local) is None and by_type.provenance_mismatch(gpt2) is not None


@pytest.mark.parametrize("built, name, differs", [
    ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", False),  # a fine-tune of the one named
    ("gpt2-small", "openai-community/gpt2", False),  # sae-lens' name for it
    ("google/gemma-2-2b", "gemma-2-2b", False),
    ("gradroute-tiny-llama", "openai-community/gpt2", True),
    ("Qwen/Qwen2.5-0.5B", "/ckpt/run/checkpoint-500", False),  # a local checkpoint: not comparable by name
])
def test_names_clearly_differ(built, name, differs):
    sub = gr.Subspace.from_directions({1: torch.randn(1, 64)},
                                      provenance=Provenance(model=built))
    model, _ = tiny_lm("gpt2")
    model.config._name_or_path = name
    model.config.model_type = "gpt2"
    assert (sub.provenance_mismatch(model) is not None) is differs
