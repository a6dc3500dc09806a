"""Per-environment attribution on constructed cases where the answer is known."""

from __future__ import annotations

import copy

import pytest
import torch

import gradroute as gr
from gradroute import projection as P
from gradroute.errors import ConfigError, EnvColumnError
from gradroute.model import residual_hooks
from gradroute.testing import tiny_lm

LAYER = 1


def _setup(arch="llama", optim="adamw", mode="update", envs=("sub", "orth"), k=2, only_writers=True):
    model, _ = tiny_lm(arch)
    g = torch.Generator().manual_seed(0)
    sub = gr.Subspace.from_directions({LAYER: torch.randn(k, 64, generator=g)})
    if only_writers:  # make the known answer exact: only block LAYER's last writer trains
        writer = {"llama": "model.layers.1.mlp.down_proj", "gpt2": "transformer.h.1.mlp.c_proj",
                  "gpt_neox": "gpt_neox.layers.1.mlp.dense_4h_to_h"}[arch]
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(writer))
        targets = [writer]
    else:
        targets = None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1) if optim == "adamw"
           else torch.optim.SGD(params, lr=0.1, momentum=0.9 if optim == "sgdm" else 0.0))
    router = gr.GradientRouter(model, sub, mode=mode, optimizer=opt, envs=list(envs), targets=targets)
    return model, sub, opt, router


def _loss_by_env(model, U, x, env, captured):
    """Rows of env 'sub' regress Uᵀh; rows of env 'orth' regress the orthogonal part of h."""
    model(input_ids=x)
    h = captured[LAYER]
    is_sub = torch.tensor([e == "sub" for e in env])
    in_sub = P.coords(h[is_sub], U) - 1.0
    orth = P.remove(h[~is_sub], U) - 0.5
    return in_sub.pow(2).mean() + orth.pow(2).mean()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("optim,mode", [("adamw", "update"), ("sgd", "update"), ("sgdm", "update"),
                                        ("adamw", "gradient")])
def test_subspace_env_gets_everything_orthogonal_env_nothing(arch, optim, mode):
    model, sub, opt, router = _setup(arch, optim, mode)
    U = sub.basis(LAYER)
    captured = {}
    g = torch.Generator().manual_seed(1)
    with residual_hooks(model, [LAYER], lambda L, h: captured.__setitem__(L, h)):
        for _ in range(6):
            x = torch.randint(3, 100, (4, 8), generator=g)
            env = ["sub", "orth", "orth", "sub"]
            with router.attribution.batch(env):
                loss = _loss_by_env(model, U, x, env, captured)
            loss.backward()
            opt.step()
            rec = router.step()
            opt.zero_grad()
            a = rec.attribution
            # the orthogonal environment's in-subspace gradient is exactly zero (to round-off)
            assert a.grad_norm.get("orth", 0.0) <= 1e-6 * a.grad_norm["sub"]
            assert rec.env_share["sub"] == pytest.approx(1.0, abs=1e-6)
            assert a.samples == {"sub": 2.0, "orth": 2.0}
    shares = router.env_adapter_shares()
    assert shares["sub"] == pytest.approx(1.0, abs=1e-6)
    assert router.adapter_norm("orth").total <= 1e-6 * router.adapter_norm().total


def test_shares_sum_to_one_and_adapters_sum_to_total():
    """Both environments push inside the subspace; invariant 5 holds step by step."""
    model, sub, opt, router = _setup(envs=("a", "b"), only_writers=False)
    g = torch.Generator().manual_seed(2)
    for i in range(8):
        x = torch.randint(3, 100, (4, 10), generator=g)
        with router.attribution.batch(["a", "b", "b", "b"] if i % 2 else ["a", "a", "a", "b"]):
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        rec = router.step()
        opt.zero_grad()
        for module in router.plan.modules:
            s = sum(w.get(module, 0.0) for w in rec.attribution.env_weights.values())
            assert s == pytest.approx(1.0, abs=1e-9)
        assert sum(rec.env_share.values()) == pytest.approx(1.0, abs=1e-9)
    for m in router.plan.modules:
        total = router.adapter_coords(m)
        assert torch.allclose(sum(router.adapter_coords(m, e) for e in router.envs), total, atol=1e-9)
    assert sum(router.env_adapter_shares().values()) == pytest.approx(1.0, abs=1e-9)


