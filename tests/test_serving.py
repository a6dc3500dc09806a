"""Adapters ready to serve: task_type CAUSAL_LM, base_model_name_or_path naming the base the
adapter fits (the discarded model), and bias-free adapters (vLLM rejects lora_bias)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import gradroute as gr
from gradroute.errors import AdapterError
from gradroute.integrations.peft import load_routed_base, save_adapter
from gradroute.testing import tiny_lm

X = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(42))


def _trained(arch, envs=False, steps=5):
    model, tok = tiny_lm(arch)
    g = torch.Generator().manual_seed(0)
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=g), 2: torch.randn(1, 64, generator=g)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    router = gr.GradientRouter(model, sub, optimizer=opt)
    model.train()
    for i in range(steps):
        x = torch.randint(3, 100, (4, 10), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        router.step(env_weights=({"math": 0.7, "hack": 0.3} if i % 2 else {"math": 0.1, "hack": 0.9}) if envs else None)
        opt.zero_grad()
    model.eval()
    return model, tok, router


def _logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_auto_peft_loads_the_pair_and_reproduces_the_trained_model(tmp_path):
    model, tok, router = _trained("llama")
    trained = _logits(model)
    path = save_adapter(router, tmp_path / "adapter", base="model", tokenizer=tok)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str((path / "base").resolve())
    assert cfg["lora_alpha"] == cfg["r"]  # vLLM's single scaling lora_alpha / r is 1 like every module's
    assert (path / "base" / "tokenizer_config.json").is_file()
    # AutoPeftModelForCausalLM finds the base through base_model_name_or_path
    pair = AutoPeftModelForCausalLM.from_pretrained(str(path)).eval()
    assert torch.allclose(_logits(pair), trained, atol=1e-5)
    with pair.disable_adapter():
        alone = _logits(pair)
    router.discard()
    assert torch.allclose(alone, _logits(model), atol=1e-5)  # the base is the discarded model
    assert not torch.allclose(alone, trained, atol=1e-4)
    # base_name overrides the name written (e.g. the hub name the base is uploaded under)
    other = save_adapter(router, tmp_path / "named", base="none", base_name="me/discarded-base")
    assert json.loads((other / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/discarded-base"
    # without a complete base written, no wrong name is written
    plain = save_adapter(router, tmp_path / "plain", base="modules")
    assert json.loads((plain / "adapter_config.json").read_text())["base_model_name_or_path"] is None


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_folded_bias_adapter_is_bias_free_and_the_pair_is_exact(tmp_path, arch):
    model, tok, router = _trained(arch)
    assert any(t.bias for t in router.plan)
    trained = _logits(model)
    trained_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="bias-free LoRA") as e:
        save_adapter(router, tmp_path / "refused", base="model", lora_bias="refuse")
    assert "Fix:" in str(e.value)
    with pytest.raises(AdapterError, match="lora_bias must be"):
        save_adapter(router, tmp_path / "bad", lora_bias="drop")
    path = save_adapter(router, tmp_path / "vllm", base="model", lora_bias="fold", tokenizer=tok)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is False and cfg["task_type"] == "CAUSAL_LM"
    tensors = load_file(path / "adapter_model.safetensors")
    assert tensors and not any(k.endswith("lora_B.bias") for k in tensors)
    meta = json.loads((path / "gradroute_adapter.json").read_text())
    assert meta["lora_bias"] == "fold" and meta["folded_bias_norm"] > 0
    # plain PEFT: the folded base + the bias-free adapter compute the trained model exactly
    base = AutoModelForCausalLM.from_pretrained(path / "base")
    pair = PeftModel.from_pretrained(base, str(path)).eval()
    assert torch.allclose(_logits(pair), trained, atol=1e-5)
    # the base alone: the discarded weights, the writers' biases as trained (that is the fold)
    folded_sd = AutoModelForCausalLM.from_pretrained(path / "base").state_dict()
    kept = save_adapter(router, tmp_path / "keep", base="model")  # lora_bias="keep": the exact discard
    exact_sd = AutoModelForCausalLM.from_pretrained(kept / "base").state_dict()
    bias_sq = 0.0
    for t in router.plan:
        w, b = f"{t.module}.weight", f"{t.module}.bias"
        assert torch.equal(folded_sd[w], exact_sd[w])
        if t.bias:
            assert torch.equal(folded_sd[b], trained_sd[b])
            bias_sq += float((trained_sd[b].double() - exact_sd[b].double()).pow(2).sum())
    assert bias_sq ** 0.5 == pytest.approx(meta["folded_bias_norm"], rel=1e-4)
    # the modules-only base folds the same way: load_routed_base leaves the trained biases
    mods = save_adapter(router, tmp_path / "mods", base="modules", lora_bias="fold")
    fresh = tiny_lm(arch)[0]
    fresh.load_state_dict(trained_sd)
    load_routed_base(fresh, mods)
    assert torch.allclose(_logits(PeftModel.from_pretrained(fresh, str(mods)).eval()), trained, atol=1e-5)


def test_refuse_writes_bias_free_adapters_when_there_is_no_bias_change(tmp_path):
    model, _, router = _trained("llama", envs=True)  # Llama writers have no bias
    trained = _logits(model)
    path = save_adapter(router, tmp_path / "a", base="model", lora_bias="refuse")
    assert json.loads((path / "adapter_config.json").read_text())["lora_bias"] is False
    pair = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path / "base"), str(path)).eval()
    assert torch.allclose(_logits(pair), trained, atol=1e-5)
    # one environment's share: base = trained minus that share
    env = save_adapter(router, tmp_path / "hack", env="hack", base="model", lora_bias="fold")
    pair = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env / "base"), str(env)).eval()
    assert torch.allclose(_logits(pair), trained, atol=1e-5)
