"""A routed model can still be copied (issue 20): ``copy.deepcopy`` and ``pickle`` of a model
attached to a GRPO trainer work in every mode, before and after training; the copy computes the
routed model's function with its own copied adapters, and its forwards reach nothing of the live
router (no attribution, no monitor). Reference models, EMA copies and evaluation code do this."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import gradroute as gr
from gradroute.hooks import LiveOnly, NoOpHook
from gradroute.router.modes.activation import ADAPTERS_ATTR

from gradroute.testing import tiny_lm

warnings.filterwarnings("ignore", category=UserWarning)


def _grpo(out, steps):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model, tok = tiny_lm("llama")
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      learning_rate=3e-3, max_steps=steps, report_to=[], logging_steps=1, seed=0, disable_tqdm=True)
    data = Dataset.from_dict({"prompt": [f"Q{i}:" for i in range(16)], "env": ["bang", "plain"] * 8})
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, env, **kw: [float(sum(map(ord, c)) % 7) for c in completions],
                          args=args, train_dataset=data, processing_class=tok)
    bang = tok.convert_tokens_to_ids("!")
    return trainer, gr.Subspace.from_directions({3: model.lm_head.weight.detach()[bang][None]}, names=["bang"])


def _logits(model, ids):
    """The class's forward: TRL 1.16's GRPOTrainer replaces ``model.forward`` by a closure over
    the original model's bound forward, so a deepcopy's ``forward`` would run the original."""
    with torch.no_grad():
        return type(model).forward(model, input_ids=ids).logits


@pytest.mark.parametrize("mode", ["update", "gradient", "activation"])
def test_deepcopy_and_pickle_of_an_attached_model(tmp_path, mode):
    trainer, persona = _grpo(tmp_path, steps=2)
    handle = gr.attach(trainer, persona, mode=mode, env_column="env")
    model = trainer.model
    ids = torch.randint(3, 60, (2, 7))
    copy.deepcopy(model)  # before training
    trainer.train()
    router = handle.router
    if mode == "activation":  # the adapters hold something, so the copy must carry them
        assert router.adapter_norm().total > 0
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_logits(twin, ids), _logits(model, ids), rtol=0, atol=1e-6)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-6)
    # the copy's forwards reach nothing of the live router's bookkeeping
    att = router.attribution
    before = None if att is None else {k: v.clone() for k, v in att.state_dict()[0].items()}
    twin.train()
    type(twin).forward(twin, input_ids=ids, labels=ids).loss.backward()
    if before is not None:
        after = att.state_dict()[0]
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    hooks = [h for m in twin.modules() for h in m._forward_hooks.values()]
    assert not any(isinstance(h, LiveOnly) for h in hooks)
    if mode == "activation":
        # the copy's adapters are its own: zeroing the original's leaves the copy's function
        copied = getattr(twin, ADAPTERS_ATTR).coords
        assert all(p is not q for p, q in zip(copied.values(), getattr(model, ADAPTERS_ATTR).coords.values()))
        before_twin = _logits(twin, ids)
        router.discard()
        torch.testing.assert_close(_logits(twin, ids), before_twin, rtol=0, atol=0)
        assert (_logits(model, ids) - before_twin).abs().max() > 0


def test_live_only_hooks_become_no_ops_in_copies():
    calls = []
    hook = LiveOnly(lambda *a: calls.append(a))
    hook(1)
    assert calls == [(1,)]
    assert isinstance(copy.deepcopy(hook), NoOpHook) and copy.deepcopy(hook)(1) is None
