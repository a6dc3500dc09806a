"""Activation mode (gradient routing in activation space): invariant 7 and its consequences on
Llama, Qwen2, GPT-2 (Conv1D) and GPT-NeoX tiny models, with full weights and a user LoRA."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import gradroute as gr
from gradroute import projection as P
from gradroute.errors import AdapterError, ConfigError, RoutingError
from gradroute.model import residual_hooks
from gradroute.router.modes.activation import ADAPTERS_ATTR
from gradroute.testing import random_ids as _batch
from gradroute.testing import random_subspace as _subspace
from gradroute.testing import tiny_lm

ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")


def _persona_loss(model, sub, x, layers):
    """A loss made only of persona coordinates Uᵀh at the given layers."""
    coords = []
    with residual_hooks(model, layers, lambda L, h: coords.append((P.coords(h, sub.basis(L)) ** 2).mean())):
        model(input_ids=x)
    return sum(coords)


def _base_params(model):
    return {n: p for n, p in model.named_parameters() if ADAPTERS_ATTR not in n and p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_unchanged_at_init_and_persona_loss_reaches_only_adapters(arch):
    model, _ = tiny_lm(arch)
    plain = copy.deepcopy(model)
    sub = _subspace()
    router = gr.GradientRouter(model, sub, mode="activation")
    x = _batch()
    assert torch.equal(model(input_ids=x).logits, plain(input_ids=x).logits)  # (a)
    # every residual write is routed: embeddings (and GPT-2's position embedding) and all writers
    sides = {t.side for t in router.plan}
    assert sides == {"embed", "write"}
    if arch == "gpt2":
        assert {"transformer.wte", "transformer.wpe"} <= set(router.plan.modules)
    for layers in ([1], [2], [1, 2]):  # (b): at any layer
        model.zero_grad()
        plain.zero_grad()
        _persona_loss(model, sub, x, layers).backward()
        _persona_loss(plain, sub, x, layers).backward()
        ref = _base_params(plain)
        for n, p in _base_params(model).items():
            g, g0 = p.grad, ref[n].grad
            scale = float(g0.norm()) if g0 is not None else 0.0
            if g is not None:
                assert float(g.norm()) <= 1e-5 * max(scale, 1e-3), (layers, n, float(g.norm()), scale)
        adapter_grads = [p.grad for p in router.mode_strategy.trainable_parameters()]
        assert sum(float(g.norm()) for g in adapter_grads if g is not None) > 0
    # an ordinary loss still trains the base
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    assert sum(float(p.grad.norm()) for p in _base_params(model).values() if p.grad is not None) > 0


def _train(model, router_or_none, steps=12, lr=3e-3, wd=0.1, sub=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    if router_or_none is not None:
        router_or_none.bind_optimizer(opt)
    for i in range(steps):
        x = _batch(seed=i)
        loss = model(input_ids=x, labels=x).loss
        if sub is not None:  # push the persona coordinates up, so the adapters have work to do
            loss = loss - 0.1 * _persona_loss(model, sub, x, [1, 2])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if router_or_none is not None:
            router_or_none.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("arch", ARCHS)
def test_base_stays_out_of_the_span_and_discard_gives_the_base(arch, tmp_path):
    model, _ = tiny_lm(arch)
    sub = _subspace()
    router = gr.GradientRouter(model, sub, mode="activation")
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, router, sub=sub)
    assert router.adapter_norm().total > 0
    modules = dict(model.named_modules())
    for t in router.plan:  # (c): writers, biases and embeddings keep their initial in-span coordinates
        U = router.basis(t.module)
        for pname, axis in (("weight", t.axis), ("bias", 0)):
            p = getattr(modules[t.module], pname, None)
            if p is None:
                continue
            diff = p.detach().double() - init[f"{t.module}.{pname}"].double()
            assert float(diff.norm()) > 0, (t.module, pname)   # it trained...
            assert P.relative_in_subspace_norm(diff, U, axis) <= 1e-5, (t.module, pname)  # ...outside the span
    x = _batch(seed=99)
    trained = model(input_ids=x).logits.detach()
    # the adapter is a plain PEFT LoRA on the base: PEFT reproduces the trained model
    from peft import PeftModel

    gr.save_adapter(router, tmp_path / "ad", base="model")
    base = type(model).from_pretrained(tmp_path / "ad" / "base")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    assert torch.allclose(peft_model(input_ids=x).logits, trained, atol=1e-5)
    # (d): discard gives exactly the base-only forward
    base_only, _ = tiny_lm(arch)
    sd = {k: v for k, v in model.state_dict().items() if ADAPTERS_ATTR not in k}
    base_only.load_state_dict(sd)
    router.discard()
    assert router.adapter_norm().total == 0
    assert torch.equal(model(input_ids=x).logits, base_only(input_ids=x).logits)
    assert not torch.allclose(trained, base_only(input_ids=x).logits, atol=1e-4)


def test_user_lora_policy_is_routed_too():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_lm("llama")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj", "up_proj"], lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    sub = _subspace()
    router = gr.GradientRouter(pm, sub, mode="activation")
    lora = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    # (b) for the user's LoRA: a persona-coordinate loss gives it no gradient
    x = _batch()
    pm.zero_grad()
    with torch.no_grad():  # make the user's LoRA non-trivial first
        for n, p in lora.items():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    _persona_loss(pm, sub, x, [1, 2]).backward()
    writer_lora_grads = [float(p.grad.norm()) for n, p in lora.items()
                         if p.grad is not None and ("o_proj" in n or "down_proj" in n)]
    reader_lora_grads = [float(p.grad.norm()) for n, p in lora.items()
                         if p.grad is not None and ("q_proj" in n or "up_proj" in n)]
    assert max(writer_lora_grads + reader_lora_grads + [0.0]) <= 1e-6
    assert sum(float(p.grad.norm()) for p in router.mode_strategy.trainable_parameters() if p.grad is not None) > 0
    # training with AdamW keeps the writers' LoRA B out of the span
    pm.zero_grad()
    _train(pm, router, steps=6, sub=sub)
    checked = 0
    for n, p in lora.items():
        module = n.split("base_model.model.", 1)[1].split(".lora_B")[0]
        if "lora_B" in n and module in router.plan.modules:
            U = router.basis(module)
            assert float(p.detach().norm()) > 0
            assert float(P.coords(p.detach(), U, 0).norm()) <= 1e-5 * float(p.detach().norm())
            checked += 1
    assert checked == 6  # o_proj and down_proj of blocks 0-2 (block 3 writes after the last persona layer)
    assert router.adapter_norm().total > 0


def test_adapter_lr_multiplier_scales_the_adapter_update_exactly():
    runs = {}
    for mult in (1.0, 3.0):
        model, _ = tiny_lm("llama")
        sub = _subspace()
        router = gr.GradientRouter(model, sub, mode="activation", adapter_lr_multiplier=mult)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        router.bind_optimizer(opt)
        x = _batch()
        (-_persona_loss(model, sub, x, [1, 2])).backward()
        opt.step()
        assert router.step() is not None
        runs[mult] = {m: router.adapter_coords(m) for m in router.plan.modules}  # ΔA of a step from A = 0
    # one SGD step from A = 0: the update is exactly proportional to the multiplier
    for m in runs[1.0]:
        assert torch.allclose(runs[3.0][m], 3.0 * runs[1.0][m], rtol=1e-5, atol=1e-12)


def test_per_environment_attribution_sums_exactly_in_activation_mode():
    model, _ = tiny_lm("llama")
    sub = _subspace()
    router = gr.GradientRouter(model, sub, mode="activation", attribution=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    router.bind_optimizer(opt)
    for i in range(4):
        x = _batch(seed=i)
        with router.attribution.batch(["a", "a", "b", "b"]):
            loss = model(input_ids=x, labels=x).loss - 0.1 * _persona_loss(model, sub, x, [1, 2])
            loss.backward()
        opt.step()
        rec = router.step()
        opt.zero_grad()
        assert rec.attribution is not None and set(rec.attribution.grad_norm) == {"a", "b"}
        assert sum(rec.env_share.values()) == pytest.approx(1.0, abs=1e-9)
    for m in router.plan.modules:
        total = router.adapter_coords(m)
        assert torch.allclose(sum(router.adapter_coords(m, e) for e in router.envs), total, atol=1e-9)
    router.discard("a")
    assert "a" not in router.envs


def test_bad_input_in_activation_mode():
    model, _ = tiny_lm("llama")
    sub = _subspace()
    with pytest.raises(ConfigError, match="side='read'"):
        gr.GradientRouter(model, sub, mode="activation", side="read")
    # an optimizer made before the router misses the adapters: refused on bind...
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    router = gr.GradientRouter(model, sub, mode="activation")
    with pytest.raises(ConfigError, match="created before the router"):
        router.bind_optimizer(opt)
    # ...and detected on the first step when it was never bound
    x = _batch()
    (-_persona_loss(model, sub, x, [1, 2])).backward()
    opt.step()
    with pytest.raises(ConfigError, match="created before the router"):
        router.step()
    # one activation router per model; detach takes its adapters off the model
    with pytest.raises(ConfigError, match="already has activation-routing adapters"):
        gr.GradientRouter(model, sub, mode="activation")
    router.detach()
    assert not hasattr(model, ADAPTERS_ATTR)
    assert torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)
    gr.GradientRouter(model, sub, mode="activation")


def test_unfindable_residual_writes_are_named():
    model, _ = tiny_lm("llama")
    blocks = model.model.layers
    h = blocks[1].mlp.register_forward_hook(lambda m, a, out: out * 2.0)  # a write that is not a module output
    with pytest.raises(RoutingError, match="block 1"):
        gr.GradientRouter(model, _subspace(), mode="activation")
    h.remove()
    h = blocks[0].register_forward_pre_hook(lambda m, args, kw: ((args[0] * 3.0,) + args[1:], kw) if args
                                            else (args, {**kw, "hidden_states": kw["hidden_states"] * 3.0}),
                                            with_kwargs=True)
    with pytest.raises(RoutingError, match="embedding"):
        gr.GradientRouter(model, _subspace(), mode="activation")
    h.remove()


def test_state_round_trip_in_activation_mode(tmp_path):
    model, _ = tiny_lm("llama")
    sub = _subspace()
    router = gr.GradientRouter(model, sub, mode="activation")
    _train(model, router, steps=3, sub=sub)
    router.save_state(tmp_path / "st")
    x = _batch(seed=5)
    ref = model(input_ids=x).logits.detach()
    twin_model, _ = tiny_lm("llama")
    twin_model.load_state_dict({k: v for k, v in model.state_dict().items() if ADAPTERS_ATTR not in k}, strict=False)
    twin = gr.GradientRouter.from_state(twin_model, tmp_path / "st")
    assert twin.mode == "activation" and twin.steps == 3
    assert torch.allclose(twin_model(input_ids=x).logits, ref, atol=1e-6)


def test_single_environment_micro_batches_read_the_adapters_own_gradients():
    """The fast path (adapter .grad increments) gives the same per-environment gradients and
    shares as the token hooks.

    Tolerances follow float32 round-off of each compared quantity, not a fixed number: the two
    paths sum the same per-token products in a different order (the fast path also subtracts
    accumulated ``.grad`` values), so each environment's gradient agrees to a few float32 ulps of
    the gradients' scale (measured ~4e-8 relative; bound 1e-5). A share divides by Adam's
    element-wise ``√v`` and by ``⟨P, ΔA⟩``; when environments pull against each other (shares 2.6
    and −1.6 on the first step) the error scales with ``Σ|s_e|``, not with ``Σ s_e = 1``
    (measured up to 2.3e-5 on another machine of this kind; bound 1e-4·Σ|s_e|)."""
    shares, grads = [], []
    for fast in (True, False):
        model, _ = tiny_lm("llama")
        sub = _subspace()
        router = gr.GradientRouter(model, sub, mode="activation", attribution=True)
        if not fast:
            router.attribution._param_of = {}
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        router.bind_optimizer(opt)
        recs, gs = [], []
        for i in range(3):
            for j, env in enumerate(("a", "b", "a")):  # gradient accumulation, one env per micro-batch
                x = _batch(seed=10 * i + j)
                with router.attribution.batch([env] * 4):
                    (model(input_ids=x, labels=x).loss - 0.1 * _persona_loss(model, sub, x, [1, 2])).backward()
            gs.append({m: {e: g.clone() for e, g in d.items()} for m, d in router.attribution._G.items()})
            opt.step()
            recs.append(router.step())
            opt.zero_grad()
        shares.append([r.env_share for r in recs])
        grads.append(gs)
        assert set(recs[-1].attribution.grad_norm) == {"a", "b"}
    for fast, slow in zip(*grads):
        assert set(fast) == set(slow) and len(slow) > 0
        for m in slow:
            assert set(fast[m]) == set(slow[m]) == {0, 1}
            scale = sum(float(g.norm()) for g in slow[m].values())
            for e in slow[m]:
                assert float((fast[m][e] - slow[m][e]).norm()) <= 1e-5 * scale, (m, e)
    for fast, slow in zip(*shares):
        spread = sum(abs(v) for v in slow.values())
        for e in slow:
            assert fast[e] == pytest.approx(slow[e], abs=1e-4 * spread)


@pytest.mark.parametrize("envs_at", ["forward", "step"])
def test_gpt2_broadcast_position_embedding_is_attributed_per_row(envs_at):
    """GPT-2 computes ``wpe(position_ids)`` once, shape (1, T, d), and broadcasts it over the
    batch. Attribution expands it to one row per sample: each environment's in-span gradient of
    ``wpe`` (and of every other route) in a mixed batch equals the adapter gradient of a run on
    that environment's rows alone (summed losses, so rows add), read off the adapter's own
    ``.grad`` by a different code path."""
    x = _batch(seed=3, bsz=6)
    envs = ["a", "b", "a", "a", "b", "b"]

    def run(rows, env_ids, at):
        torch.manual_seed(0)
        model, _ = tiny_lm("gpt2")
        router = gr.GradientRouter(model, _subspace(), mode="activation", attribution=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        router.bind_optimizer(opt)
        xs = x[rows]

        def loss():
            logits = model(input_ids=xs).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), xs[:, 1:].reshape(-1),
                                                     reduction="sum")
        if at == "forward":
            with router.attribution.batch(env_ids):
                loss().backward()
        else:
            loss().backward()
            router.attribution._resolve_pending(env_ids)  # what router.step(env_ids=...) does first
        return {m: {e: g.clone() for e, g in d.items()} for m, d in router.attribution._G.items()}

    G = run(list(range(6)), envs, envs_at)
    wpe = next(m for m in G if m.endswith("wpe"))
    assert set(G[wpe]) == {0, 1}
    for e, name in enumerate(("a", "b")):
        rows = [i for i, v in enumerate(envs) if v == name]
        G_ref = run(rows, [name] * len(rows), "forward")  # single environment: read off .grad
        for m in G:
            ref = G_ref[m][0]
            assert float((G[m][e] - ref).norm()) <= 1e-5 * max(float(ref.norm()), 1e-12), (m, name)


# ------------------------------------------------------------------ post-norm and mixture-of-experts writes
def _tiny_hf(family: str):
    import transformers as T

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    cfg, cls = {
        "gemma2": (T.Gemma2Config(**base), T.Gemma2ForCausalLM),
        "qwen3_moe": (T.Qwen3MoeConfig(**base, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       decoder_sparse_step=1), T.Qwen3MoeForCausalLM),
    }[family]
    torch.manual_seed(0)
    return cls(cfg)


def test_post_norm_writers_are_refused_by_default_and_routed_to_first_order_on_request(tmp_path):
    model = _tiny_hf("gemma2")
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=torch.Generator().manual_seed(0))})
    for mode in ("update", "gradient", "activation"):
        with pytest.raises(RoutingError, match="post_attention_layernorm") as e:
            gr.GradientRouter(model, sub, mode=mode, check_provenance=False)
        assert "Fix:" in str(e.value) and "post_norm='exact'" in str(e.value)
    # naming the writers by hand does not get around it in the weight-splitting modes
    with pytest.raises(RoutingError, match="post-norm"):
        gr.GradientRouter(model, sub, mode="update", targets=["model.layers.1.self_attn.o_proj"],
                          check_provenance=False)
    with pytest.raises(ConfigError, match="post_norm"):
        gr.GradientRouter(model, sub, mode="activation", post_norm="approximately", check_provenance=False)
    router = gr.GradientRouter(model, sub, mode="activation", post_norm="first_order", check_provenance=False)
    assert set(router.mode_strategy.post_norm) == {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                                                   "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"}
    with pytest.raises(AdapterError, match="post-norm write"):
        gr.save_adapter(router, tmp_path / "a")
    router.save_state(tmp_path / "state")  # the option travels with the state
    router.detach()
    again = gr.GradientRouter.from_state(model, tmp_path / "state", check_provenance=False)
    assert again.mode_strategy.options["post_norm"] == "first_order" and again.mode_strategy.post_norm


def test_exact_post_norm_routing_survives_resume_and_refuses_what_it_cannot_do(tmp_path):
    """post_norm='exact': the in-span write comes from the writers frozen at attach, so (i) the
    forward at attach is the plain model's, (ii) after training a resumed router (built on the
    trained weights) reproduces the routed model's logits only because the state carries W_0,
    (iii) merging and PEFT export are refused, and nothing changed, (iv) detaching warns."""
    import copy

    from gradroute.errors import GradrouteWarning

    model = _tiny_hf("gemma2")
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=torch.Generator().manual_seed(0))})
    x = torch.randint(3, 100, (2, 8))
    plain = model(input_ids=x).logits.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradrouteWarning)  # exact: nothing to warn about
        router = gr.GradientRouter(model, sub, mode="activation", post_norm="exact", check_provenance=False)
    assert set(router.mode_strategy.frozen) == set(router.mode_strategy.post_norm) and router.mode_strategy.frozen
    assert not any("frozen" in n for n, _ in model.named_parameters())  # the copies are not the model's
    torch.testing.assert_close(model(input_ids=x).logits, plain, rtol=0, atol=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        router.step()
    routed = model(input_ids=x).logits.detach()
    w = model.model.layers[1].self_attn.o_proj.weight
    w0 = router.mode_strategy.frozen["model.layers.1.self_attn.o_proj"][0].weight
    assert (w - w0).abs().max() > 1e-4  # the writer trained freely, its copy did not
    router.save_state(tmp_path / "state")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="cannot be merged"):
        router.merge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(AdapterError, match="post-norm write"):
        gr.save_adapter(router, tmp_path / "a")
    with pytest.warns(GradrouteWarning, match="post_norm='exact'"):
        router.detach()
    trained = copy.deepcopy(model)  # plain weights now: the in-span write has moved with them
    assert (trained(input_ids=x).logits - routed).abs().max() > 1e-4
    again = gr.GradientRouter.from_state(trained, tmp_path / "state", check_provenance=False)
    torch.testing.assert_close(trained(input_ids=x).logits, routed, rtol=0, atol=1e-5)
    assert again.mode_strategy.options["post_norm"] == "exact"


def test_mixture_of_experts_blocks_are_routed_through_their_output(tmp_path):
    model = _tiny_hf("qwen3_moe")
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=torch.Generator().manual_seed(0))})
    with pytest.raises(RoutingError, match=r"'model.layers.0.mlp' .*fused expert parameters"):
        gr.GradientRouter(model, sub, mode="update", check_provenance=False)
    x = torch.randint(3, 100, (2, 8))
    plain = model(input_ids=x).logits.detach()
    router = gr.GradientRouter(model, sub, mode="activation", check_provenance=False)
    assert "model.layers.1.mlp.gradroute_write" in router.plan.modules
    experts = model.model.layers[1].mlp.experts.down_proj
    pinned = [b for b in router.mode_strategy.pinned if b.param is experts]
    assert len(pinned) == 1 and pinned[0].axis == 1  # (E, d, ffn): the stream is axis 1
    assert torch.equal(model(input_ids=x).logits, plain)  # forward unchanged at init
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    router.bind_optimizer(opt)
    before = P.coords(experts.detach().double(), router.basis("model.layers.1.mlp.gradroute_write").double(), 1)
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        router.step()
        opt.zero_grad()
    after = P.coords(experts.detach().double(), router.basis("model.layers.1.mlp.gradroute_write").double(), 1)
    assert float((after - before).abs().max()) <= 1e-6 * float(before.abs().max())  # the experts keep Ũᵀ D_e
    assert router.adapter_norm().total > 0
    with pytest.raises(AdapterError, match="mixture-of-experts"):
        gr.save_adapter(router, tmp_path / "a")
    model.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    assert not any("gradroute" in k for k in load_file(str(tmp_path / "m" / "model.safetensors")))
    router.detach()
    assert not hasattr(model.model.layers[1].mlp, "gradroute_write")


def test_exact_post_norm_copies_follow_a_dtype_change():
    """post_norm='exact''s frozen copies are not submodules: a model cast after attach (bf16, FSDP2
    mixed precision) still runs, the copies computing in their own dtype."""
    model = _tiny_hf("gemma2")
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=torch.Generator().manual_seed(0))})
    gr.GradientRouter(model, sub, mode="activation", post_norm="exact", check_provenance=False)
    x = torch.randint(3, 100, (2, 8))
    ref = model(input_ids=x).logits.detach()
    model.to(torch.bfloat16)
    out = model(input_ids=x).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.2 * ref.abs().max()
