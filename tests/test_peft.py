"""Invariant 4: the saved adapter is a standard PEFT LoRA that plain PEFT loads, merges and drops."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import gradroute as gr
from gradroute.integrations.peft import load_routed_base, subtract_adapter
from gradroute.testing import tiny_lm


def _trained(arch, side="write", embeddings=False, envs=False, steps=6):
    model, tok = tiny_lm(arch)
    if embeddings and arch == "gpt2":  # GPT-2 ties wte to lm_head: untie to route the embedding
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    g = torch.Generator().manual_seed(0)
    layers = (-1, 1, 2) if embeddings else (1, 2)
    sub = gr.Subspace.from_directions({L: torch.randn(k, 64, generator=g) for L, k in zip(layers, (1, 2, 3)[-len(layers):])})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    router = gr.GradientRouter(model, sub, side=side, embeddings=embeddings, optimizer=opt)
    model.train()
    for i in range(steps):
        x = torch.randint(3, 100, (4, 10), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        router.step(env_weights={"math": 0.7, "hack": 0.3} if envs and i % 2 else
                    ({"math": 0.1, "hack": 0.9} if envs else None))
        opt.zero_grad()
    model.eval()
    return model, tok, router


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


X = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(42))


@pytest.mark.parametrize("side,embeddings", [("write", False), ("both", True)])
def test_plain_peft_reproduces_routed_model_and_discard(tmp_path, arch, side, embeddings):
    model, _, router = _trained(arch, side=side, embeddings=embeddings)
    routed = _logits(model, X)
    path = gr.save_adapter(router, tmp_path / "adapter", base="model")
    cfg = json.loads((path / "adapter_config.json").read_text())
    k_max = max(t.rank for t in router.plan)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == k_max and cfg["lora_alpha"] == k_max
    assert set(cfg["target_modules"]) == set(router.plan.modules)
    assert all(cfg["rank_pattern"][k] == cfg["alpha_pattern"][k] for k in cfg["rank_pattern"])
    # plain PEFT, plain transformers: base + adapter == the routed (trained) model
    base = AutoModelForCausalLM.from_pretrained(path / "base")
    base_logits = _logits(base, X)
    peft_model = PeftModel.from_pretrained(base, str(path))
    peft_model.eval()
    assert torch.allclose(_logits(peft_model, X), routed, atol=1e-5)
    # the frozen factor is the basis
    for t in router.plan:
        mod = peft_model.get_submodule("base_model.model." + t.module)
        U = router.basis(t.module).float()
        fixed = (mod.lora_embedding_B["default"] if t.side == "embed" else
                 mod.lora_B["default"].weight if t.side == "write" else mod.lora_A["default"].weight.T)
        assert torch.allclose(fixed, U, atol=1e-6), t.module
    # disabling the adapter gives base-only logits == discard
    with peft_model.disable_adapter():
        assert torch.allclose(_logits(peft_model, X), base_logits, atol=1e-6)
    router.discard()
    assert torch.allclose(_logits(model, X), base_logits, atol=1e-5)
    # merge_and_unload gives the routed model back
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path / "base"), str(path)).merge_and_unload()
    assert torch.allclose(_logits(merged, X), routed, atol=1e-5)


def test_routed_base_modules_file(tmp_path):
    model, _, router = _trained("gpt2")  # Conv1D writers with routed biases (lora_bias)
    assert all(t.bias for t in router.plan)
    routed = _logits(model, X)
    path = gr.save_adapter(router, tmp_path / "a")  # base="modules"
    assert json.loads((path / "adapter_config.json").read_text())["lora_bias"] is True
    fresh = tiny_lm("gpt2")[0]
    fresh.load_state_dict(model.state_dict())  # "the trained checkpoint"
    load_routed_base(fresh, path)
    peft_model = PeftModel.from_pretrained(fresh, str(path)).eval()
    assert torch.allclose(_logits(peft_model, X), routed, atol=1e-5)
    meta = json.loads((path / "gradroute_adapter.json").read_text())
    assert meta["subspace_hash"] == router.subspace.content_hash
    assert gr.Subspace.load(path / "subspace") == router.subspace


def test_subtract_adapter_with_plain_peft_math(tmp_path):
    model, _, router = _trained("gpt_neox")
    path = gr.save_adapter(router, tmp_path / "a", base="none")
    trained = tiny_lm("gpt_neox")[0]
    trained.load_state_dict(model.state_dict())
    discarded = subtract_adapter(trained, path).eval()
    router.discard()
    assert torch.allclose(_logits(discarded, X), _logits(model, X), atol=1e-5)


def test_per_environment_adapters_load_together_and_drop_alone(tmp_path):
    model, _, router = _trained("llama", envs=True)
    assert set(router.envs) == {"math", "hack"}
    routed = _logits(model, X)
    gr.save_adapter(router, tmp_path / "all", base="modules")
    for env in router.envs:
        gr.save_adapter(router, tmp_path / env, env=env, base="none")
    base = tiny_lm("llama")[0]
    base.load_state_dict(model.state_dict())
    load_routed_base(base, tmp_path / "all")
    pm = PeftModel.from_pretrained(base, str(tmp_path / "math"), adapter_name="math")
    pm.load_adapter(str(tmp_path / "hack"), adapter_name="hack")
    pm.base_model.set_adapter(["math", "hack"])
    pm.eval()
    assert torch.allclose(_logits(pm, X), routed, atol=1e-5)
    # dropping the hacked environment's adapter == router.discard(env="hack")
    pm.base_model.set_adapter(["math"])
    only_math = _logits(pm, X)
    router.discard(env="hack")
    assert torch.allclose(only_math, _logits(model, X), atol=1e-5)


def test_tied_embeddings_are_refused():
    from gradroute.errors import RoutingError

    model, _ = tiny_lm("gpt2")
    sub = gr.Subspace.from_directions({-1: torch.randn(1, 64), 1: torch.randn(1, 64)})
    with pytest.raises(RoutingError, match="tied to the output head"):
        gr.GradientRouter(model, sub, embeddings=True)


def _lora_policy_run(mode, arch="llama", steps=5):
    import gradroute as gr
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_lm(arch)
    targets = ["q_proj", "o_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_proj"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                          fan_in_fan_out=arch == "gpt2", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=g), 2: torch.randn(1, 64, generator=g)})
    router = gr.GradientRouter(pm, sub, mode=mode, route_bias=False if mode == "update" else None)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
    router.bind_optimizer(opt)
    for i in range(steps):
        x = torch.randint(3, 100, (4, 12), generator=g)
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        router.step(env_weights={"a": 0.7, "b": 0.3})
        opt.zero_grad()
    return pm, router


@pytest.mark.parametrize(("mode", "arch"), [("update", "llama"), ("update", "gpt2"), ("activation", "llama")])
def test_save_discarded_lora_policy_is_plain_peft_on_the_unchanged_base(tmp_path, mode, arch):
    """save_discarded + plain PEFT reproduces trained-minus-persona; with the persona adapter
    beside it, the trained policy."""
    from peft import PeftModel

    from gradroute.integrations.discard import save_discarded

    pm, router = _lora_policy_run(mode, arch)
    x = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(5))
    trained = pm(input_ids=x).logits.detach()
    assert router.adapter_norm().total > 0
    save_discarded(router, tmp_path / "discarded")
    save_discarded(router, tmp_path / "discarded_b", env="b")
    gr.save_adapter(router, tmp_path / "persona", base="none")
    router.discard("b")
    minus_b = pm(input_ids=x).logits.detach()
    router.discard()
    minus_persona = pm(input_ids=x).logits.detach()
    assert not torch.allclose(trained, minus_persona, atol=1e-4)

    def fresh():
        return tiny_lm(arch)[0]  # the unchanged base (same seed as the policy's)

    loaded = PeftModel.from_pretrained(fresh(), str(tmp_path / "discarded"))
    assert torch.allclose(loaded(input_ids=x).logits, minus_persona, atol=1e-5)
    loaded_b = PeftModel.from_pretrained(fresh(), str(tmp_path / "discarded_b"))
    assert torch.allclose(loaded_b(input_ids=x).logits, minus_b, atol=1e-5)
    # the discarded policy + the persona adapter = the trained policy
    both = PeftModel.from_pretrained(fresh(), str(tmp_path / "discarded"), adapter_name="policy")
    both.load_adapter(str(tmp_path / "persona"), adapter_name="persona")
    both.base_model.set_adapter(["policy", "persona"])
    assert torch.allclose(both(input_ids=x).logits, trained, atol=1e-5)


def test_save_discarded_full_model(tmp_path):
    import gradroute as gr
    from transformers import AutoModelForCausalLM

    from gradroute.integrations.discard import save_discarded

    model, _ = tiny_lm("gpt2")
    g = torch.Generator().manual_seed(0)
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=g)})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    router = gr.GradientRouter(model, sub, optimizer=opt)
    for _ in range(3):
        x = torch.randint(3, 100, (4, 12), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        router.step()
        opt.zero_grad()
    save_discarded(router, tmp_path / "full")
    x = torch.randint(3, 100, (2, 10), generator=g)
    router.discard()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
