"""GradientRouter: invariants 2-5 on Llama, GPT-2 (Conv1D) and GPT-NeoX tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

import gradroute as gr
from gradroute import projection as P
from gradroute.errors import (
    AdapterError,
    ConfigError,
    GradrouteWarning,
    ModelMismatchError,
    NoTargetError,
    PrecisionError,
    RoutingError,
    UnsupportedModuleError,
)
from gradroute.testing import tiny_lm
from gradroute.testing import random_subspace as _subspace

STEPS = 50


def _batches(n, seed=0, bsz=4, T=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (bsz, T), generator=g) for _ in range(n)]


def _make_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)


def _train(model, opt, batches, router=None, accum=1, clip=None, sched=None, envs=None):
    """A standard loop; the router adds one call after opt.step()."""
    model.train()
    records = []
    for i in range(0, len(batches), accum):
        for x in batches[i : i + accum]:
            (model(input_ids=x, labels=x).loss / accum).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if router is not None:
            records.append(router.step(env_weights=None if envs is None else envs(len(records))))
        if sched is not None:
            sched.step()
        opt.zero_grad()
    return records


def _initial_weights(model, router):
    mods = dict(model.named_modules())
    return {t.module: mods[t.module].weight.detach().clone() for t in router.plan}


@pytest.mark.parametrize("optim,accum,clip", [("sgd", 1, None), ("adamw", 2, 1.0)])
def test_update_mode_preserves_training_exactly(arch, optim, accum, clip):
    """Invariant 2: update mode never writes the weights, so the routed run's effective weights
    equal the plain run's. The tolerance is float32 round-off (1e-6 of the weight scale); the
    measured difference is exactly 0 because the training arithmetic is unchanged."""
    model, _ = tiny_lm(arch)
    plain = copy.deepcopy(model)
    sub = _subspace()
    batches = _batches(STEPS * accum)
    opt, opt_p = _make_opt(optim, model.parameters()), _make_opt(optim, plain.parameters())
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=STEPS)
    sched_p = torch.optim.lr_scheduler.LinearLR(opt_p, 1.0, 0.1, total_iters=STEPS)
    router = gr.GradientRouter(model, sub, mode="update", optimizer=opt)
    W0 = _initial_weights(model, router)
    recs = _train(model, opt, batches, router, accum, clip, sched)
    _train(plain, opt_p, batches, None, accum, clip, sched_p)
    assert router.steps == STEPS and all(r is not None for r in recs)
    for (n, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max(), n
    # effective = base + adapter, per routed module, to round-off
    mods = dict(model.named_modules())
    for t in router.plan:
        W = mods[t.module].weight.detach()
        eff = router.base_weight(t.module) + router.adapter_delta(t.module)
        assert (eff - W).abs().max() <= 1e-6 * W.abs().max()
    # invariant 3: no in-subspace change in the base; the adapter lies in span(U)
    for name, res in router.base_in_subspace_residue(W0).items():
        assert res <= 1e-5, (name, res)
    for t in router.plan:
        delta = router.adapter_delta(t.module)
        U = router.basis(t.module)
        assert (P.project(delta, U, t.axis) - delta).abs().max() <= 1e-6 * delta.abs().max()
        # the adapter is the whole in-subspace part of the fine-tuning delta
        W = mods[t.module].weight.detach()
        assert torch.allclose(P.project((W - W0[t.module]).double(), U, t.axis), delta, atol=1e-6)
    assert router.adapter_norm().total > 0


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_gradient_mode_keeps_base_out_of_the_subspace(arch, optim):
    model, _ = tiny_lm(arch)
    sub = _subspace()
    opt = _make_opt(optim, model.parameters())
    router = gr.GradientRouter(model, sub, mode="gradient", optimizer=opt, adapter_lr_multiplier=2.0)
    W0 = _initial_weights(model, router)
    losses = []
    model.train()
    for i, x in enumerate(_batches(40)):
        for half in (x[:2], x[2:]):  # gradient accumulation 2
            loss = model(input_ids=half, labels=half).loss / 2
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        router.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert router.steps == 40
    res = router.base_in_subspace_residue(W0)
    assert max(res.values()) <= 1e-5, res
    assert router.adapter_norm().total > 0
    # the adapter optimizer follows the main LR times the multiplier
    assert router.adapter_optimizer.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"] * 2.0)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_gradient_mode_adapter_absorbs_learning_that_lives_only_in_the_subspace(optim):
    """A loss that depends only on Uᵀh at layer 1, trained through block 1's last writer (its
    MLP down projection, whose output reaches layer 1 directly). The loss is minimized, yet the
    base keeps its in-subspace coordinates, so discarding the adapter restores the initial loss
    exactly: all of that learning sits in the adapter. (With SGD the base does not move at all;
    Adam turns float32 round-off in the orthogonal gradient into small orthogonal steps.)"""
    model, _ = tiny_lm("llama")
    sub = _subspace(layers=(1,), k=(2,))
    U = sub.basis(1)
    writer = "model.layers.1.mlp.down_proj"
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(writer))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(trainable, lr=0.05) if optim == "sgd"
           else torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1))
    router = gr.GradientRouter(model, sub, mode="gradient", optimizer=opt, targets=[writer], adapter_lr=0.5)
    W0 = _initial_weights(model, router)
    from gradroute.model import residual_hooks

    captured = {}
    target = torch.tensor([3.0, -2.0])
    x = _batches(1)[0]

    def loss_now():
        model(input_ids=x)
        return (P.coords(captured[1], U) - target).pow(2).mean()

    losses = []
    with residual_hooks(model, [1], lambda L, h: captured.__setitem__(L, h)):
        for _ in range(60):
            loss = loss_now()
            loss.backward()
            opt.step()
            router.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.05 * losses[0], losses[::10]
        assert max(router.base_in_subspace_residue(W0).values()) <= 1e-5
        if optim == "sgd":  # the base moved only by the float32 rounding of the stored weights
            W_eff = dict(model.named_modules())[writer].weight.detach()
            eps = torch.finfo(torch.float32).eps
            assert (router.base_weight(writer) - W0[writer].double()).abs().max() <= 4 * eps * W_eff.abs().max()
        router.discard()
        with torch.no_grad():
            after = float(loss_now())
    assert after == pytest.approx(losses[0], rel=1e-4)


def test_env_split_sums_to_total_and_drops_exactly(arch):
    model, tok = tiny_lm(arch)
    sub = _subspace()
    opt = _make_opt("adamw", model.parameters())
    router = gr.GradientRouter(model, sub, optimizer=opt)
    g = torch.Generator().manual_seed(5)

    def shares(i):
        if i < 3:
            return None  # before attribution starts: "_unattributed"
        a = float(torch.rand((), generator=g)) * 1.6 - 0.3  # may be negative
        return {"math": a, "hack": 1.0 - a}

    _train(model, opt, _batches(12), router, envs=shares)
    assert set(router.envs) == {"_unattributed", "math", "hack"}
    for t in router.plan:
        total = router.adapter_coords(t.module).double()
        parts = sum(router.adapter_coords(t.module, e).double() for e in router.envs)
        assert torch.allclose(parts, total, rtol=1e-6, atol=1e-7 * float(total.abs().max()))
    # dropping one environment removes exactly its share
    x = _batches(1, seed=9)[0]
    mods = dict(model.named_modules())
    expected = {t.module: mods[t.module].weight.detach() - router.adapter_delta(t.module, "hack") for t in router.plan}
    hack_norm = router.adapter_norm("hack").total
    removed = router.discard(env="hack")
    assert removed == pytest.approx(hack_norm)
    assert "hack" not in router.envs
    for t in router.plan:
        assert torch.allclose(mods[t.module].weight.detach().double(), expected[t.module], atol=1e-6)
        rest = sum(router.adapter_coords(t.module, e).double() for e in router.envs)
        assert torch.allclose(rest, router.adapter_coords(t.module).double(), atol=1e-6)
    with torch.no_grad():
        model.eval()
        model(input_ids=x)  # still a working model


def test_step_records_and_per_module_shares():
    model, _ = tiny_lm("llama")
    opt = _make_opt("adamw", model.parameters())
    router = gr.GradientRouter(model, _subspace(), optimizer=opt)
    mods = router.plan.modules
    per_module = {"a": {m: (1.0 if i % 2 else 0.25) for i, m in enumerate(mods)},
                  "b": {m: (0.0 if i % 2 else 0.75) for i, m in enumerate(mods)}}
    rec = _train(model, opt, _batches(1), router, envs=lambda i: per_module)[0]
    assert rec.step == 1 and rec.update_norm > 0 and rec.adapter_norm == pytest.approx(rec.update_norm)
    assert set(rec.update_norm_per_layer) == {1, 2}
    assert sum(rec.env_share.values()) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="sum to"):
        router.env_split.parse({"a": 0.5, "b": 0.4})
    with pytest.raises(ConfigError, match="mixes"):
        router.env_split.parse({"a": 0.5, "b": {mods[0]: 0.5}})


def test_no_double_counting():
    model, _ = tiny_lm("gpt2")
    opt = _make_opt("adamw", model.parameters())
    router = gr.GradientRouter(model, _subspace(), optimizer=opt)
    _train(model, opt, _batches(2), router)
    A = {m: router.adapter_coords(m) for m in router.plan.modules}
    with pytest.warns(GradrouteWarning, match="has not stepped"):
        assert router.step() is None
    assert router.steps == 2
    assert all(torch.equal(A[m], router.adapter_coords(m)) for m in A)
    # without a bound optimizer, an unchanged model is detected too
    unbound = gr.GradientRouter(model, _subspace())
    with pytest.warns(GradrouteWarning, match="did not change"):
        assert unbound.step() is None


def test_discard_and_merge(arch):
    model, _ = tiny_lm(arch)
    opt = _make_opt("adamw", model.parameters())
    router = gr.GradientRouter(model, _subspace(), optimizer=opt)
    W0 = _initial_weights(model, router)
    _train(model, opt, _batches(5), router)
    mods = dict(model.named_modules())
    W_T = {m: mods[m].weight.detach().clone() for m in router.plan.modules}
    router.merge()  # accept: weights unchanged, adapter empty, base now includes it
    assert router.adapter_norm().total == 0
    assert all(torch.equal(mods[m].weight, W_T[m]) for m in W_T)
    _train(model, opt, _batches(5, seed=1), router)
    pre = {m: router.base_weight(m).float() for m in router.plan.modules}
    router.discard()
    for m in router.plan.modules:
        assert torch.allclose(mods[m].weight.detach(), pre[m], atol=1e-6)
        U = router.basis(m)
        axis = router.plan[m].axis
        # after merge + more training + discard: in-subspace coordinates are those after merge
        assert torch.allclose(P.coords(mods[m].weight.detach().double(), U, axis),
                              P.coords(W_T[m].double(), U, axis), atol=1e-5)
    assert router.adapter_norm().total == 0 and W0  # router keeps working after discard
    _train(model, opt, _batches(2, seed=2), router)
    assert router.adapter_norm().total > 0


def test_state_roundtrip_and_from_state(tmp_path):
    model, _ = tiny_lm("llama")
    opt = _make_opt("adamw", model.parameters())
    router = gr.GradientRouter(model, _subspace(), mode="gradient", optimizer=opt)
    _train(model, opt, _batches(4), router, envs=lambda i: {"x": 0.5, "y": 0.5})
    router.save_state(tmp_path / "state")
    twin = gr.GradientRouter.from_state(model, tmp_path / "state")
    assert twin.plan.fingerprint() == router.plan.fingerprint() and twin.steps == 4
    assert twin.envs == router.envs
    for m in router.plan.modules:
        assert torch.equal(twin.adapter_coords(m), router.adapter_coords(m))
        assert torch.equal(twin.adapter_coords(m, "x"), router.adapter_coords(m, "x"))
    assert twin.adapter_optimizer.state_dict()["state"].keys() == router.adapter_optimizer.state_dict()["state"].keys()
    other = gr.GradientRouter(model, _subspace(seed=1))
    with pytest.raises(AdapterError, match="another routing plan or subspace"):
        other.load_state(tmp_path / "state")


def test_bfloat16_weights():
    model, _ = tiny_lm("llama")
    model = model.to(torch.bfloat16)
    with pytest.raises(PrecisionError, match="tolerance"):
        gr.GradientRouter(model, _subspace(), mode="gradient", tolerance=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    router = gr.GradientRouter(model, _subspace(), mode="update", optimizer=opt)
    assert router.tolerance == pytest.approx(1e-2)
    W0 = _initial_weights(model, router)
    _train(model, opt, _batches(5), router)
    # bookkeeping in float64: the shadow base is exact; materialized in bf16 it is only as
    # exact as bf16 storage (what the tolerance check at construction guards)
    assert router.adapter_coords(router.plan.modules[0]).dtype == torch.float64
    assert max(router.base_in_subspace_residue(W0).values()) <= 1e-6
    assert max(router.base_in_subspace_residue(W0, materialized=True).values()) <= router.tolerance


def test_bad_input():
    model, _ = tiny_lm("llama")  # 4 blocks, d = 64
    with pytest.raises(ModelMismatchError, match="hidden size is 64"):
        gr.GradientRouter(model, _subspace(d=32))
    with pytest.raises(NoTargetError, match="layer 3 has a basis but no read-side"):
        gr.GradientRouter(model, _subspace(layers=(3,), k=(1,)), side="read")
    with pytest.raises(NoTargetError, match="embeddings=True"):
        gr.GradientRouter(model, _subspace(layers=(-1,), k=(1,)))
    with pytest.raises(UnsupportedModuleError, match="RMSNorm"):
        gr.GradientRouter(model, _subspace(), targets={"model.layers.1.input_layernorm": (1, "write")})
    with pytest.raises(NoTargetError, match="no module matches"):
        gr.GradientRouter(model, _subspace(), targets=["model.layers.*.nope"])
    with pytest.raises(ConfigError, match="mode"):
        gr.GradientRouter(model, _subspace(), mode="blocking")
    with pytest.raises(RoutingError, match="routed twice"):
        gr.GradientRouter(model, _subspace(layers=(-1,), k=(1,)), targets={"model.embed_tokens": (-1, "embed")},
                          embeddings=True)
    with pytest.raises(NoTargetError, match="reader of block 1\\) needs the basis of layer 0"):
        gr.GradientRouter(model, _subspace(), targets=["model.layers.1.self_attn.q_proj"], side="read")
    router = gr.GradientRouter(model, _subspace(), mode="gradient")  # no optimizer bound
    x = _batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with pytest.raises(RoutingError, match="optimizer="):
        router.step()


def test_plan_options_and_summary():
    model, _ = tiny_lm("llama")
    sub = _subspace(layers=(-1, 1), k=(1, 2))
    plan = gr.build_plan(model, sub, side="both", embeddings=True)
    sides = {t.module: t.side for t in plan}
    assert sides["model.embed_tokens"] == "embed"
    assert sides["model.layers.1.self_attn.o_proj"] == "write"
    assert sides["model.layers.2.mlp.up_proj"] == "read"           # reads layer 1
    assert sides["model.layers.0.self_attn.q_proj"] == "read"       # reads layer -1
    assert not any(t.bias for t in plan)
    text = plan.summary()
    assert "model.embed_tokens" in text and "adapter parameters" in text
    # spread: layer 1's basis also covers blocks 0 and 2
    spread = gr.build_plan(model, _subspace(layers=(1,), k=(2,)), spread=1)
    assert {t.block for t in spread} == {0, 1, 2} and {t.layer for t in spread} == {1}
    # GPT-2 writers have biases: routed (and exported with lora_bias) by default
    g2, _ = tiny_lm("gpt2")
    assert all(t.bias and t.kind == "conv1d" and t.axis == 1 for t in gr.build_plan(g2, _subspace()))
    # explicit globs
    globbed = gr.build_plan(model, _subspace(), targets=["model.layers.[12].mlp.down_proj"])
    assert globbed.modules == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]


def test_interventions_restore_in_reverse_order():
    from gradroute.interventions import ablate

    model, _ = tiny_lm("llama")
    sub = _subspace()
    W = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    with ablate(model, sub, 1, writers=["model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]):
        pass
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight, W)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_update_mode_accounts_a_user_lora_policy(arch):
    """A PEFT LoRA policy: the adapter is the in-subspace part of the effective update
    U Uᵀ(s·B_t·A_t − s·B_0·A_0); discard leaves the effective weights without it."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_lm(arch)
    targets = ["o_proj", "down_proj", "q_proj"] if arch == "llama" else ["c_proj", "c_attn"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                          fan_in_fan_out=arch == "gpt2"))
    sub = _subspace()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    router = gr.GradientRouter(pm, sub, optimizer=opt)
    modules = dict(router.model.base_model.model.named_modules())
    eff0 = {m: (modules[m].base_layer.weight.detach().double() +
                modules[m].get_delta_weight("default").double()) for m in router.plan.modules}
    _train(pm, opt, _batches(6), router)
    assert router.adapter_norm().total > 0
    for t in router.plan:
        mod = modules[t.module]
        eff = mod.base_layer.weight.detach().double() + mod.get_delta_weight("default").double()
        U = router.basis(t.module).double()
        expected = P.coords(eff - eff0[t.module], U, t.axis)
        assert torch.allclose(router.adapter_coords(t.module), expected, atol=1e-9)
        # the base (effective minus adapter) has no in-subspace change
        base = router.base_weight(t.module).double()
        assert P.relative_in_subspace_norm(base - eff0[t.module], U, t.axis) <= 1e-5
    x = _batches(1, seed=9)[0]
    router.discard()
    for t in router.plan:
        mod = modules[t.module]
        eff = mod.base_layer.weight.detach().double() + mod.get_delta_weight("default").double()
        U = router.basis(t.module).double()
        assert float(P.coords(eff - eff0[t.module], U, t.axis).norm()) <= 1e-5 * float((eff - eff0[t.module]).norm())
    assert pm(input_ids=x).logits.isfinite().all()


def test_a_plan_with_nothing_trainable_is_refused():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_lm("llama")
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0))  # readers only
    with pytest.raises(RoutingError, match="nothing trainable is routed"):
        gr.GradientRouter(pm, _subspace())


def test_the_routers_integration_methods_are_deprecated_delegators(tmp_path):
    """router.save_adapter / save_discarded / callback still work, warn, and do what the
    integration functions they delegate to do (the core itself imports no integration)."""
    import warnings

    from safetensors.torch import load_file

    model, _ = tiny_lm("llama")
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=torch.Generator().manual_seed(0))})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    router = gr.GradientRouter(model, sub, optimizer=opt)
    x = torch.randint(3, 100, (2, 6))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    router.step()
    with pytest.warns(DeprecationWarning, match=r"gradroute.save_adapter\(router, path"):
        old = router.save_adapter(tmp_path / "old", base="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = gr.save_adapter(router, tmp_path / "new", base="none")
    a, b = load_file(str(old / "adapter_model.safetensors")), load_file(str(new / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.warns(DeprecationWarning, match=r"gradroute.RouterCallback\(router\)"):
        cb = router.callback()
    assert isinstance(cb, gr.RouterCallback) and cb.router is router
