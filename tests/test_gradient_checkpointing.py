"""Gradient checkpointing (issue 20): with ``model.gradient_checkpointing_enable()`` the forward
hooks of the routed writers run twice per micro-batch (forward, then the recompute in backward),
yet a routed training step gives the same base, adapter and per-environment attribution as
without it — nothing is routed or counted twice.

Why it holds (transformers 5.23/5.24 checkpoint a decoder layer's ``forward``, not its
``__call__``, non-reentrant by default): activation mode's writer hook is a pure function of
the writer's input and output, so the recompute rebuilds the same tensors; attribution's tensor
hooks on a recomputed output never fire, since the gradient flows through the original graph
(non-reentrant), or the original forward ran without gradients so the hooks were inactive
(reentrant); the residual-stream hooks sit on the decoder layers, outside the checkpoint; rows
are counted once, at the model's own forward pre-hook."""

from __future__ import annotations

import warnings

import pytest
import torch

import gradroute as gr
from gradroute.testing import tiny_lm

ENVS = (["a", "a", "b", "b"], ["b", "b", "b", "b"], ["a", "b", "b", "b"])  # mixed, single-env, mixed


def _sub() -> gr.Subspace:
    g = torch.Generator().manual_seed(0)
    return gr.Subspace.from_directions({L: torch.randn(k, 64, generator=g) for L, k in ((1, 2), (2, 3))})


def _run(arch: str, mode: str, checkpointing: bool, reentrant: bool = False, ids_at_step: bool = False,
         steps: int = 3):
    """``steps`` AdamW steps of 2 micro-batches (gradient accumulation), with per-environment
    attribution; returns (model, router, records, forward calls of one routed writer)."""
    model, _ = tiny_lm(arch)
    model.train()
    router = gr.GradientRouter(model, _sub(), mode=mode, envs=["a", "b"], check_provenance=False)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5.24: alias of activation_checkpointing_enable
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = [0]
    writer = next(t.module for t in router.plan if t.side == "write")
    model.get_submodule(writer).register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    router.bind_optimizer(opt)
    g = torch.Generator().manual_seed(1)
    records = []
    for i in range(steps):
        step_envs = []
        for micro in range(2):
            x = torch.randint(3, 100, (4, 10), generator=g)
            envs = ENVS[(i + micro) % len(ENVS)]
            if ids_at_step:
                (model(input_ids=x, labels=x).loss / 2).backward()
                step_envs += envs
            else:
                with router.attribution.batch(envs):
                    (model(input_ids=x, labels=x).loss / 2).backward()
        opt.step()
        records.append(router.step(env_ids=step_envs) if ids_at_step else router.step())
        opt.zero_grad()
    return model, router, records, calls[0]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b)) + 1e-12


CASES = [(arch, mode, reentrant, False) for arch in ("llama", "gpt2") for mode in ("update", "activation")
         for reentrant in (False, True)] + [("llama", mode, False, True) for mode in ("update", "activation")]


@pytest.mark.parametrize("arch,mode,reentrant,ids_at_step", CASES)
def test_checkpointing_routes_and_attributes_exactly_once(arch, mode, reentrant, ids_at_step):
    plain, r0, rec0, calls0 = _run(arch, mode, False, ids_at_step=ids_at_step)
    ckpt, r1, rec1, calls1 = _run(arch, mode, True, reentrant, ids_at_step=ids_at_step)
    assert calls1 == 2 * calls0 == 2 * 6  # the writers' forward hooks really ran twice per micro-batch
    # the same base (every parameter, adapters included) ...
    for (n, p0), (_, p1) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(p1, p0, rtol=1e-6, atol=1e-8), n
    # ... the same adapter, and the same per-environment shares of it
    assert r0.adapter_norm().total > 0
    assert set(r1.envs) == set(r0.envs) == {"a", "b"}
    for m in r0.plan.modules:
        assert torch.allclose(r1.adapter_coords(m), r0.adapter_coords(m), rtol=1e-6, atol=1e-12), m
        for e in r0.envs:
            assert torch.allclose(r1.adapter_coords(m, e), r0.adapter_coords(m, e), rtol=1e-5, atol=1e-12), (m, e)
        # invariant 5 under checkpointing: the environments' shares sum to the adapter
        total = sum(r1.adapter_coords(m, e) for e in r1.envs)
        assert torch.allclose(total, r1.adapter_coords(m), atol=1e-9), m
    # ... and the same per-step attribution: nothing counted twice
    for a, b in zip(rec0, rec1):
        assert a.samples == b.samples and sum(b.samples.values()) == 8  # 2 micro-batches x 4 rows
        for name in ("env_share", "grad_norm"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.keys() == y.keys() and all(_close(x[e], y[e]) for e in x), (name, x, y)
        for e, layers in a.activation_norm.items():
            assert all(_close(v, b.activation_norm[e][L]) for L, v in layers.items()), (e, layers, b.activation_norm)
        assert _close(a.update_norm, b.update_norm) and _close(a.adapter_norm, b.adapter_norm)


def test_trainer_gradient_checkpointing_with_activation_routing(tmp_path):
    """The realistic path: ``TrainingArguments(gradient_checkpointing=True)`` enables checkpointing
    inside ``train()``, after ``gr.attach`` hooked the model."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    out = []
    for checkpointing in (False, True):
        model, _ = tiny_lm("llama")
        ids = torch.randint(3, 100, (8, 8), generator=torch.Generator().manual_seed(0)).tolist()
        ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "env": ["a", "b"] * 4})
        args = TrainingArguments(output_dir=str(tmp_path / str(checkpointing)), max_steps=2, per_device_train_batch_size=4,
                                 report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                 gradient_checkpointing=checkpointing, learning_rate=1e-3)
        trainer = Trainer(model=model, args=args, train_dataset=ds)
        handle = gr.attach(trainer, _sub(), env_column="env", mode="activation", check_provenance=False)
        trainer.train()
        assert getattr(model.model.layers[0], "gradient_checkpointing", False) is checkpointing
        r = handle.router
        assert r.adapter_norm().total > 0 and r.steps == 2
        out.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                    {m: r.adapter_coords(m) for m in r.plan.modules}, r.env_adapter_shares()))
    (w0, a0, s0), (w1, a1, s1) = out
    assert all(torch.allclose(w1[n], w0[n], rtol=1e-6, atol=1e-8) for n in w0)
    assert all(torch.allclose(a1[m], a0[m], rtol=1e-6, atol=1e-12) for m in a0)
    assert s0.keys() == s1.keys() == {"a", "b"} and all(_close(s0[e], s1[e]) for e in s0)