def test_gradients_match_autograd_and_accumulation_and_checkpointing():
    """Σ_e G_e equals Uᵀ∇W; the same with gradient accumulation and gradient checkpointing."""
    def grads(checkpointing, micro):
        model, sub, opt, router = _setup(envs=("a", "b"), only_writers=False, optim="sgd")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        g = torch.Generator().manual_seed(3)
        x = torch.randint(3, 100, (4, 10), generator=g)
        env = ["a", "b", "a", "b"]
        for s in range(0, 4, 4 // micro):
            with router.attribution.batch(env[s : s + 4 // micro]):
                (model(input_ids=x[s : s + 4 // micro], labels=x[s : s + 4 // micro]).loss / micro).backward()
        G = {m: {e: router.attribution._G[m][i].clone() for i, e in enumerate(router.attribution.vocab)
                 if i in router.attribution._G[m]} for m in router.plan.modules}
        mods = dict(model.named_modules())
        true = {t.module: P.coords(mods[t.module].weight.grad.double(), router.basis(t.module), t.axis)
                for t in router.plan}
        return G, true
    G, true = grads(False, 1)
    for m in G:
        assert torch.allclose(sum(G[m].values()).double(), true[m], atol=1e-5)
    for ckpt, micro in [(False, 2), (True, 1), (True, 2)]:
        G2, true2 = grads(ckpt, micro)
        for m in G:
            for e in G[m]:
                assert torch.allclose(G2[m][e], G[m][e], atol=1e-5), (ckpt, micro, m, e)


def test_env_ids_at_step_time_and_generation_passes_are_ignored():
    """DESIGN's plain loop: router.step(env_ids=...) after the fact; no-grad passes don't count."""
    model, sub, opt, router = _setup(envs=("a", "b"), only_writers=False)
    twin, _, opt2, router2 = _setup(envs=("a", "b"), only_writers=False)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(3, 100, (4, 10), generator=g)
    env = ["b", "a", "a", "b"]
    with torch.no_grad():
        model(input_ids=x)  # a generation/reference pass: ignored
    model.eval()
    model(input_ids=x, labels=x)  # eval mode: ignored
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    late = router.step(env_ids=env)
    opt.zero_grad()
    with router2.attribution.batch(env):
        twin(input_ids=x, labels=x).loss.backward()
    opt2.step()
    early = router2.step()
    for e in ("a", "b"):
        assert late.env_share[e] == pytest.approx(early.env_share[e], abs=1e-5)  # summation order
        assert late.attribution.samples[e] == 2.0


def test_activation_projection_and_rewards():
    model, sub, opt, router = _setup(envs=("a", "b"), only_writers=False)
    U = sub.basis(LAYER)
    x = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    caught = {}
    with torch.no_grad(), residual_hooks(model, [LAYER], lambda L, h: caught.__setitem__(L, h)):
        model(input_ids=x, attention_mask=mask)
    c = P.coords(caught[LAYER], U)
    expect_a = c[0, :4].mean(0)  # live tokens only
    expect_b = c[1].mean(0)
    with router.attribution.batch(["a", "b"]):
        model(input_ids=x, attention_mask=mask, labels=x).loss.backward()
    router.attribution.record_rewards(["a", "b", "b"], [1.0, 0.0, 0.5])
    opt.step()
    a = router.step().attribution
    assert a.reward == {"a": 1.0, "b": 0.25}
    assert torch.allclose(torch.tensor(a.activation["a"][LAYER]), expect_a, atol=1e-5)
    assert torch.allclose(torch.tensor(a.activation["b"][LAYER]), expect_b, atol=1e-5)
    assert a.activation_norm["a"][LAYER] == pytest.approx(float(expect_a.norm()), rel=1e-5)


def test_bad_env_input():
    model, sub, opt, router = _setup(envs=("a", "b"), only_writers=False)
    with pytest.raises(EnvColumnError, match="not among the declared"):
        router.attribution.set_batch(["a", "zzz"])
    x = torch.randint(3, 100, (4, 6))
    with pytest.raises(EnvColumnError, match="3 environment ids for a batch of 4"):
        with router.attribution.batch(["a", "b", "a"]):
            model(input_ids=x)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    with pytest.raises(EnvColumnError, match="without environment ids"):
        router.step()
    plain = gr.GradientRouter(tiny_lm("llama")[0], sub)
    with pytest.raises(ConfigError, match="attribution=True"):
        plain.step(env_ids=["a"])
    with pytest.raises(ConfigError, match="duplicate"):
        gr.GradientRouter(tiny_lm("llama")[0], sub, envs=["a", "a"])


def test_a_failed_step_changes_nothing_and_can_be_retried():
    """Missing env ids raise before any state changes; the retry with ids accounts the step."""
    model, sub, opt, router = _setup(envs=("a", "b"), only_writers=False)
    x = torch.randint(3, 100, (4, 8), generator=torch.Generator().manual_seed(7))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    A = {m: router.adapter_coords(m) for m in router.plan.modules}
    with pytest.raises(EnvColumnError, match="without environment ids"):
        router.step()
    with pytest.raises(EnvColumnError, match="got 3 ids but the step ran 4 rows"):
        router.step(env_ids=["a", "b", "a"])
    assert router.steps == 0 and all(torch.equal(A[m], router.adapter_coords(m)) for m in A)
    rec = router.step(env_ids=["a", "b", "a", "b"])
    assert rec.update_norm > 0 and router.steps == 1
    for m in router.plan.modules:
        parts = sum(router.adapter_coords(m, e) for e in router.envs)
        assert torch.allclose(parts, router.adapter_coords(m), atol=1e-9)
    assert set(router.envs) == {"a", "b"}


def test_explicit_env_weights_drop_what_the_hooks_captured():
    model, sub, opt, router = _setup(envs=("a", "b"), only_writers=False)
    x = torch.randint(3, 100, (2, 8))
    with router.attribution.batch(["a", "b"]):
        model(input_ids=x, labels=x).loss.backward()
    opt.step()
    router.step(env_weights={"a": 1.0})
    assert not router.attribution._G and not router.attribution._rows and router.attribution._ctx is None


def test_float64_weights_with_mixed_environment_batches():
    """Token-level capture (a micro-batch mixing environments) on float64 weights: the sums are
    float32 like the rest of the bookkeeping (was: a dtype mismatch in the contraction)."""
    model, _ = tiny_lm("llama")
    model.double()
    sub = gr.Subspace.from_directions({LAYER: torch.randn(1, 64, generator=torch.Generator().manual_seed(0))})
    for mode in ("update", "activation"):
        m = copy.deepcopy(model)
        router = gr.GradientRouter(m, sub, mode=mode, envs=["a", "b"], check_provenance=False)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        router.bind_optimizer(opt)
        x = torch.randint(3, 100, (4, 8), generator=torch.Generator().manual_seed(1))
        with router.attribution.batch(["a", "b", "a", "b"]):
            m(input_ids=x, labels=x).loss.backward()
        opt.step()
        rec = router.step()
        assert set(rec.samples) == {"a", "b"} and abs(sum(rec.env_share.values()) - 1.0) < 1e-6
